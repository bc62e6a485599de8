"""tokenize_images on messy real inputs with a tiny random Emu3VQVAE: img2dataset tars of mixed
sizes/modes/captions at the default batch size, bad items counted and named, truncated tars,
the VQ module both ways, mode conversions against a reference."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from image_data import (
    CODEBOOK,
    MAX_PIXELS,
    MIN_PIXELS,
    SIZE_ARGS,
    captioned,
    encode,
    make_vq,
    mixed_mode_files,
    photos,
    read_docs,
    write_tar,
)
from PIL import Image
from transformers import Emu3ImageProcessor
from transformers.models.emu3.image_processing_emu3 import smart_resize

from emu3_train.layout import parse_vision_block, vision_spans
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab
from emu3_train.vq import ResizeSpec, VisionTokenizer

# isort: split
from emu3_train.data_pipelines.decode_pool import open_image, to_rgb  # installed from data_pipelines/
from emu3_train.data_pipelines.shard_output import read_stats
from emu3_train.data_pipelines.tokenize_images import cli, main

EMU3 = get_vocab("emu3")
TOK = load_tokenizer(EMU3)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return make_vq(tmp_path_factory.mktemp("vq"))


@pytest.fixture(scope="module")
def vt(vq_dir):
    return VisionTokenizer(vq_dir, "cpu", MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="module")
def files():
    return mixed_mode_files()


@pytest.fixture(scope="module")
def tar_run(files, vq_dir, tmp_path_factory):
    """One img2dataset tar: the mixed-mode photos plus a corrupt image, an uncaptioned one and one
    with an empty caption; tokenized with the default batch size by 2 decode processes."""
    root = tmp_path_factory.mktemp("tars")
    samples = captioned(files)
    good = files["000000000"][0]
    samples.insert(3, ("000000100", {"jpg": good[: len(good) // 2], "txt": b"cut in half"}))
    samples.insert(6, ("000000101", {"png": files["000000001"][0]}))
    samples.append(("000000102", {"png": files["000000003"][0], "txt": b"  \n"}))
    write_tar(root / "00000.tar", samples)
    out = root / "out"
    assert main(["--input", str(root), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS,
                 "--workers", "2"]) == 0
    return root, out


def split(tokens, task):
    """``(caption ids, codes [T, h, w])`` of a one-block document, checking BOS/EOS and block order."""
    tokens = np.asarray(tokens)
    assert tokens[0] == EMU3.bos and tokens[-1] == EMU3.eos
    (start, end), = vision_spans(tokens, EMU3)
    codes = parse_vision_block(tokens[start:end], EMU3, TOK.decode)
    if task == "i2t":
        assert start == 1
        return tokens[end:-1], codes
    assert end == len(tokens) - 1
    return tokens[1:start], codes


def test_tar_of_mixed_sizes_and_modes_decodes_to_the_grids_of_each_image_alone(tar_run, files, vt):
    _, out = tar_run
    docs = read_docs(out)
    keys = [f"00000/{k}-{t}" for k in files for t in ("t2i", "i2t")]
    assert list(docs) == keys  # input order, whatever the batching
    shapes = set()
    for i, (key, (data, _)) in enumerate(files.items()):
        expected = vt.encode_images([open_image(data)])[0]  # one image, one encode call
        shapes.add(expected.shape)
        for task in ("t2i", "i2t"):
            tokens, meta = docs[f"00000/{key}-{task}"]
            assert meta == {"task": task, "source": f"00000/{key}"}
            caption, codes = split(tokens, task)
            assert TOK.decode(caption) == f"photo number {i}"
            assert codes.shape == (1, *expected.shape) and np.array_equal(codes[0], expected)
    assert len(shapes) >= 4  # the batches really mixed sizes
    assert len(np.unique(expected)) > 1  # the random VQ does not collapse to one code


def test_bad_items_are_counted_by_reason_with_input_and_key(tar_run, capsys):
    root, out = tar_run
    stats = read_stats(out, "00000")
    assert stats["skipped"] == {"empty_caption": 1, "no_caption": 1, "undecodable": 1}
    assert stats["images"] == 10 and stats["documents"] == 20
    named = "\n".join(stats["skipped_items"])
    for key in ("000000100: undecodable", "000000101: no_caption", "000000102: empty_caption"):
        assert f"{root / '00000.tar'}:{key}" in named
    # a rerun finds the input done
    assert main(["--input", str(root / "00000.tar"), "--vq", "unused", "--out", str(out)]) == 0
    assert "all 1 of its 1 input shards are done" in capsys.readouterr().out


def test_on_error_error_stops_at_the_first_bad_item_with_one_line(tar_run, vq_dir, tmp_path, capsys):
    root, _ = tar_run
    rc = cli(["--input", str(root / "00000.tar"), "--vq", str(vq_dir), "--out", str(tmp_path / "o"),
              *SIZE_ARGS, "--workers", "0", "--on-error", "error"])
    assert rc == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {root / '00000.tar'}:000000100: cannot decode")
    assert not list((tmp_path / "o").glob("*.tar")) and not list((tmp_path / "o").glob("*.stats.json"))


def test_truncated_tar_keeps_the_complete_samples_before_the_damage(files, vq_dir, tmp_path, capsys):
    whole = write_tar(tmp_path / "whole.tar", captioned(files)[:4]).read_bytes()
    cut = tmp_path / "in" / "cut.tar"
    cut.parent.mkdir()
    third = whole.index(b"000000002.webp")  # the header of sample 2's image
    cut.write_bytes(whole[: third + 700])  # into its data
    tail = tmp_path / "in2" / "tail.tar"
    tail.parent.mkdir()
    with tarfile.open(tmp_path / "whole.tar") as tf:
        last = tf.getmembers()[-1]
    tail.write_bytes(whole[: last.offset_data + -(-last.size // 512) * 512])  # every member, no end blocks
    out = tmp_path / "out"
    assert main(["--input", str(cut), str(tail), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS,
                 "--workers", "0", "--tasks", "t2i"]) == 0
    summary = capsys.readouterr().out
    assert "truncated_input 2" in summary
    cut_stats, tail_stats = read_stats(out, "cut"), read_stats(out, "tail")
    assert cut_stats["documents"] == 2 and cut_stats["skipped"] == {"truncated_input": 1}
    damage, = cut_stats["skipped_items"]
    assert str(cut) in damage and "after sample 000000001" in damage
    assert tail_stats["documents"] == 3  # the last sample cannot be known complete
    keys = [m["source"] for _, m in read_docs(out).values()]
    assert keys == ["cut/000000000", "cut/000000001", "tail/000000000", "tail/000000001", "tail/000000002"]


def test_caption_key_picks_the_json_field(files, vq_dir, tmp_path):
    key, (data, ext) = next(iter(files.items()))
    meta = {"caption": "from json", "alt": {"text": "nested alt text"}}
    write_tar(tmp_path / "a.tar", [(key, {ext: data, "txt": b"from txt", "json": json.dumps(meta).encode()})])
    for spec, expected in (("txt", "from txt"), ("json:caption", "from json"),
                           ("json:alt.text", "nested alt text")):
        out = tmp_path / spec.replace(":", "_")
        assert main(["--input", str(tmp_path / "a.tar"), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS,
                     "--workers", "0", "--tasks", "i2t", "--caption-key", spec]) == 0
        (tokens, _), = read_docs(out).values()
        assert TOK.decode(split(tokens, "i2t")[0]) == expected


def test_filters_drop_small_and_wide_images_by_reason(files, vq_dir, tmp_path):
    write_tar(tmp_path / "f.tar", captioned(files))
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "f.tar"), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS,
                 "--workers", "0", "--min-side", "30", "--max-aspect", "1.45"]) == 0
    expected = {}
    for data, _ in files.values():
        w, h = open_image(data).size
        reason = "too_small" if min(w, h) < 30 else "too_wide" if max(w, h) / min(w, h) > 1.45 else None
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    stats = read_stats(out, "f")
    assert stats["skipped"] == expected and set(expected) == {"too_small", "too_wide"}
    assert stats["images"] == len(files) - sum(expected.values())
    assert any("too_small" in s and "--min-side 30" in s for s in stats["skipped_items"])


def reference_rgb(im: Image.Image) -> np.ndarray:
    """Independent numpy conversion of one PIL image to 8-bit RGB (the rules in decode_pool)."""
    if im.mode in ("I;16", "I"):
        gray = np.rint(np.asarray(im).astype(np.float64) * 255 / 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, -1)
    if im.mode == "CMYK":
        c, m, y, k = (np.asarray(im).astype(np.float64) / 255).transpose(2, 0, 1)
        return np.rint(255 * np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1))
    if im.mode == "P" or im.mode == "RGBA":
        rgba = np.asarray(im.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255
        return np.rint(rgba[..., :3] * alpha + 255 * (1 - alpha))
    if im.mode == "L":
        return np.repeat(np.asarray(im)[..., None], 3, -1)
    raise AssertionError(im.mode)


@pytest.mark.parametrize("key,mode", [("000000003", "L"), ("000000004", "RGBA"), ("000000005", "P"),
                                      ("000000006", "CMYK"), ("000000007", "I;16")])
def test_each_mode_converts_like_the_reference(files, key, mode):
    data, _ = files[key]
    im = Image.open(io.BytesIO(data))
    assert im.mode == mode or (mode == "I;16" and im.mode == "I")
    got = np.asarray(to_rgb(im)).astype(int)
    assert got.shape == (im.height, im.width, 3)
    assert np.abs(got - reference_rgb(im)).max() <= 1
    if mode == "I;16":  # scaled, not clipped: the camera photo keeps its dark and mid tones
        assert np.array_equal(got[..., 0], photos()["camera"])
        assert (got == 255).mean() < 0.05
    if mode in ("RGBA", "P"):  # transparent pixels come out white
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        assert (alpha == 0).any() and (got[alpha == 0] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    a = photos()["coffee"]  # 50 x 75
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rgb = open_image(encode(im, "PNG", exif=exif))
    assert rgb.size == (a.shape[0], a.shape[1])


def test_resize_and_normalize_equal_emu3s_processor(vq_dir, vt):
    sizes = [(h, w) for h in (1, 7, 16, 33, 100, 479, 1080) for w in (5, 32, 64, 333, 1920)]
    for h, w in sizes:
        if max(h, w) / min(h, w) <= 200:
            assert ResizeSpec().resized_shape(h, w) == smart_resize(h, w, 8, 512 * 512, 1024 * 1024)
            assert vt.resized_shape(h, w) == smart_resize(h, w, 8, MIN_PIXELS, MAX_PIXELS)
    processor = Emu3ImageProcessor.from_pretrained(vq_dir)
    processor.min_pixels, processor.max_pixels = MIN_PIXELS, MAX_PIXELS
    for name, a in photos().items():
        im = to_rgb(Image.fromarray(a))
        ours = vt.pixels(vt.spec.resize(im)[None])
        theirs = processor(images=[im], return_tensors="pt")["pixel_values"]
        assert torch.equal(ours, theirs), name  # bit for bit


def test_vq_decode_is_the_code_renderers_vq_path(vq_dir, vt):
    from emu3_train.samples import CodeRenderer

    codes = np.random.default_rng(0).integers(0, CODEBOOK, (2, 3, 4))
    ours = vt.decode(codes)
    theirs = CodeRenderer(CODEBOOK, str(vq_dir))(codes)
    assert ours.shape == theirs.shape == (2, 24, 32, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs).max() <= 1
    clip = vt.decode_clip(codes)
    assert clip.shape == (8, 24, 32, 3)


def test_vq_without_its_weights_is_refused_not_randomly_initialized(vq_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(vq_dir, tmp_path / "vq")
    weights = load_file(bad / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("encoder.conv_in.")}
    save_file(kept, bad / "model.safetensors")
    with pytest.raises(ValueError, match="2 Emu3VQVAE weights are missing or mismatched"):
        VisionTokenizer(bad, device="cpu")
