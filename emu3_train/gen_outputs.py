"""What ``python -m emu3_train.generate`` writes, and the code files it reads back.

- :func:`render`: generated codes ``[T, h, w]`` -> uint8 RGB frames ``[F, H, W, 3]``: decoded by
  the Emu3 VQ-VAE (``emu3_train.vq.VisionTokenizer``; a clip of T code frames gives ``4T`` video
  frames) or, without a VQ, one gray level per code (``samples.CodeRenderer``: exact for the demo's
  intensity codebook, a structural view of a learned one), each code frame shown for ``temporal``
  video frames so a clip lasts as long either way.
- :func:`write_grid`: one PNG, a row per prompt (or per clip) with its label.
- :func:`write_gif` (PIL) and :func:`write_mp4` (PyAV: H.264, yuv420p; MPEG-4 part 2 where the
  FFmpeg inside the wheel has no libx264) for video.
- :func:`write_codes`: ``OUT/codes.json``, one object per generated item:
  ``{"prompt": str, "seed": int, "grid": [h, w], "frames": T, "codes": [[[...]]]}`` (codes
  ``[T][h][w]``, frames first), plus ``"text"`` and ``"tokens"`` for understanding/text answers.
- :func:`read_codes`: codes ``[T, h, w]`` from a ``codes.json`` (its first item, or ``FILE.json:K``
  for item K) or a ``.npy`` file; :func:`gray_codes`: the inverse of the gray rendering (a PNG
  this tool wrote without a VQ -> its codes).

    from emu3_train.gen_outputs import read_codes
    codes = read_codes("out/codes.json:2")     # [T, h, w] int64 of the third item
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from emu3_train.samples import CodeRenderer, save_rows

GRAY_SCALE = 8  # pixels per code side in the gray rendering (the VQ's spatial factor)


def render(codes: np.ndarray, vq=None, codebook_size: int = 0, temporal: int = 4) -> np.ndarray:
    """uint8 RGB frames ``[F, H, W, 3]`` of one item's codes ``[T, h, w]`` (module docstring):
    ``F = T`` for an image (T = 1) and ``F = temporal * T`` for a clip."""
    codes = np.asarray(codes)
    if vq is not None:
        return vq.decode(codes) if len(codes) == 1 else vq.decode_clip(codes)
    frames = CodeRenderer(codebook_size, scale=GRAY_SCALE)(codes)
    return frames if len(codes) == 1 else frames.repeat(temporal, axis=0)


def gray_codes(rgb: np.ndarray, codebook_size: int, scale: int = GRAY_SCALE) -> np.ndarray:
    """Codes ``[h, w]`` of a gray-level picture ``[H, W(, 3)]`` (``H = scale * h``): each
    ``scale x scale`` cell's mean gray, mapped back to the nearest code (inverse of :func:`render`)."""
    gray = np.asarray(rgb, dtype=np.float64)
    gray = gray.mean(-1) if gray.ndim == 3 else gray
    h, w = gray.shape[0] // scale, gray.shape[1] // scale
    if not (h and w) or gray.shape != (h * scale, w * scale):
        raise ValueError(f"a {gray.shape[0]}x{gray.shape[1]} picture is not a grid of {scale}x{scale}-pixel "
                         "gray codes; pass --vq to encode a real image")
    cells = gray.reshape(h, scale, w, scale).mean(axis=(1, 3))
    return np.rint((255 - cells) * (codebook_size - 1) / 255).clip(0, codebook_size - 1).astype(np.int64)


def write_grid(rows: Sequence[np.ndarray], labels: Sequence[str], path: Path) -> Path:
    """One PNG: row r holds the pictures ``rows[r]`` (``[cols, H, W, 3]``, all the same size),
    labelled ``labels[r]``; rows with fewer pictures are padded with white."""
    cols = max(len(r) for r in rows)
    h, w = rows[0].shape[1:3]
    grid = np.full((len(rows), cols, h, w, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        grid[i, :len(r)] = r
    save_rows(grid, [label or '(empty prompt)' for label in labels], Path(path))
    return Path(path)


def write_gif(frames: np.ndarray, fps: float, path: Path) -> Path:
    """An animated GIF of uint8 RGB ``[F, H, W, 3]`` at ``fps`` frames per second, looping."""
    from PIL import Image

    pictures = [Image.fromarray(f) for f in frames]
    ms = max(20, round(1000 / fps))  # GIF delays are in 10 ms units; browsers clamp below 20 ms
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=ms, loop=0)
    return Path(path)


def write_mp4(frames: np.ndarray, fps: float, path: Path) -> Path:
    """An MP4 of uint8 RGB ``[F, H, W, 3]`` at ``fps`` (PyAV; odd sizes padded by one pixel)."""
    import av

    frames = np.asarray(frames)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # yuv420p needs even sides
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())
    return Path(path)


def write_codes(items: list[dict], path: Path) -> Path:
    """``codes.json``: the list of item objects (module docstring), codes as nested lists."""
    out = []
    for item in items:
        item = dict(item)
        if "codes" in item:
            item["codes"] = np.asarray(item["codes"]).tolist()
        out.append(item)
    Path(path).write_text(json.dumps(out) + "\n")
    return Path(path)


def read_codes(spec: str) -> np.ndarray:
    """int64 codes ``[T, h, w]`` from ``FILE.json`` (item 0), ``FILE.json:K`` (item K) or
    ``FILE.npy`` (``[h, w]`` or ``[T, h, w]``); ``ValueError`` naming the file otherwise."""
    path, _, index = spec.partition(":") if ".json:" in spec else (spec, "", "")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".npy":
        codes = np.load(path, allow_pickle=False)
    else:
        try:
            items = json.loads(path.read_text())
            codes = np.asarray(items[int(index or 0)]["codes"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{spec}: not a codes.json item with codes ({type(e).__name__}: {e})") from None
    codes = codes[None] if codes.ndim == 2 else codes
    if codes.ndim != 3 or not codes.size or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{spec}: codes must be integers [h, w] or [T, h, w], got {codes.dtype} "
                         f"{codes.shape}")
    return codes.astype(np.int64)
