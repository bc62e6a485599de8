"""The vocabulary presets hold exactly the ids of DESIGN.md §4, and the tokenizers the real BPE."""

import numpy as np
import pytest

from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab


def test_emu3_preset_ids():
    v = get_vocab("emu3")
    assert v.text_size == 151_643
    assert (v.pad, v.im_start, v.im_end) == (151_643, 151_644, 151_645)
    assert (v.eol, v.eof, v.bos, v.eos) == (151_846, 151_847, 151_849, 151_850)
    assert (v.sot, v.sov, v.eov) == (151_851, 151_852, 151_853)
    assert v.vision_start == 151_854 and v.codebook_size == 32_768
    assert v.size == 184_622
    assert v.code_to_id(32_767) == v.size - 1
    special = v.special_tokens()
    assert special["<|extra_0|>"] == 151_646 and special["<|extra_204|>"] == 151_850
    assert special["<|extra_200|>"] == v.eol and special["<|extra_203|>"] == v.bos
    assert special["<|image start|>"] == v.sov and special["<|endoftext|>"] == v.pad


def test_demo_preset_has_every_role_distinct():
    v = get_vocab("demo")
    roles = [v.pad, v.im_start, v.im_end, v.eol, v.eof, v.bos, v.eos, v.sot, v.sov, v.eov]
    assert len(set(roles)) == len(roles)
    assert all(v.text_size <= r < v.vision_start for r in roles)
    assert v.size == v.vision_start + 17


def test_first_invalid_names_position():
    v = get_vocab("demo")
    assert v.first_invalid(np.array([0, 5, v.size - 1])) == -1
    assert v.first_invalid(np.array([0, v.size, 3])) == 1
    assert v.first_invalid(np.array([-1])) == 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown vocabulary preset 'nope'"):
        get_vocab("nope")


def test_qwen_bpe_matches_known_ids():
    tok = load_tokenizer("emu3")
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode("Hello world, 你好") == [9707, 1879, 11, 220, 108386]
    # NFC normalization: decomposed and composed forms encode alike
    assert tok.encode("cafe\u0301") == tok.encode("café")
    assert tok.decode(tok.encode("a handwritten digit seven")) == "a handwritten digit seven"


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("demo")
    assert tok.encode("8*8") == [56, 42, 56]
    assert tok.decode(tok.encode("digit seven")) == "digit seven"
