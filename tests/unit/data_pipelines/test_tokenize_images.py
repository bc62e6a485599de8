"""tokenize_images with a tiny random Emu3VQVAE: grid sizes, codes, layout, video, resume, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Emu3ImageProcessor, Emu3VQVAE, Emu3VQVAEConfig
from transformers.models.emu3.image_processing_emu3 import smart_resize

from emu3_train.layout import parse_vision_block, vision_spans
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.tokenize_images import VisionTokenizer, cli, main  # from data_pipelines/
from emu3_train.data_pipelines.write_shards import write_shards

EMU3 = get_vocab("emu3")
CODEBOOK = 64
MIN_PIXELS, MAX_PIXELS = 16 * 16, 40 * 40
CAPTIONS = {"photo.png": "a photo", "photo2.png": "the same photo", "gray.png": "a gray photo",
            "clip": "a slow pan"}


def sample_photos() -> dict[str, np.ndarray]:
    """Real photos shipped inside a package: scikit-image's if installed, else scikit-learn's."""
    try:
        from skimage import data

        return {"rgb": data.astronaut(), "gray": data.camera(), "wide": data.coffee()}
    except ImportError:
        from sklearn.datasets import load_sample_image

        china = load_sample_image("china.jpg")
        return {"rgb": load_sample_image("flower.jpg"), "gray": china[:, :, 1], "wide": china}


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    """A tiny random Emu3VQVAE (downsampling 8, time factor 4, 64 codes) and its processor config."""
    path = tmp_path_factory.mktemp("vq")
    config = Emu3VQVAEConfig(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                             hidden_size=32, temporal_downsample_factor=4)
    torch.manual_seed(0)
    Emu3VQVAE(config).save_pretrained(path)
    Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two same-size RGB photos (one batch), a grayscale one (sidecar caption), a 5-frame clip."""
    root = tmp_path_factory.mktemp("images")
    photos = sample_photos()
    Image.fromarray(photos["rgb"]).save(root / "photo.png")
    Image.fromarray(photos["rgb"][::-1].copy()).save(root / "photo2.png")
    Image.fromarray(photos["gray"]).save(root / "gray.png")
    (root / "gray.txt").write_text(CAPTIONS["gray.png"] + "\n")
    (root / "clip").mkdir()
    wide = photos["wide"]
    for i in range(5):  # a pan across the wide photo
        Image.fromarray(wide[:200, 20 * i:20 * i + 300].copy()).save(root / "clip" / f"{i:03d}.png")
    captions = root.parent / (root.name + "-captions.jsonl")
    captions.write_text("".join(json.dumps({"image": k, "caption": v}) + "\n"
                                for k, v in CAPTIONS.items() if k != "gray.png"))
    return root, captions


def run(dataset, vq_dir, out, *extra):
    root, captions = dataset
    return main(["--images", str(root), "--captions", str(captions), "--vq", str(vq_dir), "--out", str(out),
                 "--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--device", "cpu",
                 "--workers", "1", *extra])


