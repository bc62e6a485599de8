"""The single vocabulary of text tokens, special tokens and visual codes (DESIGN.md §4).

Two presets share the same named roles:

- ``emu3``: Emu3's layout. Qwen BPE text ids 0..151,642, ``<|endoftext|>`` 151,643 (PAD),
  ``<|im_start|>``/``<|im_end|>``, ``<|extra_0|>``..``<|extra_204|>`` (EOL = extra_200, EOF = extra_201,
  BOS = extra_203, EOS = extra_204), SOT/SOV/EOV, then 32,768 visual codes from 151,854. Size 184,622.
- ``demo``: byte-level text (ids 0..255 are UTF-8 bytes), the same special roles, and a 17-entry
  visual codebook (the 17 gray levels of scikit-learn's 8×8 digits). Size 283.

    >>> from emu3_train.vocab import get_vocab
    >>> get_vocab("emu3").code_to_id(0)
    151854
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Vocab:
    """Ids of one vocabulary preset. Visual code ``c`` has id ``vision_start + c``."""

    name: str
    text_size: int  # text ids are [0, text_size)
    pad: int
    im_start: int
    im_end: int
    eol: int  # end of a row of visual tokens
    eof: int  # end of a frame
    bos: int
    eos: int
    sot: int  # start of the visual tokens ("<|image token|>"), after the meta text
    sov: int  # start of a vision block ("<|image start|>")
    eov: int  # end of a vision block ("<|image end|>")
    vision_start: int  # id of visual code 0; every id >= this is a visual code
    codebook_size: int
    text_codec: str  # "bytes" (demo) or "qwen" (Qwen BPE via tiktoken)

    @property
    def size(self) -> int:
        """Number of ids (embedding rows needed)."""
        return self.vision_start + self.codebook_size

    def code_to_id(self, code):
        """Visual code(s) in [0, codebook_size) -> token id(s)."""
        return code + self.vision_start

    def id_to_code(self, token_id):
        """Token id(s) of visual codes -> code(s)."""
        return token_id - self.vision_start

    def is_vision(self, ids):
        """Boolean mask (or bool) of ids that are visual codes."""
        return ids >= self.vision_start

    def first_invalid(self, ids: np.ndarray) -> int:
        """Index of the first id outside [0, size), or -1 if all are valid."""
        ids = np.asarray(ids)
        bad = np.flatnonzero((ids < 0) | (ids >= self.size))
        return int(bad[0]) if bad.size else -1

    def special_tokens(self) -> dict[str, int]:
        """Name -> id of every special token, in Emu3's spelling (used by text tokenizers)."""
        names = {
            "<|endoftext|>": self.pad,
            "<|im_start|>": self.im_start,
            "<|im_end|>": self.im_end,
            "<|image token|>": self.sot,
            "<|image start|>": self.sov,
            "<|image end|>": self.eov,
        }
        if self.name == "emu3":
            names.update({f"<|extra_{i}|>": self.im_end + 1 + i for i in range(205)})
        else:
            names.update({"<|extra_200|>": self.eol, "<|extra_201|>": self.eof,
                          "<|extra_203|>": self.bos, "<|extra_204|>": self.eos})
        return names


def _emu3() -> Vocab:
    text = 151_643
    extra0 = text + 3  # <|extra_0|> follows <|endoftext|>, <|im_start|>, <|im_end|>
    return Vocab(
        name="emu3", text_size=text, pad=text, im_start=text + 1, im_end=text + 2,
        eol=extra0 + 200, eof=extra0 + 201, bos=extra0 + 203, eos=extra0 + 204,
        sot=extra0 + 205, sov=extra0 + 206, eov=extra0 + 207, vision_start=extra0 + 208,
        codebook_size=32_768, text_codec="qwen",
    )


def _demo() -> Vocab:
    text = 256
    return Vocab(
        name="demo", text_size=text, pad=text, im_start=text + 1, im_end=text + 2,
        eol=text + 3, eof=text + 4, bos=text + 5, eos=text + 6,
        sot=text + 7, sov=text + 8, eov=text + 9, vision_start=text + 10,
        codebook_size=17, text_codec="bytes",
    )


PRESETS = {"emu3": _emu3, "demo": _demo}


def get_vocab(name: str) -> Vocab:
    """The preset called ``name`` (``emu3`` or ``demo``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown vocabulary preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
