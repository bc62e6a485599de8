"""Tokenize captioned images and frame-folder videos into t2i / i2t / video documents (offline).

Inputs, ``--images DIR``:

- every image file directly in DIR (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``) is an image;
- every sub-folder of DIR is a video clip; its image files, sorted by name, are the frames.

Captions: ``--captions FILE.jsonl`` lines ``{"image": "<name relative to DIR>", "caption": "..."}``
(a clip is named by its folder), else a sidecar ``DIR/<stem>.txt`` (``DIR/<clip>.txt`` for a clip).
Every image and clip needs one. Captions are encoded with the Qwen BPE (``--tokenizer PATH``
for another ``.tiktoken`` file).

Pixels to codes, with transformers' Emu3 classes:

- ``Emu3ImageProcessor`` (from ``--vq``'s ``preprocessor_config.json``; without one, Emu3
  VisionTokenizer's settings: mean = std = 0.5, min 512², max 1024² pixels, factor 8)
  ``smart_resize``-s an H0×W0 image to H×W, both multiples of ``spatial_factor`` (8), with
  ``min_pixels <= H*W <= max_pixels`` and about the same aspect ratio.
- ``Emu3VQVAE`` (``--vq PATH``, a directory saved by ``Emu3VQVAE.save_pretrained``) downsamples by
  ``2 ** (len(channel_multiplier) - 1)`` (8 for Emu3): the grid is ``h×w = H/8 × W/8``, so a
  512×512 image gives 64×64 codes (64·65 + 1 tokens with EOLs and EOF). Code ``c`` is token
  ``vocab.vision_start + c`` (151,854 + c for ``emu3``).
- Time: the VQ-VAE compresses ``temporal_downsample_factor`` (4) frames into one code frame; it
  encodes an image as 4 copies of itself. A clip of T frames is cut into ``ceil(T/4)`` chunks of
  4 frames (the last one padded by repeating the last frame), each encoded on its own as Emu3's
  reference video code does; the ``ceil(T/4)`` code frames form one vision block, each frame
  ending with EOF.

Documents (JSON lines for ``write_shards``, metadata first, ``tokens`` last; ``source`` is the
name relative to DIR): per image one per ``--tasks`` entry, ``t2i`` (caption, then image) and/or
``i2t`` (image, then caption); per clip one ``video`` document (caption, then the clip).

Images of the same resized shape are encoded together, ``--batch-size`` at a time, on the GPU
when there is one; ``--workers`` threads load and resize the next batches meanwhile. Resumable:
documents go to ``OUT.partial`` (renamed to ``OUT`` when complete); a rerun skips the
(source, task) pairs already there, and a complete ``OUT`` is kept unless ``--force``.

    python -m emu3_train.data_pipelines.tokenize_images --images photos/ --captions captions.jsonl \\
        --vq /models/Emu3-VisionTokenizer-hf --out docs.jsonl
    python -m emu3_train.data_pipelines.write_shards --input docs.jsonl --out data/images --vocab emu3

A ``--vq`` directory from the Hugging Face Emu3 checkpoints: ``Emu3ForConditionalGeneration
.from_pretrained(REPO).model.vqmodel.save_pretrained(PATH)`` and ``Emu3ImageProcessor
.from_pretrained(REPO).save_pretrained(PATH)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emu3_train.layout import i2t_document, t2i_document
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import PRESETS, Vocab, get_vocab

from ._cli import run_cli
from .tokenize_text import DocWriter  # emu3_train.data_pipelines (installed from data_pipelines/)

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
IMAGE_TASKS = ("t2i", "i2t")
EMU3_MEAN_STD = [0.5, 0.5, 0.5]  # Emu3 VisionTokenizer normalizes pixels to [-1, 1]
_NO_CROP = 2**30  # image_sizes that make Emu3VQVAE.encode's crop a no-op (see encode_clip_pixels)
_EXIF_ORIENTATION = 0x0112


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file as displayed (EXIF rotation applied), from its header."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                h, w = w, h
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return h, w


def load_image(path: Path):
    """The PIL image of ``path`` with its EXIF rotation applied (the processor converts it to RGB)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def _pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class VisionTokenizer:
    """Emu3's image processor + VQ-VAE: PIL images to visual codes.

    ``vq_path``: directory of ``Emu3VQVAE.save_pretrained`` (and optionally the processor's
    ``preprocessor_config.json``). ``min_pixels``/``max_pixels`` override the processor's.
    """

    def __init__(self, vq_path: str | os.PathLike, device: str = "auto", min_pixels: int | None = None,
                 max_pixels: int | None = None, batch_size: int = 8):
        import torch
        from transformers import Emu3ImageProcessor, Emu3VQVAE

        vq_path = Path(vq_path)
        if not (vq_path / "config.json").is_file():
            raise FileNotFoundError(f"{vq_path}: not a saved Emu3VQVAE (no config.json)")
        if (vq_path / "preprocessor_config.json").is_file():
            self.processor = Emu3ImageProcessor.from_pretrained(vq_path)
        else:
            self.processor = Emu3ImageProcessor(image_mean=EMU3_MEAN_STD, image_std=EMU3_MEAN_STD)
        p = self.processor
        p.min_pixels = p.min_pixels if min_pixels is None else int(min_pixels)
        p.max_pixels = p.max_pixels if max_pixels is None else int(max_pixels)
        if not 0 < p.min_pixels <= p.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {p.min_pixels} and {p.max_pixels}")
        p.size = {"min_pixels": p.min_pixels, "max_pixels": p.max_pixels}
        self.device = _pick_device(device)
        vq, info = Emu3VQVAE.from_pretrained(vq_path, output_loading_info=True)
        missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info["mismatched_keys"])
        if missing:  # from_pretrained would leave them random: the codes would be noise
            raise ValueError(f"{vq_path}: {len(missing)} Emu3VQVAE weights are missing or mismatched (e.g. "
                             f"{missing[0]}); save the VQ-VAE of an HF-format Emu3 checkpoint there")
        self.vq = vq.to(self.device).eval()
        self.spatial = int(self.vq.vision_spatial_factor)
        self.temporal = int(self.vq.config.temporal_downsample_factor)
        self.codebook_size = int(self.vq.config.codebook_size)
        if p.spatial_factor % self.spatial:
            raise ValueError(f"{vq_path}: the processor resizes to multiples of {p.spatial_factor}, which "
                             f"the VQ-VAE's downsampling {self.spatial} does not divide")
        self.batch_size = max(1, int(batch_size))
        self._torch = torch

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Pixel size ``(H, W)`` the processor gives an ``height×width`` image."""
        from transformers.models.emu3.image_processing_emu3 import smart_resize

        p = self.processor
        if not p.do_resize:
            return height, width
        return smart_resize(height, width, factor=p.spatial_factor, min_pixels=p.min_pixels,
                            max_pixels=p.max_pixels)

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Code grid ``(h, w)`` of an ``height×width`` image."""
        rh, rw = self.resized_shape(height, width)
        return rh // self.spatial, rw // self.spatial

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """float ``[B, 3, H, W]`` pixels of PIL images that share one resized shape."""
        out = self.processor(images=list(images), return_tensors="pt")
        sizes = {tuple(int(v) for v in s) for s in out["image_sizes"]}
        if len(sizes) != 1:
            raise ValueError(f"images of one batch resize to different shapes {sorted(sizes)}")
        (h, w), = sizes
        if h % self.spatial or w % self.spatial:
            raise ValueError(f"resized {h}x{w} is not a multiple of the VQ-VAE's downsampling {self.spatial}")
        return out["pixel_values"]

    def encode_pixels(self, pixels) -> np.ndarray:
        """int64 codes ``[B, h, w]`` of ``[B, 3, H, W]`` pixels (``Emu3VQVAE.encode``, batch_size a call)."""
        torch = self._torch
        _, _, h, w = pixels.shape
        codes = []
        with torch.inference_mode():
            for chunk in pixels.split(self.batch_size):
                sizes = torch.tensor([[h, w]] * len(chunk))
                tokens = self.vq.encode(chunk.to(self.device), image_sizes=sizes).image_tokens
                codes.append(torch.stack(list(tokens)).cpu())
        out = torch.cat(codes).numpy().astype(np.int64)
        if out.shape[1:] != (h // self.spatial, w // self.spatial):
            raise RuntimeError(f"VQ-VAE gave a {out.shape[1:]} grid for {h}x{w} pixels")
        return out

    def encode_clip_pixels(self, pixels) -> np.ndarray:
        """int64 codes ``[ceil(T/4), h, w]`` of a clip's ``[T, 3, H, W]`` pixels (4 = temporal factor).

        The frames are cut into chunks of ``temporal`` frames (the last padded with copies of the
        last frame); each chunk is one sample of a 5-D ``Emu3VQVAE.encode`` call.
        """
        torch = self._torch
        t, c, h, w = pixels.shape
        k = self.temporal
        pad = -t % k
        if pad:
            pixels = torch.cat([pixels, pixels[-1:].expand(pad, c, h, w)])
        chunks = pixels.reshape(-1, k, c, h, w)
        codes = []
        with torch.inference_mode():
            for batch in chunks.split(self.batch_size):
                # encode() crops each sample's codes as if they were [h, w]; for a [1, h, w] chunk that
                # would cut the wrong axes, so ask for a crop larger than any grid (a no-op).
                sizes = torch.tensor([[_NO_CROP, _NO_CROP]] * len(batch))
                tokens = self.vq.encode(batch.to(self.device), image_sizes=sizes).image_tokens
                codes.extend(tok.reshape(-1, *tok.shape[-2:]).cpu() for tok in tokens)
        out = torch.cat(codes).numpy().astype(np.int64)
        if out.shape != (math.ceil(t / k), h // self.spatial, w // self.spatial):
            raise RuntimeError(f"VQ-VAE gave codes {out.shape} for a {t}-frame {h}x{w} clip")
        return out

    def encode_images(self, images: Sequence) -> list[np.ndarray]:
        """Codes ``[h, w]`` of each PIL image (any sizes: grouped by resized shape internally)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.resized_shape(im.height, im.width), []).append(i)
        out: list[np.ndarray] = [None] * len(images)
        for idx in groups.values():
            for i, codes in zip(idx, self.encode_pixels(self.preprocess([images[i] for i in idx]))):
                out[i] = codes
        return out

    def encode_video(self, frames: Sequence) -> np.ndarray:
        """Codes ``[ceil(T/4), h, w]`` of a clip of T PIL frames of one size."""
        return self.encode_clip_pixels(self.preprocess(frames))


@dataclass
class Item:
    """One image, or one clip (a folder of frames), of the input directory."""

    name: str  # relative to the input directory (POSIX); the documents' source
    frames: list[Path]  # [image] or the clip's frames in order
    video: bool


def find_items(images_dir: str | os.PathLike) -> list[Item]:
    """The images (files directly in ``images_dir``) and clips (its sub-folders), sorted by name."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    items = []
    for p in sorted(root.iterdir()):
        if p.is_dir():
            frames = sorted(f for f in p.iterdir() if _is_image(f))
            if not frames:
                raise ValueError(f"{p}: clip folder holds no image files")
            items.append(Item(p.name, frames, True))
        elif _is_image(p):
            items.append(Item(p.name, [p], False))
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or clip folders")
    return items


def load_captions(images_dir: str | os.PathLike, items: Sequence[Item],
                  captions: str | os.PathLike | None = None) -> tuple[dict[str, str], int]:
    """``({item name: caption}, captions naming no item)``; ``ValueError`` naming an uncaptioned item."""
    root = Path(images_dir)
    names = {it.name for it in items}
    given: dict[str, str] = {}
    unused = 0
    if captions is not None:
        path = Path(captions)
        if not path.is_file():
            raise FileNotFoundError(f"captions file not found: {path}")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                if not (isinstance(obj, dict) and isinstance(obj.get("image"), str)
                        and isinstance(obj.get("caption"), str)):
                    raise ValueError(f"{path}:{line_no}: expected {{\"image\": str, \"caption\": str}}")
                if obj["image"] in given:
                    raise ValueError(f"{path}:{line_no}: a second caption for {obj['image']!r}")
                given[obj["image"]] = obj["caption"]
                unused += obj["image"] not in names
    out = {}
    for it in items:
        if it.name in given:
            out[it.name] = given[it.name]
            continue
        sidecar = root / ((it.name if it.video else Path(it.name).stem) + ".txt")
        if not sidecar.is_file():
            where = f"not in {captions} and " if captions is not None else ""
            raise ValueError(f"{root / it.name}: no caption ({where}no sidecar {sidecar.name})")
        out[it.name] = sidecar.read_text(encoding="utf-8").strip()
    return out, unused


def _prefetch(fn: Callable, jobs: Iterable, workers: int) -> Iterator:
    """``map(fn, jobs)`` in order, computed up to ``2 * workers`` jobs ahead on threads."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    jobs = iter(jobs)
    with ThreadPoolExecutor(workers) as pool:
        pending = deque(pool.submit(fn, job) for _, job in zip(range(2 * workers), jobs))
        try:
            while pending:
                result = pending.popleft().result()
                for job in jobs:
                    pending.append(pool.submit(fn, job))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()


def tokenize_images(items: Sequence[Item], captions: dict[str, str], vt: VisionTokenizer, tokenizer,
                    vocab: Vocab, writer: DocWriter, tasks: Sequence[str] = IMAGE_TASKS,
                    done: set[tuple[str, str]] = frozenset(), workers: int = 2,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Encode ``items`` and write their documents to ``writer`` (skipping ``(source, task)`` in ``done``).

    Returns counts: ``images``, ``clips``, ``skipped`` (items already done).
    """
    if vt.codebook_size > vocab.codebook_size:
        raise ValueError(f"the VQ-VAE has {vt.codebook_size} codes, vocabulary {vocab.name!r} only "
                         f"{vocab.codebook_size}")
    encode = tokenizer.encode

    def wanted(it: Item) -> list[str]:
        return [t for t in (["video"] if it.video else tasks) if (it.name, t) not in done]

    todo = [it for it in items if wanted(it)]
    counts = {"images": 0, "clips": 0, "skipped": len(items) - len(todo)}
    if progress is not None:
        progress(counts["skipped"])
    from tqdm import tqdm

    shapes = {}
    for it in tqdm(todo, desc="reading sizes", unit="item", file=sys.stderr, disable=progress is None):
        try:
            shapes[it.name] = vt.resized_shape(*image_size(it.frames[0]))
        except ValueError as e:  # smart_resize refuses extreme aspect ratios
            raise ValueError(f"{it.frames[0]}: {e}") from None
    images = sorted((it for it in todo if not it.video), key=lambda it: (shapes[it.name], it.name))
    jobs = [images[i:i + vt.batch_size] for i in range(0, len(images), vt.batch_size)]
    jobs += [[it] for it in todo if it.video]

    def prepare(job: list[Item]):
        if job[0].video:
            frames = [load_image(p) for p in job[0].frames]
            sizes = {(f.height, f.width) for f in frames}
            if len(sizes) > 1:
                raise ValueError(f"{job[0].frames[0].parent}: frames differ in size {sorted(sizes)}")
        else:
            frames = [load_image(it.frames[0]) for it in job]
        return job, vt.preprocess(frames)

    for job, pixels in _prefetch(prepare, jobs, workers):
        codes = [vt.encode_clip_pixels(pixels)] if job[0].video else vt.encode_pixels(pixels)
        docs = []
        for it, grid in zip(job, codes):
            caption = encode(captions[it.name])
            for task in wanted(it):
                build = i2t_document if task == "i2t" else t2i_document
                docs.append({"task": task, "source": it.name, "tokens": build(vocab, caption, grid, encode)})
            counts["clips" if it.video else "images"] += 1
        writer.write(docs)
        if progress is not None:
            progress(len(job))
    return counts


def _done_pairs(writer: DocWriter) -> set[tuple[str, str]]:
    writer.recover()
    return {(doc["source"], doc["task"]) for doc in writer.lines()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.tokenize_images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize captioned images (files in DIR) and video clips (sub-folders of frames) into "
                    "t2i / i2t / video documents with Emu3's image processor and VQ-VAE.",
        epilog="example:\n  python -m emu3_train.data_pipelines.tokenize_images --images photos/ "
               "--captions captions.jsonl --vq /models/Emu3-VisionTokenizer-hf --out docs.jsonl",
    )
    parser.add_argument("--images", type=Path, required=True, metavar="DIR",
                        help="image files, and sub-folders of frames (one video clip each)")
    parser.add_argument("--captions", type=Path, default=None,
                        help='JSON lines {"image": NAME, "caption": TEXT} (default: sidecar NAME.txt files)')
    parser.add_argument("--vq", type=Path, required=True, metavar="PATH",
                        help="directory of a saved Emu3VQVAE (+ preprocessor_config.json)")
    parser.add_argument("--out", type=Path, required=True, help="output JSON-lines file of documents")
    parser.add_argument("--tasks", default="t2i,i2t", help="documents per image: t2i, i2t or both (default)")
    parser.add_argument("--min-pixels", type=int, default=None, help="resize floor (default: processor's)")
    parser.add_argument("--max-pixels", type=int, default=None, help="resize ceiling (default: processor's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images (or 4-frame chunks) per VQ call")
    parser.add_argument("--workers", type=int, default=2, help="threads loading and resizing ahead (0: none)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a .tiktoken file for the captions")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset (default emu3)")
    parser.add_argument("--force", action="store_true", help="rewrite OUT even if it is complete")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or any(t not in IMAGE_TASKS for t in tasks):
        parser.error(f"--tasks {args.tasks!r}: give t2i, i2t or t2i,i2t")

    writer = DocWriter(args.out)
    if writer.complete and not args.force:
        print(f"{args.out} is complete; --force rewrites it")
        return 0
    vocab = get_vocab(args.vocab)
    tokenizer = load_tokenizer(vocab, args.tokenizer)
    items = find_items(args.images)
    captions, unused = load_captions(args.images, items, args.captions)
    done = set() if args.force else _done_pairs(writer)
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    vt = VisionTokenizer(args.vq, args.device, args.min_pixels, args.max_pixels, args.batch_size)
    start = time.perf_counter()
    writer.open(append=bool(done))
    bar = tqdm(total=len(items), desc=f"encoding on {vt.device}", unit="item", file=sys.stderr)
    try:
        counts = tokenize_images(items, captions, vt, tokenizer, vocab, writer, tasks, done, args.workers,
                                 bar.update)
        writer.finish()
    finally:
        bar.close()
        writer.close()
    seconds = max(time.perf_counter() - start, 1e-9)
    extra = f"; {counts['skipped']} items were already done" if counts["skipped"] else ""
    extra += f"; {unused} captions name no image" if unused else ""
    print(f"wrote {writer.docs} documents ({writer.tokens} tokens) from {counts['images']} images and "
          f"{counts['clips']} clips to {args.out} in {seconds:.1f} s "
          f"({(counts['images'] + counts['clips']) / seconds:.1f} items/s){extra}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
