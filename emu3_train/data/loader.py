"""The resumable packed-batch stream of one data-parallel rank (DESIGN.md §4, "Data order and state").

The stream is a pure function of (index, seed, epoch, seq_len, pack_window, oversize_policy):

- epoch e visits every document once, in the order ``np.random.default_rng([seed, e]).permutation(D)``;
- that order is cut into windows of ``pack_window`` documents, each packed into rows
  (:func:`packing.pack_rows`); the rows of successive windows, then of successive epochs, form
  one global row sequence;
- a step takes the next ``dp_size * micro_batch_size`` global rows from the cursor; the i-th of
  them goes to rank ``i % dp_size`` (from a fresh start: global row k to rank ``k % dp_size``).

The state is ``{"epoch", "cursor"}`` (cursor = next global row within the epoch), identical on all
ranks and valid for any dp size or micro-batch size: a resume continues the same row sequence with
nothing repeated or lost. Packing is planned from the index alone, lazily, window by window; a rank
reads only the documents of its own rows.

    loader = PackedLoader(ShardSet("data/demo/train", get_vocab("demo")), seq_len=1024,
                          micro_batch_size=4, dp_rank=rank, dp_size=world, seed=0)
    batch = next(loader)            # the dict of data.batch, [4, 1024] tensors
    json.dump(loader.state_dict(), f)
"""

from __future__ import annotations

import bisect

import numpy as np

from emu3_train.data.batch import build_batch
from emu3_train.data.packing import OVERSIZE_POLICIES, PackResult, Piece, pack_rows
from emu3_train.data.stream import ShardSet

STATE_VERSION = 1
_PLAN_FIELDS = ("seed", "seq_len", "pack_window", "oversize_policy", "num_docs")  # fix the row stream
_CACHED_WINDOWS = 4


