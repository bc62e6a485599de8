"""Make ``harness`` importable by the distributed tests (spawned workers import test modules), and
build the demo shards the trainer-level tests share."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """The digits demo's training shards."""
    from emu3_train.data_pipelines.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out / "train"
