"""Video files as clips of RGB frames at a fixed frame rate, decoded with PyAV (FFmpeg).

Used by ``tokenize_images`` for ``.mp4 .webm .mkv .mov .avi`` inputs (files, or members of
webdataset tars given as bytes). One clip becomes one ``video`` document; its vision block's meta
carries the clip's frame rate and duration (``emu3_train.layout``, video meta).

**Resampling.** The frames are decoded in presentation order; their times count from the first
frame (``t = 0``). Output frame ``k`` is the source frame nearest ``t_k = k / fps`` (the earlier
one on a tie), for every ``t_k`` before the end of the video (last frame time + one source frame
period): no frame is ever made up past the end. A target rate above the source's repeats frames.

**Clips.** The resampled frames are cut into consecutive clips of ``max_frames`` frames; the last
clip keeps the largest multiple of ``temporal`` frames it has (the VQ compresses ``temporal``
frames into one code frame) and the rest of the tail (fewer than ``temporal`` frames, at most
``(temporal - 1) / fps`` seconds) is dropped and counted in ``stats["tail_frames_dropped"]``.
Padding would invent frames the caption does not describe. ``max_frames`` must be a positive
multiple of ``temporal``.

**Errors.** An input that does not open, has no video stream, fails to decode (corrupt or
truncated: with ``strict``, the default, FFmpeg's ``err_detect=explode`` makes a damaged packet an
error instead of a concealed frame), whose frames end well before the duration its header gives
(cut short), or that yields no frame raises ``ValueError("{name}: ...")`` (one line). A video
the duration filters reject raises :class:`VideoFiltered` (a ``ValueError``) with ``reason``
``"too_short"`` (shorter than ``min_duration``, or fewer than ``temporal`` frames at ``fps``) or
``"too_long"`` (longer than ``max_duration``); the caller counts both by reason and moves on.

**Memory and threads.** Decoding streams one frame at a time, in one FFmpeg thread (tokenizing
workers are the parallelism); only the frames picked are converted to RGB
(at ``size`` if given, else the decoded size, rotated upright by the stream's display matrix).
:func:`iter_clips` holds one clip at a time; :func:`read_clips` returns all clips of a file, so
bound it with ``max_duration`` (at ``--fps 8``, 60 s at 720p is ~1.3 GB of RGB; with ``size`` far
less).

    python -c "from emu3_train.data_pipelines.video import read_clips; \\
               print([c.frames.shape for c in read_clips('clip.mp4', fps=8, max_frames=32)])"
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi"})
FILTER_REASONS = ("too_short", "too_long")
_EPS = 1e-6  # seconds: timestamps closer than this are equal (pts rounding)


class VideoFiltered(ValueError):
    """A decodable video that a filter drops; ``reason`` is one of :data:`FILTER_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a file's first video stream (seconds, frames per second)."""

    fps: float
    frames: int
    duration: float
    width: int
    height: int
    codec: str


@dataclass
class Clip:
    """``frames`` uint8 ``[T, H, W, 3]`` RGB at ``fps``; ``start`` seconds after the first frame;
    ``duration = T / fps`` seconds; ``index``: the clip's number in its file (0, 1, ...)."""

    frames: np.ndarray
    fps: float
    start: float
    duration: float
    index: int


Source = str | os.PathLike | bytes | bytearray | io.IOBase


def _describe(source: Source, name: str) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__} video>"


def _open(source: Source, name: str):
    """``(container, stream)``: the file opened with its first video stream; ``ValueError`` if not."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, os.PathLike):
        source = os.fspath(source)
    try:
        container = av.open(source, mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: cannot open as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{name}: has no video stream")
    return container, container.streams.video[0]


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _header_duration(container, stream) -> float | None:
    """Seconds the headers give for the stream (else the container), None if neither does."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _info(container, stream, name: str) -> VideoInfo:
    """:class:`VideoInfo` from the headers, counting packets where they give no frame count."""
    frames = int(stream.frames or 0)
    if frames <= 0:  # webm/mkv headers carry no frame count: demux (no decoding) to count packets
        try:
            frames = sum(1 for p in container.demux(stream) if p.size)
        except (av.FFmpegError, OSError) as e:
            raise ValueError(f"{name}: cannot read its packets ({e})") from None
    fps = _rate(stream)
    duration = _header_duration(container, stream)
    if duration is None:
        duration = frames / fps if fps and frames else 0.0
    if not fps and duration > 0 and frames:
        fps = frames / duration
    if not fps or frames <= 0:
        raise ValueError(f"{name}: its video stream has no frames or no frame rate")
    return VideoInfo(fps=fps, frames=frames, duration=duration, width=int(stream.width),
                     height=int(stream.height), codec=stream.codec_context.name)


def probe_video(source: Source, name: str = "") -> VideoInfo:
    """The first video stream's frame rate, frame count, duration and size; ``ValueError`` naming
    the source if it does not open as a video."""
    name = _describe(source, name)
    container, stream = _open(source, name)
    with container:
        return _info(container, stream, name)


def check_clip_args(fps: float, max_frames: int, temporal: int = 4) -> None:
    """``ValueError`` unless ``fps > 0`` and ``max_frames`` is a positive multiple of ``temporal``
    (call it once when parsing the command line: these errors are the user's, not a file's)."""
    if not isinstance(temporal, int) or temporal <= 0:
        raise ValueError(f"temporal must be a positive integer, got {temporal!r}")
    if not isinstance(max_frames, int) or max_frames <= 0 or max_frames % temporal:
        raise ValueError(f"max_frames must be a positive multiple of the VQ's temporal factor {temporal}, "
                         f"got {max_frames!r}")
    if not fps > 0 or not np.isfinite(fps):
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def _rgb(frame, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of a decoded frame, upright, at ``size = (height, width)`` if given."""
    turns = int(round(getattr(frame, "rotation", 0) / 90)) % 4  # display matrix: CCW degrees
    if size is None:
        rgb = frame.to_ndarray(format="rgb24")
    else:  # scale so that the upright image has the size asked for
        height, width = size if turns % 2 == 0 else size[::-1]
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _too_long(name: str, seconds: float, max_duration: float) -> VideoFiltered:
    return VideoFiltered("too_long", f"{name}: {seconds:.3f} s is longer than the maximum duration "
                                     f"{max_duration} s")


def _too_short(name: str, seconds: float, min_duration: float) -> VideoFiltered:
    return VideoFiltered("too_short", f"{name}: {seconds:.3f} s is shorter than the minimum duration "
                                      f"{min_duration} s")


def _resampled(container, stream, fps: float, size, name: str, min_duration: float,
               max_duration: float | None, header_seconds: float | None) -> Iterator[np.ndarray]:
    """The frames nearest ``k / fps`` (module docstring, "Resampling"), in order; raises the
    duration filters on the decoded times (for files whose headers give no duration), and
    ``ValueError`` when the frames end well before the duration the headers give (truncated)."""
    source_fps = _rate(stream)
    period = 1 / source_fps if source_fps else 0.0
    # the end (last frame time + period) is known to half a pts tick: webm's 1 ms ticks make
    # 60 frames at 30 fps end at 2.0003 s, which must not admit a target at 2.0 s
    slack = max(_EPS, min(0.5 * float(stream.time_base or 0), 0.5 * period))
    prev = prev_t = None  # the last decoded frame and its time (seconds after the first)
    t0, k, decoded = None, 0, 0
    cached = (None, None)  # (frame, rgb) of the frame last picked: repeats convert once

    def pick(frame) -> np.ndarray:
        nonlocal cached
        if cached[0] is not frame:
            cached = (frame, _rgb(frame, size))
        return cached[1]

    try:
        for frame in container.decode(stream):
            t = frame.time if frame.time is not None else decoded / (source_fps or fps)
            decoded += 1
            t0 = t if t0 is None else t0
            t -= t0
            if prev is not None and t <= prev_t + _EPS:  # a repeated or out-of-order timestamp
                continue
            if max_duration is not None and t + period > max_duration + _EPS:
                raise _too_long(name, t + period, max_duration)
            while k / fps <= t + _EPS:
                target = k / fps
                near_prev = prev is not None and target - prev_t <= t - target + _EPS
                yield pick(prev if near_prev else frame)
                k += 1
            prev, prev_t = frame, t
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"{name}: corrupt or truncated video: decoding failed after {decoded} frames "
                         f"({e})") from None
    if prev is None:
        raise ValueError(f"{name}: no frame could be decoded")
    decoded_seconds = prev_t + period
    if header_seconds is not None and decoded_seconds < header_seconds - max(2 * period, 0.1):
        raise ValueError(f"{name}: corrupt or truncated video: its frames end at {decoded_seconds:.3f} s, "
                         f"its header says {header_seconds:.3f} s")
    if decoded_seconds < min_duration - _EPS:
        raise _too_short(name, decoded_seconds, min_duration)
    while k / fps < prev_t + period - slack:  # targets between the last frame and the video's end
        yield pick(prev)
        k += 1


def iter_clips(source: Source, fps: float, max_frames: int, temporal: int = 4, min_duration: float = 0.0,
               max_duration: float | None = None, name: str = "", size: tuple[int, int] | None = None,
               stats: dict | None = None, strict: bool = True) -> Iterator[Clip]:
    """The clips of one video, one at a time (module docstring). ``size``: ``(height, width)`` of
    the frames returned (default: as decoded). ``stats``: a dict whose ``"tail_frames_dropped"``
    is increased by the frames of the last clip dropped to keep it a multiple of ``temporal``.
    The duration filters apply to the headers' duration before decoding and, where the headers
    give none, to the decoded frames' times (duration = last frame time + one frame period).
    ``strict``: a damaged packet raises (FFmpeg ``err_detect=explode``) instead of being concealed."""
    check_clip_args(fps, max_frames, temporal)
    name = _describe(source, name)
    container, stream = _open(source, name)
    with container:
        seconds = _header_duration(container, stream)
        if seconds is not None and seconds < min_duration - _EPS:
            raise _too_short(name, seconds, min_duration)
        if seconds is not None and max_duration is not None and seconds > max_duration + _EPS:
            raise _too_long(name, seconds, max_duration)
        if strict:  # a damaged packet is an error, not a concealed (made-up) frame
            stream.codec_context.options = {"err_detect": "explode"}
        buffer: list[np.ndarray] = []
        index = 0
        for rgb in _resampled(container, stream, fps, size, name, min_duration, max_duration, seconds):
            buffer.append(rgb)
            if len(buffer) == max_frames:
                yield Clip(np.stack(buffer), fps, index * max_frames / fps, max_frames / fps, index)
                buffer, index = [], index + 1
        keep = len(buffer) // temporal * temporal
        if keep == 0 and index == 0:
            raise VideoFiltered("too_short", f"{name}: gives {len(buffer)} frames at {fps} fps, fewer than "
                                             f"the {temporal} of one code frame")
        if stats is not None:
            stats["tail_frames_dropped"] = stats.get("tail_frames_dropped", 0) + len(buffer) - keep
        if keep:
            yield Clip(np.stack(buffer[:keep]), fps, index * max_frames / fps, keep / fps, index)


def read_clips(source: Source, fps: float, max_frames: int, temporal: int = 4, min_duration: float = 0.0,
               max_duration: float | None = None, name: str = "", size: tuple[int, int] | None = None,
               stats: dict | None = None, strict: bool = True) -> list[Clip]:
    """Every clip of one video (:func:`iter_clips`); all or nothing: a decoding error part way
    raises before any clip is returned."""
    return list(iter_clips(source, fps, max_frames, temporal, min_duration, max_duration, name, size, stats,
                           strict))


def is_video(path: str | os.PathLike) -> bool:
    """True for a file name with one of :data:`VIDEO_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES
