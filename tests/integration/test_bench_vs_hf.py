"""benchmarks/vs_hf.py: its smoke mode trains our step and transformers' Emu3ForCausalLM on the
same supervised targets, and the first-step losses agree at vision weight 1 (and differ at 0.5);
its default document mix is the stage-1 one the README's row claims."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emu3_train.layout import vision_spans
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("_stage1_docs", REPO / "benchmarks" / "_stage1_docs.py")
docs_mod = sys.modules.setdefault("_stage1_docs", importlib.util.module_from_spec(_spec))  # for @dataclass
_spec.loader.exec_module(docs_mod)
Mix, draw_steps, pack_step = docs_mod.Mix, docs_mod.draw_steps, docs_mod.pack_step
ours_batches, peer_batches = docs_mod.ours_batches, docs_mod.peer_batches


def test_smoke_both_sides_train_on_the_same_targets_and_agree_on_the_loss():
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vs_hf.py"), "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["targets_ours"] == out["targets_hf"] > 100
    assert abs(out["loss_ours_w1"] - out["loss_hf"]) <= 1e-4
    assert abs(out["loss_ours"] - out["loss_hf"]) > 1e-3  # the 0.5 vision weight is really applied
    for name in ("ours_1", "ours_2", "hf_1", "hf_2"):
        assert out[name]["tokens_per_s"] > 0 and out[name]["peak_gb"] > 0, name
    assert "first-step loss" in proc.stdout and "useful tokens/s" in proc.stdout


def test_default_mix_is_stage1_images_of_4200_tokens_and_a_third_text():
    vocab = get_vocab("emu3")
    steps = draw_steps(Mix(), vocab, load_tokenizer(vocab).encode, steps=12, seed=3)
    docs = [d for step in steps for d in step]
    images = [len(d.tokens) for d in docs if d.task != "text"]
    text = sum(len(d.tokens) for d in docs if d.task == "text")
    assert {d.task for d in docs} == {"t2i", "i2t", "text"}
    assert 3900 < np.median(images) < 4600 and all(
        n <= Mix().seq_len for n in map(len, (d.tokens for d in docs))
    )
    assert text / sum(len(d.tokens) for d in docs) >= 1 / 3
    assert all(len(vision_spans(d.tokens, vocab)) == (d.task != "text") for d in docs)


def test_peer_batches_hold_exactly_our_supervised_targets_per_step():
    vocab = get_vocab("demo")
    mix = Mix.smoke()
    for docs in draw_steps(mix, vocab, load_tokenizer(vocab).encode, steps=3, seed=1):
        rows = pack_step(docs, vocab, mix.seq_len)
        ours = sum(
            int((b["loss_weight"] > 0).sum()) for b in ours_batches(docs, rows, vocab, mix.seq_len, 2, 0.5)
        )
        peer = peer_batches(docs, rows, vocab, 3)
        assert sum(int((b["labels"][:, 1:] != -100).sum()) for b in peer) == ours
        # padding is masked out and never supervised; every sequence starts at its first column
        for b in peer:
            assert (b["labels"][b["attention_mask"] == 0] == -100).all()
            assert (b["attention_mask"][:, 0] == 1).all()
        assert sum(int(b["attention_mask"].sum()) for b in peer) == sum(p.length for row in rows for p in row)
