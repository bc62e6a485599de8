"""`python -m emu3_train.recipes run-dir`: the run name and directory launch/torchrun.sh hands to
every node (and the per-rank log folders), composed exactly as emu3_train.train composes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from emu3_train.recipes import compose, main, run_dir

REPO = Path(__file__).resolve().parents[2]


def test_run_dir_follows_recipe_overrides_and_suffix():
    assert run_dir([]) == ("run", "runs/run")
    demo = compose(["experiment=demo"]).run_name
    assert run_dir(["experiment=demo"]) == (demo, f"runs/{demo}")
    # mandatory fields (data.path) may stay unset: only the name and out_dir matter
    assert run_dir(["experiment=stage1", "model=emu3_8b", "data=shards", "out_dir=/scratch/r"],
                   suffix="-4242") == ("stage1-4242", "/scratch/r/stage1-4242")
    assert run_dir(["run_name=mine", "out_dir=o"], suffix="-7") == ("mine-7", "o/mine-7")
    assert run_dir(["out_dir=o", "hydra.run.dir=/elsewhere"]) == ("run", "/elsewhere")


def test_run_dir_rejects_unknown_keys_like_training_does():
    with pytest.raises(ConfigCompositionException):
        run_dir(["trainer.no_such_field=1"])


def test_cli_prints_name_and_dir_and_fails_in_one_line(capsys):
    assert main(["run-dir", "--suffix=-9", "--", "run_name=demo", "out_dir=/r"]) == 0
    assert capsys.readouterr().out == "demo-9\n/r/demo-9\n"
    assert main(["run-dir", "--", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ConfigCompositionException: Could not override 'bogus'")


def test_cli_as_module():
    proc = subprocess.run([sys.executable, "-m", "emu3_train.recipes", "run-dir", "--suffix=-1", "--",
                           "run_name=x"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["x-1", "runs/x-1"]
