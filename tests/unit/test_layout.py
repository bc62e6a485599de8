"""Documents follow the Emu3 sequence format and vision blocks parse back to their codes."""

import numpy as np
import pytest

from emu3_train.layout import (
    i2t_document,
    parse_vision_block,
    t2i_document,
    text_document,
    vision_block,
    vision_spans,
)
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")
TOK = load_tokenizer(V)


def test_t2i_layout_exact():
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    doc = t2i_document(V, TOK.encode("hi"), codes, TOK.encode)
    row = lambda *c: [V.code_to_id(x) for x in c] + [V.eol]  # noqa: E731
    expected = [V.bos, *TOK.encode("hi"), V.sov, *TOK.encode("2*3"), V.sot,
                *row(1, 2, 3), *row(4, 5, 6), V.eof, V.eov, V.eos]
    assert doc == expected


def test_i2t_puts_image_first_and_text_doc():
    codes = np.zeros((2, 2), int)
    doc = i2t_document(V, TOK.encode("x"), codes, TOK.encode)
    assert doc[0] == V.bos and doc[1] == V.sov and doc[-1] == V.eos
    assert doc[-2] == TOK.encode("x")[0] and doc[-3] == V.eov
    assert text_document(V, [1, 2]) == [V.bos, 1, 2, V.eos]


def test_video_frames_end_with_eof_and_parse_back():
    frames = np.arange(2 * 3 * 4).reshape(2, 3, 4) % V.codebook_size
    block = np.array(vision_block(V, frames, TOK.encode))
    assert (block == V.eof).sum() == 2
    np.testing.assert_array_equal(parse_vision_block(block, V, TOK.decode), frames)


def test_spans_and_malformed_blocks():
    codes = np.ones((2, 2), int)
    doc = np.array(t2i_document(V, TOK.encode("ab"), codes, TOK.encode))
    (start, end), = vision_spans(doc, V)
    assert doc[start] == V.sov and doc[end - 1] == V.eov
    with pytest.raises(ValueError, match="SOV"):
        vision_spans(doc[:-3], V)  # EOV cut off
    block = doc[start:end].copy()
    block[block == V.eol] = V.code_to_id(0)  # rows lose their EOL
    with pytest.raises(ValueError, match="contradicts|EOL"):
        parse_vision_block(block, V, TOK.decode)


def test_codes_outside_codebook_rejected():
    with pytest.raises(ValueError, match="visual codes"):
        vision_block(V, np.array([[17]]), TOK.encode)
