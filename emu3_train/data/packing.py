"""Packing documents into rows of ``seq_len`` tokens (DESIGN.md §4, "Packing rules").

A pure, deterministic function of document lengths and vision spans — no tokens are read. One
call packs one window of documents, plus the pieces carried over from the previous window:

1. A document with a vision block longer than ``seq_len`` cannot be placed: policy ``skip``
   drops it (and counts it), ``error`` raises ``ShardError`` naming its shard and key.
2. A document longer than ``seq_len`` is cut into pieces of at most ``seq_len`` tokens; a cut
   that would fall inside a vision block moves back to the block's start, so no block is ever split.
3. Pieces holding a vision block are placed best-fit decreasing: longest first, each into the open
   row with the least room that still fits it, else into a new row.
4. Text-only pieces, longest first, go whole into the best-fitting row when one has room. The
   others (longer than every gap) are then cut to fill the gaps: each fills the largest gap and
   its rest continues (best fit again, or the next gap); with no gap left a new row opens. Text
   may be cut at any token, but neither side of a cut is shorter than ``min_cut`` (32 tokens, or
   1/64 of seq_len if less): such a fragment trains on almost no context, and leaving the gap
   costs < 32 tokens of a row (benchmarks/packing.py: it halves the cuts for 0.05% of fill at
   5,120). So rows end full, to within ``min_cut``, except where text runs out.
5. With ``keep_open`` (every window but the stream's last) the least-filled row is not emitted:
   its pieces are carried into the next window (``PackResult.carry``), so a partly filled row is
   the exception rather than one per window.

A cut costs one target token (no label across a piece end) and gives the tail a fresh start:
a piece with ``start > 0`` is a continuation, with no BOS and positions restarting at 0.
Ties keep stream order (carried pieces first, then documents in ``doc_ids`` order).

A row is a list of :class:`Piece` ``(doc_id, start, end)``: tokens ``[start, end)`` of the document.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from emu3_train.data.index import ShardError

OVERSIZE_POLICIES = ("skip", "error")
MIN_CUT = 32  # tokens: the shortest text fragment a cut may leave on either side


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
    num_split: int = 0  # cuts made (a document cut into k pieces counts k - 1)
    carry: list[Piece] = field(default_factory=list)  # with keep_open: pieces left for the next window


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


def _holds_block(spans: np.ndarray, start: int, end: int) -> bool:
    """True if ``[start, end)`` holds a vision block (blocks are never cut, so: overlaps one)."""
    j = int(np.searchsorted(spans[:, 1], start, side="right"))
    return j < len(spans) and spans[j, 0] < end


class _Rows:
    """Rows under construction; ``gaps`` is the sorted list of ``(room, row)`` of rows with room."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.rows: list[list[Piece]] = []
        self.room: list[int] = []
        self.gaps: list[tuple[int, int]] = []
        self.cuts = 0

    def best_fit(self, n: int) -> int:
        """Position in ``gaps`` of the row with the least room >= n, or -1."""
        i = bisect.bisect_left(self.gaps, (n, -1))
        return i if i < len(self.gaps) else -1

    def put(self, gap: int, piece: Piece) -> None:
        """Append ``piece`` to the row at position ``gap`` of ``gaps``."""
        _, r = self.gaps.pop(gap)
        self._append(r, piece)

    def open(self, piece: Piece) -> None:
        """Start a new row with ``piece``."""
        self.rows.append([])
        self.room.append(self.seq_len)
        self._append(len(self.rows) - 1, piece)

    def _append(self, r: int, piece: Piece) -> None:
        self.rows[r].append(piece)
        self.room[r] -= piece.length
        if self.room[r] > 0:
            bisect.insort(self.gaps, (self.room[r], r))

    def place_text(self, piece: Piece, min_cut: int) -> Piece | None:
        """Put text ``piece`` whole into the best-fitting gap, else cut it into the largest gaps
        (no side shorter than ``min_cut``); returns the part that found no room, if any."""
        d, start, end = piece
        while start < end:
            g = self.best_fit(end - start)
            if g >= 0:
                self.put(g, Piece(d, start, end))
                return None
            cut = min(self.gaps[-1][0], end - start - min_cut) if self.gaps else 0
            if cut < min_cut:
                return Piece(d, start, end)
            self.put(len(self.gaps) - 1, Piece(d, start, start + cut))
            self.cuts += 1
            start += cut
        return None

    def drain(self, donor: int, min_cut: int) -> list[Piece]:
        """Move row ``donor``'s pieces (text, longest first) into the other rows; returns those left."""
        self.gaps.remove((self.room[donor], donor))
        pieces, self.rows[donor], self.room[donor] = self.rows[donor], [], 0
        return [rest for p in sorted(pieces, key=lambda p: -p.length)
                if (rest := self.place_text(p, min_cut)) is not None]


