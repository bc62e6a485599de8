"""The training step in-process: deterministic, accumulation-invariant, bf16-capable, NaN-safe."""

from __future__ import annotations

import pytest
import torch

from emu3_train.recipes import compose
from emu3_train.trainer import Trainer, TrainingError


def _trainer(demo_data, tmp_path, *overrides):
    cfg = compose(["experiment=demo", f"data.path={demo_data / 'train'}", "wandb.mode=disabled",
                   "eval.task=none", "data.seq_len=256", "model.num_layers=2", *overrides])
    t = Trainer(cfg, tmp_path)
    t.setup()
    return t


def test_same_seed_same_losses_bitwise(demo_data, tmp_path):
    runs = []
    for _ in range(2):
        t = _trainer(demo_data, tmp_path, "model.attention_dropout=0.1")
        runs.append([t.train_step()["train/loss"] for _ in range(3)])
    assert runs[0] == runs[1]


def test_grad_accumulation_matches_one_big_batch(demo_data, tmp_path):
    """Loss is normalized by the step's total loss weight, not per micro-batch."""
    big = _trainer(demo_data, tmp_path, "data.micro_batch_size=4", "data.global_batch_size=4")
    acc = _trainer(demo_data, tmp_path, "data.micro_batch_size=2", "data.global_batch_size=4")
    assert acc.accum == 2 and big.accum == 1
    m_big, m_acc = big.train_step(), acc.train_step()
    assert m_big["train/loss"] == pytest.approx(m_acc["train/loss"], rel=1e-5)
    assert m_big["train/grad_norm"] == pytest.approx(m_acc["train/grad_norm"], rel=1e-4)
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32(demo_data, tmp_path):
    fp32 = _trainer(demo_data, tmp_path).train_step()["train/loss"]
    bf16 = _trainer(demo_data, tmp_path, "trainer.precision=bf16").train_step()["train/loss"]
    assert bf16 == pytest.approx(fp32, rel=0.02)


def test_non_finite_steps_are_skipped_then_halt(demo_data, tmp_path):
    t = _trainer(demo_data, tmp_path, "trainer.max_bad_steps=2", "trainer.max_steps=5",
                 "trainer.log_interval=1")
    with torch.no_grad():
        t.model.lm_head.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in t.model.parameters()]
    m = t.train_step()
    assert m["train/skipped_step"] == 1.0
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all()
               for a, b in zip(before, t.model.parameters()))
    with pytest.raises(TrainingError, match="max_bad_steps=2"):
        t.fit()


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_compiled_blocks_train_like_eager(demo_data, tmp_path, recompute):
    """trainer.compile compiles each decoder block (CPU inductor here): same losses and weights."""
    eager = _trainer(demo_data, tmp_path, f"model.recompute={recompute}")
    compiled = _trainer(demo_data, tmp_path, f"model.recompute={recompute}", "trainer.compile=true")
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None
               for layer in compiled.model.model.layers)
    for _ in range(2):
        a, b = eager.train_step(), compiled.train_step()
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
