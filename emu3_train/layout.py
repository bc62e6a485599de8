"""The Emu3 sequence layout over a vocabulary (DESIGN.md §4, "Sequence format").

- generation (t2i):    ``BOS caption SOV meta SOT rows EOF EOV EOS``
- understanding (i2t): ``BOS SOV meta SOT rows EOF EOV caption EOS``
- text:                ``BOS text EOS``
- video:               one vision block whose frames each end with EOF

``rows`` are h rows of w visual tokens, each followed by EOL; a frame is its rows then EOF. A
*vision block* is the span ``[SOV, EOV]`` (inclusive); it is never split by packing.

**Meta text** (the tokens between SOV and SOT; :func:`format_meta` writes it, :func:`parse_meta`
reads it, nothing else in the project may build or split it):

- image: ``"{h}*{w}"``, the code grid, e.g. ``"32*48"``. A block with this meta may hold several
  frames (older video documents written without a frame rate): the meta then does not say how many.
- video: ``"{t}*{h}*{w} {fps}fps {duration}s"``, e.g. ``"4*32*48 8fps 2s"`` or
  ``"2*30*40 29.97fps 0.267s"``: ``t`` code frames of ``h x w`` codes (the VQ's temporal factor,
  4 for Emu3, packs 4 video frames per code frame), ``fps`` the frame rate of the video frames the
  codes were made from, ``duration`` the clip's length in seconds (frames / fps). As the Emu3
  paper describes, the meta of a video carries resolution, frame rate and duration.

Numbers: ``t``, ``h``, ``w`` are positive decimal integers without leading zeros; ``fps`` and
``duration`` are rounded to 3 decimals (half to even, Python's ``round``) and written without
trailing zeros or a trailing point (``8.0 -> "8"``, ``30000/1001 -> "29.97"``, ``24000/1001 ->
"23.976"``); both must be positive after rounding. One space separates the three fields. The
parser accepts exactly this canonical text (so a meta round trips byte for byte) and raises
``ValueError`` naming the text otherwise.

    >>> import numpy as np
    >>> from emu3_train.vocab import get_vocab
    >>> from emu3_train.tokenizer import load_tokenizer
    >>> v = get_vocab("demo"); tok = load_tokenizer(v)
    >>> doc = t2i_document(v, tok.encode("a digit"), np.zeros((8, 8), int), tok.encode)
    >>> format_meta(VisionMeta(h=30, w=40, frames=2, fps=30000 / 1001, duration=8 / (30000 / 1001)))
    '2*30*40 29.97fps 0.267s'
    >>> parse_meta("32*48")
    VisionMeta(h=32, w=48, frames=None, fps=None, duration=None)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from emu3_train.vocab import Vocab

Encode = Callable[[str], list[int]]

_INT = r"[1-9][0-9]*"
_NUM = r"(?:0\.[0-9]{0,2}[1-9]|[1-9][0-9]*(?:\.[0-9]{0,2}[1-9])?)"  # positive, <= 3 decimals, canonical
_IMAGE_RE = re.compile(rf"({_INT})\*({_INT})")
_VIDEO_RE = re.compile(rf"({_INT})\*({_INT})\*({_INT}) ({_NUM})fps ({_NUM})s")


def _number(x: float, what: str) -> str:
    """``x`` rounded to 3 decimals without trailing zeros; ``ValueError`` unless positive after rounding."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"video {what} {x!r} is not a number") from None
    text = f"{round(x, 3):.3f}".rstrip("0").rstrip(".") if math.isfinite(x) else str(x)
    if not math.isfinite(x) or float(text) <= 0:
        raise ValueError(f"video {what} must be a positive number (3 decimals), got {x!r}")
    return text


@dataclass(frozen=True)
class VisionMeta:
    """What a vision block's meta text says: the code grid and, for a video, its timing.

    ``frames``: code frames (None for image meta); ``fps``: video frames per second; ``duration``:
    seconds. ``fps`` and ``duration`` are both given (video) or both None (image).
    """

    h: int
    w: int
    frames: int | None = None
    fps: float | None = None
    duration: float | None = None

    @property
    def is_video(self) -> bool:
        return self.fps is not None


def format_meta(meta: VisionMeta) -> str:
    """The canonical meta text of ``meta`` (module docstring); ``ValueError`` on impossible values."""
    for name in ("h", "w") + (("frames",) if meta.is_video else ()):
        value = getattr(meta, name)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"vision meta field {name!r} must be a positive integer, got {value!r}")
    if not meta.is_video:
        if meta.frames is not None or meta.duration is not None:
            raise ValueError(f"vision meta {meta}: frames and duration need an fps (video meta)")
        return f"{meta.h}*{meta.w}"
    if meta.duration is None:
        raise ValueError(f"vision meta {meta}: a video needs both fps and duration")
    fps, duration = _number(meta.fps, "fps"), _number(meta.duration, "duration")
    return f"{meta.frames}*{meta.h}*{meta.w} {fps}fps {duration}s"


