"""The global sequence of packed rows (DESIGN.md §4, "Data order and state"), from the indexes alone.

Row k of the stream is a pure function of (the sources' indexes, weights, seed, seq_len,
pack_window, oversize_policy, shard_group):

- **Epochs.** Source i's epoch e visits each of its documents once. Its shards are shuffled by
  ``default_rng([seed, i, e, 0])`` and taken in groups of ``shard_group`` shards (0: all in one
  group); the documents of group g are shuffled by ``default_rng([seed, i, e, 1 + g])``. A group
  is materialized only when reached, so a small ``shard_group`` bounds memory and the shards a
  window reads from; 0 is a full document shuffle. Sources wrap into their next epoch
  independently.
- **Blend.** Documents are drawn one at a time, each from the source :class:`blend.TokenBlend`
  picks (the one whose share of the drawn tokens lags its weight most). A document with a vision
  block longer than seq_len is dropped when drawn (``skip``, counted) or raises (``error``).
- **Windows.** Each ``pack_window`` drawn documents, with the pieces the previous window left
  open, are packed by :func:`packing.pack_rows` (``keep_open``); the rows of successive windows
  form the infinite global row sequence 0, 1, 2, ...
- **Seeds.** Window w is planned from its *seed*: the global row where it starts, each source's
  (epoch, position, tokens drawn) and the carried pieces. A seed is small JSON data: the loader's
  state is its cursor plus the seed of the window holding it, so a resume plans from there.

    stream = RowStream([shards], [1.0], seed=0, seq_len=5120, pack_window=256)
    stream.row(12345)            # [Piece(doc_id, start, end), ...]; doc ids are global (below)

Global document ids number the documents of source 0, then source 1, ... (``offsets``).
A preference pair is one document of the plan: its chosen document's id, with both documents'
length (``data.pairs``); :meth:`RowStream.expand` gives a row's pieces per document.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from emu3_train.data.blend import TokenBlend
from emu3_train.data.format import TASKS
from emu3_train.data.index import ShardError
from emu3_train.data.packing import OVERSIZE_POLICIES, Piece, pack_rows
from emu3_train.data.pairs import PairUnits

_CACHED_WINDOWS = 4


class LengthsSource:
    """A document source known by lengths and vision spans only (tests, benchmarks).

    Has what :class:`RowStream` reads of a ``ShardSet``: ``lengths`` ``[D]``, ``max_block``
    ``[D]``, ``shard_offsets`` ``[shards + 1]``, ``vision_spans(d)``, ``describe(d)``.
    """

    def __init__(self, lengths, spans: Sequence[np.ndarray], docs_per_shard: int = 1000,
                 name: str = "synthetic"):
        self.lengths = np.asarray(lengths, np.int64)
        self._spans = [np.asarray(s, np.int64).reshape(-1, 2) for s in spans]
        self.max_block = np.array([int((s[:, 1] - s[:, 0]).max()) if len(s) else 0 for s in self._spans],
                                  np.int64)
        n = len(self.lengths)
        self.shard_offsets = np.unique(np.r_[np.arange(0, n, docs_per_shard), n])
        self.path = name

    def __len__(self) -> int:
        return len(self.lengths)

    def vision_spans(self, d: int) -> np.ndarray:
        return self._spans[d]

    def describe(self, d: int) -> str:
        return f"{self.path}: document {d}"


class _EpochOrder:
    """The document order of one source in one epoch (module docstring, "Epochs")."""

    def __init__(self, shard_offsets: np.ndarray, seed: int, source: int, epoch: int, shard_group: int):
        sizes = np.diff(shard_offsets)
        perm = np.random.default_rng([seed, source, epoch, 0]).permutation(len(sizes))
        g = shard_group or len(sizes)
        self.groups = [perm[i:i + g] for i in range(0, len(perm), g)]
        self.starts = np.concatenate([[0], np.cumsum([sizes[grp].sum() for grp in self.groups])])
        self.key, self.offsets = (seed, source, epoch), shard_offsets
        self._group, self._ids = -1, None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def doc(self, position: int) -> int:
        """The source-local id of the document at ``position`` of the epoch."""
        g = int(np.searchsorted(self.starts, position, side="right")) - 1
        if g != self._group:
            ids = np.concatenate([np.arange(self.offsets[s], self.offsets[s + 1]) for s in self.groups[g]])
            self._ids = ids[np.random.default_rng([*self.key, 1 + g]).permutation(len(ids))]
            self._group = g
        return int(self._ids[position - self.starts[g]])


@dataclass
class Seed:
    """Where window ``window`` starts: its first global row, the sources' positions, carried pieces."""

    window: int
    row: int
    sources: list[list[int]]  # per source [epoch, position in the epoch, tokens drawn so far]
    carry: list[Piece] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"window": self.window, "window_row": self.row,
                "sources": [{"epoch": e, "position": p, "tokens": t} for e, p, t in self.sources],
                "carry": [list(p) for p in self.carry]}

    @classmethod
    def from_json(cls, data: dict) -> Seed:
        return cls(int(data["window"]), int(data["window_row"]),
                   [[int(s["epoch"]), int(s["position"]), int(s["tokens"])] for s in data["sources"]],
                   [Piece(*map(int, p)) for p in data["carry"]])


