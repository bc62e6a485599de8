"""A rank that raises or hangs under torchrun: every rank exits non-zero within 60 s, and the log
names the failing rank (with its traceback) or the collective that timed out."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=128",
        "model.num_layers=2", "trainer.max_steps=20", "trainer.log_interval=1",
        "data.micro_batch_size=1", "data.global_batch_size=2", "checkpoint.async_save=false"]


def _torchrun(demo_data, tmp_path, *extra, timeout=120):
    cmd = ["launch/torchrun.sh", "2", *ARGS, f"data.path={demo_data / 'train'}", f"out_dir={tmp_path}",
           *extra]
    env = {**os.environ, "PY": sys.executable, "TIKTOKEN_CACHE_DIR": ""}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.mark.slow
def test_rank_that_raises_stops_every_rank_and_is_named(demo_data, tmp_path):
    proc, seconds = _torchrun(demo_data, tmp_path, "trainer.fault=raise@3:1")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 60
    assert "rank 1 failed: RuntimeError: injected fault on rank 1 at step 3" in log
    assert "Traceback" in log and "rank      : 1" in log  # torchrun's summary names the root cause


@pytest.mark.slow
def test_hung_rank_times_out_naming_the_collective(demo_data, tmp_path):
    proc, seconds = _torchrun(demo_data, tmp_path, "trainer.fault=hang@3:1", "parallel.timeout_s=5")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 60
    assert "rank 0 failed" in log
    assert "collective all_reduce(step loss weight + stop flag) over the world" in log
    assert "Timed out" in log
