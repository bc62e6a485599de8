"""benchmarks/generate.py: its smoke mode runs every side (cache, full recompute, our text path,
transformers' generate free and grid-constrained) and they agree token for token; the cache's bytes
equal the formula the README row states.

    .venv/bin/python -m pytest -q tests/integration/test_bench_generate.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


def test_smoke_every_side_agrees_and_the_cache_matches_its_formula():
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "generate.py"), "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("demo", "grid64"):
        r = out[name]
        assert r["tokens_equal_hf"] and r["codes_equal_hf_grid"], name
        assert r["cache_bytes"] == r["cache_formula_bytes"] > 0, name
        for side in ("cache", "ours_text", "hf", "hf_grid", "no_cache"):
            assert r[f"{side}_tokens_per_s"] > 0, (name, side)
    assert out["demo"]["codes_equal_no_cache"]
