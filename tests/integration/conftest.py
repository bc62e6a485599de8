"""Shared fixtures: the digits demo shards built once per session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu3_train.data_pipelines.demo import build_demo

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


@pytest.fixture
def run_train(tmp_path):
    """Run ``python -m emu3_train.train`` with overrides; runs land in ``tmp_path/runs``."""

    def run(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "WANDB_SILENT": "true", "TIKTOKEN_CACHE_DIR": ""}
        env.pop("RANK", None)
        cmd = [sys.executable, "-m", "emu3_train.train", f"out_dir={tmp_path / 'runs'}", *overrides]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    return run
