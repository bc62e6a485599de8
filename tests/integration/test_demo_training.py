"""A short demo run through the real CLI: the loss falls and the run directory is complete."""

from __future__ import annotations

import json
import re

import pytest


@pytest.mark.slow
def test_thirty_step_demo_run(demo_data, run_train, tmp_path):
    proc = run_train(
        "experiment=demo", f"data.path={demo_data / 'train'}", f"eval.path={demo_data / 'eval'}",
        "run_name=t", "trainer.max_steps=30", "trainer.log_interval=5", "optim.warmup_steps=5",
        "data.seq_len=512", "data.micro_batch_size=2", "data.global_batch_size=4",
        "eval.samples_per_class=1", "wandb.mode=offline",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step \d+/30 \| loss ([\d.]+)", proc.stdout, re.M)]
    assert len(losses) == 6, proc.stdout
    assert losses[-1] < losses[0] - 1.0, losses  # from ~ln(283)=5.6 down by more than a nat
    for line in re.findall(r"^step .*$", proc.stdout, re.M):
        assert all(f" {k} " in line for k in ("loss", "text", "vision", "tok/s")), line

    run = tmp_path / "runs" / "t"
    assert (run / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    assert (run / "ckpt" / "latest").read_text().strip() == "step_000030"
    assert (run / "ckpt" / "step_000030" / ".metadata").is_file()
    assert list((run / "wandb").glob("offline-run-*"))
    result = json.loads((run / "eval.json").read_text())
    assert 0.0 <= result["t2i_accuracy"] <= 1.0 and 0.0 <= result["i2t_accuracy"] <= 1.0
    assert result["t2i_samples"] == 10 and result["i2t_images"] == 180
    from PIL import Image

    with Image.open(run / "samples.png") as im:
        assert im.height >= 10 * 64  # ten rows of 8x upscaled 8x8 digits
    assert "t2i_accuracy" in proc.stdout
