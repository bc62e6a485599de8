"""The packing part of ``inspect_shards --seq-len N``: the rows the training loader would make.

The documents ``inspect_shards`` found well-formed become one source, numbered as
``emu3_train.data.stream.ShardSet`` numbers an indexed directory (the sorted ``*.tar`` files, each
shard's samples in tar order), and the loader's own planner (``emu3_train.data.plan.RowStream``:
the same epoch order, token blend, ``pack_window`` windows with carried pieces, oversize policy
``skip``, ``shard_group``, ``tasks``) plans its rows. The report covers the rows of the windows
that start in epoch 0, i.e. the first rows a run serves; ``fill`` over them is what the loader's
``stats()["fill"]`` (``data/fill`` on the dashboard) reads after serving as many rows. On a
directory smaller than one window, that first window already spans several epochs
(``epochs_planned`` says how many).

Where every shard is indexed (``index_shards`` stops on a bad sample, so an indexed shard holds
only well-formed ones) these are exactly the training documents; otherwise the report is what
the loader would make once the bad samples are gone.

    python -m emu3_train.data_pipelines.inspect_shards data/mine --seq-len 4096 --pack-window 256
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from emu3_train.data.format import TASKS
from emu3_train.data.packing import Piece
from emu3_train.data.plan import RowStream

PACKING_KEYS = ("seq_len", "fill", "rows", "docs_per_row", "split_vision_blocks", "skipped",
                "split_documents", "epochs_planned")


class InspectedSource:
    """Well-formed documents, in ``ShardSet`` order, with what ``RowStream`` reads of a source:
    ``lengths``, ``max_block``, ``tasks`` (codes into ``TASKS``) ``[D]``, ``shard_offsets``
    ``[shards + 1]``, ``vision_spans(d)``, ``describe(d)``, ``path``."""

    def __init__(self, path: str = "inspected"):
        self.path = path
        self._lengths: list[int] = []
        self._tasks: list[int] = []
        self._spans: list[np.ndarray] = []
        self._where: list[str] = []
        self._shard_ends: list[int] = [0]

    def add(self, length: int, spans: np.ndarray, task: str, where: str) -> None:
        """Append a document of the current shard."""
        self._lengths.append(int(length))
        self._tasks.append(TASKS.index(task))
        self._spans.append(np.asarray(spans, np.int64).reshape(-1, 2))
        self._where.append(where)

    def end_shard(self) -> None:
        """Close the current shard (a shard with no well-formed document adds none)."""
        if len(self._lengths) > self._shard_ends[-1]:
            self._shard_ends.append(len(self._lengths))

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self._lengths, np.int64)

    @property
    def tasks(self) -> np.ndarray:
        return np.asarray(self._tasks, np.int8)

    @property
    def max_block(self) -> np.ndarray:
        return np.array([int((s[:, 1] - s[:, 0]).max()) if len(s) else 0 for s in self._spans], np.int64)

    @property
    def shard_offsets(self) -> np.ndarray:
        ends = self._shard_ends if self._shard_ends[-1] == len(self) else [*self._shard_ends, len(self)]
        return np.asarray(ends, np.int64)

    def vision_spans(self, d: int) -> np.ndarray:
        return self._spans[d]

    def describe(self, d: int) -> str:
        return self._where[d]


def cut_blocks(rows: list[list[Piece]], spans_of: Callable[[int], np.ndarray]) -> int:
    """Vision blocks that a piece boundary of ``rows`` falls strictly inside (packing forbids it)."""
    cut: set[tuple[int, int]] = set()
    for row in rows:
        for piece in row:
            for b, (s, e) in enumerate(spans_of(piece.doc_id)):
                if s < piece.start < e or s < piece.end < e:
                    cut.add((piece.doc_id, b))
    return len(cut)


def packing_report(source: InspectedSource, seq_len: int, pack_window: int = 256, seed: int = 0,
                   shard_group: int = 0, tasks: Sequence[str] = ()) -> dict:
    """The :data:`PACKING_KEYS` of the loader's rows over ``source`` (module docstring)."""
    empty = {"seq_len": seq_len, "fill": 0.0, "rows": 0, "docs_per_row": 0.0, "split_vision_blocks": 0,
             "skipped": 0, "split_documents": 0, "epochs_planned": 0.0}
    if not len(source):
        return empty
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"tasks {unknown} are not among {list(TASKS)}")
    chosen = np.isin(source.tasks, [TASKS.index(t) for t in tasks]) if tasks else np.ones(len(source), bool)
    if not (chosen & (source.max_block <= seq_len)).any():  # nothing to train on (RowStream would
        return {**empty, "skipped": int((chosen & (source.max_block > seq_len)).sum())}  # refuse or spin)
    stream = RowStream([source], [1.0], seed, seq_len, pack_window, "skip", shard_group, tasks)
    rows: list[list[Piece]] = []
    while True:
        start = stream.seed_at(len(rows))
        if rows and start.row == len(rows) and start.sources[0][0] > 0:
            break  # the first window that starts in epoch 1
        rows.append(stream.row(len(rows)))
        stream.forget_before(len(rows) - 1)
    stream.settle(len(rows))
    epoch, position, _ = start.sources[0]
    placed = sum(p.length for row in rows for p in row)
    pieces = sum(map(len, rows))
    return {"seq_len": seq_len, "fill": placed / (len(rows) * seq_len), "rows": len(rows),
            "docs_per_row": pieces / len(rows), "split_vision_blocks": cut_blocks(rows, source.vision_spans),
            "skipped": stream.counts["skipped"], "split_documents": stream.counts["split"],
            "epochs_planned": epoch + position / len(source)}
