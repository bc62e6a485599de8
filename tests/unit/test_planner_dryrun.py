"""``python -m emu3_train.planner ... --dry-run``: the real passes at real scale, on one CPU.

The dry run builds Emu3-8B on ``meta``, applies ``parallel.parallelize`` on a fake process group of
the target world size and makes one AdamW step; rank 0's real parameter, gradient and optimizer
shards must agree with ``planner_memory``'s estimate (within 5%; they agree to ~2e-5, the
difference is FSDP2's uneven per-tensor split, rank 0 taking the larger part). Every case runs
in its own process: the fake process group is process-global and must not reach other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ("params", "param_bytes", "grad_bytes", "optim_bytes")


def _planner(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emu3_train.planner", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


# The recipes' own layouts: one node (FSDP2 over 8), nodes (tp 2 inside a pair, FSDP2 over 32),
# stage 2 (131,072-token rows, cp 8, FSDP2 over dp x cp = 64; checkpoint.init_from not needed).
CASES = {
    "stage1-node8": (["experiment=stage1", "model=emu3_8b", "parallel=node8"], 8, (8, 1, 1)),
    "stage1-nodes-tp2": (["experiment=stage1", "model=emu3_8b", "parallel=nodes"], 64, (32, 1, 2)),
    "stage2-cp8": (["experiment=stage2", "model=emu3_8b", "checkpoint.init_from=x"], 64, (8, 8, 1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_emu3_8b_real_shards_match_the_estimate(case):
    overrides, gpus, (dp, cp, tp) = CASES[case]
    proc, seconds = _planner(*overrides, "--gpus", str(gpus), "--gpu", "h100", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert seconds < 120, f"{case}: {seconds:.0f} s"
    r = json.loads(proc.stdout)
    d = r["dry_run"]
    assert d["world_size"] == gpus and d["layout"] == {"dp": dp, "cp": cp, "tp": tp} and d["rank"] == 0
    assert d["dtensor_params"] == d["num_params"] == 2 + 9 * 32 + 1  # every parameter was sharded
    real, est = d["real"], d["estimate"]
    for part in PARTS:
        assert real[part] == pytest.approx(est[part], rel=0.05), (part, real[part], est[part])
        assert d["rel_diff"][part] == pytest.approx((est[part] - real[part]) / real[part])
    # fp32 master weights and gradients, two fp32 moments (+ AdamW's 4-byte step per tensor)
    assert real["param_bytes"] == real["grad_bytes"] == 4 * real["params"]
    assert real["optim_bytes"] == 8 * real["params"] + 4 * d["num_params"]
    # the shard is the model's total over the whole world, give or take the tp-replicated norms
    assert real["params"] == pytest.approx(r["memory_bytes"]["params_total"] / gpus, rel=0.01)
    assert est["param_bytes"] == r["memory_bytes"]["weights"]  # the same estimate as the table's


def test_table_shows_the_dry_run_for_tiny_dp_cp_tp():
    """Every pass at once (dp 2 x cp 2 x tp 2) on the tiny model, whose demo vocabulary is
    uneven over tp (283 ids: 142 + 141 rows); the table gets a dry-run section, real vs estimate."""
    proc, _ = _planner("model=tiny", "parallel.tp=2", "parallel.cp=2", "--gpus", "8", "--gpu", "cpu",
                       "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "dry run: real passes on meta, fake process group of 8 (rank 0 of dp 2 x cp 2 x tp 2)" in out
    for row in ("parameters (fp32)", "gradients (fp32)", "optimizer (AdamW)", "parameter elements (M)"):
        line = next(line for line in out.splitlines() if line.startswith(row))
        real, estimate, diff = line[len(row):].split()
        assert abs(float(diff.rstrip("%"))) < 5 and float(real) > 0, line


def test_fake_process_group_is_destroyed_even_when_a_pass_fails():
    """dry_run leaves no process group behind (success or failure) and refuses to replace one."""
    script = textwrap.dedent("""
        import torch.distributed as dist
        import emu3_train.parallel.parallelize as passes
        from emu3_train.planner import _compose
        from emu3_train.planner_dryrun import dry_run
        from emu3_train.vocab import get_vocab

        cfg = _compose(["model=tiny", "parallel.tp=2"])
        vocab = get_vocab(cfg.data.vocab).size
        real = passes.parallelize

        def broken(*args, **kwargs):
            raise RuntimeError("pass failed")

        passes.parallelize = broken
        try:
            dry_run(cfg, 4, vocab)
            raise AssertionError("the failing pass did not raise")
        except RuntimeError as e:
            assert str(e) == "pass failed", e
        assert not dist.is_initialized()
        passes.parallelize = real
        d = dry_run(cfg, 4, vocab)
        assert not dist.is_initialized() and d.layout == {"dp": 2, "cp": 1, "tp": 2}

        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        try:
            dry_run(cfg, 4, vocab)
            raise AssertionError("ran inside an existing process group")
        except RuntimeError as e:
            assert "without a process group" in str(e), e
        assert dist.get_world_size() == 2  # the caller's group is untouched
        dist.destroy_process_group()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
