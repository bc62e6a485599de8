"""A directory of indexed shards as one random-access set of documents.

Global document id ``d`` numbers the samples of the sorted ``*.tar`` files in order (shard 0's
samples first). Lengths, tasks and vision spans come from the ``.idx`` files alone; only
:meth:`ShardSet.read` touches the tars, and it checks every payload against its index (webdataset
would read garbage inside a payload silently, NOTES.md). Reads are positional (``os.pread``) on
per-thread file descriptors, so loader worker threads may read concurrently.

    >>> from emu3_train.vocab import get_vocab
    >>> shards = ShardSet("data/demo/train", get_vocab("demo"))     # doctest: +SKIP
    >>> tokens, meta = shards.read(0)                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from emu3_train.data.format import (
    TASKS,
    UNDERSTANDING_TASKS,
    check_tokens,
    decode_meta,
    decode_tokens,
    loss_spans_of,
)
from emu3_train.data.index import Index, ShardError, index_path, read_index, reindex_hint
from emu3_train.vocab import Vocab

BAD_SAMPLE_POLICIES = ("error", "skip")
MAX_OPEN_FILES = 64  # per reading thread; least recently used shards are closed beyond it
log = logging.getLogger(__name__)


def _count_samples(idx: Path) -> int:
    """Samples listed by a (possibly stale) index, 0 if unreadable: for the skip count only."""
    try:
        with np.load(idx, allow_pickle=False) as z:
            return len(z["keys"])
    except Exception:  # noqa: BLE001 - best effort: the shard is dropped either way
        return 0


class ShardSet:
    """The documents of every ``*.tar`` (with its ``.idx``) in directory ``path``.

    Attributes (numpy, D = number of documents, M = vision blocks):
        lengths: int64 ``[D]`` token counts.
        tasks: int8 ``[D]`` codes into ``format.TASKS`` (``task_names`` gives the strings).
        understanding: bool ``[D]``, task in ``UNDERSTANDING_TASKS``.
        span_offsets: int64 ``[D+1]`` and spans: int64 ``[M, 2]``: doc d's ``[start, end)`` vision
            blocks are ``spans[span_offsets[d]:span_offsets[d+1]]``.
        max_block: int64 ``[D]`` length of the longest vision block (0 if none).
        loss_span_offsets: int64 ``[D+1]`` and loss_span_data: int64 ``[L, 2]``: doc d's supervised
            ``[start, end)`` spans (``loss_spans(d)``; none = every target, ``data.format``).
        pair_role: int8 ``[D]`` 0 / 1 chosen / 2 rejected; pair_partner: int64 ``[D]`` the other
            document of the pair (-1 none; ``data.pairs``).
        shard_of / local_of: int64 ``[D]``: which shard, which sample in it.
        shard_offsets: int64 ``[num_shards + 1]``: shard i holds documents
            ``[shard_offsets[i], shard_offsets[i+1])``.
        dropped: ``"message"`` per shard left out by ``on_bad_sample=skip``; dropped_docs: the
            samples their indexes listed (0 where unreadable).

    ``on_bad_sample``: a shard that cannot be used — its tar missing next to its ``.idx``, a tar
    whose size differs from its index (truncated or rewritten), an unreadable index — raises
    (``error``, naming the file) or, with ``skip``, is left out with a warning and counted.
    A shard whose ``.idx`` is missing always raises (nothing says what it held).
    """

    def __init__(self, path: str | os.PathLike, vocab: Vocab, on_bad_sample: str = "error"):
        self.path = Path(path)
        self.vocab = vocab
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample is {on_bad_sample!r}; expected one of "
                             f"{list(BAD_SAMPLE_POLICIES)}")
        if not self.path.is_dir():
            raise FileNotFoundError(f"shard directory not found: {self.path}")
        tars = sorted(self.path.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"no *.tar shards in {self.path}")
        orphans = {i.with_suffix(".tar") for i in self.path.glob("*.idx")} - set(tars)
        self.indexes: list[Index] = []
        self.dropped: list[str] = []
        self.dropped_docs = 0
        for tar in sorted(set(tars) | orphans):
            try:
                if tar in orphans:
                    raise FileNotFoundError(f"shard not found: {tar} (its index {index_path(tar)} exists)")
                self.indexes.append(read_index(tar, vocab))
            except (ShardError, FileNotFoundError) as e:
                if on_bad_sample == "error" or not index_path(tar).is_file():
                    raise
                self.dropped.append(str(e))
                self.dropped_docs += _count_samples(index_path(tar))
                log.warning("data.on_bad_sample=skip: leaving out %s", e)
        if not self.indexes:
            raise FileNotFoundError(f"no usable shards in {self.path}: {self.dropped[0]}")
        ix = self.indexes
        self.lengths = np.concatenate([i.lengths for i in ix])
        self.tasks = np.concatenate([i.tasks for i in ix])
        self.understanding = np.isin(self.tasks, [TASKS.index(t) for t in UNDERSTANDING_TASKS])
        self.shard_of = np.repeat(np.arange(len(ix)), [len(i) for i in ix])
        self.local_of = np.concatenate([np.arange(len(i)) for i in ix])
        self.shard_offsets = np.concatenate([[0], np.cumsum([len(i) for i in ix])]).astype(np.int64)
        self.spans = np.concatenate([i.spans for i in ix]).reshape(-1, 2)
        counts = np.concatenate([np.diff(i.span_offsets) for i in ix])
        self.span_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        block = self.spans[:, 1] - self.spans[:, 0]
        self.max_block = np.zeros(len(self.lengths), np.int64)
        np.maximum.at(self.max_block, np.repeat(np.arange(len(counts)), counts), block)
        loss_counts = np.concatenate([np.diff(i.loss_span_offsets) for i in ix])
        self.loss_span_offsets = np.concatenate([[0], np.cumsum(loss_counts)]).astype(np.int64)
        self.loss_span_data = np.concatenate([i.loss_span_data for i in ix]).reshape(-1, 2)
        self.pair_role = np.concatenate([i.pair_role for i in ix]).astype(np.int8)
        self.pair_partner = np.concatenate([np.where(i.pair_partner >= 0, i.pair_partner + off, -1)
                                            for i, off in zip(ix, self.shard_offsets)]).astype(np.int64)
        self._local = threading.local()  # .files: OrderedDict shard -> fd, per reading thread
        self._all_files: list[OrderedDict] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def task_names(self) -> np.ndarray:
        """unicode ``[D]`` task of each document."""
        return np.array(TASKS)[self.tasks]

    def vision_spans(self, doc_id: int) -> np.ndarray:
        """``[m, 2]`` ``[start, end)`` vision blocks of document ``doc_id``."""
        return self.spans[self.span_offsets[doc_id]:self.span_offsets[doc_id + 1]]

    def loss_spans(self, doc_id: int) -> np.ndarray:
        """``[k, 2]`` ``[start, end)`` supervised spans of document ``doc_id`` (``[0, 2]``: every target)."""
        return self.loss_span_data[self.loss_span_offsets[doc_id]:self.loss_span_offsets[doc_id + 1]]

    def describe(self, doc_id: int) -> str:
        """``"dir/shard.tar: sample 'key'"`` for error messages."""
        return self.indexes[self.shard_of[doc_id]].describe(int(self.local_of[doc_id]))

    def _fd(self, shard: int, where: str) -> int:
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()
            with self._lock:
                self._all_files.append(files)
        fd = files.get(shard)
        if fd is not None:
            files.move_to_end(shard)
            return fd
        try:
            fd = files[shard] = os.open(self.indexes[shard].path, os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"{where}: cannot open the shard ({e})") from None
        if len(files) > MAX_OPEN_FILES:
            os.close(files.popitem(last=False)[1])
        return fd

    def _read_bytes(self, shard: int, offset: int, size: int, where: str) -> bytes:
        try:
            data = os.pread(self._fd(shard, where), size, offset)
        except OSError as e:
            raise ShardError(f"{where}: cannot read the shard ({e})") from None
        if len(data) != size:
            raise ShardError(f"{where}: payload at byte {offset} is cut short ({len(data)} of {size} "
                             "bytes); the shard is truncated or changed after indexing")
        return data

    def read(self, doc_id: int) -> tuple[np.ndarray, dict]:
        """``(tokens int32 [N], meta dict)`` of document ``doc_id``, checked against the index.

        Raises ``ShardError`` naming shard and key when a payload's CRC-32 differs from the index,
        it does not decode, its length, task or vision blocks differ from the index, or an id is
        outside the vocabulary.
        """
        if not 0 <= doc_id < len(self):
            raise IndexError(f"document {doc_id} out of range [0, {len(self)}) in {self.path}")
        shard, local = int(self.shard_of[doc_id]), int(self.local_of[doc_id])
        index = self.indexes[shard]
        where = index.describe(local)
        tok = self._read_bytes(shard, int(index.tokens_offset[local]), int(index.tokens_size[local]), where)
        meta = self._read_bytes(shard, int(index.meta_offset[local]), int(index.meta_size[local]), where)
        if zlib.crc32(tok) != index.tokens_crc32[local] or zlib.crc32(meta) != index.meta_crc32[local]:
            raise ShardError(f"{where}: payload checksum differs from the index; the shard changed after "
                             "indexing or is corrupt")
        try:
            tokens = decode_tokens(tok)
            spans = check_tokens(tokens, self.vocab)
            meta = decode_meta(meta, len(tokens))
        except ValueError as e:
            raise ShardError(f"{where}: {e} (the shard changed after indexing?)") from None
        if len(tokens) != index.lengths[local]:
            raise ShardError(f"{where}: {len(tokens)} tokens, the index says {index.lengths[local]}; "
                             "the shard changed after indexing")
        if meta["task"] != TASKS[index.tasks[local]] or not np.array_equal(spans, index.vision_spans(local)):
            raise ShardError(f"{where}: task or vision blocks differ from the index; the shard changed "
                             "after indexing")
        if not np.array_equal(loss_spans_of(meta), index.loss_spans(local)):
            old = " (a version-1 index, written before loss_spans)" if index.version == 1 else ""
            raise ShardError(f"{where}: loss_spans differ from the index{old}; "
                             f"{reindex_hint(index.path, self.vocab.name)}")
        return tokens, meta

    def close(self) -> None:
        """Close the shard files of every thread (reads reopen them); call with no read in flight."""
        with self._lock:
            for files in self._all_files:
                while files:
                    os.close(files.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # open files and locks do not pickle; a copy reopens lazily
        state = self.__dict__.copy()
        for name in ("_local", "_all_files", "_lock"):
            del state[name]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local, self._all_files, self._lock = threading.local(), [], threading.Lock()
