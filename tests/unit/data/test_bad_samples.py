"""Bad input met by the loader: an error naming shard and key, or under on_bad_sample=skip a counted
skip whose batch is the same batch with that document left out — never a silently wrong row."""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pytest
import torch

from emu3_train.data.batch import build_batch
from emu3_train.data.index import ShardError, read_index, write_index
from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet

S = 64


@pytest.fixture
def data(make_docs, make_shards):
    return make_shards(make_docs(24, max_text=40), max_count=8)


def loader(shards, **kw):
    return PackedLoader(shards, seq_len=S, micro_batch_size=2, pack_window=8, **kw)


def first_doc(shards):
    """(doc id, tar path, sample number in it, its index) of the first document of the first batch."""
    d = loader(shards).row(0)[0].doc_id
    index = shards.indexes[int(shards.shard_of[d])]
    return d, index.path, int(shards.local_of[d]), index


def rewrite_token(tar, index, local, position, new_id, fix_crc):
    """Overwrite token ``position`` of sample ``local`` in place; with ``fix_crc`` the index agrees."""
    end = int(index.tokens_offset[local] + index.tokens_size[local])
    at = end - 4 * int(index.lengths[local]) + 4 * position
    data = bytearray(tar.read_bytes())
    data[at:at + 4] = np.int32(new_id).tobytes()
    tar.write_bytes(bytes(data))
    if fix_crc:
        fixed = read_index(tar)
        fixed.tokens_crc32[local] = zlib.crc32(bytes(data[int(index.tokens_offset[local]):end]))
        write_index(fixed)


def expected_without(shards, bad_doc):
    """The first batch with ``bad_doc`` left out, built from the intact data."""
    ld = loader(shards)
    rows = [[p for p in ld.row(k) if p.doc_id != bad_doc] for k in (0, 1)]
    docs = {p.doc_id for row in rows for p in row}
    return build_batch(rows, {d: shards.read(d)[0] for d in docs},
                       {d for d in docs if shards.understanding[d]}, S, shards.vocab)


def check_error_then_skip(path, vocab, bad_doc, where, reason, caplog):
    with pytest.raises(ShardError, match=f"{where}.*{reason}"):
        next(loader(ShardSet(path, vocab)))
    ld = loader(ShardSet(path, vocab), on_bad_sample="skip", num_workers=1)
    with caplog.at_level(logging.WARNING, logger="emu3_train.data"):
        batch = next(ld)
        ld.close()
    assert ld.stats()["skipped"] == ld.stats()["skipped_bad"] == 1
    assert sum(where in r.getMessage() for r in caplog.records) == 1
    return batch


@pytest.mark.parametrize("damage", ["checksum", "out_of_vocab", "malformed_block"])
def test_a_damaged_payload_names_shard_and_key_or_is_left_out(data, vocab, damage, caplog):
    intact = ShardSet(data, vocab)
    d, tar, local, index = first_doc(intact)
    expected = expected_without(intact, d)
    tokens = intact.read(d)[0]
    if damage == "malformed_block":  # an EOV becomes a text id: an SOV without EOV
        eov = np.flatnonzero(tokens == vocab.eov)
        if not len(eov):
            pytest.skip("the first document has no vision block")
        position, new_id, reason = int(eov[0]), 7, "malformed vision block"
    else:
        position, new_id = 1, (999_999 if damage == "out_of_vocab" else int(tokens[1]) ^ 1)
        reason = "outside vocabulary" if damage == "out_of_vocab" else "checksum differs from the index"
    rewrite_token(tar, index, local, position, new_id, fix_crc=damage != "checksum")
    where = f"{tar}: sample 'doc-{d:09d}'"
    batch = check_error_then_skip(data, vocab, d, where, reason, caplog)
    for k in ("tokens", "labels", "loss_weight", "position_ids", "cu_seqlens"):
        assert torch.equal(batch[k], expected[k])


def test_a_shard_truncated_or_deleted_after_opening(data, vocab, caplog):
    shards = ShardSet(data, vocab)
    d, tar, local, index = first_doc(shards)
    expected = expected_without(shards, d)
    ld = loader(shards)
    tar.write_bytes(tar.read_bytes()[:int(index.tokens_offset[local]) + 10])
    with pytest.raises(ShardError, match=f"{tar}: sample 'doc-{d:09d}': payload at byte .* cut short"):
        next(ld)
    skip = loader(shards, on_bad_sample="skip")
    batch = next(skip)
    assert skip.stats()["skipped_bad"] >= 1 and batch["num_tokens"] <= expected["num_tokens"]
    shards.close()
    tar.unlink()
    with pytest.raises(ShardError, match=f"{tar}: sample 'doc-{d:09d}': cannot open the shard"):
        next(loader(shards))


def test_a_missing_or_stale_shard_at_open_is_named_or_left_out_and_counted(data, vocab, caplog):
    tars = sorted(data.glob("*.tar"))
    with open(tars[2], "r+b") as f:  # truncated: its size no longer matches the index
        f.truncate(tars[2].stat().st_size - 1024)
    with pytest.raises(ShardError, match=f"stale index: shard {tars[2]}"):
        ShardSet(data, vocab)
    n_docs = len(read_index(tars[1])) + 8
    tars[1].unlink()  # its index stays: the shard is missing
    with pytest.raises(FileNotFoundError, match=f"shard not found: {tars[1]}"):
        ShardSet(data, vocab)
    with caplog.at_level(logging.WARNING, logger="emu3_train.data"):
        shards = ShardSet(data, vocab, on_bad_sample="skip")
    assert str(tars[1]) in caplog.text and str(tars[2]) in caplog.text and len(shards.dropped) == 2
    assert shards.dropped_docs == n_docs and len(shards) == 24 - n_docs
    assert loader(shards).stats()["skipped"] == n_docs
