"""Warmup + cosine-to-floor schedule and AdamW parameter groups."""

import math

import pytest
import torch

from emu3_train.config import OptimConfig
from emu3_train.optim import build_optimizer, build_scheduler, lr_factor


def test_schedule_shape():
    f = [lr_factor(s, 10, 110, 0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine falls
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)  # the floor
    assert lr_factor(10**6, 10, 110, 0.0) == pytest.approx(0.0)


def test_no_weight_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=True), torch.nn.RMSNorm(3))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model[0].weight) in decayed
    assert id(model[0].bias) not in decayed and id(model[1].weight) not in decayed
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_scheduler_drives_lr():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])
