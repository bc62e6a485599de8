"""Decode + convert + filter + resize items in background processes, so the VQ device never waits.

:func:`prepare` turns one :class:`image_inputs.Item` into uint8 RGB pixels at the VQ processor's
resized shape (an image ``[H, W, 3]``, a frame folder ``[T, H, W, 3]``, a video file a list of
clips of ``[T, H, W, 3]``), or says why it is dropped; it never raises for bad data.
:class:`DecodePool` runs it in ``workers`` spawned processes (0: in this process), a bounded number
of items ahead, and yields the results in input order. A decode process that dies (a decoder
crash, the OOM killer) restarts the pool; the item it died on is retried alone and dropped as
``undecodable`` if it kills a process again (three such items in a row stop the run: then the
processes cannot work at all).

Image modes, to 8-bit RGB (Pillow decodes; the EXIF orientation is applied first):

- RGBA, LA, PA, and P / L / RGB with a transparency entry: composited on **white** (the same as
  ``transformers``' ``convert_to_rgb``, which Emu3's processor uses);
- CMYK: ``255 * (1 - C) * (1 - K)`` per channel (Pillow's conversion; no ICC profile applied);
- 16-bit (``I;16``, ``I;16B``, ``I;16L``, and ``I`` holding 16-bit data, e.g. 16-bit grayscale
  PNG): scaled by 255/65535 and rounded, never clipped (a clip would saturate almost every pixel);
  32-bit ``I`` values above 65,535 and ``F`` images are scaled by their own maximum;
- 1, L, YCbCr, LAB, HSV, RGB: Pillow's ``convert("RGB")``.

Filters (on the oriented size before resizing, for images, frames and video frames alike;
counted, never errors): ``too_small`` (shorter side below ``min_side``), ``too_wide`` (longer /
shorter side above ``max_aspect``, or above 200, which Emu3's resize refuses); video
``too_short`` / ``too_long`` (``data_pipelines.video``).

    with DecodePool(workers=4) as pool:
        for item, prepared in pool.map(items, spec): ...
"""

from __future__ import annotations

import io
import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np

from emu3_train.vq import MAX_ASPECT, ResizeSpec

from .image_inputs import Item
from .video import VideoFiltered, iter_clips

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
MAX_DEATHS = 3


@dataclass(frozen=True)
class DecodeSpec:
    """What the decode processes do to each item (picklable)."""

    resize: ResizeSpec
    min_side: int = 0
    max_aspect: float | None = None
    fps: float = 8.0
    max_frames: int = 32
    temporal: int = 4
    min_duration: float = 0.0
    max_duration: float | None = None


@dataclass
class VideoClip:
    pixels: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    start: float  # seconds
    duration: float  # seconds
    index: int


@dataclass
class Prepared:
    """Pixels of an item (``pixels`` for an image / frame folder, ``clips`` for a video file), or
    why it is dropped: ``reason`` set, ``filtered`` True for a filter (else bad input)."""

    pixels: np.ndarray | None = None
    clips: list[VideoClip] = field(default_factory=list)
    reason: str = ""
    message: str = ""
    filtered: bool = False
    tail_frames_dropped: int = 0


class _Dropped(Exception):
    def __init__(self, reason: str, message: str, filtered: bool = False):
        super().__init__(message)
        self.reason, self.message, self.filtered = reason, message, filtered