def parse_meta(text: str) -> VisionMeta:
    """The :class:`VisionMeta` of a canonical meta text; ``ValueError`` naming ``text`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"vision block meta {text!r} is not text")
    m = _IMAGE_RE.fullmatch(text)
    if m:
        return VisionMeta(int(m[1]), int(m[2]))
    m = _VIDEO_RE.fullmatch(text)
    if m:
        return VisionMeta(int(m[2]), int(m[3]), frames=int(m[1]), fps=float(m[4]), duration=float(m[5]))
    raise ValueError(f"vision block meta {text!r} is neither 'h*w' (image) nor "
                     "'t*h*w {fps}fps {duration}s' (video)")


def vision_block(vocab: Vocab, codes: np.ndarray, encode: Encode, fps: float | None = None,
                 duration: float | None = None) -> list[int]:
    """Token ids of one vision block. ``codes``: ``[h, w]`` (image) or ``[T, h, w]`` (video).

    With ``fps`` and ``duration`` (seconds) the meta is the video meta ``"T*h*w {fps}fps
    {duration}s"``; without, it is ``"h*w"`` (an image; a ``[T, h, w]`` block then keeps no timing).
    """
    codes = np.asarray(codes)
    frames = codes[None] if codes.ndim == 2 else codes
    if frames.ndim != 3:
        raise ValueError(f"codes must be [h, w] or [T, h, w], got shape {codes.shape}")
    if frames.size and (frames.min() < 0 or frames.max() >= vocab.codebook_size):
        raise ValueError(f"visual codes must lie in [0, {vocab.codebook_size}), "
                         f"got [{frames.min()}, {frames.max()}]")
    if (fps is None) != (duration is None):
        raise ValueError(f"give both fps and duration for video meta, or neither (got fps={fps!r}, "
                         f"duration={duration!r})")
    t, h, w = frames.shape
    meta = VisionMeta(h, w) if fps is None else VisionMeta(h, w, frames=t, fps=fps, duration=duration)
    grid = np.empty((t, h, w + 1), dtype=np.int64)
    grid[:, :, :w] = vocab.code_to_id(frames)
    grid[:, :, w] = vocab.eol
    out = [vocab.sov, *encode(format_meta(meta)), vocab.sot]
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


def parse_vision_block_meta(block: np.ndarray, vocab: Vocab,
                            decode: Callable) -> tuple[np.ndarray, VisionMeta]:
    """``(codes [T, h, w], meta)`` of one vision block (SOV .. EOV), checked against its meta: the
    grid, and for video meta the number of code frames."""
    block = np.asarray(block)
    if len(block) < 2 or block[0] != vocab.sov or block[-1] != vocab.eov:
        raise ValueError("a vision block must start with SOV and end with EOV")
    sot = np.flatnonzero(block == vocab.sot)
    if not len(sot):
        raise ValueError("vision block without SOT")
    text = decode(block[1:sot[0]])
    meta = parse_meta(text)
    h, w = meta.h, meta.w
    body = block[sot[0] + 1:-1]
    frame_len = h * (w + 1) + 1
    if len(body) % frame_len or not len(body):
        raise ValueError(f"vision block of {len(body)} tokens contradicts its meta {text!r}")
    frames = body.reshape(-1, frame_len)
    if meta.frames is not None and len(frames) != meta.frames:
        raise ValueError(f"vision block holds {len(frames)} frames but its meta {text!r} says {meta.frames}")
    rows = frames[:, :-1].reshape(len(frames), h, w + 1)
    if np.any(frames[:, -1] != vocab.eof) or np.any(rows[:, :, w] != vocab.eol):
        raise ValueError(f"vision block rows do not end with EOL / frames with EOF (meta {text!r})")
    codes = rows[:, :, :w]
    if np.any(~vocab.is_vision(codes)):
        raise ValueError("vision block holds a non-visual token inside its rows")
    return vocab.id_to_code(codes), meta


def parse_vision_block(block: np.ndarray, vocab: Vocab, decode: Callable) -> np.ndarray:
    """Visual codes ``[T, h, w]`` of one vision block (SOV .. EOV); checks it against its meta."""
    return parse_vision_block_meta(block, vocab, decode)[0]
