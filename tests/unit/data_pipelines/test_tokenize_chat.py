"""tokenize_chat on LLaVA-style conversations with real photos of different sizes and the tiny random
VQ: the Emu3-Chat layout (BAAI's prompt, byte for byte), images resized into the range, answer-only
spans, bad conversations named or skipped and counted, reruns and worker shares."""

from __future__ import annotations

import json

import numpy as np
import pytest
from image_data import make_vq, photos, read_docs
from PIL import Image

from emu3_train.chat import Turn, chat_document, chat_prompt
from emu3_train.layout import parse_vision_block, vision_spans
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab
from emu3_train.vq import VisionTokenizer

# isort: split
from emu3_train.data_pipelines.shard_output import read_stats
from emu3_train.data_pipelines.tokenize_chat import cli, main

EMU3 = get_vocab("emu3")
TOK = load_tokenizer(EMU3)
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64  # the understanding range, scaled down for the tiny VQ
SIZE = ["--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--device", "cpu"]


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return make_vq(tmp_path_factory.mktemp("vq"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Photos of different sizes and modes: small ones (resized up), big ones (down), one RGBA."""
    root = tmp_path_factory.mktemp("images")
    p = photos()  # 8x downscaled: astronaut 64x64, coffee 75x50, chelsea 56x37, camera 64x64, ...
    Image.fromarray(p["astronaut"]).save(root / "astronaut.jpg", quality=95)
    Image.fromarray(p["coffee"]).save(root / "coffee.png")
    Image.fromarray(p["chelsea"]).resize((20, 13)).save(root / "chelsea_small.png")  # below the range
    Image.fromarray(p["rocket"]).resize((150, 240)).save(root / "rocket_big.webp", lossless=True)  # above
    Image.fromarray(p["logo"]).save(root / "logo.png")  # RGBA
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def _conv(image, *pairs, ident=None):
    msgs = []
    for q, a in pairs:
        msgs += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec = {"conversations": msgs}
    if image is not None:
        rec["image"] = image
    if ident is not None:
        rec["id"] = ident
    return rec


GOOD = [
    _conv("astronaut.jpg", ("<image>\nWho is this?", "An astronaut."), ("Where is she?", "Near a flag."),
          ident="a1"),
    _conv("coffee.png", ("What is in the cup?\n<image>", "Coffee.")),
    _conv(None, ("What is 2+2?", "4"), ("And 3+3?", "6")),  # text only
    _conv("chelsea_small.png", ("<image>\nDescribe the animal.", "A tabby cat.")),
    _conv("rocket_big.webp", ("<image>\nWhat is this?", "A rocket.")),
    _conv("logo.png", ("<image>\nWhat logo?", "scikit-image.")),
]


def _write(path, records, jsonl=False):
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_baai_prompt_byte_for_byte_and_prompt_builder():
    """BAAI's Emu3Processor ('U' mode): bos + 'You are a helpful assistant. USER: {image}{text}.
    ASSISTANT:'."""
    codes = np.arange(6).reshape(2, 3)
    doc = chat_document(EMU3, TOK.encode, [Turn("Describe it", "A cat."), Turn("Color?", "Gray")], codes)
    block = vision_spans(np.array(doc.tokens), EMU3)[0]
    head = TOK.encode("You are a helpful assistant. USER: ")
    assert doc.tokens[0] == EMU3.bos and doc.tokens[1:1 + len(head)] == head and block[0] == 1 + len(head)
    rest = doc.tokens[block[1]:]
    s1, s2 = doc.loss_spans
    text = "Describe it. ASSISTANT: A cat."
    assert rest[:s1[1] - 1 - block[1]] == TOK.encode(text)  # pieces tokenize as the whole string
    assert TOK.decode(doc.tokens[s1[0]:s1[1] - 1]) == " A cat." and doc.tokens[s1[1] - 1] == EMU3.eos
    assert TOK.decode(doc.tokens[s1[1]:s2[0]]) == " USER: Color?. ASSISTANT:"
    assert TOK.decode(doc.tokens[s2[0]:s2[1] - 1]) == " Gray" and s2[1] == len(doc.tokens)
    # the generation side builds the same prefix: the answer is what follows "ASSISTANT:"
    assert chat_prompt(EMU3, TOK.encode, "Describe it", codes) == doc.tokens[:s1[0]]
    assert chat_prompt(EMU3, TOK.encode, "Color?", codes, history=[Turn("Describe it", "A cat.")]) == \
        doc.tokens[:s2[0]]


def test_llava_conversations_real_photos(tmp_path, vq_dir, folder):
    src = _write(tmp_path / "llava.json", GOOD)
    out = tmp_path / "out"
    assert main(["--input", str(src), "--image-folder", str(folder), "--vq", str(vq_dir), "--out", str(out),
                 "--workers", "1", "--batch-size", "2", *SIZE]) == 0
    docs = read_docs(out)
    assert sorted(docs) == [f"llava_00000/{i:09d}" for i in range(len(GOOD))]
    vt = VisionTokenizer(vq_dir, "cpu", MIN_PIXELS, MAX_PIXELS)
    shapes = set()
    for i, rec in enumerate(GOOD):
        tokens, meta = docs[f"llava_00000/{i:09d}"]
        assert meta["source"] == f"llava/{i}" and meta["turns"] == len(rec["conversations"]) // 2
        turns = [Turn(m["value"].replace("<image>", "").strip(), a["value"])
                 for m, a in zip(rec["conversations"][::2], rec["conversations"][1::2])]
        codes = None
        if "image" in rec:
            with Image.open(folder / rec["image"]) as im:
                h0, w0 = im.height, im.width
                codes = vt.encode_images([im.convert("RGB") if im.mode != "RGBA" else _on_white(im)])[0]
            h, w = codes.shape
            shapes.add((h, w))
            assert MIN_PIXELS <= (8 * h) * (8 * w) <= MAX_PIXELS  # resized into the range
            assert abs(np.log((w / h) / (w0 / h0))) < 0.25  # keeping the aspect ratio
            start, end = vision_spans(np.array(tokens), EMU3)[0]
            assert parse_vision_block(np.array(tokens[start:end]), EMU3, TOK.decode).shape == (1, h, w)
        assert meta["task"] == ("i2t" if codes is not None else "text")
        want = chat_document(EMU3, TOK.encode, turns, codes)
        assert tokens == want.tokens and meta["loss_spans"] == want.loss_spans
        answers = [TOK.decode(tokens[s:e - 1]) for s, e in meta["loss_spans"]]
        assert answers == [" " + t.answer for t in turns]  # only the answers are supervised
        assert all(tokens[e - 1] == EMU3.eos for _, e in meta["loss_spans"])
    assert len(shapes) >= 3  # photos of different sizes give different grids
    stats = read_stats(out, "llava_00000")
    assert stats["documents"] == 6 and stats["images"] == 5 and stats["skipped"] == {}


def _on_white(im):
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB")


BAD = {
    "no_assistant_turn": {"conversations": [{"from": "human", "value": "Hello?"}]},
    "unanswered_turn": _conv(None, ("a", "b")) | {"conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}]},
    "placeholder_without_image": _conv(None, ("<image>\nWhat is it?", "A cat.")),
    "image_without_placeholder": _conv("coffee.png", ("What is it?", "Coffee.")),
    "several_placeholders": _conv("coffee.png", ("<image> and <image>?", "Two.")),
    "missing_image": _conv("nowhere.png", ("<image>\nWhat?", "x")),
    "undecodable": _conv("broken.jpg", ("<image>\nWhat?", "x")),
    "turns_out_of_order": {"conversations": [{"from": "gpt", "value": "Hi"},
                                             {"from": "human", "value": "?"}]},
    "unknown_role": {"conversations": [{"from": "bot", "value": "Hi"}]},
    "bad_conversation": {"image": "coffee.png"},
}


def test_bad_conversations_are_skipped_and_counted(tmp_path, vq_dir, folder):
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD[1])] + [json.dumps(r) for r in BAD.values()] + ["{not json", json.dumps(GOOD[2])]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["--input", str(src), "--image-folder", str(folder), "--vq", str(vq_dir), "--out", str(out),
                 "--workers", "0", *SIZE]) == 0
    stats = read_stats(out, "mixed_00000")
    assert stats["skipped"] == {**{r: 1 for r in BAD}, "bad_json": 1}
    assert stats["documents"] == 2 and len(stats["skipped_items"]) == len(BAD) + 1
    assert all(item.startswith(f"{src}:") for item in stats["skipped_items"])  # file and position named
    assert sorted(read_docs(out)) == ["mixed_00000/000000000", f"mixed_00000/{len(BAD) + 2:09d}"]


