"""One output shard set per input shard, published only when complete (offline tools' writer).

For input ``NAME`` a tool writes ``OUT/NAME-000000.tar`` + ``OUT/NAME-000000.idx``, ``-000001``, ...
(the ``data.format`` sample layout, at most ``max_count`` documents / ``max_size`` bytes each) and
last ``OUT/NAME.stats.json``, whose presence says the input is done. While it works, everything
goes to the hidden folder ``OUT/.partial-NAME/`` (the loader reads only ``OUT/*.tar``); ``finish``
indexes every shard there, moves them into ``OUT`` and writes the stats. A worker killed at any
point leaves no published shard of an unfinished input that a rerun does not redo: ``begin``
removes the partial folder and any published ``NAME-*.tar``/``.idx`` without a stats file.

    writer = ShardSetWriter(out_dir, "00012", vocab, input_path="tars/00012.tar")
    writer.add(tokens, {"task": "t2i", "source": "00012/000000042"}, key="000000042-t2i")
    stats = writer.finish({"skipped": skips.counts})      # -> OUT/00012.stats.json
    is_done(out_dir, "00012")                              # True: a rerun skips this input

Keys are the input's sample keys (``.``, ``/`` and whitespace become ``_``); a key written twice in
one set is a ``ValueError``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from emu3_train.data.format import check_meta, check_tokens, encode_sample
from emu3_train.data.index import build_index, index_path, write_index
from emu3_train.vocab import Vocab

DEFAULT_MAX_COUNT = 10_000  # documents per output shard
DEFAULT_MAX_SIZE = 1_000_000_000  # bytes per output shard (checked before each sample)
STATS_SUFFIX = ".stats.json"
_BAD_KEY = re.compile(r"[./\s]")


def stats_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / f"{name}{STATS_SUFFIX}"


def is_done(out_dir: str | os.PathLike, name: str) -> bool:
    """True when input ``name``'s shard set is complete (its stats file exists)."""
    return stats_path(out_dir, name).is_file()


def read_stats(out_dir: str | os.PathLike, name: str) -> dict:
    return json.loads(stats_path(out_dir, name).read_text(encoding="utf-8"))


def safe_key(key: str) -> str:
    """``key`` usable as a webdataset sample key (``.``, ``/``, whitespace -> ``_``)."""
    key = _BAD_KEY.sub("_", str(key))
    if not key:
        raise ValueError("empty sample key")
    return key


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


class ShardSetWriter:
    """The shard set of one input (module docstring). Constructing one clears what an interrupted
    earlier run of the same input left (:meth:`begin`)."""

    def __init__(self, out_dir: str | os.PathLike, name: str, vocab: Vocab, *,
                 max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE,
                 input_path: str | os.PathLike | None = None):
        if not name or _BAD_KEY.search(name):
            raise ValueError(f"output name {name!r} must be non-empty without '.', '/' or whitespace")
        if max_count < 1 or max_size < 1:
            raise ValueError(f"max_count and max_size must be >= 1, got {max_count} and {max_size}")
        self.out_dir, self.name, self.vocab = Path(out_dir), name, vocab
        self.max_count, self.max_size = max_count, max_size
        self.input_path = None if input_path is None else str(input_path)
        self.partial = self.out_dir / f".partial-{name}"
        self.documents = 0
        self.tokens = 0
        self.by_task: Counter = Counter()
        self.tokens_by_task: Counter = Counter()
        self._keys: set[str] = set()
        self._tars: list[Path] = []
        self._writer = None
        self._count = self._size = 0
        self._start = time.time()
        self.begin()

    def begin(self) -> None:
        """Remove this input's partial folder and any published shards without a stats file."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if is_done(self.out_dir, self.name):
            raise FileExistsError(f"{stats_path(self.out_dir, self.name)} exists: input {self.name} is "
                                  "already complete (remove its files to redo it)")
        shutil.rmtree(self.partial, ignore_errors=True)
        for stale in self.out_dir.glob(f"{glob.escape(self.name)}-[0-9][0-9][0-9][0-9][0-9][0-9].*"):
            if stale.suffix in (".tar", ".idx"):
                stale.unlink()
        self.partial.mkdir()

    def _open_next(self) -> None:
        import webdataset as wds

        if self._writer is not None:
            self._writer.close()
        path = self.partial / f"{self.name}-{len(self._tars):06d}.tar"
        self._tars.append(path)
        self._writer = wds.TarWriter(str(path), mtime=0.0)
        self._count = self._size = 0

    def add(self, tokens, meta: dict, key: str) -> None:
        """Validate and append one document (``ValueError`` naming the key if it is malformed)."""
        key = safe_key(key)
        tokens = np.asarray(tokens)
        try:
            if key in self._keys:
                raise ValueError("written twice")
            check_tokens(tokens, self.vocab)
            check_meta(meta)
            sample = encode_sample(key, tokens, meta)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.name} sample {key}: {e}") from None
        size = sum(len(v) for k, v in sample.items() if k != "__key__") + 1536  # + tar headers
        if self._writer is None or self._count >= self.max_count or \
                (self._count and self._size + size > self.max_size):
            self._open_next()
        self._writer.write(sample)
        self._keys.add(key)
        self._count += 1
        self._size += size
        self.documents += 1
        self.tokens += len(tokens)
        self.by_task[meta["task"]] += 1
        self.tokens_by_task[meta["task"]] += len(tokens)

    def finish(self, extra: dict | None = None) -> dict:
        """Index, publish and write ``NAME.stats.json`` (returned); an input with no document
        publishes no shard, only its stats (so it is not redone)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        published = []
        for tar in self._tars:
            write_index(build_index(tar, self.vocab))
        for tar in self._tars:  # index first: a reader never sees a tar without its index
            os.replace(index_path(tar), self.out_dir / index_path(tar).name)
            os.replace(tar, self.out_dir / tar.name)
            published.append(tar.name)
        stats = {"input": self.input_path, "name": self.name, "shards": published,
                 "documents": self.documents, "tokens": self.tokens,
                 "documents_by_task": dict(sorted(self.by_task.items())),
                 "tokens_by_task": dict(sorted(self.tokens_by_task.items())),
                 "seconds": round(time.time() - self._start, 3), **(extra or {})}
        _write_json(stats_path(self.out_dir, self.name), stats)
        shutil.rmtree(self.partial, ignore_errors=True)
        return stats

    def abort(self) -> None:
        """Drop everything written so far (the input stays not done)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