class _EpochPlan:
    """The rows of one epoch, planned window by window on demand."""

    def __init__(self, loader: PackedLoader, epoch: int):
        self.loader = loader
        self.order = np.random.default_rng([loader.seed, epoch]).permutation(len(loader.shards))
        self.num_windows = -(-len(self.order) // loader.pack_window)
        self.row_starts = [0]  # window w holds the epoch's rows [row_starts[w], row_starts[w+1])
        self.cache: dict[int, PackResult] = {}

    @property
    def total_rows(self) -> int | None:
        """Rows in the epoch, once every window is planned."""
        return self.row_starts[-1] if len(self.row_starts) > self.num_windows else None

    def _window(self, w: int) -> PackResult:
        if w in self.cache:
            self.cache[w] = self.cache.pop(w)  # most recently used last
        else:
            ld = self.loader
            ids = self.order[w * ld.pack_window:(w + 1) * ld.pack_window]
            result = pack_rows(ids, ld.shards.lengths, ld.shards.vision_spans, ld.seq_len,
                               ld.oversize_policy, ld.shards.describe)
            if w == len(self.row_starts) - 1:  # first time: extend the row map, count the stats
                self.row_starts.append(self.row_starts[-1] + len(result.rows))
                ld._counts["skipped"] += len(result.skipped)
                ld._counts["split"] += result.num_split
            self.cache[w] = result
            if len(self.cache) > _CACHED_WINDOWS:
                del self.cache[next(iter(self.cache))]  # least recently used
        return self.cache[w]

    def row(self, k: int) -> list[Piece] | None:
        """Row k of the epoch, or None if the epoch has at most k rows."""
        while self.total_rows is None and self.row_starts[-1] <= k:
            self._window(len(self.row_starts) - 1)
        if k >= self.row_starts[-1]:
            return None
        w = bisect.bisect_right(self.row_starts, k) - 1
        return self._window(w).rows[k - self.row_starts[w]]


class PackedLoader:
    """Infinite iterator of this rank's packed micro-batches (dicts of ``data.batch.build_batch``).

    Args:
        shards: the documents.
        seq_len: tokens per row (S).
        micro_batch_size: rows per batch on this rank (B).
        dp_rank, dp_size: this rank among the data-parallel ranks.
        seed: shuffle seed of the document order.
        vision_weight: loss weight of visual-code targets.
        pack_window: documents packed together.
        oversize_policy: ``skip`` or ``error`` for documents with a vision block longer than seq_len
            (``error`` raises here, at construction, naming the first such shard and key).
    """

    def __init__(self, shards: ShardSet, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, vision_weight: float = 0.5, pack_window: int = 256,
                 oversize_policy: str = "skip"):
        for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                            ("dp_size", dp_size), ("pack_window", pack_window)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if oversize_policy not in OVERSIZE_POLICIES:
            raise ValueError(f"oversize_policy is {oversize_policy!r}; expected one of "
                             f"{list(OVERSIZE_POLICIES)}")
        self.shards, self.seq_len, self.micro_batch_size = shards, int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.vision_weight, self.pack_window = float(vision_weight), int(pack_window)
        self.oversize_policy = oversize_policy
        oversize = np.flatnonzero(shards.max_block > self.seq_len)
        if len(oversize) and oversize_policy == "error":  # fail before training, not mid-epoch
            pack_rows(oversize[:1], shards.lengths, shards.vision_spans, self.seq_len, "error",
                      shards.describe)
        if len(oversize) == len(shards):
            raise ValueError(f"every document in {shards.path} has a vision block longer than seq_len "
                             f"{self.seq_len}; nothing to train on")
        self.epoch, self.cursor = 0, 0
        self._plans: dict[int, _EpochPlan] = {}
        self._counts = {"skipped": 0, "split": 0, "rows": 0, "docs": 0, "tokens": 0, "slots": 0}

    # -- the global row sequence ------------------------------------------------------------------
    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = _EpochPlan(self, epoch)
        return self._plans[epoch]

    def _normalize(self, epoch: int, k: int) -> tuple[int, int]:
        """(epoch, row within it) of row k counted from the start of ``epoch``."""
        while True:
            plan = self._plan(epoch)
            if plan.row(k) is not None:
                return epoch, k
            k -= plan.total_rows
            epoch += 1

    def row(self, epoch: int, k: int) -> list[Piece]:
        """Global row k counted from the start of ``epoch`` (k may run into later epochs)."""
        epoch, k = self._normalize(epoch, k)
        return self._plan(epoch).row(k)

    def rows_in_epoch(self, epoch: int) -> int:
        """Number of rows epoch ``epoch`` packs into (plans the whole epoch)."""
        plan = self._plan(epoch)
        while plan.total_rows is None:
            plan.row(plan.row_starts[-1])
        return plan.total_rows

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict:
        rows = [self.row(self.epoch, self.cursor + self.dp_rank + j * self.dp_size)
                for j in range(self.micro_batch_size)]
        self.epoch, self.cursor = self._normalize(
            self.epoch, self.cursor + self.dp_size * self.micro_batch_size)
        doc_ids = sorted({p.doc_id for row in rows for p in row})
        tokens = {d: self.shards.read(d)[0] for d in doc_ids}
        understanding = {d for d in doc_ids if self.shards.understanding[d]}
        batch = build_batch(rows, tokens, understanding, self.seq_len, self.shards.vocab, self.vision_weight)
        c = self._counts
        c["rows"] += len(rows)
        c["docs"] += batch["num_docs"]
        c["tokens"] += batch["num_tokens"]
        c["slots"] += len(rows) * self.seq_len
        return batch

    def stats(self, reset: bool = False) -> dict:
        """Running data stats of this rank since construction (or the last reset).

        ``fill``: non-padding fraction of the tokens served; ``docs_per_row``: pieces per row;
        ``skipped``: documents dropped as oversize in the windows this loader planned (each window
        counted once per epoch); ``split``: documents cut into several pieces, likewise.
        """
        c = self._counts
        out = {"fill": c["tokens"] / c["slots"] if c["slots"] else 0.0,
               "docs_per_row": c["docs"] / c["rows"] if c["rows"] else 0.0,
               "skipped": c["skipped"], "split": c["split"]}
        if reset:
            self._counts = dict.fromkeys(c, 0)
        return out

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serializable position in the global row sequence (the same on every rank)."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "seq_len": self.seq_len, "pack_window": self.pack_window,
                "oversize_policy": self.oversize_policy, "num_docs": len(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; rejects a state whose row sequence differs from this loader's."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for name in _PLAN_FIELDS:
            if state.get(name) != mine[name]:
                raise ValueError(f"loader state was saved with {name}={state.get(name)!r} but this loader "
                                 f"has {name}={mine[name]!r}; the row stream would differ")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or cursor < 0:
            raise ValueError(f"loader state has negative epoch/cursor: {epoch}/{cursor}")
        self.epoch, self.cursor = self._normalize(epoch, cursor)
