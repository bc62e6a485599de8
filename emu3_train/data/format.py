"""The shard sample format (DESIGN.md §4, "Shard sample"): one document per webdataset sample.

A sample ``KEY`` is two tar members, written in this order by ``webdataset`` (sorted by suffix):

- ``KEY.json``: UTF-8 JSON object ``{"task": "t2i"|"i2t"|"text"|"video", "source": str, ...extra}``,
  optionally ``"loss_spans": [[start, end], ...]`` (below)
- ``KEY.tokens.npy``: the document's token ids, ``np.save`` of an int32 1-D array
  (``allow_pickle=False``).

**Supervised spans.** ``loss_spans`` lists ``[start, end)`` token ranges, sorted, non-overlapping,
non-empty, within ``[0, len(tokens))``: span ``[s, e)`` supervises the *targets* ``tokens[s:e]``.
The label of position ``p - 1`` is token ``p``, so the prediction of token ``p`` has a non-zero
loss weight only if ``s <= p < e`` for some span (token 0 is never a target). Absent = every
target weighted by its class (``data.batch``); an empty list is rejected (omit the field). A chat
document supervises its answers: ``loss_spans = [[first answer token, EOS + 1], ...]``.

**Preference pairs** (DPO, ``data.pairs``): ``"pair": ID`` (a non-empty string) and ``"role":
"chosen"|"rejected"`` mark the two documents of a pair (same shard); ``"ref_logp"`` (a finite
float) is the frozen reference model's log-probability of the document's supervised targets,
precomputed by ``make_preferences --reference``; ``"score"`` is the scorer's value (informative).

``KEY`` may not contain ``.`` (webdataset splits member names at the first dot), ``/`` or
whitespace.

    >>> sample = encode_sample("doc-0", [1, 2, 3], {"task": "text", "source": "wiki"})
    >>> decode_tokens(sample[TOKENS_SUFFIX]).tolist(), decode_meta(sample[META_SUFFIX])["task"]
    ([1, 2, 3], 'text')
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np

from emu3_train.layout import vision_spans
from emu3_train.vocab import Vocab

TASKS = ("t2i", "i2t", "text", "video")  # order = the task codes stored in the .idx
UNDERSTANDING_TASKS = frozenset({"i2t"})  # tasks whose visual tokens are inputs, not targets
PAIR_ROLES = ("chosen", "rejected")  # role codes 1, 2 in the .idx (0: not in a pair)
TOKENS_SUFFIX = "tokens.npy"
META_SUFFIX = "json"
TOKEN_DTYPE = np.dtype("<i4")

_KEY_RE = re.compile(r"^[^./\s]+$")


def check_key(key: str) -> str:
    """``key`` if it can name a webdataset sample, else ``ValueError``."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must be a non-empty string without '.', '/' or whitespace")
    return key


