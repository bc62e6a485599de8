"""Damaged demo shards: inspect_shards finds what training would reject or never read, and the fix
the training error suggests (``write_shards --reindex``) works on a truncated shard."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from emu3_train.data.format import encode_sample
from emu3_train.data.index import ShardError, index_path, read_index
from emu3_train.data.stream import ShardSet
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.index_shards import main as index_main
from emu3_train.data_pipelines.inspect_shards import main as inspect_main

VOCAB = get_vocab("demo")


@pytest.fixture
def shards(demo, tmp_path):
    """A fresh copy of the demo eval split (one shard, 360 documents), its tar and its index."""
    out = tmp_path / "eval"
    shutil.copytree(demo / "eval", out)
    tar = out / "shard-000000.tar"
    return out, tar, read_index(tar, VOCAB)


def inspect_json(capsys, *args) -> tuple[int, dict, str]:
    code = inspect_main([*map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def append_sample(tar, key="extra"):
    """Append a valid text sample with tarfile's append mode (it lands in the end padding)."""
    sample = encode_sample(key, [VOCAB.bos, 72, 105, VOCAB.eos], {"task": "text", "source": "late"})
    with tarfile.open(tar, "a") as tf:
        for suffix in ("json", "tokens.npy"):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(sample[suffix])
            tf.addfile(info, io.BytesIO(sample[suffix]))


def test_without_vocab_the_index_vocabulary_is_used(shards, capsys):
    out, _, _ = shards
    code, r, err = inspect_json(capsys, out)
    modality = r["tokens_by_modality"]
    assert modality["vision"] == 360 * 64 and modality["invalid"] == 0  # 8x8 codes per document
    assert modality["text"] < r["tokens"] / 2
    assert code == 0 and (r["vocab"], r["vocab_source"]) == ("demo", "index") and "note:" not in err
    code, r, _ = inspect_json(capsys, out, "--vocab", "emu3")  # asked explicitly: the index disagrees
    assert code == 1 and r["vocab"] == "emu3" and r["index_mismatches"] == 1
    assert "indexed for vocabulary 'demo'" in r["index_mismatches_examples"][0]


def test_unindexed_shards_fall_back_to_emu3_with_a_note(shards, capsys):
    out, tar, _ = shards
    index_path(tar).unlink()
    code, r, err = inspect_json(capsys, out)
    assert (r["vocab"], r["vocab_source"], r["shards_without_index"]) == ("emu3", "default", 1)
    assert f"note: no --vocab and no .idx in {out} records a vocabulary" in err


def test_bit_flips_inside_the_vocabulary_are_checksum_mismatches(shards, capsys):
    out, tar, index = shards
    data = bytearray(tar.read_bytes())
    tokens_end = int(index.tokens_offset[2] + index.tokens_size[2])
    at = tokens_end - 4 * int(index.lengths[2]) + 4  # t2i token 1: a caption byte, still a text id after ^1
    data[at] ^= 1
    meta = bytes(data[index.meta_offset[7]:index.meta_offset[7] + index.meta_size[7]])
    at = int(index.meta_offset[7]) + meta.index(b"digits") + 5
    data[at] = ord("z")  # "sklearn-digitz": still valid JSON with a string source
    tar.write_bytes(bytes(data))
    code, r, _ = inspect_json(capsys, out, "--seq-len", 256)
    assert code == 1
    assert r["checksum_mismatches"] == 2 and r["vocab_violations"] == r["malformed_vision_blocks"] == 0
    examples = "\n".join(r["checksum_mismatches_examples"])
    assert f"{tar}: sample 'doc-000000002': doc-000000002.tokens.npy has CRC-32" in examples
    assert f"{tar}: sample 'doc-000000007': doc-000000007.json has CRC-32" in examples
    with pytest.raises(ShardError, match=f"{tar}: sample 'doc-000000002': payload checksum differs"):
        ShardSet(out, VOCAB).read(2)  # what training does with it


def test_a_member_appended_into_the_end_padding_is_an_index_mismatch(shards, capsys):
    out, tar, index = shards
    size = tar.stat().st_size
    append_sample(tar)
    assert tar.stat().st_size == size  # same size: only the tail check sees it
    code, r, _ = inspect_json(capsys, out)
    assert code == 1 and r["documents"] == 361
    assert r["index_mismatches"] == 1
    assert r["index_mismatches_examples"] == [
        f"{tar}: sample 'extra': in the tar but not in its index {index_path(tar)}: training never reads it "
        "(added after indexing?); reindex"]
    assert inspect_main([str(out)]) == 1
    assert "1 index mismatches" in capsys.readouterr().out.splitlines()[-1]