class RowStream:
    """The infinite global row sequence of ``sources`` (module docstring).

    ``sources``: ``ShardSet`` or :class:`LengthsSource` objects; ``weights``: one per source.
    ``counts``: documents dropped as oversize and cuts made, in the windows whose first row lies
    before the cursor last passed to :meth:`settle` (so the same however far ahead rows are planned).
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int, seq_len: int, pack_window: int,
                 oversize_policy: str = "skip", shard_group: int = 0, tasks: Sequence[str] = ()):
        if oversize_policy not in OVERSIZE_POLICIES:
            raise ValueError(f"oversize_policy is {oversize_policy!r}; expected one of "
                             f"{list(OVERSIZE_POLICIES)}")
        if len(weights) != len(sources):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        if shard_group < 0:
            raise ValueError(f"shard_group must be >= 0, got {shard_group}")
        self.sources, self.blend = list(sources), TokenBlend(weights)
        self.seed, self.seq_len, self.pack_window = int(seed), int(seq_len), int(pack_window)
        self.oversize_policy, self.shard_group = oversize_policy, int(shard_group)
        sizes = [len(s.lengths) for s in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.lengths = np.concatenate([s.lengths for s in self.sources]).astype(np.int64)
        self.max_block = np.concatenate([s.max_block for s in self.sources])
        self.pairs = PairUnits(self.sources, self.offsets, self.lengths)
        if self.pairs.any:  # a pair is drawn and packed as one rigid document (data.pairs)
            self.lengths = self.pairs.unit_lengths()
            self.max_block = np.where(self.pairs.partner >= 0, self.lengths, self.max_block)
            self._check_pairs()
        for src in self.sources:
            oversize = np.flatnonzero(src.max_block > self.seq_len)
            if len(oversize) and oversize_policy == "error":  # fail before training, not mid-epoch
                d = int(oversize[0])
                raise ShardError(f"{src.describe(d)}: vision block of {int(src.max_block[d])} tokens is "
                                 f"longer than seq_len {self.seq_len}; raise seq_len or set "
                                 "oversize_policy=skip")
            if len(oversize) == len(src.lengths):
                raise ValueError(f"every document in {src.path} has a vision block longer than seq_len "
                                 f"{self.seq_len}; nothing to train on")
        self.excluded = self._exclude(tasks) | self.pairs.rejected
        if ((self.max_block > self.seq_len) | self.excluded).all():  # draw() would never find one
            raise ValueError(f"no document (or preference pair) of the stream fits seq_len {self.seq_len}; "
                             "nothing to train on")
        self.counts = {"skipped": 0, "split": 0}
        self._counted_to = -1  # highest window whose drops and cuts were recorded
        self._uncounted: deque[tuple[int, int, int]] = deque()  # (first row, dropped, cuts) per window
        self._orders: OrderedDict[tuple[int, int], _EpochOrder] = OrderedDict()
        self.restart(self.origin())

    def _exclude(self, tasks: Sequence[str]) -> np.ndarray:
        """bool ``[D]``: documents whose task is not in ``tasks`` (``[]`` = keep all), never drawn."""
        if not tasks:
            return np.zeros(len(self.lengths), bool)
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"tasks {unknown} are not among {list(TASKS)}")
        keep = [TASKS.index(t) for t in tasks]
        parts = []
        for src in self.sources:
            codes = getattr(src, "tasks", None)
            if codes is None:
                raise ValueError(f"{src.path} has no task codes to filter by tasks={list(tasks)}")
            drop = ~np.isin(codes, keep)
            if drop.all():
                raise ValueError(f"no document of {src.path} has a task in {list(tasks)}; nothing to "
                                 "train on")
            parts.append(drop)
        return np.concatenate(parts)

    def _check_pairs(self) -> None:
        """Under ``oversize_policy=error``, name the first pair longer than seq_len (it cannot be packed)."""
        long = np.flatnonzero((self.pairs.partner >= 0) & (self.lengths > self.seq_len))
        if len(long) and self.oversize_policy == "error":
            d = int(long[0])
            raise ShardError(f"{self.describe(d)}: preference pair of {int(self.lengths[d])} "
                             f"tokens (both documents) is longer than seq_len {self.seq_len}; raise seq_len "
                             "or set oversize_policy=skip")

    # -- documents ------------------------------------------------------------------------------
    def locate(self, doc_id: int) -> tuple[int, int]:
        """(source index, source-local id) of global document ``doc_id``."""
        s = int(np.searchsorted(self.offsets, doc_id, side="right")) - 1
        return s, int(doc_id - self.offsets[s])

    def vision_spans(self, doc_id: int) -> np.ndarray:
        if self.pairs.any and self.pairs.is_unit(doc_id):  # the whole pair is one block: never cut
            return np.array([[0, int(self.lengths[doc_id])]], np.int64)
        s, d = self.locate(doc_id)
        return self.sources[s].vision_spans(d)

    def describe(self, doc_id: int) -> str:
        s, d = self.locate(doc_id)
        return self.sources[s].describe(d)

    def _order(self, source: int, epoch: int) -> _EpochOrder:
        key = (source, epoch)
        if key not in self._orders:
            self._orders[key] = _EpochOrder(self.sources[source].shard_offsets, self.seed, source, epoch,
                                            self.shard_group)
            if len(self._orders) > 2 * len(self.sources):
                self._orders.popitem(last=False)
        return self._orders[key]

    # -- windows ---------------------------------------------------------------------------------
    def origin(self) -> Seed:
        return Seed(0, 0, [[0, 0, 0] for _ in self.sources])

    def draw(self, sources: list[list[int]]) -> tuple[list[int], list[list[int]], int]:
        """The global ids of the next ``pack_window`` documents drawn from source positions ``sources``
        (``[[epoch, position, tokens], ...]``), the positions after them, and oversize docs dropped."""
        state = [list(s) for s in sources]
        ids, dropped = [], 0
        while len(ids) < self.pack_window:
            s = self.blend.pick([t for _, _, t in state])
            epoch, pos, tokens = state[s]
            order = self._order(s, epoch)
            d = order.doc(pos) + int(self.offsets[s])
            pos += 1
            if pos == len(order):
                epoch, pos = epoch + 1, 0
            if self.excluded[d]:  # a task this stream leaves out (not counted as skipped)
                state[s] = [epoch, pos, tokens]
                continue
            if self.max_block[d] > self.seq_len:  # policy error was raised at construction
                state[s] = [epoch, pos, tokens]
                dropped += 1
                continue
            state[s] = [epoch, pos, tokens + int(self.lengths[d])]
            ids.append(d)
        return ids, state, dropped

    def _plan(self, seed: Seed):
        """(rows, the next window's seed, oversize docs dropped, cuts) of the window ``seed`` starts."""
        ids, state, dropped = self.draw(seed.sources)
        result = pack_rows(ids, self.lengths, self.vision_spans, self.seq_len, self.oversize_policy,
                           self.describe, carry=seed.carry, keep_open=True)
        nxt = Seed(seed.window + 1, seed.row + len(result.rows), state, result.carry)
        return result.rows, nxt, dropped, result.num_split

    def restart(self, seed: Seed, recount: bool = False) -> None:
        """Plan from ``seed`` on (rows before it are replanned from the origin if asked for);
        ``recount``: count the windows from ``seed`` on as new (a loaded state)."""
        if recount:
            self._counted_to = seed.window - 1
            self._uncounted.clear()
        self._seeds, self._starts = [seed], [seed.row]
        self._cache: OrderedDict[int, list[list[Piece]]] = OrderedDict()

    def _extend(self) -> None:
        """Plan the first window not yet planned."""
        seed = self._seeds[-1]
        rows, nxt, dropped, cuts = self._plan(seed)
        self._remember(seed.window, rows)
        self._seeds.append(nxt)
        self._starts.append(nxt.row)
        if seed.window > self._counted_to:
            self._counted_to = seed.window
            self._uncounted.append((seed.row, dropped, cuts))

    def settle(self, cursor: int) -> None:
        """Add the counts of the windows starting before row ``cursor`` to ``counts``."""
        while self._uncounted and self._uncounted[0][0] < cursor:
            _, dropped, cuts = self._uncounted.popleft()
            self.counts["skipped"] += dropped
            self.counts["split"] += cuts

    def _remember(self, window: int, rows: list[list[Piece]]) -> None:
        self._cache[window] = rows
        self._cache.move_to_end(window)
        if len(self._cache) > _CACHED_WINDOWS:
            self._cache.popitem(last=False)

    def _find(self, k: int) -> int:
        """Index into ``_seeds`` of the window holding row k (planning up to it)."""
        if k < self._starts[0]:
            self.restart(self.origin())
        while self._starts[-1] <= k:
            self._extend()
        return bisect.bisect_right(self._starts, k) - 1

    def row(self, k: int) -> list[Piece]:
        """Global row ``k``: its pieces, with global document ids."""
        if k < 0:
            raise IndexError(f"row {k} < 0")
        i = self._find(k)
        seed = self._seeds[i]
        rows = self._cache.get(seed.window)
        if rows is None:
            rows = self._plan(seed)[0]
        self._remember(seed.window, rows)
        return rows[k - seed.row]

    def expand(self, row: list[Piece]) -> list[Piece]:
        """``row`` with each preference pair's piece as its two documents (chosen, then rejected)."""
        return self.pairs.expand(row) if self.pairs.any else row

    def seed_at(self, k: int) -> Seed:
        """The seed of the window holding row k."""
        return self._seeds[self._find(k)]

    def forget_before(self, k: int) -> None:
        """Drop the seeds of windows that end at or before row k (they are replanned if asked for)."""
        i = self._find(k)
        del self._seeds[:i], self._starts[:i]

    def check_seed(self, seed: Seed) -> None:
        """``ValueError`` unless ``seed`` could belong to this stream."""
        if len(seed.sources) != len(self.sources):
            raise ValueError(f"loader state has {len(seed.sources)} sources, this loader {len(self.sources)}")
        for i, (epoch, pos, tokens) in enumerate(seed.sources):
            if epoch < 0 or tokens < 0 or not 0 <= pos < len(self.sources[i].lengths):
                raise ValueError(f"loader state: source {i} position (epoch {epoch}, {pos}, {tokens} tokens) "
                                 f"is impossible for {len(self.sources[i].lengths)} documents")
        for p in seed.carry:
            if not (0 <= p.doc_id < len(self.lengths) and 0 <= p.start < p.end <= self.lengths[p.doc_id]
                    and p.length <= self.seq_len):
                raise ValueError(f"loader state: carried piece {tuple(p)} is impossible")
        if seed.window < 0 or seed.row < 0:
            raise ValueError(f"loader state: negative window/row {seed.window}/{seed.row}")
