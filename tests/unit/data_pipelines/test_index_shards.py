"""index_shards: builds .idx for shards written elsewhere, keeps current ones, names a bad sample."""

from __future__ import annotations

import os

import pytest

from emu3_train.data.index import index_path
from emu3_train.data.stream import ShardSet
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.index_shards import cli, main  # installed from data_pipelines/
from emu3_train.data_pipelines.write_shards import write_shards

VOCAB = get_vocab("demo")


def test_indexes_foreign_shards_and_keeps_current_ones(tmp_path, good_docs, make_tar, capsys):
    write_shards(good_docs, tmp_path, VOCAB, max_count=4)
    for idx in tmp_path.glob("*.idx"):
        idx.unlink()
    make_tar(tmp_path / "other-000000.tar", [("a", good_docs[0]["tokens"], "t2i")])
    assert main([str(tmp_path), "--vocab", "demo"]) == 0
    assert "indexed 3 shards (7 documents" in capsys.readouterr().out
    shards = ShardSet(tmp_path, VOCAB)
    assert len(shards) == 7 and shards.read(0)[1]["source"] == "hand-made"  # other-* sorts first

    other = index_path(tmp_path / "other-000000.tar")
    mtime = other.stat().st_mtime_ns
    assert main([str(tmp_path), "--vocab", "demo"]) == 0
    assert "indexed 0 shards (0 documents, 0 tokens) in" in capsys.readouterr().out
    assert other.stat().st_mtime_ns == mtime
    os.utime(tmp_path / "other-000000.tar", ns=(mtime + 10**9, mtime + 10**9))  # the shard changed later
    assert main([str(tmp_path), "--vocab", "demo"]) == 0
    assert "indexed 1 shards" in capsys.readouterr().out
    assert main([str(tmp_path), "--vocab", "demo", "--force"]) == 0
    assert "indexed 3 shards" in capsys.readouterr().out


@pytest.mark.parametrize("key, reason", [
    ("oov", "token id 286 at position 2 is outside vocabulary 'demo'"),
    ("noeov", "malformed vision block"),
])
def test_bad_sample_is_one_error_line_naming_shard_and_key(tmp_path, good_docs, bad_docs, make_tar, capsys,
                                                           key, reason):
    tar = make_tar(tmp_path / "x.tar", [("fine", good_docs[0]["tokens"], "t2i"), (key, bad_docs[key], "t2i")])
    assert cli([str(tmp_path), "--vocab", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tar}: sample {key!r}: ") and reason in err
    assert not index_path(tar).exists()


def test_missing_or_empty_directory(tmp_path, capsys):
    assert cli([str(tmp_path / "nope")]) == 2
    assert "error: shard directory not found" in capsys.readouterr().err
    assert cli([str(tmp_path)]) == 2
    assert f"error: no *.tar shards in {tmp_path}" in capsys.readouterr().err
