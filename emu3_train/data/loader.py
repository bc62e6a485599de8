"""The resumable packed-batch stream of one data-parallel rank (DESIGN.md §4, "Data order and state").

The global row sequence is :class:`plan.RowStream`'s: a pure function of (the sources' indexes,
blend weights, seed, seq_len, pack_window, oversize_policy, shard_group). A step takes the next
``dp_size * micro_batch_size`` rows from the cursor; the i-th of them goes to rank ``i % dp_size``
(from a fresh start: global row k to rank ``k % dp_size``). A rank reads only the documents of
its own rows, each by byte offset, checked against the index.

**State** (``state_dict()``, JSON, the same on every rank and valid for any dp size, worker count
or micro-batch size)::

    {"version": 2, "cursor": 1234,                 # next global row the trainer has not consumed
     "window": 9, "window_row": 1200,              # seed of the window holding the cursor:
     "sources": [{"epoch": 0, "position": 2560, "tokens": 9400321}, ...],  # per source
     "carry": [[doc_id, start, end], ...],         # pieces the previous window left open
     "seed": 0, "seq_len": 5120, "pack_window": 256, "oversize_policy": "skip", "shard_group": 0,
     "weights": [0.6, 0.4], "num_docs": [10000, 30000], "names": ["/shards/pairs", "/shards/text"]}

The cursor counts rows handed to the trainer, never rows prefetched; the seed lets a resume plan
from the cursor's window instead of the stream's start. ``names`` is informative (data may move).

**Workers.** ``num_workers=0`` reads and builds each batch in the calling thread. With N > 0,
N threads read and build the next ``prefetch`` batches in the background; rows are planned in
the calling thread and batches come out in stream order, identical to ``num_workers=0``. One
thread (~20M tokens/s on a CPU core, benchmarks/loader.py) hides the reads behind the training
step; more threads only contend for the GIL.

**Caption dropout.** With ``caption_dropout`` p, a t2i document starting in global row k loses
its caption (``BOS SOV meta SOT rows ...``: the unconditional prompt of classifier-free guidance)
when :func:`caption_dropped` (seed, k, doc) draws below p; its freed room is padding. The row
plan is unchanged and the draw depends on the stream alone, so any dp size, worker count or
resume sees the same drops.

**Bad samples.** A read that fails its checks (checksum, truncated or missing shard, out-of-vocab
id, malformed vision block; ``ShardSet.read``) raises ``ShardError`` naming shard and key under
``on_bad_sample="error"``. Under ``"skip"`` the batch is still produced, with that document's
pieces left out (its room is padding), the skip counted in ``stats()["skipped"]`` and the
shard/key logged once. The row stream itself never changes.

    loader = PackedLoader(ShardSet("data/demo/train", get_vocab("demo")), seq_len=1024,
                          micro_batch_size=4, dp_rank=rank, dp_size=world, seed=0, num_workers=2)
    batch = next(loader)            # the dict of data.batch, [4, 1024] tensors
    json.dump(loader.state_dict(), f)
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from emu3_train.data.batch import build_batch
from emu3_train.data.format import TASKS
from emu3_train.data.index import ShardError
from emu3_train.data.packing import OVERSIZE_POLICIES, Piece
from emu3_train.data.plan import RowStream, Seed
from emu3_train.data.stream import BAD_SAMPLE_POLICIES, ShardSet

STATE_VERSION = 2
_PLAN_FIELDS = ("seed", "seq_len", "pack_window", "oversize_policy", "shard_group", "weights", "num_docs",
                "tasks")
_PLAN_DEFAULTS = {"tasks": []}  # fields older states lack
log = logging.getLogger(__name__)


CAPTION_DROPOUT_STREAM = 0xCA9  # separates the caption-dropout draws from every other seeded stream


def caption_dropped(seed: int, row: int, doc_id: int, rate: float) -> bool:
    """Whether global document ``doc_id`` starting in global row ``row`` of the stream loses its
    caption: a draw of ``default_rng([seed, CAPTION_DROPOUT_STREAM, row, doc_id])`` below ``rate``.
    The row of a document changes with the epoch, so each drawing of a document decides anew; a
    pure function of the stream, so any dp size, worker count and resume sees the same drops."""
    return rate > 0 and np.random.default_rng([seed, CAPTION_DROPOUT_STREAM, row, doc_id]).random() < rate


class PackedLoader:
    """Infinite iterator of this rank's packed micro-batches (dicts of ``data.batch.build_batch``).

    Args:
        shards: the documents: one ``ShardSet``, or a sequence of them blended by ``weights``.
        seq_len: tokens per row (S).
        micro_batch_size: rows per batch on this rank (B).
        dp_rank, dp_size: this rank among the data-parallel ranks.
        seed: shuffle seed of the document order.
        vision_weight: loss weight of visual-code targets.
        pack_window: documents drawn per packing window.
        oversize_policy: ``skip`` or ``error`` for documents with a vision block longer than seq_len
            (``error`` raises here, at construction, naming the first such shard and key).
        weights: token share of each source (normalized); default equal.
        shard_group: shards whose documents are shuffled together per epoch; 0 = all.
        num_workers: background reader threads; 0 = read in the calling thread.
        prefetch: batches prepared ahead when ``num_workers > 0``.
        on_bad_sample: ``error`` or ``skip`` (module docstring).
        task_weights: loss multiplier per document task (``loss.task_weights``; missing = 1.0).
            The documents' ``loss_spans`` (from the index) are applied as ``data.batch`` says.
        caption_dropout: fraction of t2i documents whose caption is replaced by the empty one
            (:func:`caption_dropped`), so the model learns the unconditional branch of
            classifier-free guidance.
        require_ref_logp: a preference-pair document without a precomputed ``ref_logp`` is a
            ``ShardError`` naming shard and key (DPO with ``dpo.reference=precomputed``).
    """

    def __init__(self, shards: ShardSet | Sequence[ShardSet], seq_len: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, vision_weight: float = 0.5,
                 pack_window: int = 256, oversize_policy: str = "skip", *,
                 weights: Sequence[float] | None = None, shard_group: int = 0, num_workers: int = 0,
                 prefetch: int = 2, on_bad_sample: str = "error", tasks: Sequence[str] = (),
                 task_weights: Mapping[str, float] | None = None, caption_dropout: float = 0.0,
                 require_ref_logp: bool = False):
        for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                            ("dp_size", dp_size), ("pack_window", pack_window), ("prefetch", prefetch)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, (int, np.integer)) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if oversize_policy not in OVERSIZE_POLICIES:
            raise ValueError(f"oversize_policy is {oversize_policy!r}; expected one of "
                             f"{list(OVERSIZE_POLICIES)}")
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample is {on_bad_sample!r}; expected one of "
                             f"{list(BAD_SAMPLE_POLICIES)}")
        self.sources = [shards] if isinstance(shards, ShardSet) else list(shards)
        if not self.sources:
            raise ValueError("no data sources given")
        weights = [1.0] * len(self.sources) if weights is None else [float(w) for w in weights]
        vocabs = {(s.vocab.name, s.vocab.size) for s in self.sources}
        if len(vocabs) != 1:
            raise ValueError(f"the blended sources use different vocabularies: {sorted(vocabs)}")
        self.vocab = self.sources[0].vocab
        self.seq_len, self.micro_batch_size = int(seq_len), int(micro_batch_size)
        self.dp_rank, self.dp_size, self.seed = int(dp_rank), int(dp_size), int(seed)
        self.vision_weight, self.pack_window = float(vision_weight), int(pack_window)
        self.oversize_policy, self.on_bad_sample = oversize_policy, on_bad_sample
        self.weights, self.shard_group, self.tasks = weights, int(shard_group), sorted(tasks)
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout={caption_dropout} must be in [0, 1]")
        self.caption_dropout = float(caption_dropout)
        self.require_ref_logp = bool(require_ref_logp)
        unknown = sorted(set(task_weights or {}) - set(TASKS))
        if unknown:
            raise ValueError(f"task_weights has tasks {unknown}; expected some of {list(TASKS)}")
        self.task_weight = np.array([float((task_weights or {}).get(t, 1.0)) for t in TASKS], np.float64)
        self.stream = RowStream(self.sources, weights, self.seed, self.seq_len, self.pack_window,
                                oversize_policy, self.shard_group, tasks)
        self.cursor = 0
        self.prefetch = int(prefetch)
        self._executor = ThreadPoolExecutor(int(num_workers), thread_name_prefix="emu3-data") \
            if num_workers else None
        self._pending: deque[Future] = deque()
        self._submitted = 0  # cursor after the last submitted batch
        self._warned: set[int] = set()
        self._counts = dict.fromkeys(("rows", "docs", "tokens", "slots", "skipped_bad"), 0)
        self._dropped_docs = sum(getattr(s, "dropped_docs", 0) for s in self.sources)
        self._plan_base = dict(self.stream.counts)

    # -- the global row sequence ------------------------------------------------------------------
    def row(self, k: int) -> list[Piece]:
        """Global row ``k`` of the stream (from its start), a preference pair as its two documents;
        doc ids are global (``locate``)."""
        return self.stream.expand(self.stream.row(k))

    def locate(self, doc_id: int) -> tuple[int, int]:
        """(source index, id within that source) of global document ``doc_id``."""
        return self.stream.locate(doc_id)

    def _rank_rows(self, cursor: int) -> list[list[Piece]]:
        first = cursor + self.dp_rank
        return [self.stream.expand(self.stream.row(first + j * self.dp_size))
                for j in range(self.micro_batch_size)]

    # -- reading (worker threads, or the caller) --------------------------------------------------
    def _load(self, rows: list[list[Piece]], first_row: int) -> tuple[dict, list[tuple[int, str]]]:
        """The batch of ``rows`` (global rows ``first_row + j * dp_size``) and the
        ``(doc_id, message)`` of each bad document left out."""
        tokens, understanding, bad, spans, doc_weight, ref_logp = {}, set(), [], {}, {}, {}
        for d in sorted({p.doc_id for row in rows for p in row}):
            s, local = self.stream.locate(d)
            try:
                tokens[d], meta = self.sources[s].read(local)
            except ShardError as e:
                if self.on_bad_sample == "error":
                    raise
                bad.append((d, str(e)))
                continue
            src = self.sources[s]
            if src.understanding[local]:
                understanding.add(d)
            spans[d] = src.loss_spans(local)
            doc_weight[d] = float(self.task_weight[src.tasks[local]])
            if "ref_logp" in meta:
                ref_logp[d] = float(meta["ref_logp"])
            elif self.require_ref_logp and src.pair_role[local]:
                raise ShardError(f"{src.describe(local)}: preference-pair document without 'ref_logp' "
                                 "(dpo.reference=precomputed): run make_preferences without --no-reference, "
                                 "or set dpo.reference=frozen")
        pairs = None
        if self.stream.pairs.any:
            partner = self.stream.pairs.partner
            pairs = {d: int(partner[d]) for d in tokens if partner[d] >= 0 and int(partner[d]) in tokens}
        if bad:
            rows = [[p for p in row if p.doc_id in tokens] for row in rows]
        drop = self._caption_drops(rows, first_row) if self.caption_dropout else None
        return build_batch(rows, tokens, understanding, self.seq_len, self.vocab, self.vision_weight,
                           loss_spans=spans, doc_weight=doc_weight, caption_drop=drop, pairs=pairs,
                           ref_logp=ref_logp), bad

    def _caption_drops(self, rows: list[list[Piece]], first_row: int) -> dict[tuple[int, int], int]:
        """``{(j, doc_id): SOV position}`` of the t2i documents starting in rows j whose caption
        is dropped (a piece holding the document's start and its vision block, caption non-empty)."""
        t2i, out = TASKS.index("t2i"), {}
        for j, row in enumerate(rows):
            k = first_row + j * self.dp_size
            for p in row:
                s, local = self.stream.locate(p.doc_id)
                if p.start or self.sources[s].tasks[local] != t2i or self.sources[s].pair_role[local]:
                    continue  # a preference pair keeps its prompt: both documents must share it
                spans = self.sources[s].vision_spans(local)
                sov = int(spans[0, 0]) if len(spans) else 0
                if 1 < sov < p.end and caption_dropped(self.seed, k, p.doc_id, self.caption_dropout):
                    out[j, p.doc_id] = sov
        return out

    def batch_of(self, rows: list[list[Piece]]) -> dict:
        """The batch of any ``rows`` of this stream (validation: a fixed set of rows), read now;
        ``on_bad_sample`` as for the stream's own batches (a bad document's room becomes padding)."""
        return self._load(rows, 0)[0]  # no caption dropout here: the validator's loader has none

    def _submit(self) -> None:
        rows = self._rank_rows(self._submitted)
        self._pending.append(self._executor.submit(self._load, rows, self._submitted + self.dp_rank))
        self._submitted += self.dp_size * self.micro_batch_size

    def _drop_pending(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._submitted = self.cursor

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> dict:
        if self._executor is None:
            batch, bad = self._load(self._rank_rows(self.cursor), self.cursor + self.dp_rank)
        else:
            while len(self._pending) < self.prefetch:
                self._submit()
            future = self._pending.popleft()
            try:
                batch, bad = future.result()
            except BaseException:
                self._drop_pending()  # the cursor stays on the failed batch
                raise
            self._submit()  # keep `prefetch` batches in flight while the trainer computes
        self.cursor += self.dp_size * self.micro_batch_size
        self.stream.forget_before(self.cursor)
        self.stream.settle(self.cursor)
        c = self._counts
        for d, message in bad:
            c["skipped_bad"] += 1
            if d not in self._warned:
                self._warned.add(d)
                log.warning("data.on_bad_sample=skip: left out %s", message)
        c["rows"] += self.micro_batch_size
        c["docs"] += batch["num_docs"]
        c["tokens"] += batch["num_tokens"]
        c["slots"] += self.micro_batch_size * self.seq_len
        return batch

    def close(self) -> None:
        """Stop the worker threads (batches in flight are dropped; the cursor is unaffected)."""
        if self._executor is not None:
            self._drop_pending()
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def stats(self, reset: bool = False) -> dict:
        """Running data stats of this rank since construction (or the last reset).

        ``fill``: non-padding fraction of the tokens served; ``docs_per_row``: pieces per row;
        ``skipped``: ``skipped_oversize`` (documents dropped as oversize in the packing windows the
        cursor entered, the same on every rank) + ``skipped_bad`` (bad samples this rank left out under
        ``on_bad_sample=skip``, once per batch that needed them) + ``skipped_shard_docs`` (samples
        of shards left out at open); ``split``: cuts made by packing in those windows.
        """
        c = self._counts
        plan = {k: v - self._plan_base[k] for k, v in self.stream.counts.items()}
        out = {"fill": c["tokens"] / c["slots"] if c["slots"] else 0.0,
               "docs_per_row": c["docs"] / c["rows"] if c["rows"] else 0.0,
               "skipped": plan["skipped"] + c["skipped_bad"] + self._dropped_docs,
               "skipped_oversize": plan["skipped"], "skipped_bad": c["skipped_bad"],
               "skipped_shard_docs": self._dropped_docs, "split": plan["split"]}
        if reset:
            self._counts = dict.fromkeys(c, 0)
            self._plan_base = dict(self.stream.counts)
            self._dropped_docs = 0
        return out

    # -- state -----------------------------------------------------------------------------------
    def _plan_fields(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "pack_window": self.pack_window,
                "oversize_policy": self.oversize_policy, "shard_group": self.shard_group,
                "weights": list(self.weights), "num_docs": [len(s.lengths) for s in self.sources],
                "tasks": list(self.tasks)}

    def state_dict(self) -> dict:
        """JSON-serializable position in the global row sequence (module docstring)."""
        return {"version": STATE_VERSION, "cursor": self.cursor, **self.stream.seed_at(self.cursor).to_json(),
                **self._plan_fields(), "names": [str(getattr(s, "path", "")) for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; rejects a state whose row sequence differs from this loader's."""
        version = state.get("version")
        if version != STATE_VERSION:
            hint = " (written by the first-fit loader, whose row stream differs)" if version == 1 else ""
            raise ValueError(f"loader state version {version!r}{hint}; expected {STATE_VERSION}")
        mine = self._plan_fields()
        for name in _PLAN_FIELDS:
            theirs = state.get(name, _PLAN_DEFAULTS.get(name))
            if theirs != mine[name]:
                raise ValueError(f"loader state was saved with {name}={theirs!r} but this loader "
                                 f"has {name}={mine[name]!r}; the row stream would differ")
        try:
            cursor, seed = int(state["cursor"]), Seed.from_json(state)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"loader state is incomplete or malformed: {e!r}") from None
        self.stream.check_seed(seed)
        if not seed.row <= cursor:
            raise ValueError(f"loader state: cursor {cursor} lies before its window's first row {seed.row}")
        self._drop_pending()
        self.stream.restart(seed, recount=True)
        self.cursor = self._submitted = cursor
