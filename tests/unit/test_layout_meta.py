"""The vision-block meta text: one canonical writer and parser, image "h*w" and video timing."""

import numpy as np
import pytest

from emu3_train.data.format import check_tokens
from emu3_train.layout import (
    VisionMeta,
    format_meta,
    parse_meta,
    parse_vision_block,
    parse_vision_block_meta,
    t2i_document,
    vision_block,
)
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")
TOK = load_tokenizer(V)


@pytest.mark.parametrize("meta, text", [
    (VisionMeta(32, 48), "32*48"),
    (VisionMeta(30, 40, frames=2, fps=8.0, duration=1.0), "2*30*40 8fps 1s"),
    (VisionMeta(30, 40, frames=4, fps=30000 / 1001, duration=16 / (30000 / 1001)), "4*30*40 29.97fps 0.534s"),
    (VisionMeta(9, 16, frames=8, fps=24000 / 1001, duration=32 / (24000 / 1001)), "8*9*16 23.976fps 1.335s"),
    (VisionMeta(1, 1, frames=1, fps=12.5, duration=0.32), "1*1*1 12.5fps 0.32s"),
    (VisionMeta(4, 4, frames=100, fps=0.5, duration=800.0), "100*4*4 0.5fps 800s"),
])
def test_meta_text_is_canonical_and_round_trips(meta, text):
    assert format_meta(meta) == text
    back = parse_meta(text)
    assert (back.h, back.w, back.frames) == (meta.h, meta.w, meta.frames)
    assert back.is_video == meta.is_video
    if meta.is_video:
        assert back.fps == pytest.approx(meta.fps, abs=5e-4)
        assert back.duration == pytest.approx(meta.duration, abs=5e-4)
    assert format_meta(back) == text  # the parsed meta writes the same text again


@pytest.mark.parametrize("text", [
    "", "32", "32*", "*32", "0*4", "04*4", "3*4 ", " 3*4", "3x4", "3*4*5",  # image grids
    "2*3*4", "2*3*4 8fps", "2*3*4 8fps 1", "2*3*4 8.0fps 1s", "2*3*4 8fps 1.50s", "2*3*4 8.fps 1s",
    "2*3*4 0fps 1s", "2*3*4 8fps 0s", "2*3*4 -8fps 1s", "2*3*4  8fps 1s", "2*3*4 8fps 1s ", "0*3*4 8fps 1s",
    "2*3*4 29.9700fps 1s", "2*3*4 8 fps 1 s", "2*3*4 1e3fps 1s", "2*3*4 nanfps 1s", "2*3*4 8fps 1s\n",
])
def test_malformed_meta_is_rejected_naming_the_text(text):
    with pytest.raises(ValueError, match="vision block meta") as err:
        parse_meta(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("meta, match", [
    (VisionMeta(0, 4), "'h'"), (VisionMeta(4, -1), "'w'"), (VisionMeta(4.0, 4), "'h'"),
    (VisionMeta(4, 4, frames=0, fps=8, duration=1), "frames"),
    (VisionMeta(4, 4, frames=2, fps=0.0001, duration=1), "fps"),
    (VisionMeta(4, 4, frames=2, fps=8, duration=0), "duration"),
    (VisionMeta(4, 4, frames=2, fps=float("inf"), duration=1), "fps"),
    (VisionMeta(4, 4, frames=2, fps=8), "both"), (VisionMeta(4, 4, frames=2), "need an fps"),
])
def test_impossible_meta_is_not_written(meta, match):
    with pytest.raises(ValueError, match=match):
        format_meta(meta)


def test_video_block_round_trips_with_its_timing_and_passes_check_tokens():
    codes = np.arange(3 * 2 * 5).reshape(3, 2, 5) % V.codebook_size
    block = vision_block(V, codes, TOK.encode, fps=30000 / 1001, duration=12 / (30000 / 1001))
    assert TOK.decode(block[1:block.index(V.sot)]) == "3*2*5 29.97fps 0.4s"
    got, meta = parse_vision_block_meta(np.array(block), V, TOK.decode)
    np.testing.assert_array_equal(got, codes)
    assert meta == VisionMeta(2, 5, frames=3, fps=29.97, duration=0.4)
    np.testing.assert_array_equal(parse_vision_block(np.array(block), V, TOK.decode), codes)
    doc = np.array([V.bos, *TOK.encode("a pan"), *block, V.eos])
    (start, end), = check_tokens(doc, V)
    assert (start, end) == (1 + len(TOK.encode("a pan")), len(doc) - 1)


def test_image_meta_is_unchanged_and_legacy_video_blocks_still_parse():
    doc = t2i_document(V, TOK.encode("x"), np.zeros((2, 3), int), TOK.encode)
    assert TOK.decode(doc[doc.index(V.sov) + 1:doc.index(V.sot)]) == "2*3"
    legacy = np.array(vision_block(V, np.ones((2, 2, 3), int), TOK.encode))  # [T, h, w] without fps
    codes, meta = parse_vision_block_meta(legacy, V, TOK.decode)
    assert codes.shape == (2, 2, 3) and meta == VisionMeta(2, 3)


def test_frame_count_is_checked_against_the_video_meta():
    block = vision_block(V, np.ones((2, 2, 3), int), TOK.encode, fps=8, duration=1)
    sot = block.index(V.sot)
    frame = block[sot + 1:sot + 1 + 2 * 4 + 1]
    three = np.array([*block[:-1], *frame, V.eov])  # a third frame the meta does not announce
    with pytest.raises(ValueError, match=r"holds 3 frames but its meta '2\*2\*3 8fps 1s' says 2"):
        parse_vision_block(three, V, TOK.decode)


def test_vision_block_needs_both_fps_and_duration():
    with pytest.raises(ValueError, match="both fps and duration"):
        vision_block(V, np.ones((2, 2, 2), int), TOK.encode, fps=8)
    with pytest.raises(ValueError, match="fps"):
        vision_block(V, np.ones((2, 2, 2), int), TOK.encode, fps=-1, duration=1)
