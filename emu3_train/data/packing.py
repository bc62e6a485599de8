"""Packing documents into rows of ``seq_len`` tokens (DESIGN.md §4, "Packing rules").

A pure, deterministic function of document lengths and vision spans — no tokens are read:

1. A document with a vision block longer than ``seq_len`` cannot be placed: policy ``skip``
   drops it (and counts it), ``error`` raises ``ShardError`` naming its shard and key.
2. A document longer than ``seq_len`` is cut into pieces of at most ``seq_len`` tokens; a cut
   that would fall inside a vision block moves back to the block's start, so no block is ever
   split. A tail piece (``start > 0``) is a continuation: it gets no BOS and its positions restart.
3. The pieces of one window of documents are placed first-fit decreasing: longest piece first,
   each into the first open row with room, else into a new row. Ties keep document order.

A row is a list of :class:`Piece` ``(doc_id, start, end)``: tokens ``[start, end)`` of the document.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from emu3_train.data.index import ShardError

OVERSIZE_POLICIES = ("skip", "error")


class Piece(NamedTuple):
    """Tokens ``[start, end)`` of document ``doc_id``."""

    doc_id: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def continuation(self) -> bool:
        """True for a tail piece of a split document (it does not start with the document's BOS)."""
        return self.start > 0


@dataclass
class PackResult:
    rows: list[list[Piece]] = field(default_factory=list)  # each row's pieces, total length <= seq_len
    skipped: list[int] = field(default_factory=list)  # doc ids dropped by oversize_policy=skip
    num_split: int = 0  # documents cut into more than one piece


def split_document(length: int, spans: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """``[start, end)`` pieces of at most ``seq_len`` tokens covering ``[0, length)``, none cutting a block.

    ``spans``: ``[m, 2]`` sorted ``[start, end)`` vision blocks, each at most ``seq_len`` long.
    """
    spans = np.asarray(spans).reshape(-1, 2)
    pieces, start = [], 0
    while length - start > seq_len:
        cut = start + seq_len
        j = int(np.searchsorted(spans[:, 1], cut, side="right"))  # first block ending after cut
        if j < len(spans) and spans[j, 0] < cut:
            cut = int(spans[j, 0])
        if cut <= start:
            raise ValueError(f"vision block [{spans[j, 0]}, {spans[j, 1]}) is longer than seq_len {seq_len}")
        pieces.append((start, cut))
        start = cut
    pieces.append((start, length))
    return pieces


def pack_rows(
    doc_ids: Sequence[int],
    lengths: np.ndarray,
    vision_spans: Callable[[int], np.ndarray],
    seq_len: int,
    oversize_policy: str = "skip",
    describe: Callable[[int], str] | None = None,
) -> PackResult:
    """Pack the documents ``doc_ids`` (one window, in stream order) into rows of ``seq_len`` tokens.

    ``lengths[d]``: token count of document d; ``vision_spans(d)``: its ``[m, 2]`` vision blocks;
    ``describe(d)``: "shard: sample 'key'" for the ``error`` policy's message.
    """
    if oversize_policy not in OVERSIZE_POLICIES:
        raise ValueError(f"oversize_policy is {oversize_policy!r}; expected one of {list(OVERSIZE_POLICIES)}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    result = PackResult()
    pieces: list[Piece] = []
    for d in doc_ids:
        d = int(d)
        spans = np.asarray(vision_spans(d)).reshape(-1, 2)
        longest = int((spans[:, 1] - spans[:, 0]).max()) if len(spans) else 0
        if longest > seq_len:
            if oversize_policy == "error":
                name = describe(d) if describe is not None else f"document {d}"
                raise ShardError(f"{name}: vision block of {longest} tokens is longer than seq_len "
                                 f"{seq_len}; raise seq_len or set oversize_policy=skip")
            result.skipped.append(d)
            continue
        cuts = split_document(int(lengths[d]), spans, seq_len)
        result.num_split += len(cuts) > 1
        pieces.extend(Piece(d, s, e) for s, e in cuts)

    order = sorted(range(len(pieces)), key=lambda i: -pieces[i].length)  # stable: ties keep order
    free = np.empty(len(pieces), np.int64)
    for i in order:
        piece = pieces[i]
        fits = np.flatnonzero(free[:len(result.rows)] >= piece.length)
        if len(fits):
            r = int(fits[0])
        else:
            r = len(result.rows)
            result.rows.append([])
            free[r] = seq_len
        result.rows[r].append(piece)
        free[r] -= piece.length
    return result
