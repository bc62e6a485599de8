"""``python -m emu3_train.generate`` on a tiny trained checkpoint and its HF export: images, clips
(GIF + MP4), continued clips, captions of a PNG it wrote, ``--size`` through a VQ's smart resize,
and bad input as one line naming the value (exit 2).

    .venv/bin/python -m pytest -q tests/unit/test_generate_cli.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from emu3_train.gen_outputs import gray_codes
from emu3_train.generate import main
from emu3_train.recipes import compose
from emu3_train.trainer import Trainer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")
TINY = ["experiment=demo", "wandb.mode=disabled", "eval.task=none", "data.seq_len=256", "data.num_workers=0",
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "optim.warmup_steps=1",
        "checkpoint.async_save=false", "trainer.sample_interval=0", "eval.val_interval=0",
        "trainer.max_steps=3", "trainer.log_interval=3", "model.max_position_embeddings=512"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A run dir trained 3 steps on the demo digits (its ckpt), and its HF export."""
    from emu3_train.data_pipelines.demo import build_demo
    from emu3_train.interop.hf import export_hf

    root = tmp_path_factory.mktemp("gen")
    build_demo(root / "demo")
    trainer = Trainer(compose([*TINY, f"data.path={root / 'demo' / 'train'}"]), root / "run")
    trainer.setup()
    trainer.fit()
    trainer.save(wait=True)
    trainer.loader.close()
    export_hf(root / "run" / "ckpt", root / "hf")
    return {"run": root / "run", "hf": root / "hf", "root": root}


def _items(out: Path) -> list[dict]:
    return json.loads((out / "codes.json").read_text())


def _error(capsys, argv, *needles) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar, if any
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_images_from_a_run_dir_are_seeded_and_its_hf_export_gives_the_same(run, tmp_path):
    argv = ["--prompt", "a handwritten digit one", "--prompt", "a handwritten digit two", "--n", "3",
            "--batch-size", "2", "--cfg", "3", "--seed", "5", "--top-k", "8"]
    assert main([str(run["run"]), *argv, "--out", str(tmp_path / "a")]) == 0
    items = _items(tmp_path / "a")
    assert [i["prompt"][-3:] for i in items] == ["one"] * 3 + ["two"] * 3
    assert [i["seed"] for i in items] == [5, 5, 6, 7, 7, 8]  # batch b draws from seed + b
    for k, item in enumerate(items):
        codes = np.asarray(item["codes"])
        assert item["grid"] == [8, 8] and item["frames"] == 1 and codes.shape == (1, 8, 8)
        assert codes.min() >= 0 and codes.max() < V.codebook_size
        png = np.asarray(Image.open(tmp_path / "a" / f"item_{k:04d}.png"))
        assert png.shape == (64, 64, 3) and np.array_equal(gray_codes(png, V.codebook_size), codes[0])
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.height > 2 * 64 and grid.width >= 3 * 64  # a row per prompt, 3 images each
    assert len({str(i["codes"]) for i in items}) > 1
    # the checkpoint's ckpt/latest and the exported HF folder are the same model: the same codes
    assert main([str(run["hf"]), *argv, "--out", str(tmp_path / "b")]) == 0
    assert _items(tmp_path / "b") == items


def test_video_writes_gif_and_mp4_and_a_clip_continues_from_its_codes(run, tmp_path):
    out = tmp_path / "clip"
    assert main([str(run["run"] / "ckpt" / "latest"), "--prompt", "a digit", "--grid", "4x6",
                 "--video-frames", "2", "--fps", "8", "--out", str(out)]) == 0
    (item,) = _items(out)
    assert item["frames"] == 2 and item["grid"] == [4, 6] and np.asarray(item["codes"]).shape == (2, 4, 6)
    gif = Image.open(out / "item_0000.gif")  # PIL merges repeated frames, adding their delays
    shown = []
    for k in range(gif.n_frames):
        gif.seek(k)
        shown.append(gif.info["duration"])
    assert gif.size == (48, 32) and sum(shown) == 1000  # 2 code frames x 4 video frames at 8 fps
    with av.open(str(out / "item_0000.mp4")) as f:
        frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (32, 48, 3)

    more = tmp_path / "more"
    assert main([str(run["run"]), "--continue", str(out / "codes.json"), "--video-frames", "1",
                 "--out", str(more)]) == 0
    (cont,) = _items(more)
    codes = np.asarray(cont["codes"])
    assert cont["frames"] == 3 and cont["given_frames"] == 2 and codes.shape == (3, 4, 6)
    assert np.array_equal(codes[:2], item["codes"]) and cont["prompt"] == ""