def check_loss_spans(spans, length: int | None = None) -> np.ndarray:
    """``[k, 2]`` int64 of a valid ``loss_spans`` value (module docstring), else ``ValueError`` naming
    the first bad span; ``length``: the document's token count (spans must end at or before it)."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, (list, tuple, np.ndarray)) or not len(spans):
        raise ValueError(f"field 'loss_spans' is {spans!r}; expected a non-empty list of [start, end) "
                         "pairs (omit the field to supervise every target)")
    out = []
    for i, span in enumerate(spans):
        if not (isinstance(span, (list, tuple, np.ndarray)) and len(span) == 2
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in span)):
            raise ValueError(f"field 'loss_spans'[{i}] is {span!r}; expected [start, end] integers")
        s, e = int(span[0]), int(span[1])
        if not 0 <= s < e:
            raise ValueError(f"field 'loss_spans'[{i}] = [{s}, {e}) is empty or negative")
        if length is not None and e > length:
            raise ValueError(f"field 'loss_spans'[{i}] = [{s}, {e}) lies outside the document of "
                             f"{length} tokens")
        if out and s < out[-1][1]:
            raise ValueError(f"field 'loss_spans'[{i}] = [{s}, {e}) overlaps or precedes "
                             f"[{out[-1][0]}, {out[-1][1]}) (spans must be sorted and disjoint)")
        out.append((s, e))
    return np.array(out, np.int64).reshape(-1, 2)


def check_meta(meta: dict, length: int | None = None) -> dict:
    """``meta`` if it has a known ``task``, a string ``source`` and valid ``loss_spans`` (if any; within
    ``length`` tokens when given), else ``ValueError`` naming the field."""
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(meta).__name__}")
    if meta.get("task") not in TASKS:
        raise ValueError(f"field 'task' is {meta.get('task')!r}; expected one of {list(TASKS)}")
    if not isinstance(meta.get("source"), str):
        raise ValueError(f"field 'source' is {meta.get('source')!r}; expected a string")
    if "loss_spans" in meta:
        check_loss_spans(meta["loss_spans"], length)
    if ("pair" in meta) != ("role" in meta):
        only = "pair" if "pair" in meta else "role"
        raise ValueError(f"fields 'pair' and 'role' go together; the metadata has only {only!r}")
    if "pair" in meta:
        if not isinstance(meta["pair"], str) or not meta["pair"]:
            raise ValueError(f"field 'pair' is {meta['pair']!r}; expected a non-empty string")
        if meta["role"] not in PAIR_ROLES:
            raise ValueError(f"field 'role' is {meta['role']!r}; expected one of {list(PAIR_ROLES)}")
    if "ref_logp" in meta:
        v = meta["ref_logp"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"field 'ref_logp' is {v!r}; expected a finite number")
    return meta


def loss_spans_of(meta: dict) -> np.ndarray:
    """``[k, 2]`` int64 supervised spans of checked metadata (``[0, 2]`` when absent)."""
    spans = meta.get("loss_spans")
    return np.zeros((0, 2), np.int64) if spans is None else np.asarray(spans, np.int64).reshape(-1, 2)


def encode_tokens(tokens) -> bytes:
    """``.npy`` bytes of ``tokens`` as int32 1-D (the caller has checked the ids fit the vocabulary)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ValueError(f"tokens must be a 1-D integer sequence, got shape {arr.shape} dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(TOKEN_DTYPE).min or arr.max() > np.iinfo(TOKEN_DTYPE).max):
        raise ValueError("token ids do not fit in int32")
    buf = io.BytesIO()
    np.save(buf, arr.astype(TOKEN_DTYPE), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: str, tokens, meta: dict) -> dict:
    """The dict ``webdataset.ShardWriter.write`` takes for one document: raw bytes per member suffix."""
    check_meta(meta, len(np.asarray(tokens)))
    return {
        "__key__": check_key(key),
        TOKENS_SUFFIX: encode_tokens(tokens),
        META_SUFFIX: json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }


def decode_tokens(data: bytes) -> np.ndarray:
    """int32 ``[N]`` tokens from ``.npy`` bytes; ``ValueError`` if unreadable, not int32 or not 1-D."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/UnpicklingError on garbage
        raise ValueError(f"tokens payload is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != TOKEN_DTYPE or arr.ndim != 1:
        raise ValueError(f"tokens must be int32 1-D, got dtype {arr.dtype} shape {arr.shape}")
    return arr


def decode_meta(data: bytes, length: int | None = None) -> dict:
    """The metadata dict from ``.json`` bytes, checked by :func:`check_meta` (spans within
    ``length`` tokens when given)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"json payload is not valid UTF-8 JSON ({e})") from None
    return check_meta(meta, length)


def check_tokens(tokens: np.ndarray, vocab: Vocab) -> np.ndarray:
    """``[M, 2]`` int64 ``[start, end)`` vision-block spans of a valid document, else ``ValueError``.

    Valid: non-empty, every id in ``[0, vocab.size)``, SOV/EOV paired and not nested, each block
    holding an SOT, and no visual code outside a block (packing protects only whole blocks).
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise ValueError("document has no tokens")
    bad = vocab.first_invalid(tokens)
    if bad >= 0:
        raise ValueError(f"token id {int(tokens[bad])} at position {bad} is outside vocabulary "
                         f"{vocab.name!r} (size {vocab.size})")
    try:
        spans = vision_spans(tokens, vocab)
    except ValueError as e:
        raise ValueError(f"malformed vision block: {e}") from None
    sot = np.flatnonzero(tokens == vocab.sot)
    first_sot = np.searchsorted(sot, spans[:, 0])
    has_sot = first_sot < len(sot)
    has_sot[has_sot] = sot[first_sot[has_sot]] < spans[has_sot, 1]
    if not has_sot.all():
        raise ValueError(f"malformed vision block: the block at position {spans[~has_sot][0, 0]} has no SOT")
    depth = np.zeros(len(tokens) + 1, np.int64)
    depth[spans[:, 0]] += 1
    depth[spans[:, 1]] -= 1
    stray = np.flatnonzero(vocab.is_vision(tokens) & (np.cumsum(depth[:-1]) == 0))
    if len(stray):
        raise ValueError(f"visual code {int(tokens[stray[0]])} at position {stray[0]} lies outside any "
                         "vision block")
    return spans
