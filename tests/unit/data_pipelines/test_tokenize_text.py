"""tokenize_text: Qwen BPE ids, BOS/EOS placement, NFC, jsonl/txt inputs, errors, resume."""

from __future__ import annotations

import json

import pytest

from emu3_train.data.stream import ShardSet
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.tokenize_text import cli, main  # installed from data_pipelines/
from emu3_train.data_pipelines.write_shards import write_shards

EMU3 = get_vocab("emu3")
BOS, EOS = 151_849, 151_850


def read_docs(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text(
        json.dumps({"text": "Hello world"}) + "\n\n"
        + json.dumps({"text": "Hello world, 你好", "id": 7}, ensure_ascii=False) + "\n"
        + json.dumps({"text": "   "}) + "\n", encoding="utf-8")
    (src / "b.txt").write_text("Cafe\u0301 au lait.\n\nA second paragraph of the same document.\n",
                               encoding="utf-8")
    return src


def test_known_qwen_ids_with_emu3_bos_eos(inputs, tmp_path, capsys):
    out = tmp_path / "docs.jsonl"
    assert main(["--input", str(inputs / "a.jsonl"), "--out", str(out)]) == 0
    docs = read_docs(out)
    assert [d["tokens"] for d in docs] == [[BOS, 9707, 1879, EOS], [BOS, 9707, 1879, 11, 220, 108386, EOS]]
    assert (EMU3.bos, EMU3.eos) == (BOS, EOS)
    assert [d["source"] for d in docs] == [f"{inputs / 'a.jsonl'}:1", f"{inputs / 'a.jsonl'}:3"]
    assert all(d["task"] == "text" for d in docs)
    printed = capsys.readouterr().out
    assert "wrote 2 documents (11 tokens" in printed and "skipped 1 empty" in printed  # line 4 is blank text


def test_txt_file_is_one_nfc_document_and_directories_expand(inputs, tmp_path, capsys):
    out = tmp_path / "docs.jsonl"
    assert main(["--input", str(inputs), "--out", str(out)]) == 0
    assert "skipped 1 empty" in capsys.readouterr().out
    docs = read_docs(out)
    assert [d["source"] for d in docs][-1] == str(inputs / "b.txt")
    tok = load_tokenizer(EMU3)
    text = (inputs / "b.txt").read_text(encoding="utf-8")
    assert docs[-1]["tokens"] == [BOS, *tok.encode(text.replace("e\u0301", "\u00e9")), EOS]  # NFC: é
    assert tok.decode(docs[-1]["tokens"]).startswith("Café au lait.\n\nA second")
    shards = write_shards(docs, tmp_path / "shards", "emu3")  # valid emu3 documents
    assert len(ShardSet(shards[0].parent, EMU3)) == 3


@pytest.mark.parametrize("line, reason", [
    ('{"text": "ok"', "not valid JSON"),
    ('{"body": "no text field"}', "expected an object with a string field 'text'"),
    ('["a", "list"]', "expected an object"),
])
def test_bad_jsonl_line_is_one_error_naming_file_and_line(tmp_path, capsys, line, reason):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    assert cli(["--input", str(src), "--out", str(tmp_path / "docs.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {src}:2: ") and reason in err


def test_missing_input_and_other_field(tmp_path, capsys):
    assert cli(["--input", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "error: input not found" in capsys.readouterr().err
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"body": "Hello world"}) + "\n")
    assert main(["--input", str(src), "--out", str(tmp_path / "d.jsonl"), "--field", "body"]) == 0
    assert read_docs(tmp_path / "d.jsonl")[0]["tokens"] == [BOS, 9707, 1879, EOS]


def test_complete_output_is_kept_and_an_interrupted_one_resumes(inputs, tmp_path, capsys):
    out = tmp_path / "docs.jsonl"
    args = ["--input", str(inputs), "--out", str(out)]
    assert main(args) == 0
    full = out.read_bytes()
    before = out.stat().st_mtime_ns
    assert main(args) == 0
    assert "is complete; --force rewrites it" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == before
    # interrupted after the first document, in the middle of writing the second
    lines = full.splitlines(keepends=True)
    out.unlink()
    (tmp_path / "docs.jsonl.partial").write_bytes(lines[0] + lines[1][:10])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 documents" in printed and "resumed after 1 documents" in printed
    assert out.read_bytes() == full and not (tmp_path / "docs.jsonl.partial").exists()
    assert main(args + ["--force"]) == 0 and out.read_bytes() == full


def test_empty_inputs_are_warned_about_by_name(inputs, tmp_path, capsys):
    empty, blank, spaces = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", tmp_path / "spaces.txt"
    empty.write_bytes(b"")
    blank.write_text("\n  \n\n")
    spaces.write_text(" \n\t\n")
    whitespace = tmp_path / "ws.jsonl"
    whitespace.write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": ""}) + "\n")
    out = tmp_path / "docs.jsonl"
    assert main(["--input", str(empty), str(inputs / "a.jsonl"), str(blank), str(spaces), str(whitespace),
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {empty}: no documents (no non-blank lines)",
                        f"warning: {blank}: no documents (no non-blank lines)",
                        f"warning: {spaces}: no documents (the file is empty or whitespace)",
                        f"warning: {whitespace}: no documents (all 2 texts are empty or whitespace)"]
    assert "wrote 2 documents" in captured.out and "skipped 4 empty" in captured.out
    assert len(read_docs(out)) == 2

    nothing = tmp_path / "nothing.jsonl"
    assert main(["--input", str(empty), "--out", str(nothing)]) == 0  # a warning, not an error
    captured = capsys.readouterr()
    assert f"warning: wrote 0 documents to {nothing}: the inputs ({empty}) hold no non-empty" in captured.err
    assert "wrote 0 documents (0 tokens" in captured.out and nothing.read_text() == ""