@pytest.mark.parametrize("reason", ["no_assistant_turn", "placeholder_without_image",
                                    "image_without_placeholder", "undecodable"])
def test_on_error_error_is_one_line_naming_file_and_sample(tmp_path, vq_dir, folder, capsys, reason):
    src = _write(tmp_path / "one.json", [GOOD[2], BAD[reason]])
    out = tmp_path / "out"
    assert cli(["--input", str(src), "--image-folder", str(folder), "--vq", str(vq_dir), "--out", str(out),
                "--workers", "0", "--on-error", "error", *SIZE]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "conv/s" not in line]  # the progress bar left out
    assert len(err) == 1 and err[0].startswith(f"error: {src}:1") and "--on-error skip" in err[0], err
    assert not list(out.glob("*.tar")) and not list(out.glob("*.stats.json"))  # nothing published


def test_pieces_workers_and_rerun(tmp_path, vq_dir, folder, capsys):
    """Pieces of --items-per-shard; two workers' union is one worker's output; a rerun skips done pieces."""
    src = _write(tmp_path / "conv.jsonl", GOOD, jsonl=True)
    common = ["--input", str(src), "--image-folder", str(folder), "--vq", str(vq_dir), "--workers", "0",
              "--items-per-shard", "2", *SIZE]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    for rank in (1, 0):
        assert main([*common, "--out", str(tmp_path / "two"), "--rank", str(rank), "--world-size", "2"]) == 0
    one, two = read_docs(tmp_path / "one"), read_docs(tmp_path / "two")
    assert sorted(one) == sorted(two) and all(one[k] == two[k] for k in one)
    assert sorted(p.name for p in (tmp_path / "one").glob("*.stats.json")) == \
        ["conv_00000.stats.json", "conv_00001.stats.json", "conv_00002.stats.json"]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert "all 3 of its 3 input pieces are done" in capsys.readouterr().out


def test_text_only_conversations_need_no_vq(tmp_path):
    src = _write(tmp_path / "text.json", [GOOD[2], _conv(None, ("Hi", "Hello"))])
    assert main(["--input", str(src), "--out", str(tmp_path / "out")]) == 0
    docs = read_docs(tmp_path / "out")
    assert [m["task"] for _, m in docs.values()] == ["text", "text"]
    images = _write(tmp_path / "img.json", [GOOD[1]])
    with pytest.raises(ValueError, match=r"img\.json:0: .*--vq"):
        main(["--input", str(images), "--out", str(tmp_path / "out2")])
