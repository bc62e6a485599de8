"""tokenize_text: jsonl(.gz)/parquet/txt -> token shards with known Qwen ids; bad items counted and
named; workers split inputs disjointly; a killed worker's rerun completes without duplicates."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emu3_train.data.stream import ShardSet
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.shard_output import is_done, read_stats  # installed from data_pipelines/
from emu3_train.data_pipelines.tokenize_text import cli, main, tokenize_corpus
from emu3_train.data_pipelines.work import Worker

EMU3 = get_vocab("emu3")
BOS, EOS = 151_849, 151_850
# Qwen BPE ids, checked by eye once against tiktoken's token bytes:
HELLO = [9707, 1879]  # "Hello" " world"
HELLO_NIHAO = [9707, 1879, 11, 220, 108386]  # "Hello" " world" "," " " "你好"
CAFE = [34, 2577, 963, 7906, 1187, 275]  # "Cafe\u0301 au lait" after NFC: "C" "af" "é" " au" " la" "it"
# "naïve 日本語 <|im_end|>": the special token's spelling is plain text
SPECIAL = [3376, 37572, 586, 75402, 21894, 102819, 82639, 318, 6213, 91, 29]


@pytest.fixture(autouse=True)
def single_worker(monkeypatch):
    """No launcher environment leaks into the default worker identity (here or in subprocesses)."""
    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE") or name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMU3)


def docs_of(out) -> list[tuple[str, str, str, list[int]]]:
    """``(shard, key, source, tokens)`` of every published document, in ShardSet order."""
    shards = ShardSet(out, EMU3)
    rows = []
    for d in range(len(shards)):
        tokens, meta = shards.read(d)
        index = shards.indexes[shards.shard_of[d]]
        assert meta["task"] == "text"
        rows.append((index.path.name, str(index.keys[shards.local_of[d]]), meta["source"], tokens.tolist()))
    return rows


def write_jsonl(path, lines: list) -> None:
    data = "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(data)


def test_jsonl_gz_and_parquet_round_trip_with_known_qwen_ids(tmp_path, capsys):
    a, b, out = tmp_path / "a.jsonl.gz", tmp_path / "b.parquet", tmp_path / "out"
    write_jsonl(a, [{"text": "Hello world"}, "", {"text": "Hello world, 你好", "id": 7}, "{oops",
                    {"text": "  "}])
    texts = ["Hello world, 你好", None, "", "Cafe\u0301 au lait", "naïve 日本語 <|im_end|>"]
    pq.write_table(pa.table({"id": list(range(5)), "text": texts}), b, row_group_size=2)
    assert pq.ParquetFile(b).metadata.num_row_groups == 3
    assert main(["--input", str(a), str(b), "--out", str(out)]) == 0
    assert docs_of(out) == [
        ("a-000000.tar", "L000000001", "a:1", [BOS, *HELLO, EOS]),
        ("a-000000.tar", "L000000003", "a:3", [BOS, *HELLO_NIHAO, EOS]),
        ("b-000000.tar", "R000000000", "b:0", [BOS, *HELLO_NIHAO, EOS]),
        ("b-000000.tar", "R000000003", "b:3", [BOS, *CAFE, EOS]),
        ("b-000000.tar", "R000000004", "b:4", [BOS, *SPECIAL, EOS]),
    ]
    sa, sb = read_stats(out, "a"), read_stats(out, "b")
    assert (sa["documents"], sa["tokens"], sa["format"]) == (2, 11, "jsonl")
    assert sa["skipped"] == {"bad_json": 1, "empty_text": 1}
    assert sa["skipped_items"][0].startswith(f"{a}:4: bad_json: not valid JSON")
    assert sb["skipped"] == {"empty_text": 1, "missing_field": 1}
    assert sb["skipped_items"][0] == f"{b} row 1: missing_field: column 'text' is null"
    printed = capsys.readouterr()
    assert printed.out.startswith(f"wrote 5 documents (39 tokens) from 2 inputs (0 already done) to {out} in")
    assert printed.out.rstrip().endswith("tokens/s); 4 skipped (bad_json 1, empty_text 2, missing_field 1)")
    assert f"skipped: {b} row 1: missing_field" in printed.err

    # a rerun skips both inputs untouched; --force redoes them byte for byte
    tar = (out / "b-000000.tar").read_bytes()
    mtime = (out / "b-000000.tar").stat().st_mtime_ns
    assert main(["--input", str(tmp_path), "--out", str(out)]) == 0
    assert "from 2 inputs (2 already done)" in capsys.readouterr().out
    assert (out / "b-000000.tar").stat().st_mtime_ns == mtime
    assert main(["--input", str(b), "--out", str(out), "--force"]) == 0
    assert (out / "b-000000.tar").read_bytes() == tar and len(docs_of(out)) == 5


def test_txt_is_one_nfc_document_and_a_directory_mixes_formats(tmp_path, tok):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "c.txt").write_text("Cafe\u0301 au lait.\n\nA second paragraph.\n", encoding="utf-8")
    write_jsonl(src / "d.json.gz", [{"meta": {"body": "Hello world"}}])  # C4-style name, nested field
    write_jsonl(src / "e.jsonl", [{"meta": {"body": "Hello world, 你好"}}, {"meta": {}}])
    pq.write_table(pa.table({"meta": [{"body": "Cafe\u0301 au lait"}]}), src / "f.parquet")
    with gzip.open(src / "g.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Hello world")
    (src / "readme.md").write_text("not an input")
    run = tokenize_corpus(src, tmp_path / "out", field="meta.body", tokenizer=tok)
    assert (run.inputs, run.documents, run.skips.summary()) == (5, 5, "1 skipped (missing_field 1)")
    docs = {source: tokens for _, _, source, tokens in docs_of(tmp_path / "out")}
    assert docs["d:1"] == [BOS, *HELLO, EOS] and docs["e:1"] == [BOS, *HELLO_NIHAO, EOS]
    assert docs["f:0"] == [BOS, *CAFE, EOS] and docs["g"] == [BOS, *HELLO, EOS]
    assert docs["c"] == [BOS, *tok.encode("Caf\u00e9 au lait.\n\nA second paragraph.\n"), EOS]  # NFC: é
    assert docs["c"][1:4] == [34, 2577, 963] and tok.decode(docs["c"]).startswith("Café au lait.\n\nA second")
    assert run.skips.items == [f"{src / 'e.jsonl'}:2: missing_field: no field 'meta.body'"]


BAD_LINES = ['{"text": "fine"}', '{"text": "ok"', '["a", "list"]', '{"body": "no text"}', '{"text": 5}',
             '{"text": null}', b'{"text": "\xff"}', '{"text": "also fine"}']


def _bad_file(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in BAD_LINES))
    return src


def test_bad_lines_are_skipped_counted_and_named(tmp_path, tok):
    src = _bad_file(tmp_path)
    run = tokenize_corpus(src, tmp_path / "out", tokenizer=tok)
    assert run.documents == 2 and [s for _, _, s, _ in docs_of(tmp_path / "out")] == ["bad:1", "bad:8"]
    stats = read_stats(tmp_path / "out", "bad")
    assert stats["skipped"] == {"bad_json": 2, "bad_utf8": 1, "missing_field": 3}
    assert [i.split(": ", 2)[:2] for i in stats["skipped_items"]] == [
        [f"{src}:{n}", why] for n, why in [(2, "bad_json"), (3, "bad_json"), (4, "missing_field"),
                                            (5, "missing_field"), (6, "missing_field"), (7, "bad_utf8")]]
    assert stats["skipped_items"][3].endswith("field 'text' is int, not a string")


def test_on_error_error_is_one_line_naming_file_and_line_and_publishes_nothing(tmp_path, capsys):
    src, out = _bad_file(tmp_path), tmp_path / "out"
    assert cli(["--input", str(src), "--out", str(out), "--on-error", "error"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the progress bar, then one error line
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith(f"error: {src}:2: not valid JSON (Expecting ',' delimiter: line 1 column 14")
    assert not is_done(out, "bad") and not list(out.glob("*.tar")) and not list(out.glob(".partial-*"))
    assert cli(["--input", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "error: no input files" in capsys.readouterr().err


def test_truncated_gzip_keeps_complete_lines_and_is_counted(tmp_path, tok):
    full = tmp_path / "full.jsonl.gz"
    write_jsonl(full, [{"text": f"line {i} " + "word " * 50} for i in range(400)])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    run = tokenize_corpus(cut, tmp_path / "out", tokenizer=tok)
    stats = read_stats(tmp_path / "out", "cut")
    assert stats["skipped"] == {"truncated_input": 1}
    assert stats["skipped_items"][0].startswith(f"{cut}: truncated_input: compressed stream ends early")
    assert 0 < run.documents < 400
    kept = docs_of(tmp_path / "out")
    assert [s for _, _, s, _ in kept] == [f"cut:{i + 1}" for i in range(run.documents)]
    assert kept[-1][3] == [BOS, *tok.encode(f"line {run.documents - 1} " + "word " * 50), EOS]  # complete
    with pytest.raises(ValueError, match="compressed stream ends early"):
        tokenize_corpus(cut, tmp_path / "strict", tokenizer=tok, on_error="error")


def test_parquet_without_the_column_is_an_error_naming_its_columns(tmp_path, tok):
    pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet: no column 'text' \(columns: content, url\)"):
        tokenize_corpus(tmp_path / "p.parquet", tmp_path / "out", tokenizer=tok)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "q.parquet")
    with pytest.raises(ValueError, match="column 'text' holds int64, not strings"):
        tokenize_corpus(tmp_path / "q.parquet", tmp_path / "out", tokenizer=tok)
    assert not list((tmp_path / "out").iterdir())  # nothing published, nothing partial
    (tmp_path / "r.parquet").write_bytes(b"PAR1 but not really")  # corrupt: skipped, counted, named
    run = tokenize_corpus(tmp_path / "r.parquet", tmp_path / "out", tokenizer=tok)
    assert run.skips.counts == {"corrupt_input": 1} and run.empty_inputs == [
        f"{tmp_path / 'r.parquet'}: no documents (every item was skipped: corrupt_input 1)"]
    assert run.skips.items[0].startswith(f"{tmp_path / 'r.parquet'}: corrupt_input: not a readable parquet")


def _corpus(src) -> None:
    src.mkdir()
    for i in range(5):
        write_jsonl(src / f"{i:05d}.jsonl.gz", [{"text": f"document {j} of shard {i}: Hello world"}
                                                 for j in range(1, 4 + i)])
    rows = pa.table({"text": [f"row {r}, 你好" for r in range(7)]})
    pq.write_table(rows, src / "p.parquet", row_group_size=3)


def test_two_workers_write_disjoint_outputs_whose_union_is_one_workers(tmp_path, tok, capsys, monkeypatch):
    src = tmp_path / "in"
    _corpus(src)
    both, one = tmp_path / "both", tmp_path / "one"
    monkeypatch.setenv("SLURM_PROCID", "1")  # rank 1 of 2 from slurm's environment
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert main(["--input", str(src), "--out", str(both), "--max-count", "2"]) == 0
    assert "from 3 inputs (0 already done)" in capsys.readouterr().out
    mine1 = {p.name for p in both.iterdir()}
    assert sorted(p.name for p in both.glob("*.stats.json")) == ["00001.stats.json", "00003.stats.json",
                                                                 "p.stats.json"]
    assert all(name.split("-")[0].split(".")[0] in ("00001", "00003", "p") for name in mine1)
    assert main(["--input", str(src), "--out", str(both), "--max-count", "2", "--rank", "0",
                 "--world-size", "2"]) == 0  # the arguments win over the environment
    stats0 = {p.name for p in both.glob("*.stats.json")} - mine1
    assert sorted(stats0) == ["00000.stats.json", "00002.stats.json", "00004.stats.json"]
    monkeypatch.delenv("SLURM_PROCID")
    monkeypatch.delenv("SLURM_NTASKS")
    run = tokenize_corpus(src, one, tokenizer=tok, max_count=2)  # worker 0 of 1
    assert (run.worker, run.inputs) == (Worker(0, 1, "single"), 6)
    assert docs_of(both) == docs_of(one) and len(docs_of(one)) == 3 + 4 + 5 + 6 + 7 + 7
    assert sorted(p.name for p in both.iterdir()) == sorted(p.name for p in one.iterdir())


def test_worker_killed_mid_input_reruns_to_a_complete_set_without_duplicates(tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"text": "Hello world"}])
    n = 1500
    write_jsonl(src / "b.jsonl", [{"text": f"document {i}: " + "Hello world, 你好 " * 20} for i in range(n)])
    cmd = [sys.executable, "-m", "emu3_train.data_pipelines.tokenize_text", "--input", str(src),
           "--out", str(out), "--max-count", "50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TIKTOKEN_CACHE_DIR": ""})
    deadline = time.time() + 120
    while len(list((out / ".partial-b").glob("*.tar"))) < 4 and time.time() < deadline:
        assert proc.poll() is None, "the worker finished before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert is_done(out, "a") and not is_done(out, "b") and not list(out.glob("b-*"))
    assert main(["--input", str(src), "--out", str(out), "--max-count", "50"]) == 0
    assert "from 2 inputs (1 already done)" in capsys.readouterr().out
    docs = docs_of(out)
    assert [s for _, _, s, _ in docs] == ["a:1", *(f"b:{i}" for i in range(1, n + 1))]
    assert len({(shard.split("-")[0], key) for shard, key, _, _ in docs}) == n + 1
    assert not list(out.glob(".partial-*")) and read_stats(out, "b")["documents"] == n


def test_inputs_without_documents_are_warned_about_by_name(tmp_path, capsys):
    empty, blank, spaces = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "spaces.txt"
    empty.write_bytes(b"")
    blank.write_text("\n  \n\n")
    spaces.write_text(" \n\t\n")
    assert main(["--input", str(empty), str(blank), str(spaces), "--out", str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert err == [f"warning: {blank}: no documents (no non-blank lines)",
                   f"warning: {empty}: no documents (no non-blank lines)",
                   f"warning: {spaces}: no documents (the file is empty or whitespace)",
                   "warning: wrote 0 documents: this worker's inputs (worker 0/1 (single)) hold no "
                   "non-empty text"]
    assert all(is_done(tmp_path / "out", n) for n in ("empty", "blank", "spaces"))