def test_a_png_it_wrote_is_captioned_with_text_ids_only(run, tmp_path):
    img = tmp_path / "img"
    assert main([str(run["run"]), "--prompt", "a handwritten digit three", "--out", str(img)]) == 0
    (image,) = _items(tmp_path / "img")
    out = tmp_path / "cap"
    assert main([str(run["hf"]), "--image", str(tmp_path / "img" / "item_0000.png"), "--max-new-tokens", "12",
                 "--out", str(out)]) == 0
    (cap,) = _items(out)
    assert cap["codes"] == image["codes"] and cap["grid"] == [8, 8] and cap["prompt"] == ""
    assert 0 < len(cap["tokens"]) <= 12 or cap["text"] == ""
    assert all(0 <= t < V.text_size for t in cap["tokens"])  # text only, EOS excluded
    assert cap["text"] == bytes(cap["tokens"]).decode("utf-8", errors="replace")
    # --image repeats: one answer per image, in order, each with its own codes
    assert main([str(run["run"]), "--prompt", "a handwritten digit one", "--n", "2", "--out", str(img)]) == 0
    two = [str(img / "item_0000.png"), str(img / "item_0001.png")]
    assert main([str(run["run"]), "--image", two[0], "--image", two[1], "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    caps, drawn = _items(out), _items(img)
    assert [c["image"] for c in caps] == two and [c["codes"] for c in caps] == [d["codes"] for d in drawn]


def _vq(path: Path) -> Path:
    from transformers import Emu3ImageProcessor, Emu3VQVAE, Emu3VQVAEConfig

    config = Emu3VQVAEConfig(codebook_size=V.codebook_size, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                             hidden_size=32, temporal_downsample_factor=4)
    torch.manual_seed(0)
    Emu3VQVAE(config).save_pretrained(path)
    Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=16 * 16,
                       max_pixels=64 * 64).save_pretrained(path)
    return path


def test_size_maps_through_the_processors_smart_resize_and_the_vq_decodes(run, tmp_path, capsys):
    vq = _vq(tmp_path / "vq")
    # 70x30 pixels: rounded to multiples of 8 (72x32 = 2,304 pixels, inside 16²..64²) -> 4x9 codes
    assert main([str(run["run"]), "--prompt", "a digit", "--size", "70x30", "--vq", str(vq),
                 "--out", str(tmp_path / "o")]) == 0
    assert "resizes it to 72x32 pixels" in capsys.readouterr().err
    (item,) = _items(tmp_path / "o")
    assert item["grid"] == [4, 9]
    assert Image.open(tmp_path / "o" / "item_0000.png").size == (72, 32)  # VQ-decoded, 8 px a code
    # a 10x10 grid is 80x80 = 6,400 pixels: more than this processor's max_pixels
    _error(capsys, [run["run"], "--prompt", "x", "--grid", "10x10", "--vq", vq, "--out", tmp_path / "e"],
           "--grid 10x10", "never produces", "--size")


def test_bad_input_is_one_line_naming_the_value(run, tmp_path, capsys):
    src, out = run["run"], tmp_path / "o"
    _error(capsys, [src, "--prompt", "x", "--grid", "30x30", "--out", out], "--grid 30x30",
           "max_position_embeddings=512")
    _error(capsys, [src, "--prompt", "x", "--cfg", "-1"], "--cfg -1.0", ">= 0")
    _error(capsys, [src, "--prompt", "x", "--grid", "8by8"], "--grid '8by8'")
    _error(capsys, [src, "--continue", tmp_path / "none.json"], "none.json: no such file")
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (llama / "model.safetensors").write_bytes(b"")
    _error(capsys, [llama, "--prompt", "x"], "llama", "not an Emu3 model")
    other = tmp_path / "other"  # the same weights under a config of another shape
    shutil.copytree(run["run"] / "ckpt", other)
    step = next(other.glob("step_*"))
    meta = json.loads((step / "meta.json").read_text())
    meta["config"]["model"]["hidden_size"] = 96
    (step / "meta.json").write_text(json.dumps(meta))
    _error(capsys, [other, "--prompt", "x"], "step_000003: does not fit",
           "[283, 64] in the checkpoint but [283, 96]")
    assert not out.exists()


def test_module_runs_as_a_command(run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "emu3_train.generate", str(run["hf"]), "--text", "--prompt",
                           "a handwritten", "--max-new-tokens", "4", "--out", str(tmp_path / "t")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stderr and "'a handwritten' -> " in proc.stdout
    (item,) = _items(tmp_path / "t")
    assert len(item["tokens"]) <= 4 and "codes" not in item
