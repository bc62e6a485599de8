"""The DPO demo path end to end at a tiny size, through the real CLIs, and the frozen reference.

1. A 2-step stage-1 demo checkpoint -> make_preferences (the demo_reward k-NN scorer, K = 4, one
   caption per digit) -> pair shards -> a 3-step experiment=demo_dpo run (its dpo console lines) ->
   dpo_eval writes eval.json (before/after t2i, i2t, diversity) and samples_before/after.png.
2. On the same pair shards and weights, dpo.reference=frozen (a frozen copy of checkpoint.init_from
   run every step) gives the DPO loss and metrics of dpo.reference=precomputed (the shards' ref_logp)
   for the first 3 steps, within 1e-5 (measured: bitwise equal on CPU fp32).

The demo goals (t2i >= 0.98, i2t >= 0.90, diversity >= 70%) are measured by ``make post-train-demo-dpo``.

    .venv/bin/pytest -q tests/integration/test_demo_dpo.py
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emu3_train.data.stream import ShardSet
from emu3_train.data_pipelines.demo import caption
from emu3_train.recipes import compose
from emu3_train.trainer import Trainer
from emu3_train.vocab import get_vocab

REPO = Path(__file__).resolve().parents[2]
SCORER = "emu3_train.data_pipelines.demo_reward:make_scorer()"
DPO = ["experiment=demo_dpo", "wandb.mode=disabled", "data.micro_batch_size=2", "data.global_batch_size=2",
       "optim.warmup_steps=1", "trainer.max_steps=3"]
NUM = r"(-?[\d.]+)"  # "nan" / "inf" do not match: the metrics must be finite


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "TIKTOKEN_CACHE_DIR": ""}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def stage1_pairs(demo_data, tmp_path_factory):
    """(root, stage-1 checkpoint, pair shards) made by the real CLIs."""
    root = tmp_path_factory.mktemp("dpo")
    s1 = _cli("emu3_train.train", f"out_dir={root / 'runs'}", "experiment=demo",
              f"data.path={demo_data / 'train'}", "run_name=s1", "trainer.max_steps=2",
              "trainer.sample_interval=0", "eval.task=none", "eval.val_path=null", "data.seq_len=512",
              "data.micro_batch_size=1", "data.global_batch_size=1", "optim.warmup_steps=1",
              "wandb.mode=disabled")
    assert s1.returncode == 0, s1.stderr[-3000:]
    ckpt = root / "runs" / "s1" / "ckpt" / "latest"
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": caption(d), "label": d}) + "\n" for d in range(10)))
    mp = _cli("emu3_train.data_pipelines.make_preferences", str(ckpt), "--prompts", str(prompts),
              "--out", str(root / "pairs"), "--grid", "8x8", "--k", "4", "--scorer", SCORER,
              "--prompts-per-batch", "10", "--device", "cpu")
    assert mp.returncode == 0, mp.stderr[-3000:]
    made = re.search(r"wrote (\d+) pairs from 1 prompt files .* scores: all mean ", mp.stdout)
    assert made and int(made.group(1)) >= 4, mp.stdout  # ties (gap 0) are dropped, the rest are pairs
    return root, ckpt, root / "pairs"


def test_pairs_to_dpo_to_eval(stage1_pairs, demo_data):
    root, ckpt, pairs = stage1_pairs
    shards = ShardSet(pairs, get_vocab("demo"))
    docs = [shards.read(d)[1] for d in range(len(shards))]
    by_pair = {}
    for meta in docs:
        by_pair.setdefault(meta["pair"], {})[meta["role"]] = meta
    assert len(docs) == 2 * len(by_pair) and all(p.keys() == {"chosen", "rejected"} for p in by_pair.values())
    for p in by_pair.values():  # best vs worst of 4 by the k-NN reward, reference log-probs stored
        assert 0.0 <= p["rejected"]["score"] < p["chosen"]["score"] <= 1.0
        assert all(math.isfinite(p[r]["ref_logp"]) and p[r]["ref_logp"] < 0 for r in p)

    proc = _cli("emu3_train.train", f"out_dir={root / 'runs'}", *DPO, f"data.path={pairs}",
                f"checkpoint.init_from={ckpt}", "run_name=d", "trainer.log_interval=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = (rf"^dpo \| loss {NUM} \| margin {NUM} \| acc {NUM} \| chosen {NUM} \| rejected {NUM} "
            rf"\| ntp {NUM}$")
    rows = [[float(x) for x in m] for m in re.findall(line, proc.stdout, re.M)]
    assert len(rows) == 3, proc.stdout  # one dpo line after each step's summary (log_interval=1)
    assert rows[0][0] == pytest.approx(math.log(2), abs=1e-4) and rows[0][1] == 0.0  # policy = reference
    for loss, _, acc, chosen, rejected, ntp in rows:
        assert loss > 0 and 0.0 <= acc <= 1.0 and chosen < 0 and rejected < 0 and ntp > 0
    assert rows[-1][0] < rows[0][0] and rows[-1][1] > 0  # measured: loss 0.693 -> 0.328, margin 0.956
    run = root / "runs" / "d"
    assert (run / "ckpt" / "latest").read_text().strip() == "step_000003"

    ev = _cli("emu3_train.dpo_eval", str(ckpt), str(run / "ckpt" / "latest"), "--train",
              str(demo_data / "train"), "--eval", str(demo_data / "eval"), "--out", str(run),
              "--samples-per-class", "2")
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads((run / "eval.json").read_text())
    for key in ("t2i_accuracy", "i2t_accuracy"):
        assert 0.0 <= result[key] <= 1.0 and 0.0 <= result[key + "_before"] <= 1.0
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ("diversity", "diversity_before"))
    assert result["diversity_ratio"] == pytest.approx(result["diversity"] / result["diversity_before"])
    assert result["samples_per_class"] == 2
    arrow = r"[\d.]+ -> [\d.]+"  # before -> after
    printed = rf"^t2i_accuracy {arrow} \| i2t_accuracy {arrow} \| diversity {arrow}$"
    assert re.search(printed, ev.stdout, re.M), ev.stdout
    from PIL import Image

    for name in ("samples_before.png", "samples_after.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(run / name) as im:  # one row per digit, 2 columns of 8x8 codes at scale 8
            assert im.format == "PNG" and im.size == (24 + 2 * (64 + 4), 10 * (64 + 4) + 4)


def test_frozen_reference_equals_precomputed(stage1_pairs):
    root, ckpt, pairs = stage1_pairs
    got, trainers = {}, {}
    for ref in ("precomputed", "frozen"):
        t = Trainer(compose([*DPO, f"data.path={pairs}", f"checkpoint.init_from={ckpt}",
                             f"dpo.reference={ref}", "checkpoint.async_save=false", "data.num_workers=0"]),
                    root / f"ref_{ref}")
        t.setup()
        got[ref] = [t.train_step() for _ in range(3)]
        t.loader.close()
        trainers[ref] = t
    assert trainers["precomputed"].reference is None
    keys = ["dpo/loss", "dpo/reward_margin", "dpo/accuracy", "dpo/chosen_logp", "dpo/rejected_logp",
            "dpo/ntp_loss"]
    for step, (want, have) in enumerate(zip(got["precomputed"], got["frozen"]), 1):
        for k in keys:
            if k == "dpo/accuracy" and step == 1:
                # policy = reference at step 1: every margin is 0 up to rounding, so "margin > 0" is a
                # coin toss of the matmul kernels (AVX2 and AVX-512 CPUs decide it differently)
                continue
            assert math.isfinite(want[k]) and have[k] == pytest.approx(want[k], abs=1e-5), (step, k)
    assert got["frozen"][0]["dpo/reward_margin"] == pytest.approx(0.0, abs=1e-5)  # reference = init
    assert got["frozen"][-1]["dpo/reward_margin"] != pytest.approx(0.0, abs=1e-3)  # ...and stays frozen
    frozen = trainers["frozen"]
    moved = [not torch.equal(p, r) for p, r in zip(frozen.model.parameters(), frozen.reference.parameters())]
    assert any(moved) and not any(r.requires_grad for r in frozen.reference.parameters())
