"""inspect_shards: counts, problems found without raising, packing, --json, histogram PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emu3_train.data.packing import PackResult, Piece, pack_rows
from emu3_train.layout import vision_spans
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines import inspect_shards as inspect_mod  # installed from data_pipelines/
from emu3_train.data_pipelines.inspect_shards import cli, main
from emu3_train.data_pipelines.write_shards import write_shards

VOCAB = get_vocab("demo")


def run_json(capsys, *args) -> tuple[int, dict]:
    code = main([*map(str, args), "--vocab", "demo", "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object, nothing else
    return code, json.loads(out)


def test_counts_by_task_and_modality(tmp_path, good_docs, capsys):
    write_shards(good_docs, tmp_path, VOCAB, max_count=4)
    code, r = run_json(capsys, tmp_path)
    assert code == 0
    tokens = [np.array(d["tokens"]) for d in good_docs]
    assert (r["shards"], r["documents"], r["tokens"]) == (2, 6, sum(map(len, tokens)))
    assert r["documents_by_task"] == {"i2t": 2, "t2i": 2, "text": 1, "video": 1}
    assert r["tokens_by_task"]["video"] == len(tokens[5])
    every = np.concatenate(tokens)
    assert r["tokens_by_modality"] == {"text": int((every < 256).sum()), "vision": int((every >= 266).sum()),
                                       "special": int(((every >= 256) & (every < 266)).sum()), "invalid": 0}
    assert r["vocab_violations"] == r["malformed_vision_blocks"] == r["unreadable"] == 0
    assert r["shards_without_index"] == 0 and r["lengths"]["max"] == max(map(len, tokens))
    assert sum(r["length_histogram"]["counts"]) == 6


def test_packing_matches_pack_rows_and_never_splits_a_block(tmp_path, good_docs, capsys):
    write_shards(good_docs, tmp_path, VOCAB)
    lengths = np.array([len(d["tokens"]) for d in good_docs])
    spans = [vision_spans(np.array(d["tokens"]), VOCAB) for d in good_docs]
    longest = max(int((s[:, 1] - s[:, 0]).max()) for s in spans if len(s))
    seq_len = longest  # every block fits, the longer documents split around them
    code, r = run_json(capsys, tmp_path, "--seq-len", seq_len)
    assert code == 0 and r["seq_len"] == seq_len
    order = np.random.default_rng([0, 0]).permutation(6)
    plan = pack_rows(order, lengths, spans.__getitem__, seq_len)
    assert r["rows"] == len(plan.rows) and r["skipped"] == 0 and r["split_vision_blocks"] == 0
    assert r["fill"] == pytest.approx(lengths.sum() / (len(plan.rows) * seq_len))
    assert r["docs_per_row"] == pytest.approx(sum(map(len, plan.rows)) / len(plan.rows))
    assert r["split_documents"] == plan.num_split > 0
    _, r = run_json(capsys, tmp_path, "--seq-len", longest - 1)  # the video block no longer fits
    assert r["skipped"] >= 1


def test_a_piece_boundary_inside_a_block_is_counted(monkeypatch):
    spans = np.array([[2, 10]])

    def bad_pack(doc_ids, lengths, vision_spans, seq_len, policy):
        return PackResult(rows=[[Piece(0, 0, 5)], [Piece(0, 5, 12)]])

    monkeypatch.setattr(inspect_mod, "pack_rows", bad_pack)
    r = inspect_mod.packing_report([(12, spans)], seq_len=8, pack_window=4, seed=0)
    assert r["split_vision_blocks"] == 1


def test_problems_are_reported_not_raised(tmp_path, good_docs, bad_docs, make_tar, capsys):
    make_tar(tmp_path / "bad.tar", [("fine", good_docs[0]["tokens"], "t2i"),
                                     *((k, tokens, "t2i") for k, tokens in bad_docs.items())])
    with open(tmp_path / "bad.tar", "r+b") as f:  # a payload that is not an .npy array
        data = f.read()
        at = data.index(b"\x93NUMPY", data.index(b"oov.tokens.npy"))
        f.seek(at)
        f.write(b"garbage!")
    write_shards(good_docs[:2], tmp_path / "sub", VOCAB)
    (tmp_path / "sub" / "shard-000000.tar").rename(tmp_path / "cut.tar")
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2])  # truncated
    code, r = run_json(capsys, tmp_path, "--seq-len", 64)
    assert code == 1
    assert r["malformed_vision_blocks"] == 2 and r["vocab_violations"] == 0 and r["unreadable"] == 2
    examples = "\n".join(r["malformed_vision_blocks_examples"])
    assert f"{tmp_path / 'bad.tar'}: sample 'noeov': malformed vision block: 1 SOV but 0 EOV" in examples
    assert "sample 'rows': vision block [" in examples and "contradicts its meta '2*2'" in examples
    unreadable = "\n".join(r["unreadable_examples"])
    assert "sample 'oov': tokens payload is not a readable .npy array" in unreadable
    assert f"{tmp_path / 'cut.tar'}: not a complete uncompressed tar" in unreadable
    assert r["shards_without_index"] == 2 and r["documents"] >= 3  # the good samples still counted


def test_vocabulary_violations_text_report_and_histogram(tmp_path, good_docs, bad_docs, make_tar, capsys):
    make_tar(tmp_path / "x.tar", [("fine", good_docs[0]["tokens"], "t2i"), ("oov", bad_docs["oov"], "text")])
    png = tmp_path / "plots" / "lengths.png"
    assert main([str(tmp_path), "--vocab", "demo", "--histogram", str(png)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert f"  {tmp_path / 'x.tar'}: sample 'oov': token id 286 at position 2 is outside vocabulary 'demo' " \
           "(size 283)" in out
    assert out[-1] == "inspected 2 documents (" + f"{len(good_docs[0]['tokens']) + 4} tokens) in 1 shards: " \
           "1 vocabulary violations, 0 malformed vision blocks, 0 unreadable, 0 checksum mismatches, " \
           "0 index mismatches"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (900, 420)


def test_missing_directory_is_one_error_line(tmp_path, capsys):
    assert cli([str(tmp_path / "nope"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"error: shard directory not found: {tmp_path / 'nope'}"
