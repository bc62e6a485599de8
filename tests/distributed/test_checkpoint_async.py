"""An async checkpoint of a dp=2 run is published as soon as every rank's shards are written, while
training goes on, not when the next save starts (issue: a crash between saves lost the last one)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from harness import run_distributed

from emu3_train.recipes import compose
from emu3_train.trainer import Trainer

BASE = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=128",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
        "data.global_batch_size=4", "data.micro_batch_size=2", "optim.warmup_steps=1",
        "trainer.max_steps=20", "checkpoint.async_save=true", "parallel.dp=2"]


def _save_then_train(rank, world, data, run_dir):
    cfg = compose([*BASE, f"data.path={data}"])
    t = Trainer(cfg, run_dir, rank, world)
    t.setup()
    t.train_step()
    t.save()  # background write; returns at once
    latest = t.ckpt_dir / "latest"
    deadline, steps = time.monotonic() + 60, 0
    while time.monotonic() < deadline:  # both ranks keep training until both see it published
        seen = torch.tensor([int(latest.is_file())])
        dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # ranks agree, so they run the same steps
        if seen.item():
            break
        t.train_step()
        steps += 1
    published = latest.read_text().strip() if latest.is_file() else None
    complete = (t.ckpt_dir / "step_000001" / ".metadata").is_file()
    t.checkpoints.wait()
    t.loader.close()
    return published, complete, steps


def test_async_save_is_published_when_complete_on_every_rank(data, tmp_path):
    results = run_distributed(_save_then_train, 2, (data, tmp_path / "run"))
    for published, complete, _ in results:
        assert published == "step_000001" and complete