def _composite_on_white(im):
    from PIL import Image

    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def to_rgb(im):
    """8-bit RGB PIL image of any Pillow mode (module docstring)."""
    from PIL import Image

    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode in _SIXTEEN_BIT or (im.mode == "I" and a.max(initial=0) <= 65535) else \
            max(float(a.max(initial=0)), 1e-12)
        gray = np.clip(np.rint(np.clip(a, 0, None) * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if "A" in im.getbands() or "transparency" in im.info:
        return _composite_on_white(im)
    return im.convert("RGB")


def open_image(source: bytes | str):
    """The fully decoded, upright 8-bit RGB PIL image of file bytes or a path; raises on bad data."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        im.load()  # decode now: a truncated file fails here, not later
        return to_rgb(ImageOps.exif_transpose(im))


def _check_size(height: int, width: int, spec: DecodeSpec, what: str) -> None:
    if min(height, width) < spec.min_side:
        raise _Dropped("too_small", f"{what} is {width}x{height}, shorter side below --min-side "
                                    f"{spec.min_side}", True)
    aspect = max(height, width) / max(1, min(height, width))
    limit = MAX_ASPECT if spec.max_aspect is None else min(spec.max_aspect, MAX_ASPECT)
    if aspect > limit:
        raise _Dropped("too_wide", f"{what} is {width}x{height}, aspect ratio {aspect:.2f} above {limit:g}",
                       True)


def _image(source, spec: DecodeSpec, what: str):
    try:
        im = open_image(source)
    except Exception as e:  # noqa: BLE001 -- any failure to decode one file is that file's problem
        raise _Dropped("undecodable", f"cannot decode the {what} ({type(e).__name__}: {e})") from None
    _check_size(im.height, im.width, spec, what)
    return im


def _video(item: Item, spec: DecodeSpec) -> Prepared:
    source = item.data if item.data is not None else item.path
    stats: dict = {}
    clips = []
    try:
        for clip in iter_clips(source, spec.fps, spec.max_frames, spec.temporal, spec.min_duration,
                               spec.max_duration, name=item.where, stats=stats):
            if not clips:
                _check_size(*clip.frames.shape[1:3], spec, "video")
            pixels = np.stack([spec.resize.resize(f) for f in clip.frames])
            clips.append(VideoClip(pixels, clip.fps, clip.start, clip.duration, clip.index))
    except VideoFiltered as e:
        raise _Dropped(e.reason, str(e), True) from None
    except ValueError as e:
        raise _Dropped("undecodable", str(e)) from None
    return Prepared(clips=clips, tail_frames_dropped=stats.get("tail_frames_dropped", 0))


def prepare(item: Item, spec: DecodeSpec) -> Prepared:
    """Pixels of ``item`` at the resized shape, or why it is dropped (module docstring)."""
    try:
        if item.kind == "video":
            return _video(item, spec)
        if item.kind == "image":
            im = _image(item.data if item.data is not None else item.path, spec, "image")
            return Prepared(pixels=spec.resize.resize(im))
        frames = [_image(p, spec, f"frame {p}") for p in item.frames]
        sizes = sorted({(f.height, f.width) for f in frames})
        if len(sizes) > 1:
            raise _Dropped("mixed_frame_sizes", f"its frames differ in size {sizes}")
        return Prepared(pixels=np.stack([spec.resize.resize(f) for f in frames]))
    except _Dropped as d:
        return Prepared(reason=d.reason, message=d.message, filtered=d.filtered)
    except ValueError as e:  # the resize refusing an image (aspect), bad metadata, ...
        return Prepared(reason="undecodable", message=str(e))


class DecodePool:
    """:func:`prepare` over items in ``workers`` spawned processes (0: in-process), in input order,
    at most ``ahead`` items in flight (default ``4 * workers``): memory stays bounded on any input."""

    def __init__(self, workers: int = 0, ahead: int | None = None):
        self.workers = max(0, int(workers))
        self.ahead = max(1, ahead if ahead is not None else 4 * self.workers)
        self._pool = None
        self._deaths = 0  # items in a row whose decode process died even when retried alone
        if self.workers:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, items: Iterable[Item], spec: DecodeSpec) -> Iterator[tuple[Item, Prepared]]:
        if self._pool is None:
            for item in items:
                yield item, prepare(item, spec)
            return
        items = iter(items)
        pending: deque = deque()
        try:
            for item in items:
                pending.append((item, self._pool.submit(prepare, item, spec)))
                if len(pending) >= self.ahead:
                    yield self._next(pending, spec)
            while pending:
                yield self._next(pending, spec)
        finally:
            for _, future in pending:
                future.cancel()

    def _next(self, pending: deque, spec: DecodeSpec) -> tuple[Item, Prepared]:
        """The oldest pending result. A decode process that died (a decoder crash, the OOM killer)
        breaks the pool: restart it, retry that item alone (dropped as ``undecodable`` if it kills
        a process again) and resubmit the others."""
        item, future = pending.popleft()
        try:
            return item, future.result()
        except BrokenProcessPool:
            pass
        self._restart()
        try:
            result = self._pool.submit(prepare, item, spec).result()
            self._deaths = 0
        except BrokenProcessPool:
            self._deaths += 1
            if self._deaths >= MAX_DEATHS:  # not one bad file: the processes cannot run at all
                raise RuntimeError(f"decode processes died on {MAX_DEATHS} items in a row, the last "
                                   f"{item.where}; run with --workers 0 to see why") from None
            self._restart()
            result = Prepared(reason="undecodable", message="its decode process died (a decoder crash or "
                                                            "out of memory)")
        for i, (other, _) in enumerate(pending):
            pending[i] = (other, self._pool.submit(prepare, other, spec))
        return item, result

    def _restart(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
