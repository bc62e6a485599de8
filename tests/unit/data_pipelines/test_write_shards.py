"""write_shards: validates before writing, splits shards, indexes them; the CLI and --reindex."""

from __future__ import annotations

import json

import pytest

from emu3_train.data.index import index_path
from emu3_train.data.stream import ShardSet
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.write_shards import main, write_shards  # installed from data_pipelines/

VOCAB = get_vocab("demo")


def doc(i, **kw):
    return {"tokens": [VOCAB.bos, 65 + i % 26, 66, VOCAB.eos], "task": "text", "source": "t", "i": i, **kw}


def test_writes_indexed_shards_of_max_count(tmp_path):
    shards = write_shards([doc(i) for i in range(7)], tmp_path / "out", "demo", max_count=3)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all(index_path(p).is_file() for p in shards)
    s = ShardSet(tmp_path / "out", VOCAB)
    assert s.lengths.tolist() == [4] * 7
    assert s.read(5)[1] == {"task": "text", "source": "t", "i": 5}


@pytest.mark.parametrize("bad, reason", [
    ({"tokens": [VOCAB.bos, 300, VOCAB.eos], "task": "text", "source": "t"},
     "document 2: token id 300 at position 1 is outside vocabulary 'demo'"),
    ({"tokens": [VOCAB.bos, VOCAB.sov, 1], "task": "t2i", "source": "t"},
     "document 2: malformed vision block"),
    ({"tokens": [1, 2], "task": "story", "source": "t"}, "document 2: field 'task'"),
    ({"tokens": [1.5, 2], "task": "text", "source": "t"}, "document 2: 'tokens' must be"),
    ({"tokens": [1, 2], "task": "text", "source": "t", "when": object()}, "document 2: .*not JSON"),
])
def test_invalid_document_is_named_and_nothing_is_left_behind(tmp_path, bad, reason):
    with pytest.raises(ValueError, match=reason):
        write_shards([doc(0), doc(1), bad, doc(3)], tmp_path, "demo", max_count=1)
    assert not list(tmp_path.iterdir())


def test_refuses_to_mix_with_existing_shards_or_write_nothing(tmp_path):
    write_shards([doc(0)], tmp_path, "demo")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        write_shards([doc(1)], tmp_path, "demo")
    with pytest.raises(ValueError, match="no documents"):
        write_shards([], tmp_path / "empty", "demo")


def test_cli_writes_and_reindexes(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(doc(i)) + "\n" for i in range(5)))
    out = tmp_path / "out"
    assert main(["--input", str(src), "--out", str(out), "--vocab", "demo", "--max-count", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 5 documents (20 tokens) to 3 shards in {out}" in printed
    assert "# writing" not in printed  # ShardWriter kept quiet
    assert len(ShardSet(out, VOCAB)) == 5
    for idx in out.glob("*.idx"):
        idx.unlink()
    assert main(["--reindex", str(out), "--vocab", "demo"]) == 0
    assert ShardSet(out, VOCAB).read(4)[1]["i"] == 4
