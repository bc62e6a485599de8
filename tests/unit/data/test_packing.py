"""Packing rules: blocks never split, every token once, rows within seq_len, oversize policy."""

from __future__ import annotations

import numpy as np
import pytest

from emu3_train.data.index import ShardError
from emu3_train.data.packing import Piece, pack_rows, split_document


def random_layout(rng, n_docs, max_len=300, max_block=70):
    """Lengths [n] and per-doc [m, 2] non-overlapping vision spans."""
    lengths, spans = [], []
    for _ in range(n_docs):
        pos, doc_spans = int(rng.integers(0, 20)), []
        for _ in range(int(rng.integers(0, 4))):
            size = int(rng.integers(5, max_block))
            doc_spans.append((pos, pos + size))
            pos += size + int(rng.integers(0, 40))
        lengths.append(max(pos, 1) + int(rng.integers(0, 60)))
        spans.append(np.array(doc_spans, np.int64).reshape(-1, 2))
    return np.array(lengths), spans


@pytest.mark.parametrize("seed", range(6))
def test_packing_invariants_on_random_documents(seed):
    rng = np.random.default_rng(seed)
    seq_len = 64
    lengths, spans = random_layout(rng, 80)
    oversize = {d for d, s in enumerate(spans) if len(s) and (s[:, 1] - s[:, 0]).max() > seq_len}
    assert oversize and len(oversize) < 80  # the layout exercises both policies' paths
    ids = rng.permutation(80)
    result = pack_rows(ids, lengths, spans.__getitem__, seq_len, "skip")

    assert sorted(result.skipped) == sorted(oversize)
    pieces: dict[int, list[Piece]] = {}
    for row in result.rows:
        assert 0 < sum(p.length for p in row) <= seq_len
        for p in row:
            pieces.setdefault(p.doc_id, []).append(p)
    assert set(pieces) == set(range(80)) - oversize
    for d, ps in pieces.items():  # every token of the doc exactly once, in contiguous pieces
        ps.sort(key=lambda p: p.start)
        assert ps[0].start == 0 and ps[-1].end == lengths[d]
        assert all(a.end == b.start for a, b in zip(ps, ps[1:]))
        for p in ps:  # no piece boundary strictly inside a vision block
            for s, e in spans[d]:
                assert not s < p.start < e and not s < p.end < e
    assert result.num_split == sum(len(ps) > 1 for ps in pieces.values()) > 0
    again = pack_rows(ids, lengths, spans.__getitem__, seq_len, "skip")
    assert again.rows == result.rows  # deterministic


def test_split_moves_back_to_the_block_start():
    # cut at 8 would land inside [5, 12): the piece ends at 5, the block starts the next piece
    assert split_document(20, np.array([[5, 12]]), 8) == [(0, 5), (5, 13), (13, 20)]
    assert split_document(8, np.zeros((0, 2)), 8) == [(0, 8)]


def test_first_fit_decreasing_fills_rows():
    lengths = np.array([5, 3, 4, 2, 6])
    result = pack_rows(range(5), lengths, lambda d: np.zeros((0, 2)), 10)
    assert [[p.doc_id for p in row] for row in result.rows] == [[4, 2], [0, 1, 3]]


def test_oversize_error_names_shard_and_key():
    lengths, spans = np.array([10, 50]), [np.zeros((0, 2)), np.array([[2, 40]])]
    with pytest.raises(ShardError, match="shard-000007.tar: sample 'doc-1': vision block of 38 tokens"):
        pack_rows([0, 1], lengths, spans.__getitem__, 32, "error",
                  describe=lambda d: f"shard-000007.tar: sample 'doc-{d}'")
    with pytest.raises(ValueError, match="oversize_policy"):
        pack_rows([0], lengths, spans.__getitem__, 32, "drop")
