"""inspect_shards: counts, problems found without raising, packing, --json, histogram PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from emu3_train.data.loader import PackedLoader
from emu3_train.data.packing import Piece
from emu3_train.data.stream import ShardSet
from emu3_train.layout import i2t_document, t2i_document, text_document, vision_block
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.inspect_packing import cut_blocks  # installed from data_pipelines/
from emu3_train.data_pipelines.inspect_shards import cli, main
from emu3_train.data_pipelines.write_shards import write_shards

VOCAB = get_vocab("demo")
TOK = load_tokenizer(VOCAB)


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


def mixed_docs(n: int, seed: int = 0) -> list[dict]:
    """``n`` documents of every task and many lengths: t2i/i2t images of 1x1 to 6x6 codes, text of
    4..120 bytes, videos with video meta (one of them longer than a 96-token row)."""
    rng = np.random.default_rng(seed)
    enc = TOK.encode
    codes = lambda *shape: rng.integers(0, VOCAB.codebook_size, shape)  # noqa: E731
    docs = []
    for i in range(n):
        kind = ("t2i", "i2t", "text", "video")[i % 4]
        caption = enc("x" * int(rng.integers(1, 12)))
        if kind == "t2i":
            tokens = t2i_document(VOCAB, caption, codes(*rng.integers(1, 7, 2)), enc)
        elif kind == "i2t":
            tokens = i2t_document(VOCAB, caption, codes(*rng.integers(1, 7, 2)), enc)
        elif kind == "text":
            tokens = text_document(VOCAB, enc("t" * int(rng.integers(4, 120))))
        else:
            t = 12 if i == 3 else int(rng.integers(1, 3))  # document 3's block does not fit 96 tokens
            tokens = [VOCAB.bos, *caption, *vision_block(VOCAB, codes(t, 2, 3), enc, fps=8, duration=t / 2),
                      VOCAB.eos]
        docs.append({"tokens": tokens, "task": kind, "source": "mixed"})
    return docs


@pytest.mark.parametrize("flags, loader_args", [
    ([], {}),
    (["--pack-window", 8, "--seed", 3, "--shard-group", 2], {"pack_window": 8, "seed": 3, "shard_group": 2}),
    (["--pack-window", 8, "--tasks", "t2i,text"], {"pack_window": 8, "tasks": ["t2i", "text"]}),
])
def test_packing_report_is_what_the_loader_serves(tmp_path, capsys, flags, loader_args):
    write_shards(mixed_docs(45), tmp_path, VOCAB, max_count=7)  # 7 shards
    code, r = run_json(capsys, tmp_path, "--seq-len", 96, *flags)
    assert code == 0 and r["seq_len"] == 96 and r["rows"] > 0 and r["split_vision_blocks"] == 0
    loader = PackedLoader(ShardSet(tmp_path, VOCAB), seq_len=96, micro_batch_size=1, **loader_args)
    served = [next(loader) for _ in range(r["rows"])]
    stats = loader.stats()
    assert r["fill"] == pytest.approx(stats["fill"], rel=1e-12)  # the loader's data/fill over those rows
    assert r["docs_per_row"] == pytest.approx(stats["docs_per_row"], rel=1e-12)
    assert (r["skipped"], r["split_documents"]) == (stats["skipped_oversize"], stats["split"])
    assert r["fill"] == pytest.approx(sum(b["num_tokens"] for b in served) / (96 * len(served)))
    if "tasks" not in loader_args:
        assert r["skipped"] >= 1  # document 3's video block is longer than a row
    window = loader_args.get("pack_window", 256)  # the first window that starts in epoch 1 is not in it
    assert r["epochs_planned"] == pytest.approx(loader.stream.seed_at(r["rows"]).sources[0][1] / 45
                                                + loader.stream.seed_at(r["rows"]).sources[0][0])
    assert r["epochs_planned"] >= 1 and (window > 45 or r["epochs_planned"] < 1 + window / 45)


def test_a_piece_boundary_inside_a_block_is_counted():
    spans = {0: np.array([[2, 10]]), 1: np.zeros((0, 2), np.int64)}
    assert cut_blocks([[Piece(0, 0, 5)], [Piece(0, 5, 12)]], spans.__getitem__) == 1
    assert cut_blocks([[Piece(0, 0, 10)], [Piece(0, 10, 12), Piece(1, 0, 3)]], spans.__getitem__) == 0


def test_video_meta_is_accepted_and_summed(tmp_path, capsys):
    docs = [d for d in mixed_docs(12) if d["task"] == "video"]  # 3 videos: 12, then 1-2 code frames
    ntsc_fps = 30000 / 1001
    ntsc = vision_block(VOCAB, np.ones((2, 2, 2), int), TOK.encode, fps=ntsc_fps, duration=8 / ntsc_fps)
    docs.append({"tokens": [VOCAB.bos, *ntsc, VOCAB.eos], "task": "video", "source": "ntsc"})
    write_shards(docs, tmp_path, VOCAB)
    code, r = run_json(capsys, tmp_path)
    assert code == 0 and r["malformed_vision_blocks"] == 0
    frames = [d["tokens"].count(VOCAB.eof) for d in docs[:3]]  # code frames; duration = frames / 2
    assert r["video_blocks"] == 4 and r["video_fps"] == {"8": 3, "29.97": 1}
    assert r["video_seconds"] == pytest.approx(sum(frames) / 2 + 0.267)


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


def test_text_report_shows_video_and_packing(tmp_path, capsys):
    write_shards(mixed_docs(12), tmp_path, VOCAB)
    assert main([str(tmp_path), "--vocab", "demo", "--seq-len", "96"]) == 0
    out = capsys.readouterr().out
    assert "video: 3 blocks, " in out and "by fps 8: 3" in out
    assert "packing at seq_len 96: fill " in out and "epochs planned)" in out
