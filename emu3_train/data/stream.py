"""A directory of indexed shards as one random-access set of documents.

Global document id ``d`` numbers the samples of the sorted ``*.tar`` files in order (shard 0's
samples first). Lengths, tasks and vision spans come from the ``.idx`` files alone; only
:meth:`ShardSet.read` touches the tars, and it checks every payload against its index (webdataset
would read garbage inside a payload silently, NOTES.md).

    >>> from emu3_train.vocab import get_vocab
    >>> shards = ShardSet("data/demo/train", get_vocab("demo"))     # doctest: +SKIP
    >>> tokens, meta = shards.read(0)                              # doctest: +SKIP
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from emu3_train.data.format import TASKS, UNDERSTANDING_TASKS, check_tokens, decode_meta, decode_tokens
from emu3_train.data.index import Index, ShardError, read_index
from emu3_train.vocab import Vocab


class ShardSet:
    """The documents of every ``*.tar`` (with its ``.idx``) in directory ``path``.

    Attributes (numpy, D = number of documents, M = vision blocks):
        lengths: int64 ``[D]`` token counts.
        tasks: int8 ``[D]`` codes into ``format.TASKS`` (``task_names`` gives the strings).
        understanding: bool ``[D]``, task in ``UNDERSTANDING_TASKS``.
        span_offsets: int64 ``[D+1]`` and spans: int64 ``[M, 2]``: doc d's ``[start, end)`` vision
            blocks are ``spans[span_offsets[d]:span_offsets[d+1]]``.
        max_block: int64 ``[D]`` length of the longest vision block (0 if none).
        shard_of / local_of: int64 ``[D]``: which shard, which sample in it.
    """

    def __init__(self, path: str | os.PathLike, vocab: Vocab):
        self.path = Path(path)
        self.vocab = vocab
        if not self.path.is_dir():
            raise FileNotFoundError(f"shard directory not found: {self.path}")
        tars = sorted(self.path.glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"no *.tar shards in {self.path}")
        self.indexes: list[Index] = [read_index(t, vocab) for t in tars]
        ix = self.indexes
        self.lengths = np.concatenate([i.lengths for i in ix])
        self.tasks = np.concatenate([i.tasks for i in ix])
        self.understanding = np.isin(self.tasks, [TASKS.index(t) for t in UNDERSTANDING_TASKS])
        self.shard_of = np.repeat(np.arange(len(ix)), [len(i) for i in ix])
        self.local_of = np.concatenate([np.arange(len(i)) for i in ix])
        self.spans = np.concatenate([i.spans for i in ix]).reshape(-1, 2)
        counts = np.concatenate([np.diff(i.span_offsets) for i in ix])
        self.span_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        block = self.spans[:, 1] - self.spans[:, 0]
        self.max_block = np.zeros(len(self.lengths), np.int64)
        np.maximum.at(self.max_block, np.repeat(np.arange(len(counts)), counts), block)
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def task_names(self) -> np.ndarray:
        """unicode ``[D]`` task of each document."""
        return np.array(TASKS)[self.tasks]

    def vision_spans(self, doc_id: int) -> np.ndarray:
        """``[m, 2]`` ``[start, end)`` vision blocks of document ``doc_id``."""
        return self.spans[self.span_offsets[doc_id]:self.span_offsets[doc_id + 1]]

    def describe(self, doc_id: int) -> str:
        """``"dir/shard.tar: sample 'key'"`` for error messages."""
        return self.indexes[self.shard_of[doc_id]].describe(int(self.local_of[doc_id]))

    def _read_bytes(self, shard: int, offset: int, size: int, where: str) -> bytes:
        f = self._files.get(shard)
        if f is None:
            try:
                f = self._files[shard] = open(self.indexes[shard].path, "rb")
            except OSError as e:
                raise ShardError(f"{where}: cannot open the shard ({e})") from None
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{where}: payload at byte {offset} is cut short ({len(data)} of {size} "
                             "bytes); the shard changed after indexing")
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
            meta = decode_meta(meta)
        except ValueError as e:
            raise ShardError(f"{where}: {e} (the shard changed after indexing?)") from None
        if len(tokens) != index.lengths[local]:
            raise ShardError(f"{where}: {len(tokens)} tokens, the index says {index.lengths[local]}; "
                             "the shard changed after indexing")
        if meta["task"] != TASKS[index.tasks[local]] or not np.array_equal(spans, index.vision_spans(local)):
            raise ShardError(f"{where}: task or vision blocks differ from the index; the shard changed "
                             "after indexing")
        return tokens, meta

    def close(self) -> None:
        """Close the open shard files (reads reopen them)."""
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # open files do not pickle; workers reopen lazily
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