@pytest.fixture(scope="module")
def docs(dataset, vq_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "docs.jsonl"
    assert run(dataset, vq_dir, out) == 0
    return out, [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(vq_dir):
    """``(processor, vq)`` loaded straight from vq_dir with transformers, independently of the tool."""
    processor = Emu3ImageProcessor.from_pretrained(vq_dir)
    processor.min_pixels, processor.max_pixels = MIN_PIXELS, MAX_PIXELS
    return processor, Emu3VQVAE.from_pretrained(vq_dir).eval()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMU3)


def direct_codes(reference, image) -> np.ndarray:
    """Codes ``[h, w]`` of one image through the processor and ``Emu3VQVAE.encode``."""
    processor, vq = reference
    batch = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        return vq.encode(batch["pixel_values"], batch["image_sizes"]).image_tokens[0].numpy()


def split(doc, tok):
    """``(caption ids, codes [T, h, w])`` of a one-block document, checking BOS/EOS and the block order."""
    tokens = np.array(doc["tokens"])
    assert tokens[0] == EMU3.bos and tokens[-1] == EMU3.eos
    (start, end), = vision_spans(tokens, EMU3)
    codes = parse_vision_block(tokens[start:end], EMU3, tok.decode)
    if doc["task"] == "i2t":
        assert start == 1
        return tokens[end:-1], codes
    assert end == len(tokens) - 1
    return tokens[1:start], codes


def test_images_become_t2i_and_i2t_documents_with_the_vq_codes(docs, dataset, reference, tok):
    root, _ = dataset
    _, documents = docs
    images = {d["source"] for d in documents if d["task"] != "video"}
    assert images == {"photo.png", "photo2.png", "gray.png"}
    assert sorted((d["source"], d["task"]) for d in documents if d["source"] in images) == \
        sorted((name, task) for name in images for task in ("t2i", "i2t"))
    for name in sorted(images):
        im = Image.open(root / name)
        expected = direct_codes(reference, im)
        h, w = smart_resize(im.height, im.width, factor=8, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        assert expected.shape == (h // 8, w // 8)  # the grid: resized pixels / the VQ's 8x downsampling
        for doc in (d for d in documents if d["source"] == name):
            caption, codes = split(doc, tok)
            assert tok.decode(caption) == CAPTIONS[name]
            assert codes.shape == (1, h // 8, w // 8) and np.array_equal(codes[0], expected)
            vision = np.array(doc["tokens"])[EMU3.is_vision(np.array(doc["tokens"]))]
            assert vision.min() >= 151_854 and vision.max() < 151_854 + CODEBOOK
    assert len(np.unique(expected)) > 1  # the random VQ does not collapse to one code


def test_clip_is_one_video_block_of_four_frame_chunks(docs, dataset, reference, tok):
    root, _ = dataset
    _, documents = docs
    doc, = (d for d in documents if d["source"] == "clip")
    assert doc["task"] == "video"
    caption, codes = split(doc, tok)
    assert tok.decode(caption) == CAPTIONS["clip"]
    frames = [Image.open(p) for p in sorted((root / "clip").iterdir())]
    assert codes.shape[0] == 2  # 5 frames -> chunks [0..3] and [4, 4, 4, 4]
    processor, vq = reference
    pixels = processor(images=frames[:4], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        first = vq.encode(pixels[None], torch.tensor([[1 << 30, 1 << 30]])).image_tokens[0][0].numpy()
    assert np.array_equal(codes[0], first)
    # a chunk of four copies of one frame is how Emu3VQVAE encodes a still image
    assert np.array_equal(codes[1], direct_codes(reference, frames[4]))


def test_documents_fit_the_emu3_vocabulary(docs, tmp_path):
    _, documents = docs
    shards = write_shards(documents, tmp_path / "shards", "emu3")  # validates every id and block
    assert len(shards) == 1


def test_complete_output_is_kept_and_interrupted_run_resumes(docs, dataset, vq_dir, tmp_path, capsys):
    out, documents = docs
    assert run(dataset, vq_dir, out) == 0
    assert "is complete" in capsys.readouterr().out
    lines = out.read_bytes().splitlines(keepends=True)
    resumed = tmp_path / "docs.jsonl"
    (tmp_path / "docs.jsonl.partial").write_bytes(b"".join(lines[:3]) + lines[3][:50])
    assert run(dataset, vq_dir, resumed) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(lines) - 3} documents" in printed
    again = [json.loads(line) for line in resumed.read_text().splitlines()]
    key = lambda d: (d["source"], d["task"])
    assert sorted(again, key=key) == sorted(documents, key=key)  # nothing lost, nothing twice


def test_uncaptioned_image_and_bad_options_are_one_error_line(dataset, vq_dir, tmp_path, capsys):
    root, captions = dataset
    lonely = tmp_path / "imgs"
    lonely.mkdir()
    Image.new("RGB", (40, 30)).save(lonely / "x.png")
    args = ["--images", str(lonely), "--vq", str(vq_dir), "--out", str(tmp_path / "d.jsonl")]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {lonely / 'x.png'}: no caption (no sidecar x.txt)"]
    (lonely / "x.txt").write_text("black")
    assert cli(["--images", str(lonely), "--vq", str(tmp_path), "--out", str(tmp_path / "d.jsonl")]) == 2
    assert "not a saved Emu3VQVAE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args + ["--tasks", "t2v"])


def test_vq_without_its_weights_is_refused_not_randomly_initialized(vq_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(vq_dir, tmp_path / "vq")
    weights = load_file(bad / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("encoder.conv_in.")}
    save_file(kept, bad / "model.safetensors")
    with pytest.raises(ValueError, match="2 Emu3VQVAE weights are missing or mismatched"):
        VisionTokenizer(bad, device="cpu")
