"""Every collective of a training step, with its tensors' devices, on dp2, tp2 and cp2 (gloo).

The step must be legal under NCCL: every tensor a collective of the step carries lives on the
model's device (NCCL has no CPU backend). To make that visible on a CPU, the step runs with
``meta`` as the default device: a tensor made without an explicit device (the bug: CPU tensors
all-reduced through NCCL) becomes a meta tensor and shows up in the record. The step also reads no
value back to the host (no ``.item()``/``float()``), and issues a fixed number of collectives.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed
from recorder import CollectiveRecorder, HostSyncCounter

from emu3_train.optim import build_optimizer, build_scheduler
from emu3_train.recipes import compose
from emu3_train.trainer import Trainer

LAYERS = 2
BASE = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=128",
        f"model.num_layers={LAYERS}", "model.hidden_size=64", "model.intermediate_size=128",
        "data.global_batch_size=4", "optim.warmup_steps=1", "checkpoint.async_save=false"]


def _record(rank, world, data, run_dir, overrides):
    cfg = compose([*BASE, f"data.path={data}", *overrides])
    t = Trainer(cfg, run_dir, rank, world)
    t.setup()
    # the fused AdamW (CUDA's) decides on the device whether to apply a step: no host read
    t.optimizer = build_optimizer(t.model, cfg.optim, fused=True)
    t.scheduler = build_scheduler(t.optimizer, cfg.optim, cfg.trainer.max_steps)
    t.step_once()  # FSDP2's lazy init and first-step allocations are not part of a steady step
    batches = [next(t.loader) for _ in range(t.accum)]
    with CollectiveRecorder() as rec, HostSyncCounter() as syncs, torch.device("meta"):
        t.step_once(batches)
    loss = t.read_window()[-1]["train/loss"]
    t.loader.close()
    return {"calls": rec.calls, "syncs": syncs.where, "device": t.plan.device.type, "loss": loss,
            "accum": t.accum}


@pytest.mark.parametrize("layout", [["parallel.dp=2", "data.micro_batch_size=1"],
                                    ["parallel.tp=2", "parallel.dp=1", "data.micro_batch_size=2"],
                                    ["parallel.cp=2", "parallel.dp=1", "data.micro_batch_size=2"]],
                         ids=["dp2", "tp2", "cp2"])
def test_step_collectives_are_on_the_model_device_and_never_sync(data, tmp_path, layout):
    for r in run_distributed(_record, 2, (data, tmp_path / "run", layout)):
        assert not r["syncs"], "the step read a tensor's value on the host:\n" + "\n".join(r["syncs"])
        bad = [c for c in r["calls"] if any(d != r["device"] for d in c.devices)]
        assert not bad, f"collectives with tensors off the model's device ({r['device']}): {bad}"
        assert r["loss"] == r["loss"]  # finite and read only after the step
        names = [c.name for c in r["calls"]]
        # ours: [weight total, stop flag] over the world first, loss sums over dp_cp after backward
        assert r["calls"][0].name == "all_reduce" and r["calls"][0].shapes == ((2,),)
        print(layout, len(names), names)