def pack_rows(
    doc_ids: Sequence[int],
    lengths: np.ndarray,
    vision_spans: Callable[[int], np.ndarray],
    seq_len: int,
    oversize_policy: str = "skip",
    describe: Callable[[int], str] | None = None,
    *,
    carry: Iterable[Piece] = (),
    keep_open: bool = False,
    min_cut: int | None = None,
) -> PackResult:
    """Pack the documents ``doc_ids`` (one window, in stream order) into rows of ``seq_len`` tokens.

    ``lengths[d]``: token count of document d; ``vision_spans(d)``: its ``[m, 2]`` vision blocks;
    ``describe(d)``: "shard: sample 'key'" for the ``error`` policy's message. ``carry``: pieces
    left open by the previous window (placed with this window's pieces); ``keep_open``: leave the
    least-filled row open, its pieces returned in ``PackResult.carry``; ``min_cut``: the shortest
    fragment a cut may leave (default: 32 tokens, or seq_len // 64 if less, at least 1).
    """
    if oversize_policy not in OVERSIZE_POLICIES:
        raise ValueError(f"oversize_policy is {oversize_policy!r}; expected one of {list(OVERSIZE_POLICIES)}")
    if min_cut is None:
        min_cut = max(1, min(MIN_CUT, seq_len // 64))
    if seq_len <= 0 or min_cut <= 0:
        raise ValueError(f"seq_len and min_cut must be positive, got {seq_len}, {min_cut}")
    result = PackResult()
    rigid: list[Piece] = []
    text: list[Piece] = []

    def add(piece: Piece, spans: np.ndarray) -> None:
        (rigid if _holds_block(spans, piece.start, piece.end) else text).append(piece)

    for piece in carry:
        piece = Piece(*map(int, piece))
        if not 0 < piece.length <= seq_len:
            raise ValueError(f"carried piece {piece} does not fit seq_len {seq_len}")
        add(piece, np.asarray(vision_spans(piece.doc_id)).reshape(-1, 2))
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
        result.num_split += len(cuts) - 1
        for s, e in cuts:
            add(Piece(d, s, e), spans)

    rows = _Rows(seq_len)
    longest_first = lambda pieces: sorted(pieces, key=lambda p: -p.length)  # noqa: E731 - stable
    for piece in longest_first(rigid) + longest_first(text):
        g = rows.best_fit(piece.length)
        rows.put(g, piece) if g >= 0 else rows.open(piece)

    # Fill the gaps with text: empty the least-filled text-only row into the others, cutting text,
    # while it empties completely; an open window drains its next such row as far as it goes and
    # carries the rest. Only text is cut, and only where a row is saved.
    rigid = set(rigid)
    carry_row = None
    while True:
        donors = [(room, r) for room, r in rows.gaps if not any(p in rigid for p in rows.rows[r])]
        if not donors:
            break
        donor = max(donors)[1]
        saved = (list(rows.gaps), [list(row) for row in rows.rows], list(rows.room), rows.cuts)
        left = rows.drain(donor, min_cut)
        if left:
            if keep_open:  # the drained row is carried: its rest goes to the next window
                rows.rows[donor] = left
                carry_row = donor
            else:  # no row saved: undo
                rows.gaps, rows.rows, rows.room, rows.cuts = saved
            break

    keep = [r for r in range(len(rows.rows)) if rows.rows[r]]
    if keep_open:
        if carry_row is None and rows.gaps:
            carry_row = max(rows.gaps)[1]  # the least-filled row (newest on ties)
        if carry_row is not None:
            result.carry = rows.rows[carry_row]
            keep.remove(carry_row)
    result.rows = [rows.rows[r] for r in keep]
    result.num_split += rows.cuts
    return result