def test_samples_lost_from_a_truncated_shard_are_named(shards, capsys):
    out, tar, index = shards
    with open(tar, "r+b") as f:
        f.truncate(int(index.tokens_offset[300]) + 10)
    code, r, _ = inspect_json(capsys, out)
    assert code == 1 and r["documents"] == 300 and r["index_mismatches"] == 60
    assert f"{tar}: sample 'doc-000000300': listed in its index" in r["index_mismatches_examples"][0]


def suggested_command(message: str) -> list[str]:
    """The command between backticks in an error message, run with this interpreter."""
    command = shlex.split(re.search(r"`(python -m [^`]+)`", message).group(1))
    return [sys.executable, *command[1:]]


@pytest.mark.parametrize("cut, kept", [
    ("inside_payload", 300),  # the tokens of doc 300 are cut short
    ("at_a_header", 300),  # the file ends where doc 300's first header starts
    ("in_the_end_marker", 360),  # every sample is whole, the end-of-archive marker is not
])
def test_the_suggested_reindex_keeps_the_complete_prefix_of_a_truncated_shard(shards, cut, kept):
    out, tar, index = shards
    before = ShardSet(out, VOCAB)
    originals = [before.read(d)[0] for d in range(kept)]
    before.close()
    at = {"inside_payload": int(index.tokens_offset[300]) + 10,
          "at_a_header": int(index.meta_offset[300]) - 512,
          "in_the_end_marker": int(index.tokens_offset[359] + index.tokens_size[359]) + 600}[cut]
    size = tar.stat().st_size
    with open(tar, "r+b") as f:
        f.truncate(at)
    with pytest.raises(ShardError, match=f"stale index: shard {tar}") as e:
        ShardSet(out, VOCAB)
    proc = subprocess.run(suggested_command(str(e.value)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cut short by" in str(e.value) and "the command keeps its complete samples" in str(e.value)
    warning = next(line for line in proc.stderr.splitlines() if line.startswith("warning:"))
    assert f"{tar}: truncated shard" in warning and f"kept its {kept} complete samples" in warning
    if kept < 360:
        assert "lost the 60 samples its old index listed after them ('doc-000000300' .. 'doc-000000359')" \
            in warning
    else:
        assert "lost none of the samples its old index listed" in warning
    assert "recovered 1 truncated shards" in proc.stdout
    damaged = tar.with_name(tar.name + ".damaged")
    assert damaged.stat().st_size == at and tar.stat().st_size % 10240 == 0
    after = ShardSet(out, VOCAB)  # opens: the stale-index check passes
    assert len(after) == kept
    for d in range(kept):
        assert np.array_equal(after.read(d)[0], originals[d])
    assert after.describe(kept - 1).endswith(f"'doc-{kept - 1:09d}'")
    assert tar.stat().st_size <= size


def test_reindex_without_an_old_index_and_with_nothing_to_keep(shards, capsys):
    out, tar, index = shards
    index_path(tar).unlink()
    data = tar.read_bytes()
    with open(tar, "r+b") as f:
        f.truncate(int(index.tokens_offset[10]) + 3)
    assert index_main([str(out), "--vocab", "demo"]) == 0
    captured = capsys.readouterr()
    assert "kept its 10 complete samples ('doc-000000000' .. 'doc-000000009') and lost the" in captured.err
    assert "(no readable old index says which samples)" in captured.err
    assert len(ShardSet(out, VOCAB)) == 10

    tar.write_bytes(data[:int(index.tokens_offset[0]) + 3])  # inside the first sample
    (out / "shard-000000.tar.damaged").unlink()
    from emu3_train.data_pipelines.index_shards import cli

    assert cli([str(out), "--vocab", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {tar}: not a complete uncompressed tar") and "nothing to recover" in err
    assert "rewrite the shard with write_shards --input" in err
    assert tar.stat().st_size == int(index.tokens_offset[0]) + 3  # left untouched


def test_a_concatenated_tar_is_reported_not_silently_half_read(shards, capsys):
    out, tar, _ = shards
    tar.write_bytes(tar.read_bytes() * 2)  # `cat a.tar a.tar`: tarfile stops at the first end marker
    code, r, _ = inspect_json(capsys, out)
    assert code == 1 and r["documents"] == 360
    assert any(f"{tar}: not a complete uncompressed tar: data at byte" in ex and "concatenated" in ex
               for ex in r["unreadable_examples"])
