"""Whole training steps on several gloo processes equal one process on the same global batch.

The trainer itself runs on every rank (data, model, passes, loss normalization, optimizer), so this
checks the wiring as a user runs it, not only the passes.
"""

from __future__ import annotations

import pytest
import torch
from harness import run_distributed

from emu3_train.recipes import compose
from emu3_train.trainer import Trainer

BASE = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=128",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
        "data.global_batch_size=4", "optim.warmup_steps=1", "trainer.max_steps=6",
        "checkpoint.async_save=false"]


def _run(rank, world, data, run_dir, overrides, steps, save=False):
    cfg = compose([*BASE, f"data.path={data}", *overrides])
    t = Trainer(cfg, run_dir, rank, world)
    t.setup()
    losses = [t.train_step()["train/loss"] for _ in range(steps)]
    if save:
        t.save(wait=True)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(t.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return losses, ({k: v.clone() for k, v in full.items()} if rank == 0 else None), t.loader.state_dict()


def _single(data, tmp_path, steps=3, micro=4):
    return _run(0, 1, data, tmp_path / "single", [f"data.micro_batch_size={micro}"], steps)


def _close(ref, got, loss_rel=1e-6, param_atol=1e-5):
    ref_losses, ref_params, _ = ref
    losses, params, _ = got
    assert losses == pytest.approx(ref_losses, rel=loss_rel)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=param_atol, msg=name)


def test_dp2_equals_one_process(data, tmp_path):
    ref = _single(data, tmp_path)
    got = run_distributed(_run, 2, (data, tmp_path / "dp2", ["parallel.dp=2", "data.micro_batch_size=2"], 3))
    _close(ref, got[0])
    assert got[0][2] == got[1][2] == ref[2]  # one global cursor, identical on every rank


def test_dp2_compiled_equals_one_process(data, tmp_path):
    """trainer.compile: compiled blocks under FSDP2 (compile before fully_shard, per block)."""
    ref = _single(data, tmp_path)
    got = run_distributed(_run, 2, (data, tmp_path / "dp2c", ["parallel.dp=2", "data.micro_batch_size=2",
                                                              "trainer.compile=true"], 3))
    # inductor's fused kernels round differently from eager; AdamW amplifies that in the same
    # near-zero-gradient element as TP and CP (layers.1.mlp.up_proj): 1e-4, as there
    _close(ref, got[0], param_atol=1e-4)


@pytest.mark.parametrize("impl", ["allgather", "ulysses"])
def test_cp2_equals_one_process(data, tmp_path, impl):
    ref = _single(data, tmp_path)
    got = run_distributed(_run, 2, (data, tmp_path / impl, [
        "parallel.dp=1", "parallel.cp=2", f"parallel.cp_impl={impl}", "data.micro_batch_size=4"], 3))
    # The chunked CP core attends each query chunk to only the keys its documents can reach, which
    # moves outputs by ~1 ulp; AdamW amplifies that as for TP (test_tensor_parallel_layouts_...).
    _close(ref, got[0], param_atol=1e-4)


@pytest.mark.parametrize("layout", [
    ["parallel.dp=2", "data.micro_batch_size=2"],
    pytest.param(["parallel.dp=1", "parallel.tp=2", "data.micro_batch_size=4"], marks=pytest.mark.slow),
    pytest.param(["parallel.dp=1", "parallel.cp=2", "data.micro_batch_size=4"], marks=pytest.mark.slow),
], ids=["dp2", "tp2", "cp2"])
def test_resume_on_another_layout(data, tmp_path, layout):
    """Saved on two processes, resumed on one: weights and AdamW state reshard, the stream goes on."""
    full = _single(data, tmp_path, steps=6)
    run_dir = tmp_path / "resharded"
    first = run_distributed(_run, 2, (data, run_dir, layout, 3, True))
    resumed = _run(0, 1, data, run_dir, ["data.micro_batch_size=4", "checkpoint.resume=latest"], 3)
    assert first[0][0] + resumed[0] == pytest.approx(full[0], rel=1e-5)
    assert resumed[2] == full[2]  # the same rows consumed, none repeated or lost
    for name, value in full[1].items():  # AdamW amplifies fp32 rounding of near-zero gradients
        torch.testing.assert_close(resumed[1][name], value, rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize("layout", [
    ["parallel.dp=1", "parallel.tp=2", "data.micro_batch_size=4"],
    pytest.param(["parallel.dp=2", "parallel.tp=2", "data.micro_batch_size=2"], marks=pytest.mark.slow),
    pytest.param(["parallel.dp=1", "parallel.cp=2", "parallel.tp=2", "data.micro_batch_size=4"],
                 marks=pytest.mark.slow),
], ids=["tp2", "dp2-tp2", "cp2-tp2"])
def test_tensor_parallel_layouts_equal_one_process(data, tmp_path, layout):
    ref = _single(data, tmp_path)
    world = 4 if ("parallel.dp=2" in layout or "parallel.cp=2" in layout) else 2
    got = run_distributed(_run, world, (data, tmp_path / "tp", layout, 3))
    # AdamW turns fp32 rounding in near-zero gradients into ~1e-5 parameter noise (see the TP pass tests)
    _close(ref, got[0], param_atol=1e-4)
