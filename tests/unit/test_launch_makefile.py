"""The Makefile's MODEL=, DATA=, NNODES=, GPUS_PER_NODE= (NPROC=), INIT=, EXTRA= map onto the recipes
and the launcher (checked with `make -n`, nothing runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


def _launch_line(target: str, *args: str, env: dict | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                              "NNODES", "NPROC", "GPUS_PER_NODE")}
    proc = subprocess.run(["make", "-n", "-s", target, *args], cwd=REPO, capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]  # the install/demo-data prerequisites come first


def test_no_arguments_is_the_one_process_demo():
    assert _launch_line("pretrain-stage1").split() == [
        ".venv/bin/python", "-m", "emu3_train.train", "experiment=demo", "model=tiny"]


def test_cluster_arguments_map_onto_recipes_and_torchrun():
    line = _launch_line("pretrain-stage1", "MODEL=emu3_8b", "DATA=/shards", "NNODES=2", "GPUS_PER_NODE=8",
                        "NODE_RANK=1", "MASTER_ADDR=node0", "EXTRA=parallel.tp=2 trainer.max_steps=5")
    assert line.split() == [
        "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=node0", "PY=.venv/bin/python", "launch/torchrun.sh", "8",
        "experiment=stage1", "model=emu3_8b", "data=shards", "data.path=/shards", "parallel.tp=2",
        "trainer.max_steps=5"]
    line = _launch_line("pretrain-stage2", "MODEL=emu3_8b", "DATA=/long", "INIT=runs/s1/ckpt/latest",
                        "NNODES=4", env={"NODE_RANK": "3", "MASTER_ADDR": "n0", "MASTER_PORT": "29600"})
    assert line.split() == [
        "NNODES=4", "NODE_RANK=3", "MASTER_ADDR=n0", "MASTER_PORT=29600", "PY=.venv/bin/python",
        "launch/torchrun.sh", "1", "experiment=stage2", "model=emu3_8b", "data=shards", "data.path=/long",
        "checkpoint.init_from=runs/s1/ckpt/latest"]


def test_nproc_is_an_alias_of_gpus_per_node():
    assert _launch_line("pretrain-stage1", "NPROC=4").split()[:4] == [
        "NNODES=1", "PY=.venv/bin/python", "launch/torchrun.sh", "4"]
    assert _launch_line("pretrain-stage2", "INIT=ck").split() == [
        ".venv/bin/python", "-m", "emu3_train.train", "experiment=demo_stage2", "model=tiny",
        "checkpoint.init_from=ck"]
