"""The global row stream: blend proportions, shard/document shuffling, epochs, resumable seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emu3_train.data.blend import TokenBlend, parse_blend
from emu3_train.data.plan import LengthsSource, RowStream, Seed


def source(rng, n, name, image_share=0.5, per_shard=50):
    """Documents of 40..300 tokens, ``image_share`` of them with one vision block of 20..100."""
    lengths, spans = [], []
    for _ in range(n):
        length = int(rng.integers(40, 300))
        if rng.random() < image_share:
            block = int(rng.integers(20, min(100, length)))
            start = int(rng.integers(0, length - block + 1))
            spans.append([[start, start + block]])
        else:
            spans.append(np.zeros((0, 2)))
        lengths.append(length)
    return LengthsSource(lengths, spans, docs_per_shard=per_shard, name=name)


def test_parse_blend_resolves_directories_and_names_bad_entries(tmp_path):
    assert parse_blend(tmp_path, []) == [(tmp_path, 1.0)]
    assert parse_blend(tmp_path, ["0.7:img", "0.3:/abs/text"]) == [(tmp_path / "img", 0.7),
                                                                    (Path("/abs/text"), 0.3)]
    for bad in (["img"], ["0:img"], ["x:img"], ["1:"], ["1:a", "2:a"]):
        with pytest.raises(ValueError, match="data.blend"):
            parse_blend(tmp_path, bad)


def test_token_blend_is_exact_and_deterministic():
    blend = TokenBlend([0.5, 0.3, 0.2])
    assert blend.quotas == [5, 3, 2]
    tokens = [0, 0, 0]
    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens[blend.pick(tokens)] += int(rng.integers(1, 500))
    shares = np.array(tokens) / sum(tokens)
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 500 / sum(tokens) * 2  # within a document
    with pytest.raises(ValueError, match="positive"):
        TokenBlend([1.0, 0.0])


def test_blend_proportions_within_one_percent_over_10000_rows():
    rng = np.random.default_rng(0)
    sources = [source(rng, 3000, "a", 0.8), source(rng, 2000, "b", 0.0), source(rng, 500, "c", 0.3)]
    weights = [0.5, 0.3, 0.2]  # c is small: it wraps through many epochs
    stream = RowStream(sources, weights, seed=0, seq_len=256, pack_window=64)
    tokens = np.zeros(3)
    for k in range(10_000):
        for p in stream.row(k):
            tokens[stream.locate(p.doc_id)[0]] += p.length
    shares = tokens / tokens.sum()
    assert np.all(np.abs(shares - weights) <= 0.01 * np.array(weights)), shares
    assert tokens.sum() / (10_000 * 256) > 0.99  # fill
    assert stream.seed_at(10_000).sources[2][0] >= 5  # epochs of the small source


def test_epochs_visit_every_document_once_shuffled_by_shard_then_document():
    rng = np.random.default_rng(1)
    src = source(rng, 400, "s", per_shard=50)  # 8 shards
    stream = RowStream([src], [1.0], seed=3, seq_len=256, pack_window=100, shard_group=2)
    state, epoch0 = stream.origin().sources, []
    for _ in range(4):
        ids, state, _ = stream.draw(state)
        epoch0 += ids
    assert sorted(epoch0) == list(range(400)) and state[0][:2] == [1, 0]
    assert len({d // 50 for d in epoch0[:100]}) == 2  # the first group: 2 shards, documents mixed
    assert epoch0[:100] != sorted(epoch0[:100])
    ids, _, _ = stream.draw(state)
    assert ids != epoch0[:100]  # the next epoch is shuffled anew
    other = RowStream([src], [1.0], seed=4, seq_len=256, pack_window=100, shard_group=2)
    assert other.draw(other.origin().sources)[0] != epoch0[:100]


def test_restart_from_a_json_seed_gives_the_same_rows():
    rng = np.random.default_rng(2)
    sources = [source(rng, 300, "a"), source(rng, 200, "b", 0.0)]
    stream = RowStream(sources, [2, 1], seed=0, seq_len=200, pack_window=32)
    expected = [stream.row(k) for k in range(700)]
    seed = json.loads(json.dumps(stream.seed_at(500).to_json()))
    fresh = RowStream(sources, [2, 1], seed=0, seq_len=200, pack_window=32)
    fresh.restart(Seed.from_json(seed))
    assert [fresh.row(k) for k in range(500, 700)] == expected[500:]
    assert fresh.row(3) == expected[3]  # rows before the seed: replanned from the origin
