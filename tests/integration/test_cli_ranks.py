"""Only rank 0 writes Hydra's output files; other ranks still validate and fail the same way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_non_zero_rank_writes_no_hydra_outputs(demo_data, tmp_path):
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "emu3_train.train", "experiment=demo", f"out_dir={tmp_path}",
           "run_name=r", f"data.path={demo_data / 'train'}", "parallel=single"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "world size 2" in proc.stderr
    run = tmp_path / "r"
    assert not (run / ".hydra").exists() and not (run / "config.yaml").exists()
