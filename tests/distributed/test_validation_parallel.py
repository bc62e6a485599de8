"""Validation numbers are the same on one process, dp2, tp2 and cp2 (gloo), before and after a step.

Every layout evaluates the same fixed held-out rows; the sums are reduced over dp_cp once. Before
any step the weights are identical (the seeded init), so the numbers agree to fp32 rounding of the
forward (rel 1e-6); after one AdamW step TP/CP rounding is amplified as in test_trainer_parallel
(rel 1e-4 on the loss).
"""

from __future__ import annotations

import pytest
from harness import run_distributed

from emu3_train.recipes import compose
from emu3_train.trainer import Trainer

BASE = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=128", "data.num_workers=0",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
        "data.global_batch_size=4", "optim.warmup_steps=1", "trainer.max_steps=6",
        "checkpoint.async_save=false", "trainer.sample_interval=0", "eval.val_rows=8"]


def _run(rank, world, data, run_dir, overrides):
    cfg = compose([*BASE, f"data.path={data}", f"eval.val_path={data.parent / 'eval'}", *overrides])
    t = Trainer(cfg, run_dir, rank, world)
    t.setup()
    before = t.validate()
    loss = t.train_step()["train/loss"]
    after = t.validate()
    t.loader.close()
    return before, loss, after


LAYOUTS = {"dp2": ["parallel.dp=2", "data.micro_batch_size=2"],
           "tp2": ["parallel.dp=1", "parallel.tp=2", "data.micro_batch_size=4"],
           "cp2": ["parallel.dp=1", "parallel.cp=2", "data.micro_batch_size=4"]}


def _layouts(rank, world, data, run_dir):
    """Every layout in turn on the same two processes (one spawn: the imports dominate)."""
    return {name: _run(rank, world, data, run_dir / name, overrides) for name, overrides in LAYOUTS.items()}


def test_validation_is_the_same_on_any_layout(data, tmp_path):
    ref = _run(0, 1, data, tmp_path / "one", ["data.micro_batch_size=4"])
    assert set(ref[0]) == {"val/loss", "val/loss_text", "val/loss_vision", "val/eval/loss"}
    got = run_distributed(_layouts, 2, (data, tmp_path / "two"))
    for rank, layouts in enumerate(got):  # every rank holds the reduced numbers
        for name, (before, loss, after) in layouts.items():
            where = f"{name}, rank {rank}"
            assert before == pytest.approx(ref[0], rel=1e-6), where
            assert loss == pytest.approx(ref[1], rel=1e-6), where  # validating did not disturb training
            assert after == pytest.approx(ref[2], rel=1e-4), where
            assert after["val/loss"] != before["val/loss"], where
