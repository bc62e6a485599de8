"""Process-level faults through the real CLI: kill -9 mid-save, SIGTERM, injected NaN losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAST = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=256",
        "model.num_layers=2", "data.micro_batch_size=1", "data.global_batch_size=1",
        "trainer.log_interval=1", "optim.warmup_steps=1", "run_name=f"]


def _cmd(demo_data, tmp_path, *overrides):
    return [sys.executable, "-m", "emu3_train.train", *FAST, f"out_dir={tmp_path}",
            f"data.path={demo_data / 'train'}", *overrides]


def _run(cmd, timeout=180):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_kill_9_during_async_save_resumes_from_previous(demo_data, tmp_path):
    ckpt = tmp_path / "f" / "ckpt"
    proc = _run(_cmd(demo_data, tmp_path, "trainer.max_steps=6", "checkpoint.interval=2",
                     "trainer.fault=sigkill_in_save@4"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (ckpt / "latest").read_text().strip() == "step_000002"
    assert not (ckpt / "step_000004").exists()  # the torn save was never published

    proc = _run(_cmd(demo_data, tmp_path, "trainer.max_steps=6", "checkpoint.interval=2",
                     "checkpoint.resume=latest"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert (ckpt / "latest").read_text().strip() == "step_000006"
    assert "step 3/6" in proc.stdout and "step 2/6" not in proc.stdout


@pytest.mark.slow
def test_kill_9_after_async_save_completes_resumes_from_it(demo_data, tmp_path):
    """A finished background save is published at once, not at the next save: kill -9 right after
    the trainer reports one durable and resume from it (before, ``ckpt/`` held only
    ``.tmp_step_000005`` until the next save started, and the resume started from scratch)."""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    proc = subprocess.Popen(_cmd(demo_data, tmp_path, "trainer.max_steps=40", "checkpoint.interval=5",
                                 "checkpoint.async_save=true"),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    durable = None
    try:
        for line in proc.stdout:
            if line.startswith("checkpoint step_") and " durable " in line:
                durable = line.split()[1]
                break
    finally:
        proc.kill()  # kill -9, at most a step or two after the save completed
        _, err = proc.communicate(timeout=60)
    assert durable is not None, err[-2000:]
    ckpt = tmp_path / "f" / "ckpt"
    latest = (ckpt / "latest").read_text().strip()
    assert latest >= durable and (ckpt / latest / ".metadata").is_file()  # a next save may have begun
    step = int(latest.split("_")[1])

    proc = _run(_cmd(demo_data, tmp_path, f"trainer.max_steps={step + 2}", "checkpoint.interval=5",
                     "checkpoint.resume=latest"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{latest} at step {step}" in proc.stdout
    assert f"step {step + 1}/{step + 2}" in proc.stdout and f"step {step}/{step + 2}" not in proc.stdout


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(demo_data, tmp_path):
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    proc = subprocess.Popen(_cmd(demo_data, tmp_path, "trainer.max_steps=100000"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training runs
        if line.startswith("step 2/"):
            break
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert time.monotonic() - t0 < 30
    assert "SIGTERM: stopped at step" in out and "checkpoint.resume=latest" in out
    latest = (tmp_path / "f" / "ckpt" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) >= 2


@pytest.mark.slow
def test_injected_nan_step_is_skipped_and_training_goes_on(demo_data, tmp_path):
    proc = _run(_cmd(demo_data, tmp_path, "trainer.max_steps=4", "trainer.fault=nan_loss@2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 2: non-finite loss/grad norm, update skipped (1 in a row)" in proc.stdout
    assert "step 4/4" in proc.stdout
