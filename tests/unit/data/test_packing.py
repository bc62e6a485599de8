"""Packing rules: blocks never split, every token once, best fit, text cut to fill rows, oversize policy."""

from __future__ import annotations

import numpy as np
import pytest

from emu3_train.data.index import ShardError
from emu3_train.data.packing import Piece, pack_rows, split_document

NO_SPANS = np.zeros((0, 2), np.int64)


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


def check_cover(pieces_of: dict, lengths, spans, docs):
    """Every token of each doc in ``docs`` exactly once, in contiguous pieces, no block cut."""
    assert set(pieces_of) == set(docs)
    for d, ps in pieces_of.items():
        ps.sort(key=lambda p: p.start)
        assert ps[0].start == 0 and ps[-1].end == lengths[d]
        assert all(a.end == b.start for a, b in zip(ps, ps[1:]))
        for p in ps:
            for s, e in spans[d]:
                assert not s < p.start < e and not s < p.end < e


@pytest.mark.parametrize("seed", range(4))
def test_packing_invariants_on_random_documents(seed):
    rng = np.random.default_rng(seed)
    seq_len = 64
    lengths, spans = random_layout(rng, 80)
    oversize = {d for d, s in enumerate(spans) if len(s) and (s[:, 1] - s[:, 0]).max() > seq_len}
    assert oversize and len(oversize) < 80  # the layout exercises both policies' paths
    ids = rng.permutation(80)
    result = pack_rows(ids, lengths, spans.__getitem__, seq_len, "skip")

    assert sorted(result.skipped) == sorted(oversize) and not result.carry
    pieces: dict[int, list[Piece]] = {}
    for row in result.rows:
        assert 0 < sum(p.length for p in row) <= seq_len
        for p in row:
            pieces.setdefault(p.doc_id, []).append(p)
    check_cover(pieces, lengths, spans, set(range(80)) - oversize)
    assert result.num_split == sum(len(ps) - 1 for ps in pieces.values()) > 0
    again = pack_rows(ids, lengths, spans.__getitem__, seq_len, "skip")
    assert again.rows == result.rows  # deterministic


@pytest.mark.parametrize("seed", range(3))
def test_windows_with_carry_place_every_token_once(seed):
    rng = np.random.default_rng(seed)
    seq_len = 128
    lengths, spans = random_layout(rng, 120, max_block=100)
    carry, rows = [], []
    for w in range(0, 120, 16):  # a stream of windows: the last one flushes its open row
        last = w + 16 >= 120
        result = pack_rows(range(w, min(w + 16, 120)), lengths, spans.__getitem__, seq_len, carry=carry,
                           keep_open=not last)
        assert sum(p.length for p in result.carry) <= seq_len
        assert all(sum(p.length for p in row) <= seq_len for row in result.rows)
        rows += result.rows
        carry = result.carry
    assert not carry
    pieces: dict[int, list[Piece]] = {}
    for p in (p for row in rows for p in row):
        pieces.setdefault(p.doc_id, []).append(p)
    check_cover(pieces, lengths, spans, set(range(120)))
    alone = sum(len(pack_rows(range(w, min(w + 16, 120)), lengths, spans.__getitem__, seq_len).rows)
                for w in range(0, 120, 16))
    assert len(rows) < alone  # carrying the open row saves rows


def test_split_moves_back_to_the_block_start():
    # cut at 8 would land inside [5, 12): the piece ends at 5, the block starts the next piece
    assert split_document(20, np.array([[5, 12]]), 8) == [(0, 5), (5, 13), (13, 20)]
    assert split_document(8, np.zeros((0, 2)), 8) == [(0, 8)]


def test_best_fit_puts_a_piece_in_the_row_with_least_room():
    # an image of 60 (room 40), then text 70 (room 30): text 30 fits both; best fit takes the
    # fuller row, first fit would take row 0 and leave row 1 with 30 tokens of padding
    lengths = np.array([60, 70, 30])
    spans = [np.array([[0, 60]]), NO_SPANS, NO_SPANS]
    result = pack_rows(range(3), lengths, spans.__getitem__, 100)
    assert [[p.doc_id for p in row] for row in result.rows] == [[0], [1, 2]]


def test_text_is_cut_only_where_it_saves_a_row():
    lengths = np.array([6, 5, 3, 2])  # best fit: [6, 3] [5, 2]; a cut would save no row
    result = pack_rows(range(4), lengths, lambda d: NO_SPANS, 10)
    assert [[p.doc_id for p in row] for row in result.rows] == [[0, 2], [1, 3]] and result.num_split == 0


def test_text_is_cut_to_fill_the_gaps_around_vision_blocks():
    # 4 image documents of 800 tokens (one block each) at seq_len 1024, and 2 texts longer than a gap
    seq_len = 1024
    lengths = np.array([800] * 4 + [600, 296])
    spans = [np.array([[10, 790]])] * 4 + [NO_SPANS, NO_SPANS]
    result = pack_rows(range(6), lengths, spans.__getitem__, seq_len)
    used = [sum(p.length for p in row) for row in result.rows]
    assert used == [1024] * 4  # 4,096 tokens: 4 full rows
    assert result.num_split >= 2
    for row in result.rows:
        assert sum(p.doc_id < 4 for p in row) == 1  # one image per row, never cut
        for p in row:
            if p.doc_id < 4:
                assert (p.start, p.end) == (0, 800)


def test_no_cut_leaves_a_fragment_shorter_than_min_cut():
    lengths = np.array([90, 90, 18])
    spans = [np.array([[0, 90]]), np.array([[0, 90]]), NO_SPANS]  # two rows with 10 free each
    result = pack_rows(range(3), lengths, spans.__getitem__, 100, min_cut=16)
    assert result.num_split == 0 and len(result.rows) == 3  # 10 + 8 would need fragments < 16
    result = pack_rows(range(3), lengths, spans.__getitem__, 100, min_cut=8)
    assert result.num_split == 1 and len(result.rows) == 2
    assert sorted(p.length for row in result.rows for p in row if p.doc_id == 2) == [8, 10]


def test_keep_open_carries_the_least_filled_row():
    lengths = np.array([70, 60, 20])
    spans = [np.array([[0, 70]]), np.array([[0, 60]]), NO_SPANS]
    result = pack_rows(range(3), lengths, spans.__getitem__, 100, keep_open=True)
    assert [[p.doc_id for p in row] for row in result.rows] == [[0, 2]]
    assert result.carry == [Piece(1, 0, 60)]
    nxt = pack_rows([], lengths, spans.__getitem__, 100, carry=result.carry)
    assert nxt.rows == [[Piece(1, 0, 60)]]


def test_oversize_error_names_shard_and_key():
    lengths, spans = np.array([10, 50]), [np.zeros((0, 2)), np.array([[2, 40]])]
    with pytest.raises(ShardError, match="shard-000007.tar: sample 'doc-1': vision block of 38 tokens"):
        pack_rows([0, 1], lengths, spans.__getitem__, 32, "error",
                  describe=lambda d: f"shard-000007.tar: sample 'doc-{d}'")
    with pytest.raises(ValueError, match="oversize_policy"):
        pack_rows([0], lengths, spans.__getitem__, 32, "drop")
