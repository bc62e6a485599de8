"""Video decoding with PyAV: probing, resampling to --fps, clips aligned to the VQ's temporal factor,
corrupt files named, duration filters by reason. Every video is written by PyAV in the test."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from emu3_train.layout import parse_vision_block_meta, vision_block
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.video import (
    VIDEO_SUFFIXES,
    VideoFiltered,
    check_clip_args,
    probe_video,
    read_clips,
)

STEP = 4  # gray level per source frame: frame i's top half is 4 * i, so frames are told apart


def source_frame(i: int, h: int, w: int) -> np.ndarray:
    """Frame i: top half uniform gray 4 * (i % 64); bottom half black with a white 8-px square moving
    2 px per frame."""
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2] = STEP * (i % 64)
    x = (2 * i) % (w - 8)
    img[h - 12:h - 4, x:x + 8] = 255
    return img


def write_video(fmt: str, codec: str, frames: int = 60, rate: int = 30, size=(120, 160),
                pix_fmt: str = "yuv420p", options: dict | None = None) -> bytes:
    h, w = size
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(source_frame(i, h, w), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


# near-lossless settings so that the gray level identifies the source frame (step 4, tolerance 1.5)
MP4 = dict(fmt="mp4", codec="libx264", options={"crf": "0"})
WEBM = dict(fmt="webm", codec="libvpx-vp9", options={"lossless": "1"})


@pytest.fixture(scope="module")
def mp4_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "two-seconds.mp4"
    path.write_bytes(write_video(**MP4))
    return path


@pytest.fixture(scope="module")
def webm_bytes():
    return write_video(**WEBM)


def nearest_sources(k: int, fps: float, rate: int = 30, n: int = 60) -> set[int]:
    """Source frames nearest t = k / fps (both when they tie to within a millisecond)."""
    t = Fraction(k) / Fraction(fps)
    gaps = [abs(Fraction(i, rate) - t) for i in range(n)]
    best = min(gaps)
    return {i for i, g in enumerate(gaps) if g - best < Fraction(1, 1000)}


def test_suffixes():
    assert {".mp4", ".webm", ".mkv", ".mov", ".avi"} == VIDEO_SUFFIXES


@pytest.mark.parametrize("which", ["mp4", "webm"])
def test_probe_reports_what_was_written(which, mp4_file, webm_bytes):
    info = probe_video(mp4_file if which == "mp4" else webm_bytes)
    assert info.fps == pytest.approx(30.0) and info.frames == 60
    assert info.duration == pytest.approx(2.0, abs=0.04)
    assert (info.width, info.height) == (160, 120)
    assert info.codec == {"mp4": "h264", "webm": "vp9"}[which]


@pytest.mark.parametrize("which", ["mp4", "webm"])
def test_clips_at_8_fps_hold_the_nearest_source_frames(which, mp4_file, webm_bytes):
    stats = {}
    source = mp4_file if which == "mp4" else io.BytesIO(webm_bytes)  # a path, and a file-like object
    clips = read_clips(source, fps=8, max_frames=8, stats=stats)
    assert [c.index for c in clips] == [0, 1] and stats == {"tail_frames_dropped": 0}
    assert [c.frames.shape for c in clips] == [(8, 120, 160, 3)] * 2  # 2 s at 8 fps: 16 frames
    assert [c.frames.dtype for c in clips] == [np.uint8] * 2
    assert [(c.fps, c.start, c.duration) for c in clips] == [(8, 0.0, 1.0), (8, 1.0, 1.0)]
    frames = np.concatenate([c.frames for c in clips])
    for k, frame in enumerate(frames):
        level = float(frame[:54].mean())  # the uniform top half (rows 0..59, away from the edge)
        want = nearest_sources(k, 8)
        assert any(abs(level - STEP * i) < 1.5 for i in want), (k, level, want)
        square = int(np.argmax(frame[-8, :, 0] > 128))  # where the moving square starts
        assert any(abs(square - 2 * i) <= 1 for i in want), (k, square, want)


def test_tail_keeps_a_multiple_of_the_temporal_factor(webm_bytes):
    data = write_video(**WEBM, frames=78)  # 2.6 s: 21 frames at 8 fps = 8 + 8 + 5
    stats = {}
    clips = read_clips(data, fps=8, max_frames=8, temporal=4, stats=stats)
    assert [len(c.frames) for c in clips] == [8, 8, 4] and stats["tail_frames_dropped"] == 1
    assert [(c.start, c.duration) for c in clips] == [(0.0, 1.0), (1.0, 1.0), (2.0, 0.5)]
    clips = read_clips(data, fps=8, max_frames=12, temporal=4)  # 12 + 8 (+ 1 dropped)
    assert [len(c.frames) for c in clips] == [12, 8]


def test_upsampling_repeats_frames_but_never_past_the_end():
    data = write_video(**MP4, frames=16, rate=8)  # 2 s at 8 fps, decoded at 16 fps
    (clip,) = read_clips(data, fps=16, max_frames=32, temporal=4)
    assert len(clip.frames) == 32 and clip.duration == 2.0
    levels = np.round(clip.frames[:, :54].mean(axis=(1, 2, 3)) / STEP).astype(int)
    assert levels.tolist() == [k // 2 for k in range(32)]  # each source frame twice, the last included


@pytest.mark.parametrize("fmt, codec, pix_fmt, size", [
    ("matroska", "libx264", "yuv444p", (121, 161)),  # .mkv, odd size, 4:4:4
    ("mov", "mjpeg", "yuvj444p", (121, 161)),  # .mov, full-range JPEG frames
    ("avi", "mpeg4", "yuv420p", (120, 160)),
])
def test_other_containers_and_odd_sizes(fmt, codec, pix_fmt, size):
    data = write_video(fmt, codec, frames=30, size=size, pix_fmt=pix_fmt)
    info = probe_video(data)
    assert (info.height, info.width, info.frames) == (*size, 30)
    clips = read_clips(data, fps=8, max_frames=4)  # 1 s: 8 frames
    assert [c.frames.shape for c in clips] == [(4, *size, 3)] * 2


def test_size_resizes_the_frames(mp4_file):
    clips = read_clips(mp4_file, fps=4, max_frames=8, size=(60, 80))
    assert [c.frames.shape for c in clips] == [(8, 60, 80, 3)]
    (native,) = read_clips(mp4_file, fps=4, max_frames=8)
    top = lambda frames, rows: frames[:, :rows].mean(axis=(1, 2, 3))  # noqa: E731
    np.testing.assert_allclose(top(clips[0].frames, 25), top(native.frames, 50), atol=3)  # same frames


def corrupt_inputs(mp4: bytes, webm: bytes) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    garbled = bytearray(mp4)
    garbled[len(mp4) // 3:len(mp4) // 3 + 400] = rng.integers(0, 256, 400, dtype=np.uint8).tobytes()
    return {"random.mp4": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "empty.webm": b"",
            "half.mp4": mp4[:len(mp4) // 2], "half.webm": webm[:len(webm) // 2],
            "header-only.webm": webm[:200], "garbled.mp4": bytes(garbled)}


@pytest.mark.parametrize("key", ["random.mp4", "empty.webm", "half.mp4", "half.webm", "header-only.webm",
                                 "garbled.mp4"])
def test_corrupt_video_raises_naming_it(key, mp4_file, webm_bytes):
    data = corrupt_inputs(mp4_file.read_bytes(), webm_bytes)[key]
    name = f"in-000.tar: sample '{key}'"
    with pytest.raises(ValueError) as err:
        read_clips(data, fps=8, max_frames=8, name=name)
    assert not isinstance(err.value, VideoFiltered)  # corrupt, not filtered
    assert str(err.value).startswith(f"{name}: ") and "\n" not in str(err.value)


def test_corrupt_file_on_disk_is_named_by_its_path(tmp_path):
    path = tmp_path / "broken.mkv"
    path.write_bytes(b"\x1a\x45\xdf\xa3 not really matroska" * 10)
    with pytest.raises(ValueError, match=f"^{path}: cannot open as a video"):
        probe_video(path)
    with pytest.raises(ValueError, match=f"^{path}: "):
        read_clips(path, fps=8, max_frames=8)


def test_duration_filters_raise_by_reason(mp4_file):
    with pytest.raises(VideoFiltered, match="shorter than the minimum duration 3") as err:
        read_clips(mp4_file, fps=8, max_frames=8, min_duration=3)
    assert err.value.reason == "too_short" and isinstance(err.value, ValueError)
    with pytest.raises(VideoFiltered, match="longer than the maximum duration 1.5") as err:
        read_clips(mp4_file, fps=8, max_frames=8, max_duration=1.5)
    assert err.value.reason == "too_long"
    assert len(read_clips(mp4_file, fps=8, max_frames=8, min_duration=2, max_duration=2)) == 2
    short = write_video(**MP4, frames=10)  # 1/3 s: 3 frames at 8 fps, less than one code frame
    with pytest.raises(VideoFiltered, match="gives 3 frames at 8 fps") as err:
        read_clips(short, fps=8, max_frames=8, name="short")
    assert err.value.reason == "too_short"


@pytest.mark.parametrize("fps, max_frames, temporal", [(8, 6, 4), (8, 0, 4), (0, 8, 4), (8, 8, 0)])
def test_impossible_clip_arguments(fps, max_frames, temporal):
    with pytest.raises(ValueError, match="max_frames|fps|temporal"):
        check_clip_args(fps, max_frames, temporal)


def test_a_clip_block_carries_the_clip_timing(webm_bytes):
    vocab = get_vocab("demo")
    tok = load_tokenizer(vocab)
    clip = read_clips(webm_bytes, fps=8, max_frames=8)[1]
    codes = np.zeros((len(clip.frames) // 4, 3, 4), int)  # what a 4x temporal VQ would give
    block = vision_block(vocab, codes, tok.encode, fps=clip.fps, duration=clip.duration)
    assert tok.decode(block[1:block.index(vocab.sot)]) == "2*3*4 8fps 1s"
    got, meta = parse_vision_block_meta(np.array(block), vocab, tok.decode)
    assert got.shape == (2, 3, 4) and (meta.fps, meta.duration) == (8.0, 1.0)


def test_a_rotated_phone_video_comes_out_upright():
    """A portrait phone clip: coded landscape, its mp4 track matrix says 'turn 90 degrees clockwise'
    (what ffprobe shows as 'rotation of -90.00 degrees')."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        coded = np.zeros((32, 64, 3), np.uint8)
        coded[:, :16] = 255  # a white stripe down the left edge of the coded picture
        for _ in range(4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(coded, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = bytearray(buf.getvalue())
    identity = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.index(identity, data.index(b"tkhd"))
    data[at:at + 36] = struct.pack(">9I", 0, 0x10000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000)
    (clip,) = read_clips(bytes(data), fps=8, max_frames=4)
    assert clip.frames.shape == (4, 64, 32, 3)  # portrait
    assert clip.frames[:, :14].min() > 200 and clip.frames[:, 18:].max() < 60  # the stripe is on top
    (small,) = read_clips(bytes(data), fps=8, max_frames=4, size=(32, 16))  # size is of the upright frame
    assert small.frames.shape == (4, 32, 16, 3) and small.frames[:, :6].min() > 200
