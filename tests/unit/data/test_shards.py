"""Shard format, index and ShardSet: round trip, index contents, and every bad input named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset as wds

from emu3_train.data.format import TASKS, encode_sample
from emu3_train.data.index import ShardError, build_index, index_path, read_index, write_index
from emu3_train.data.stream import ShardSet
from emu3_train.layout import vision_spans
from emu3_train.vocab import get_vocab


def test_round_trip_gives_identical_tokens_and_json(make_docs, make_shards, vocab):
    docs = make_docs(25)
    path = make_shards(docs, max_count=10)
    assert len(sorted(path.glob("*.tar"))) == 3
    with ShardSet(path, vocab) as shards:
        assert len(shards) == 25
        for d in [0, 9, 10, 24, 3]:  # across shards, out of order
            tokens, meta = shards.read(d)
            assert tokens.dtype == np.int32
            assert tokens.tolist() == docs[d]["tokens"]
            assert meta == {k: v for k, v in docs[d].items() if k != "tokens"}


def test_index_holds_lengths_tasks_and_vision_spans(make_docs, make_shards, vocab):
    docs = make_docs(12)
    shards = ShardSet(make_shards(docs, max_count=5), vocab)
    assert shards.lengths.tolist() == [len(d["tokens"]) for d in docs]
    assert shards.task_names.tolist() == [d["task"] for d in docs]
    assert shards.understanding.tolist() == [d["task"] == "i2t" for d in docs]
    for d, doc in enumerate(docs):
        expected = vision_spans(np.array(doc["tokens"]), vocab)
        assert np.array_equal(shards.vision_spans(d), expected)
        block = (expected[:, 1] - expected[:, 0]).max() if len(expected) else 0
        assert shards.max_block[d] == block
        assert shards.describe(d).endswith(f"sample 'doc-{d:09d}'")


def test_index_offsets_point_at_the_payloads(make_docs, make_shards, vocab):
    tar = sorted(make_shards(make_docs(4)).glob("*.tar"))[0]
    index = read_index(tar, vocab)
    data = tar.read_bytes()
    for i in range(len(index)):
        meta = data[index.meta_offset[i]:index.meta_offset[i] + index.meta_size[i]]
        assert json.loads(meta)["task"] == TASKS[index.tasks[i]]
        npy = data[index.tokens_offset[i]:index.tokens_offset[i] + index.tokens_size[i]]
        assert npy.startswith(b"\x93NUMPY")


def _write_tar(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _good(key, vocab):
    return encode_sample(key, [vocab.bos, 1, 2, vocab.eos], {"task": "text", "source": "t"})


def test_out_of_vocab_id_names_shard_key_and_position(tmp_path, vocab):
    tar = tmp_path / "shard-000001.tar"
    bad = encode_sample("doc-000123", [vocab.bos, 5, 999999, vocab.eos], {"task": "text", "source": "t"})
    _write_tar(tar, [_good("doc-000122", vocab), bad])
    with pytest.raises(ShardError) as e:
        build_index(tar, vocab)
    msg = str(e.value)
    assert str(tar) in msg and "'doc-000123'" in msg
    assert "999999 at position 2" in msg and "'demo' (size 283)" in msg


@pytest.mark.parametrize("sample, reason", [
    ({"__key__": "k1", "json": b'{"task": "t2i", "source": "x"}'}, "k1.tokens.npy is missing"),
    ({"__key__": "k1", "json": b'{"task": "poem", "source": "x"}',
      "tokens.npy": encode_sample("k", [1], {"task": "text", "source": "x"})["tokens.npy"]}, "'task'"),
    ({"__key__": "k1", "json": b'{"task": "text", "source": "x"}',
      "tokens.npy": encode_sample("k", [1], {"task": "text", "source": "x"})["tokens.npy"][:-2]}, ".npy"),
    ({"__key__": "k1", "json": b'{"task": "t2i", "source": "x"}',
      "tokens.npy": encode_sample("k", [264, 1, 265], {"task": "text", "source": "x"})["tokens.npy"]},
     "no SOT"),
])
def test_malformed_sample_names_shard_and_key(tmp_path, vocab, sample, reason):
    tar = tmp_path / "s.tar"
    _write_tar(tar, [_good("k0", vocab), sample])
    with pytest.raises(ShardError, match=f"{tar}: sample 'k1': .*{reason}"):
        build_index(tar, vocab)


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.75, -1024])  # mid-payload, mid-header, boundaries, marker
def test_truncated_tar_names_the_file(make_docs, make_shards, vocab, tmp_path, cut):
    tar = sorted(make_shards(make_docs(6)).glob("*.tar"))[0]
    data = tar.read_bytes()
    index = build_index(tar, vocab)
    end = int(index.tokens_offset[-1] + index.tokens_size[-1])  # last payload; then the end marker
    n = end if cut == -1024 else int(len(data) * cut)
    bad = tmp_path / "cut.tar"
    bad.write_bytes(data[:n])
    with pytest.raises(ShardError, match=f"{bad}: not a complete uncompressed tar"):
        build_index(bad, vocab)


def test_missing_or_empty_directory_names_the_path(tmp_path, vocab):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        ShardSet(tmp_path / "nope", vocab)
    with pytest.raises(FileNotFoundError, match=f"no \\*.tar shards in {tmp_path}"):
        ShardSet(tmp_path, vocab)


def test_missing_stale_or_foreign_index_is_refused(make_docs, make_shards, vocab):
    path = make_shards(make_docs(3))
    tar = sorted(path.glob("*.tar"))[0]
    index = build_index(tar, vocab)
    with pytest.raises(ShardError, match="indexed for vocabulary 'demo'"):
        read_index(tar, get_vocab("emu3"))
    index_path(tar).unlink()
    with pytest.raises(FileNotFoundError, match="--reindex"):
        ShardSet(path, vocab)
    write_index(index)
    with open(tar, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="stale index"):
        ShardSet(path, vocab)


def _alter(tar, offset, new: bytes):
    data = bytearray(tar.read_bytes())
    data[offset:offset + len(new)] = new
    tar.write_bytes(bytes(data))


@pytest.mark.parametrize("new_token", [999999, 7])  # out of vocabulary, and a valid but different id
def test_payload_altered_after_indexing_fails_the_read(make_docs, make_shards, vocab, new_token):
    path = make_shards(make_docs(4))
    tar = sorted(path.glob("*.tar"))[0]
    index = read_index(tar, vocab)
    tokens_start = int(index.tokens_offset[2] + index.tokens_size[2] - 4 * index.lengths[2])
    _alter(tar, tokens_start + 4, np.int32(new_token).tobytes())  # token 1 of doc 2 (text byte)
    shards = ShardSet(path, vocab)
    assert shards.read(1)[0].tolist() == make_docs(4)[1]["tokens"]  # the others still read
    with pytest.raises(ShardError, match=f"{tar}: sample 'doc-000000002'"):
        shards.read(2)
