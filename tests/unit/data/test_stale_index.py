"""The stale-index check run when a shard is opened: same-size changes at the tar's end are caught,
cheaply, and a tar with data after its end-of-archive marker is never indexed."""

from __future__ import annotations

import io
import tarfile

import pytest

from emu3_train.data import index as index_mod
from emu3_train.data.format import encode_sample
from emu3_train.data.index import ShardError, build_index, indexed_end, read_index
from emu3_train.data.stream import ShardSet

# isort: split
from emu3_train.data_pipelines.write_shards import main as write_main  # installed from data_pipelines/


def roomy_shard(path, vocab, need: int = 3 * 1024):
    """A shard of ``path`` whose end padding holds ``need`` more bytes (member + end marker)."""
    for tar in sorted(path.glob("*.tar")):
        if tar.stat().st_size - indexed_end(read_index(tar, vocab)) >= need + 1024:
            return tar
    pytest.fail(f"no shard in {path} has {need} bytes of end padding")


def append(tar, vocab, key="late", suffixes=("json", "tokens.npy")):
    sample = encode_sample(key, [vocab.bos, 1, 2, vocab.eos], {"task": "text", "source": "appended"})
    with tarfile.open(tar, "a") as tf:
        for suffix in suffixes:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(sample[suffix])
            tf.addfile(info, io.BytesIO(sample[suffix]))


@pytest.mark.parametrize("suffixes", [("json", "tokens.npy"), ("json",)])
def test_a_member_appended_into_the_padding_makes_the_index_stale(make_docs, make_shards, vocab, suffixes):
    out = make_shards(make_docs(30), max_count=10)
    tar = roomy_shard(out, vocab)
    size, docs = tar.stat().st_size, len(ShardSet(out, vocab))
    end = indexed_end(read_index(tar, vocab))
    append(tar, vocab, suffixes=suffixes)
    assert tar.stat().st_size == size
    with pytest.raises(ShardError, match=f"stale index: shard {tar} holds data at byte {end}, after its last "
                                         "indexed sample 'doc-.*added after indexing .*--reindex"):
        ShardSet(out, vocab)
    if suffixes == ("json",):
        return  # a half sample: reindexing names it (test_shards covers the message)
    assert write_main(["--reindex", str(out), "--vocab", vocab.name]) == 0  # the suggested fix
    shards = ShardSet(out, vocab)
    assert len(shards) == docs + 1
    late = [d for d in range(len(shards)) if shards.describe(d).endswith("'late'")]
    assert len(late) == 1 and shards.read(late[0])[1]["source"] == "appended"


def test_opening_a_shard_reads_only_its_tail(make_docs, make_shards, vocab, monkeypatch):
    out = make_shards(make_docs(30), max_count=30)
    tar = next(out.glob("*.tar"))
    reads = []
    real = index_mod.first_nonzero_byte

    def spy(f, offset, *a):
        reads.append((offset, tar.stat().st_size - offset))
        return real(f, offset, *a)

    monkeypatch.setattr(index_mod, "first_nonzero_byte", spy)
    read_index(tar, vocab)
    (offset, length), = reads
    assert offset == indexed_end(index_mod.load_index(tar))
    assert length <= 10240 + 1024  # end marker and record padding only


def test_data_after_the_end_of_archive_marker_is_refused(make_docs, make_shards, vocab):
    first = make_shards(make_docs(4, seed=1), max_count=10, name="a")
    second = make_shards(make_docs(4, seed=2), max_count=10, name="b")
    tar = first / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes() + (second / "shard-000000.tar").read_bytes())  # `cat a.tar b.tar`
    with pytest.raises(ShardError, match=f"{tar}: data at byte .* after the end-of-archive marker .*"
                                         "concatenated tars"):
        build_index(tar, vocab)
    with pytest.raises(ShardError, match="stale index"):
        ShardSet(first, vocab)
