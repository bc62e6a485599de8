"""tokenize_images on video (mp4 and webm written by PyAV here) and on folders: clips with frame
rate and duration in their meta, frame folders, corrupt videos and images skipped and named."""

from __future__ import annotations

import numpy as np
import pytest
from image_data import (
    MAX_PIXELS,
    MIN_PIXELS,
    SIZE_ARGS,
    encode,
    make_vq,
    pan_frames,
    read_docs,
    write_tar,
    write_video,
)
from PIL import Image

from emu3_train.layout import parse_vision_block_meta, vision_spans
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab
from emu3_train.vq import VisionTokenizer

# isort: split
from emu3_train.data_pipelines.shard_output import read_stats  # installed from data_pipelines/
from emu3_train.data_pipelines.tokenize_images import main
from emu3_train.data_pipelines.video import probe_video, read_clips

EMU3 = get_vocab("emu3")
TOK = load_tokenizer(EMU3)
FPS, MAX_FRAMES = 8, 8
VIDEO_ARGS = ["--fps", str(FPS), "--max-frames", str(MAX_FRAMES)]


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    return make_vq(tmp_path_factory.mktemp("vq"))


@pytest.fixture(scope="module")
def vt(vq_dir):
    return VisionTokenizer(vq_dir, "cpu", MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="module")
def videos():
    return {"mp4": write_video("mp4", "libx264", 48, 24),  # 2 s at 24 fps
            "webm": write_video("webm", "libvpx-vp9", 45, 30)}  # 1.5 s at 30 fps


def block(tokens):
    """``(caption, codes [T, h, w], meta)`` of a ``caption, block`` video document."""
    tokens = np.asarray(tokens)
    assert tokens[0] == EMU3.bos and tokens[-1] == EMU3.eos
    (start, end), = vision_spans(tokens, EMU3)
    assert end == len(tokens) - 1
    codes, meta = parse_vision_block_meta(tokens[start:end], EMU3, TOK.decode)
    return TOK.decode(tokens[1:start]), codes, meta


def test_mp4_and_webm_become_clip_documents_whose_meta_matches_the_file(videos, vq_dir, vt, tmp_path):
    corrupt = videos["mp4"][:600] + bytes(range(256)) * 8  # a header, then garbage
    write_tar(tmp_path / "v.tar", [("a", {"mp4": videos["mp4"], "txt": b"coffee pan"}),
                                   ("b", {"webm": videos["webm"], "json": b'{"caption": "pan again"}'}),
                                   ("c", {"mp4": corrupt, "txt": b"broken"}),
                                   ("d", {"jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": b"broken too"})])
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "v.tar"), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS,
                 *VIDEO_ARGS, "--workers", "0"]) == 0
    docs = read_docs(out)
    assert list(docs) == ["v/a-clip00", "v/a-clip01", "v/b-clip00", "v/b-clip01"]
    for key, caption in (("a", "coffee pan"), ("b", "pan again")):
        info = probe_video(videos["mp4" if key == "a" else "webm"])
        frames = int(info.duration * FPS + 1e-6) // 4 * 4  # resampled frames, tail cut to the factor 4
        total = 0
        for index in (0, 1):
            tokens, meta = docs[f"v/{key}-clip{index:02d}"]
            text, codes, vmeta = block(tokens)
            n = min(MAX_FRAMES, frames - index * MAX_FRAMES)
            assert text == caption and meta == {"task": "video", "source": f"v/{key}", "clip": index,
                                                "start": index * MAX_FRAMES / FPS}
            assert vmeta.fps == FPS and vmeta.frames == n // 4 == codes.shape[0]
            assert vmeta.duration == pytest.approx(n / FPS)
            assert (vmeta.h, vmeta.w) == vt.grid_shape(info.height, info.width) == codes.shape[1:]
            total += n
        assert total == frames
    clip = read_clips(videos["mp4"], FPS, MAX_FRAMES)[0]  # codes: the VQ on the resized frames
    expected = vt.encode_clip_pixels(vt.pixels(np.stack([vt.spec.resize(f) for f in clip.frames])))
    assert np.array_equal(block(docs["v/a-clip00"][0])[1], expected)
    stats = read_stats(out, "v")
    assert stats["clips"] == 4 and stats["skipped"] == {"undecodable": 2}
    named = "\n".join(stats["skipped_items"])
    assert f"{tmp_path / 'v.tar'}:c: undecodable" in named and f"{tmp_path / 'v.tar'}:d: undecodable" in named


def test_duration_filters_count_too_short_and_too_long(videos, vq_dir, tmp_path):
    write_tar(tmp_path / "d.tar", [("a", {"mp4": videos["mp4"], "txt": b"two seconds"}),
                                   ("b", {"webm": videos["webm"], "txt": b"1.5 seconds"})])
    for flag, reason in (("--min-duration", "too_short"), ("--max-duration", "too_long")):
        out = tmp_path / reason
        value = "1.8" if reason == "too_short" else "1.7"
        assert main(["--input", str(tmp_path / "d.tar"), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS,
                     *VIDEO_ARGS, "--workers", "0", flag, value]) == 0
        assert read_stats(out, "d")["skipped"] == {reason: 1}
        assert len(read_docs(out)) == 2  # the other video's two clips


def test_folder_of_images_videos_and_frame_folders(videos, vq_dir, vt, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    frames = pan_frames(5)
    Image.fromarray(frames[0]).save(root / "a_photo.png")
    (root / "a_photo.txt").write_text("a still\n")
    (root / "b_movie.webm").write_bytes(videos["webm"])
    (root / "b_movie.txt").write_text("a movie")
    (root / "c_clip").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(root / "c_clip" / f"{i:03d}.jpg", quality=95)
    (root / "c_clip.txt").write_text("a frame folder")
    (root / "d_broken.jpg").write_bytes(encode(Image.fromarray(frames[1]), "JPEG")[:200])
    (root / "d_broken.txt").write_text("cut short")
    (root / "e_uncaptioned.png").write_bytes(encode(Image.fromarray(frames[2]), "PNG"))
    (root / "f_empty").mkdir()
    out = tmp_path / "out"
    assert main(["--images", str(root), "--vq", str(vq_dir), "--out", str(out), *SIZE_ARGS, *VIDEO_ARGS,
                 "--workers", "0", "--items-per-shard", "3", "--tasks", "t2i"]) == 0
    docs = read_docs(out)
    assert list(docs) == ["mixed_00000/a_photo_png-t2i", "mixed_00000/b_movie_webm-clip00",
                          "mixed_00000/b_movie_webm-clip01", "mixed_00000/c_clip-clip00"]
    assert docs["mixed_00000/a_photo_png-t2i"][1]["source"] == "mixed_00000/a_photo.png"
    caption, codes, meta = block(docs["mixed_00000/c_clip-clip00"][0])
    assert caption == "a frame folder" and not meta.is_video  # a frame folder has no frame rate
    loaded = [np.asarray(Image.open(p)) for p in sorted((root / "c_clip").iterdir())]
    assert codes.shape[0] == 2 and np.array_equal(codes, vt.encode_video(loaded))  # 5 frames: 2 code frames
    first, second = read_stats(out, "mixed_00000"), read_stats(out, "mixed_00001")
    assert first["images"] == 1 and first["clips"] == 3 and first["skipped"] == {}
    assert second["skipped"] == {"undecodable": 1, "no_caption": 1, "empty_clip": 1}
    assert any(str(root / "e_uncaptioned.png") in s and "no sidecar e_uncaptioned.txt" in s
               for s in second["skipped_items"])
