"""The Emu3 sequence layout over a vocabulary (DESIGN.md §4, "Sequence format").

- generation (t2i):    ``BOS caption SOV meta SOT rows EOF EOV EOS``
- understanding (i2t): ``BOS SOV meta SOT rows EOF EOV caption EOS``
- text:                ``BOS text EOS``
- video:               one vision block whose frames each end with EOF

``meta`` is the text ``"{h}*{w}"`` of the token grid; ``rows`` are h rows of w visual tokens,
each followed by EOL. A *vision block* is the span ``[SOV, EOV]`` (inclusive); it is never split
by packing.

    >>> import numpy as np
    >>> from emu3_train.vocab import get_vocab
    >>> from emu3_train.tokenizer import load_tokenizer
    >>> v = get_vocab("demo"); tok = load_tokenizer(v)
    >>> doc = t2i_document(v, tok.encode("a digit"), np.zeros((8, 8), int), tok.encode)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from emu3_train.vocab import Vocab

Encode = Callable[[str], list[int]]


def vision_block(vocab: Vocab, codes: np.ndarray, encode: Encode) -> list[int]:
    """Token ids of one vision block. ``codes``: ``[h, w]`` (image) or ``[T, h, w]`` (video)."""
    codes = np.asarray(codes)
    frames = codes[None] if codes.ndim == 2 else codes
    if frames.ndim != 3:
        raise ValueError(f"codes must be [h, w] or [T, h, w], got shape {codes.shape}")
    if frames.size and (frames.min() < 0 or frames.max() >= vocab.codebook_size):
        raise ValueError(f"visual codes must lie in [0, {vocab.codebook_size}), "
                         f"got [{frames.min()}, {frames.max()}]")
    t, h, w = frames.shape
    grid = np.empty((t, h, w + 1), dtype=np.int64)
    grid[:, :, :w] = vocab.code_to_id(frames)
    grid[:, :, w] = vocab.eol
    out = [vocab.sov, *encode(f"{h}*{w}"), vocab.sot]
    for frame in grid:
        out.extend(frame.reshape(-1).tolist())
        out.append(vocab.eof)
    out.append(vocab.eov)
    return out


def t2i_document(vocab: Vocab, caption: list[int], codes: np.ndarray, encode: Encode) -> list[int]:
    """Generation sample: the caption, then the image."""
    return [vocab.bos, *caption, *vision_block(vocab, codes, encode), vocab.eos]


def i2t_document(vocab: Vocab, caption: list[int], codes: np.ndarray, encode: Encode) -> list[int]:
    """Understanding sample: the image, then the caption."""
    return [vocab.bos, *vision_block(vocab, codes, encode), *caption, vocab.eos]


def text_document(vocab: Vocab, text: list[int]) -> list[int]:
    """Text-only sample."""
    return [vocab.bos, *text, vocab.eos]


def vision_spans(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """``[M, 2]`` int64 ``[start, end)`` spans of the vision blocks (SOV .. EOV inclusive).

    Raises ``ValueError`` on an SOV without EOV, an EOV without SOV, or nested blocks.
    """
    tokens = np.asarray(tokens)
    starts = np.flatnonzero(tokens == vocab.sov)
    ends = np.flatnonzero(tokens == vocab.eov)
    if len(starts) != len(ends):
        raise ValueError(f"{len(starts)} SOV but {len(ends)} EOV tokens")
    spans = np.stack([starts, ends + 1], axis=1).astype(np.int64) if len(starts) else \
        np.zeros((0, 2), np.int64)
    if len(starts) and (np.any(ends < starts) or np.any(starts[1:] < ends[:-1])):
        raise ValueError("vision blocks are nested or an EOV comes before its SOV")
    return spans


def parse_vision_block(block: np.ndarray, vocab: Vocab, decode: Callable) -> np.ndarray:
    """Visual codes ``[T, h, w]`` of one vision block (SOV .. EOV); checks it against its meta."""
    block = np.asarray(block)
    if len(block) < 2 or block[0] != vocab.sov or block[-1] != vocab.eov:
        raise ValueError("a vision block must start with SOV and end with EOV")
    sot = np.flatnonzero(block == vocab.sot)
    if not len(sot):
        raise ValueError("vision block without SOT")
    meta = decode(block[1:sot[0]])
    try:
        h, w = (int(x) for x in meta.split("*"))
    except ValueError:
        raise ValueError(f"vision block meta {meta!r} is not 'h*w'") from None
    body = block[sot[0] + 1:-1]
    frame_len = h * (w + 1) + 1
    if h <= 0 or w <= 0 or len(body) % frame_len:
        raise ValueError(f"vision block of {len(body)} tokens contradicts its meta {meta!r}")
    frames = body.reshape(-1, frame_len)
    rows = frames[:, :-1].reshape(len(frames), h, w + 1)
    if np.any(frames[:, -1] != vocab.eof) or np.any(rows[:, :, w] != vocab.eol):
        raise ValueError(f"vision block rows do not end with EOL / frames with EOF (meta {meta!r})")
    codes = rows[:, :, :w]
    if np.any(~vocab.is_vision(codes)):
        raise ValueError("vision block holds a non-visual token inside its rows")
    return vocab.id_to_code(codes)
