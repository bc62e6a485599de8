"""The offline tools' shared parts: one shard set per input published on completion
(``shard_output``), worker identity / input lists / the bad-item policy (``work``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emu3_train.data.stream import ShardSet
from emu3_train.data_pipelines.shard_output import ShardSetWriter, is_done, read_stats
from emu3_train.data_pipelines.work import Skips, Worker, expand_inputs, input_name, my_share, worker_identity

from emu3_train.vocab import get_vocab

VOCAB = get_vocab("demo")


def _write(out, name, docs, **kw) -> dict:
    w = ShardSetWriter(out, name, VOCAB, input_path=f"in/{name}.tar", **kw)
    for i, d in enumerate(docs):
        w.add(d["tokens"], {"task": d["task"], "source": f"{name}/{i}"}, key=f"k{i}.x")
    return w.finish({"skipped": {"undecodable": 1}})


def test_published_shards_read_back_document_for_document(tmp_path, good_docs):
    stats = _write(tmp_path, "00003", good_docs, max_count=4)
    assert stats["shards"] == ["00003-000000.tar", "00003-000001.tar"]
    assert stats["documents"] == 6 and stats["skipped"] == {"undecodable": 1}
    assert stats["tokens"] == sum(len(d["tokens"]) for d in good_docs)
    assert is_done(tmp_path, "00003") and read_stats(tmp_path, "00003") == stats
    assert not list(tmp_path.glob(".partial-*"))
    src = ShardSet(tmp_path, VOCAB)
    assert len(src.lengths) == 6
    for i, d in enumerate(good_docs):
        tokens, meta = src.read(i)
        assert tokens.tolist() == list(d["tokens"]) and meta["source"] == f"00003/{i}"


def test_interrupted_input_is_redone_without_duplicates(tmp_path, good_docs):
    w = ShardSetWriter(tmp_path, "a", VOCAB, max_count=2)
    for i, d in enumerate(good_docs[:3]):
        w.add(d["tokens"], {"task": d["task"], "source": "a"}, key=f"k{i}")
    del w  # the worker dies: nothing published, the input is not done
    assert not is_done(tmp_path, "a") and not list(tmp_path.glob("*.tar"))
    (tmp_path / "a-000000.tar").write_bytes(b"x")  # died while publishing: a tar without stats
    assert _write(tmp_path, "a", good_docs)["documents"] == 6
    assert len(ShardSet(tmp_path, VOCAB).lengths) == 6
    with pytest.raises(FileExistsError, match="already complete"):
        ShardSetWriter(tmp_path, "a", VOCAB)


def test_bad_document_and_duplicate_key_are_named(tmp_path, good_docs, bad_docs):
    w = ShardSetWriter(tmp_path, "s", VOCAB)
    with pytest.raises(ValueError, match=r"s sample oov: token id"):
        w.add(bad_docs["oov"], {"task": "text", "source": "s"}, key="oov")
    w.add(good_docs[0]["tokens"], {"task": "t2i", "source": "s"}, key="k/1")
    with pytest.raises(ValueError, match="k_1: written twice"):
        w.add(good_docs[0]["tokens"], {"task": "t2i", "source": "s"}, key="k.1")
    w.abort()
    assert not list(tmp_path.iterdir())


def test_empty_input_is_done_with_no_shard(tmp_path):
    stats = ShardSetWriter(tmp_path, "e", VOCAB).finish()
    assert stats["documents"] == 0 and stats["shards"] == [] and is_done(tmp_path, "e")


@pytest.mark.parametrize("env,expect", [
    ({}, Worker(0, 1, "single")),
    ({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, Worker(3, 8, "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16"}, Worker(5, 16, "slurm")),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4",
      "SLURM_PROCID": "1", "SLURM_NTASKS": "8"}, Worker(17, 32, "slurm-array")),
])
def test_worker_identity_from_launchers(env, expect):
    assert worker_identity(env=env) == expect
    assert worker_identity(2, 4, env=env) == Worker(2, 4, "args")


def test_worker_identity_refuses_impossible_rank():
    with pytest.raises(ValueError, match="rank 4 is not in"):
        worker_identity(4, 4, env={})
    with pytest.raises(ValueError, match="RANK='x'"):
        worker_identity(env={"RANK": "x", "WORLD_SIZE": "2"})


def test_inputs_expand_and_split_disjointly(tmp_path):
    for i in range(5):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    braces = expand_inputs(str(tmp_path / "{00000..00004}.tar"), [".tar"])
    assert braces == expand_inputs(tmp_path, [".tar"]) == sorted(tmp_path.glob("*.tar"))
    shares = [my_share(braces, Worker(r, 2, "args")) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == braces and not set(shares[0]) & set(shares[1])
    assert input_name(braces[1]) == "00001" and input_name("x/c4.en.jsonl.gz") == "c4_en"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "00001.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="'00001'"):
        expand_inputs(tmp_path, [".tar"])
    with pytest.raises(FileNotFoundError, match="match"):
        expand_inputs(str(tmp_path / "{7..9}.tar"), [".tar"])


def test_skips_count_or_raise():
    s = Skips()
    s.bad("undecodable", "00001/key7", "cannot identify image file")
    s.filtered("too_small", "00001/key8", "100x80 < 256")
    assert s.summary() == "2 skipped (too_small 1, undecodable 1)"
    assert s.items[0] == "00001/key7: undecodable: cannot identify image file"
    strict = Skips("error")
    strict.filtered("too_small", "k", "")
    with pytest.raises(ValueError, match="00001/key7: cannot identify"):
        strict.bad("undecodable", "00001/key7", "cannot identify")
    with pytest.raises(ValueError, match="on_error"):
        Skips("ignore")
    assert json.dumps(dict(s.counts))
    _ = np  # numpy is used by the fixtures' documents
