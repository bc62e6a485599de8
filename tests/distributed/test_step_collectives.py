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


# Collectives of one step with L = 2 blocks and A = 2 micro-batches per rank (c10d + functional):
#   ours: all_reduce([weight total, stop flag]) over the world first, all_reduce(loss sums) over
#   dp_cp after the last backward (none under tp2: |dp_cp| = 1, tp ranks hold global sums), and the
#   gradient norm's all_reduce (clip_grad_norm_ on DTensors), last;
#   dp2: + FSDP2 per micro-batch (2L + 1) all-gathers and (L + 1) reduce-scatters: 3 + A(3L + 2) = 19;
#   cp2: + the CP core's K and V all-gathers (2L) and their reduce-scatters in backward (2L): 35;
#   tp2: + sequence-parallel gathers/reduce-scatters, norm-weight and vocab-parallel CE all-reduces: 56.
EXPECTED = {"dp2": 19, "tp2": 56, "cp2": 35}
LAYOUTS = {"dp2": ["parallel.dp=2", "data.micro_batch_size=1"],
           "tp2": ["parallel.tp=2", "parallel.dp=1", "data.micro_batch_size=2"],
           "cp2": ["parallel.cp=2", "parallel.dp=1", "data.micro_batch_size=2"]}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_step_collectives_are_on_the_model_device_and_never_sync(data, tmp_path, name):
    layout = LAYOUTS[name]
    for r in run_distributed(_record, 2, (data, tmp_path / "run", layout)):
        assert not r["syncs"], "the step read a tensor's value on the host:\n" + "\n".join(r["syncs"])
        bad = [c for c in r["calls"] if any(d != r["device"] for d in c.devices)]
        assert not bad, f"collectives with tensors off the model's device ({r['device']}): {bad}"
        assert r["loss"] == r["loss"]  # finite and read only after the step
        assert r["accum"] == 2 and len(r["calls"]) == EXPECTED[name], [c.name for c in r["calls"]]
        first = r["calls"][0]
        assert first.name == "all_reduce" and first.shapes == ((2,),) and first.group_size == 2
        sums = [c.name for c in r["calls"] if c.shapes == ((6,),)]  # the loss sums, over dp_cp
        assert sums == ([] if name == "tp2" else ["all_reduce"])
        assert r["calls"][-1].name == "f.all_reduce"  # the gradient norm, last
