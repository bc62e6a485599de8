"""make_preferences on a tiny random model (HF folder): pairs written, reference log-probs equal to the
frozen-copy computation in training, two workers = one, reruns skip, scorer failures named.

    .venv/bin/python -m pytest -q tests/unit/data_pipelines/test_make_preferences.py
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from emu3_train.config import ModelConfig
from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet
from emu3_train.dpo import reference_logps
from emu3_train.interop.hf import save_hf
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.model_source import load_model
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.make_preferences import cli, main

V = get_vocab("demo")
SCORER = "scorers_for_tests:ink"  # any grid; the demo reward is for 8x8 digits (test below)


@pytest.fixture(autouse=True)
def scorers(monkeypatch):
    mod = types.ModuleType("scorers_for_tests")
    mod.ink = lambda codes, prompt, pixels: float(codes.sum()) / codes.size
    mod.nan = lambda codes, prompt, pixels: float("nan") if "one" in prompt else float(codes.sum())
    mod.boom = lambda codes, prompt, pixels: 1 / 0
    monkeypatch.setitem(sys.modules, "scorers_for_tests", mod)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_position_embeddings=256, vocab_size=V.size)
    save_hf(Emu3CausalLM(cfg, V.size), cfg, root / "hf",
            {"pad_token_id": V.pad, "bos_token_id": V.bos, "eos_token_id": V.eos})
    words = ["zero", "one", "two", "three", "four", "five"]
    for f in range(2):
        lines = [json.dumps({"prompt": f"a handwritten digit {w}", "label": d})
                 for d, w in enumerate(words) if d % 2 == f]
        (root / f"prompts{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def run(root, out, *extra):
    return main([str(root / "hf"), "--prompts", str(root / "prompts0.jsonl"), str(root / "prompts1.jsonl"),
                 "--out", str(out), "--grid", "3x3", "--k", "4", "--scorer", SCORER, "--device", "cpu",
                 "--prompts-per-batch", "2", *extra])


def docs_of(out):
    shards = ShardSet(out, V)
    out = {}
    for d in range(len(shards)):
        tokens, meta = shards.read(d)
        out[f"{meta['source']}/{meta['role']}"] = (tokens.tolist(), meta)
    return out


def test_pairs_reference_logps_workers_and_rerun(setup, capsys):
    root = setup
    assert run(root, root / "one") == 0
    printed = capsys.readouterr().out
    assert "pairs from 2 prompt files" in printed and "scores: all mean" in printed
    docs = docs_of(root / "one")
    assert len(docs) == 12  # 6 prompts, a pair each (4 random grids: never all of one ink)
    stats = json.loads((root / "one" / "prompts0.stats.json").read_text())
    assert stats["pairs"] == 3 and stats["scores"]["all"]["n"] == 12 and stats["scores"]["gap"]["min"] > 0
    pairs = {}
    for tokens, meta in docs.values():
        pairs.setdefault(meta["pair"], {})[meta["role"]] = (tokens, meta)
    for pair in pairs.values():
        (tc, mc), (tr, mr) = pair["chosen"], pair["rejected"]
        assert mc["prompt"] == mr["prompt"] and mc["score"] > mr["score"] and mc["gap"] == mr["gap"]
        sov = tc.index(V.sov)
        assert tc[:sov] == tr[:sov] and mc["label"] == mr["label"]  # same prompt, extra fields kept
        assert mc["loss_spans"] == [[tc.index(V.sot) + 1, len(tc) - 1]]

    # the stored reference log-probs equal those the frozen copy gives on the loader's batches
    model = load_model(root / "hf").model
    loader = PackedLoader(ShardSet(root / "one", V), seq_len=128, micro_batch_size=3, pack_window=16)
    checked = 0
    for _ in range(2):
        batch = next(loader)
        with torch.no_grad():
            hidden = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"])
        frozen = reference_logps(hidden, model.lm_head.weight, batch)
        torch.testing.assert_close(frozen, batch["ref_logp"], atol=1e-4, rtol=1e-5)
        checked += batch["num_pairs"]
    assert checked >= 4  # pairs seen in two batches of 3 rows (an epoch holds 6)

    # two workers write exactly what one wrote; a rerun does nothing
    assert run(root, root / "two", "--rank", "0", "--world-size", "2") == 0
    assert run(root, root / "two", "--rank", "1", "--world-size", "2") == 0
    two = docs_of(root / "two")
    assert two.keys() == docs.keys()
    for key in docs:
        assert two[key][0] == docs[key][0]
        assert two[key][1].keys() == docs[key][1].keys()
        assert two[key][1]["ref_logp"] == pytest.approx(docs[key][1]["ref_logp"], abs=1e-5)
    capsys.readouterr()
    assert run(root, root / "one") == 0
    assert "all 2 of its 2 prompt files are done" in capsys.readouterr().out


def test_scorer_failures_are_skipped_and_counted_or_named(setup, capsys):
    root = setup
    assert run(root, root / "nan", "--scorer", "scorers_for_tests:nan", "--no-reference") == 0
    stats = json.loads((root / "nan" / "prompts1.stats.json").read_text())
    assert stats["skipped"] == {"scorer_not_finite": 1} and stats["pairs"] == 2
    assert any("prompts1.jsonl:1" in item for item in stats["skipped_items"])
    assert "ref_logp" not in next(iter(docs_of(root / "nan").values()))[1]
    capsys.readouterr()
    assert cli([str(root / "hf"), "--prompts", str(root / "prompts0.jsonl"), "--out", str(root / "boom"),
                "--grid", "3x3", "--k", "2", "--scorer", "scorers_for_tests:boom", "--device", "cpu",
                "--on-error", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "prompts0.jsonl:1" in err and "ZeroDivisionError" in err
    assert not list((root / "boom").glob("*.tar"))
    assert cli([str(root / "hf"), "--prompts", str(root / "prompts0.jsonl"), "--out", str(root / "x"),
                "--grid", "3x3", "--scorer", "no_such_module_xyz:f"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_demo_reward_prefers_the_prompted_digit():
    from emu3_train.data_pipelines.demo import caption, load_images
    from emu3_train.data_pipelines.demo_reward import make_scorer, reward_indices

    images, labels = load_images()
    score = make_scorer()
    other = np.setdiff1d(np.arange(len(images)), reward_indices())[:50]  # images it was not trained on
    right = [score(images[i], caption(labels[i]), None) for i in other]
    wrong = [score(images[i], caption((labels[i] + 1) % 10), None) for i in other]
    assert np.mean(np.array(right) > np.array(wrong)) > 0.9
    with pytest.raises(ValueError, match="names no digit"):
        score(images[0], "a cat", None)
