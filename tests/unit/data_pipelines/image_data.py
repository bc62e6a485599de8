"""Messy real inputs for the tokenize_images tests: a tiny random Emu3VQVAE, scikit-image photos of
different sizes saved in every mode, img2dataset-style tars, PyAV-written videos, a shard reader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Emu3ImageProcessor, Emu3VQVAE, Emu3VQVAEConfig

from emu3_train.data.format import decode_meta, decode_tokens

CODEBOOK = 64
MIN_PIXELS, MAX_PIXELS = 16 * 16, 48 * 48
SIZE_ARGS = ["--min-pixels", str(MIN_PIXELS), "--max-pixels", str(MAX_PIXELS), "--device", "cpu"]


def make_vq(path: Path) -> Path:
    """A tiny random Emu3VQVAE (downsampling 8, time factor 4, 64 codes) and its processor config."""
    config = Emu3VQVAEConfig(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32,
                             channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                             hidden_size=32, temporal_downsample_factor=4)
    torch.manual_seed(0)
    Emu3VQVAE(config).save_pretrained(path)
    Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
    return path


def photos() -> dict[str, np.ndarray]:
    """scikit-image's photos, downscaled 8x (so the suite stays fast), sizes and aspect ratios differ."""
    from skimage import data

    out = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "logo", "text"):
        a = getattr(data, name)()
        im = Image.fromarray(a)
        out[name] = np.asarray(im.resize((max(1, im.width // 8), max(1, im.height // 8)), Image.BICUBIC))
    return out


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def mixed_mode_files() -> dict[str, tuple[bytes, str]]:
    """``{key: (file bytes, extension)}``: one photo per mode (RGB jpg/png/webp, L, RGBA, P with
    transparency, CMYK, 16-bit grayscale PNG), all of different sizes but two of one size."""
    p = photos()
    pal = Image.fromarray(p["rocket"]).quantize(16)
    pal.info["transparency"] = 0
    logo = p["logo"].copy()  # RGBA; its alpha made a left-to-right ramp from fully transparent
    logo[..., 3] = np.linspace(0, 255, logo.shape[1]).round().astype(np.uint8)[None, :]
    sixteen = Image.fromarray(p["camera"].astype(np.uint16) * 257)  # 16-bit, full range
    assert sixteen.mode in ("I;16", "I")
    return {
        "000000000": (encode(Image.fromarray(p["astronaut"]), "JPEG", quality=95), "jpg"),
        "000000001": (encode(Image.fromarray(p["coffee"]), "PNG"), "png"),
        "000000002": (encode(Image.fromarray(p["chelsea"]), "WEBP", lossless=True), "webp"),
        "000000003": (encode(Image.fromarray(p["camera"]), "PNG"), "png"),  # L, same size as astronaut
        "000000004": (encode(Image.fromarray(logo), "PNG"), "png"),  # RGBA
        "000000005": (encode(pal, "PNG"), "png"),  # P + transparency
        "000000006": (encode(Image.fromarray(p["cat"]).convert("CMYK"), "JPEG", quality=95), "jpeg"),
        "000000007": (encode(sixteen, "PNG"), "png"),
        "000000008": (encode(Image.fromarray(p["text"]), "PNG"), "png"),  # L, wide
        "000000009": (encode(Image.fromarray(p["astronaut"][::-1].copy()), "PNG"), "png"),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar with the members of each sample consecutive (img2dataset / webdataset order)."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def captioned(files: dict[str, tuple[bytes, str]]) -> list[tuple[str, dict[str, bytes]]]:
    """img2dataset samples: captions in .txt, in .json only, or both (json also has other fields)."""
    out = []
    for i, (key, (data, ext)) in enumerate(files.items()):
        caption = f"photo number {i}"
        members = {ext: data}
        if i % 3 != 1:
            members["txt"] = caption.encode()
        if i % 3 != 0:
            members["json"] = json.dumps({"caption": caption, "key": key, "status": "success"}).encode()
        out.append((key, members))
    return out


def read_docs(out_dir: Path) -> dict[str, tuple[list[int], dict]]:
    """``{"<input name>/<key>": (tokens, meta)}`` of every published shard in ``out_dir``, in file
    and member order."""
    docs = {}
    for tar in sorted(Path(out_dir).glob("*.tar")):
        assert tar.with_suffix(".idx").is_file(), tar
        with tarfile.open(tar) as tf:
            members = {}
            for m in tf.getmembers():
                key, _, suffix = m.name.partition(".")
                members.setdefault(key, {})[suffix] = tf.extractfile(m).read()
        name = tar.stem.rsplit("-", 1)[0]
        for key, parts in members.items():
            assert f"{name}/{key}" not in docs, f"{key} written twice"
            docs[f"{name}/{key}"] = (decode_tokens(parts["tokens.npy"]).tolist(), decode_meta(parts["json"]))
    return docs


def pan_frames(n: int, size=(40, 56)) -> list[np.ndarray]:
    """``n`` RGB frames panning across scikit-image's coffee photo (a real scene that moves)."""
    from skimage import data

    h, w = size
    photo = np.asarray(Image.fromarray(data.coffee()).resize((w * 3, h * 2), Image.BICUBIC))
    return [photo[:h, (2 * i) % (2 * w):(2 * i) % (2 * w) + w].copy() for i in range(n)]


def write_video(fmt: str, codec: str, frames: int, rate: int, size=(40, 56), options=None) -> bytes:
    """A video of ``frames`` pan frames at ``rate`` fps written by PyAV (mp4 / webm / mkv / mov)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for frame in pan_frames(frames, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
