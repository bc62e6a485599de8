"""The per-shard index ``X.idx`` next to each shard ``X.tar``: where every sample's payloads lie.

With it any rank plans packing from token counts and vision spans alone, and reads any sample
by seeking to its byte offset (DESIGN.md §4, "Shard sample").

Format (``FORMAT_VERSION`` 3): an ``np.savez`` zip of plain arrays, read with
``allow_pickle=False``. N samples in tar order, M vision blocks and L supervised spans in total:

============== =============== =================================================================
array          dtype, shape    meaning
============== =============== =================================================================
format_version int64 []        3 (1: before supervised spans, 2: before pairs; read as none)
vocab_name     unicode []      vocabulary preset the ids were checked against
vocab_size     int64 []        its size (ids are in ``[0, vocab_size)``)
shard_size     int64 []        byte size of the tar when indexed (a changed tar = stale index)
keys           unicode [N]     sample keys
tokens_offset  int64 [N]       byte offset of the ``KEY.tokens.npy`` payload in the tar
tokens_size    int64 [N]       its size in bytes (npy header included)
meta_offset    int64 [N]       byte offset of the ``KEY.json`` payload
meta_size      int64 [N]       its size in bytes
tokens_crc32   uint32 [N]      ``zlib.crc32`` of the tokens payload (reads are checked against it)
meta_crc32     uint32 [N]      ``zlib.crc32`` of the json payload
lengths        int64 [N]       token count of the document
tasks          int8 [N]        index into ``format.TASKS``
span_offsets   int64 [N+1]     sample i's vision blocks are ``spans[span_offsets[i]:span_offsets[i+1]]``
spans          int64 [M, 2]    ``[start, end)`` token positions of each block (SOV .. EOV inclusive)
loss_span_offsets int64 [N+1]  sample i's supervised spans are ``loss_spans[o[i]:o[i+1]]``
loss_spans     int64 [L, 2]    ``[start, end)`` ``loss_spans`` of the json (``data.format``); a sample
                               without any supervises every target
pair_role      int8 [N]        0 not in a preference pair, 1 chosen, 2 rejected (``data.pairs``)
pair_partner   int64 [N]       position in this shard of the pair's other document, -1 none
============== =============== =================================================================

A version-1 index loads with no supervised spans; :meth:`stream.ShardSet.read` then refuses a
sample whose json has ``loss_spans`` (reindex to use them).

A shard is complete (``build_index``) when its end-of-archive marker follows the last sample and
only zero bytes follow it; ``read_index`` checks, when a shard is opened, the size and that only
zero bytes follow the last indexed member (a member appended into the end padding keeps the size).

Build and write: ``write_index(build_index("shard-000000.tar", vocab))``; the CLI is
``python -m emu3_train.data_pipelines.write_shards --reindex DIR --vocab NAME`` (it also keeps the
complete samples of a truncated shard).
"""

from __future__ import annotations

import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emu3_train.data.format import (
    META_SUFFIX,
    TASKS,
    TOKENS_SUFFIX,
    check_tokens,
    decode_meta,
    decode_tokens,
    loss_spans_of,
)
from emu3_train.data.pairs import match_pairs
from emu3_train.vocab import Vocab

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: no loss_spans arrays; 2: no pair arrays
_ARRAYS = ("keys", "tokens_offset", "tokens_size", "meta_offset", "meta_size", "tokens_crc32",
           "meta_crc32", "lengths", "tasks")


class ShardError(ValueError):
    """A shard or its index is unusable; the message names the file and, if known, the sample key."""


class IncompleteTarError(ShardError):
    """The shard is not a complete tar: cut short, no end-of-archive marker, or a garbled header."""


def index_path(tar_path: str | os.PathLike) -> Path:
    """``X.idx`` for shard ``X.tar``."""
    return Path(tar_path).with_suffix(".idx")


def reindex_hint(tar_path: Path, vocab_name: str) -> str:
    return (f"rebuild it with `python -m emu3_train.data_pipelines.write_shards --reindex "
            f"{tar_path.parent} --vocab {vocab_name}`")


@dataclass
class Index:
    """The index of one shard; see the module docstring for every array."""

    path: Path  # the shard X.tar this index describes
    vocab_name: str
    vocab_size: int
    shard_size: int
    keys: np.ndarray
    tokens_offset: np.ndarray
    tokens_size: np.ndarray
    meta_offset: np.ndarray
    meta_size: np.ndarray
    tokens_crc32: np.ndarray
    meta_crc32: np.ndarray
    lengths: np.ndarray
    tasks: np.ndarray
    span_offsets: np.ndarray
    spans: np.ndarray
    loss_span_offsets: np.ndarray | None = None  # None: every sample [0]*(N+1) (version-1 index)
    loss_span_data: np.ndarray | None = None
    pair_role: np.ndarray | None = None  # None: no pairs (an index before version 3)
    pair_partner: np.ndarray | None = None
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.pair_role is None:
            self.pair_role = np.zeros(len(self.keys), np.int8)
        if self.pair_partner is None:
            self.pair_partner = np.full(len(self.keys), -1, np.int64)
        if self.loss_span_offsets is None:
            self.loss_span_offsets = np.zeros(len(self.keys) + 1, np.int64)
        if self.loss_span_data is None:
            self.loss_span_data = np.zeros((0, 2), np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def vision_spans(self, i: int) -> np.ndarray:
        """``[m, 2]`` ``[start, end)`` vision blocks of sample ``i``."""
        return self.spans[self.span_offsets[i]:self.span_offsets[i + 1]]

    def loss_spans(self, i: int) -> np.ndarray:
        """``[k, 2]`` ``[start, end)`` supervised spans of sample ``i`` (``[0, 2]``: every target)."""
        return self.loss_span_data[self.loss_span_offsets[i]:self.loss_span_offsets[i + 1]]

    def describe(self, i: int) -> str:
        """``"path/shard.tar: sample 'key'"``, the prefix of every error about sample ``i``."""
        return f"{self.path}: sample {str(self.keys[i])!r}"


BLOCK = 512  # tar block size, bytes


def _end_marker_ok(f, offset: int) -> bool:
    """A complete tar ends with two zero blocks at ``offset`` (tarfile stops silently without them)."""
    f.seek(offset)
    tail = f.read(2 * BLOCK)
    return len(tail) == 2 * BLOCK and not any(tail)


def first_nonzero_byte(f, offset: int, chunk: int = 1 << 16) -> int:
    """Position of the first non-zero byte of file ``f`` at or after ``offset``, -1 if none (the tail
    of a tar is its end marker and padding: normally under 11 KiB)."""
    f.seek(offset)
    while data := f.read(chunk):
        stripped = data.lstrip(b"\0")
        if stripped:
            return offset + len(data) - len(stripped)
        offset += len(data)
    return -1


def build_index(tar_path: str | os.PathLike, vocab: Vocab) -> Index:
    """Scan and validate every sample of the uncompressed tar ``tar_path``.

    Raises ``ShardError`` (naming the shard and the sample key) on a missing member, an unexpected
    member, a duplicate key, tokens that are not int32 1-D, ids outside ``vocab``, a malformed
    vision block or bad JSON; and (naming the shard) on a truncated or corrupt tar.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"shard not found: {tar_path}")
    rows: list[tuple] = []
    spans: list[np.ndarray] = []
    supervised: list[np.ndarray] = []
    metas: list[dict] = []
    seen: set[str] = set()

    def finish(key: str, members: dict) -> None:
        where = f"{tar_path}: sample {key!r}"
        for suffix in (TOKENS_SUFFIX, META_SUFFIX):
            if suffix not in members:
                raise ShardError(f"{where}: member {key}.{suffix} is missing")
        tok_ti, tok_data = members[TOKENS_SUFFIX]
        meta_ti, meta_data = members[META_SUFFIX]
        try:
            tokens = decode_tokens(tok_data)
            doc_spans = check_tokens(tokens, vocab)
            meta = decode_meta(meta_data, len(tokens))
        except ValueError as e:
            raise ShardError(f"{where}: {e}") from None
        rows.append((key, tok_ti.offset_data, tok_ti.size, meta_ti.offset_data, meta_ti.size,
                     zlib.crc32(tok_data), zlib.crc32(meta_data), len(tokens), TASKS.index(meta["task"])))
        spans.append(doc_spans)
        supervised.append(loss_spans_of(meta))
        metas.append(meta)

    try:
        with open(tar_path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                key, members = None, {}
                for ti in tf:
                    name_key, _, suffix = ti.name.partition(".")
                    if not ti.isfile() or suffix not in (TOKENS_SUFFIX, META_SUFFIX):
                        raise ShardError(f"{tar_path}: sample {name_key!r}: unexpected member {ti.name!r} "
                                         f"(expected KEY.{TOKENS_SUFFIX} and KEY.{META_SUFFIX})")
                    if name_key != key:
                        if key is not None:
                            finish(key, members)
                        if name_key in seen:
                            raise ShardError(f"{tar_path}: sample {name_key!r}: key appears twice "
                                             "(or its members are not adjacent)")
                        seen.add(name_key)
                        key, members = name_key, {}
                    if suffix in members:
                        raise ShardError(f"{tar_path}: sample {key!r}: member {ti.name!r} appears twice")
                    members[suffix] = (ti, tf.extractfile(ti).read())
                    if len(members[suffix][1]) != ti.size:
                        raise tarfile.ReadError(f"member {ti.name!r} is cut short")
                end = tf.offset
            if not _end_marker_ok(f, end):  # checked before the last sample: it may be cut short
                raise tarfile.ReadError(f"no end-of-archive marker at byte {end} (truncated, or a "
                                        "corrupt header)")
            after = first_nonzero_byte(f, end)
            if after >= 0:  # tarfile never reads past the marker: whatever lies there is never used
                raise ShardError(f"{tar_path}: data at byte {after}, after the end-of-archive marker at "
                                 f"byte {end} (concatenated tars?); nothing after the marker is ever read: "
                                 "rewrite the shard with write_shards --input")
            if key is not None:
                finish(key, members)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise IncompleteTarError(f"{tar_path}: not a complete uncompressed tar: {e}") from None
    if not rows:
        raise ShardError(f"{tar_path}: shard holds no samples")
    cols = list(zip(*rows))
    counts = np.array([len(s) for s in spans], np.int64)
    loss_counts = np.array([len(s) for s in supervised], np.int64)
    role, partner = match_pairs([f"{tar_path}: sample {k!r}" for k in cols[0]], metas,
                                [len(s) > 0 for s in spans], ShardError)
    return Index(
        path=tar_path, vocab_name=vocab.name, vocab_size=vocab.size,
        shard_size=tar_path.stat().st_size,
        keys=np.array(cols[0], dtype=str),
        tokens_offset=np.array(cols[1], np.int64), tokens_size=np.array(cols[2], np.int64),
        meta_offset=np.array(cols[3], np.int64), meta_size=np.array(cols[4], np.int64),
        tokens_crc32=np.array(cols[5], np.uint32), meta_crc32=np.array(cols[6], np.uint32),
        lengths=np.array(cols[7], np.int64), tasks=np.array(cols[8], np.int8),
        span_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        spans=np.concatenate(spans).astype(np.int64).reshape(-1, 2),
        loss_span_offsets=np.concatenate([[0], np.cumsum(loss_counts)]).astype(np.int64),
        loss_span_data=np.concatenate(supervised).astype(np.int64).reshape(-1, 2),
        pair_role=role, pair_partner=partner,
    )


def write_index(index: Index, path: str | os.PathLike | None = None) -> Path:
    """Write ``index`` to ``path`` (default: next to its shard, ``X.idx``) atomically; returns the path."""
    path = Path(path) if path is not None else index_path(index.path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, format_version=np.int64(FORMAT_VERSION), vocab_name=np.array(index.vocab_name),
                 vocab_size=np.int64(index.vocab_size), shard_size=np.int64(index.shard_size),
                 span_offsets=index.span_offsets, spans=index.spans,
                 loss_span_offsets=index.loss_span_offsets, loss_spans=index.loss_span_data,
                 pair_role=index.pair_role, pair_partner=index.pair_partner,
                 **{name: getattr(index, name) for name in _ARRAYS})
    os.replace(tmp, path)
    return path


def load_index(tar_path: str | os.PathLike, vocab_name: str = "NAME") -> Index:
    """The index of shard ``tar_path`` as written, checked only for its own consistency (the tar is not
    looked at: see :func:`read_index`); ``vocab_name`` goes into the rebuild hint of an error.

    Raises ``FileNotFoundError`` (with the command that builds it) if ``X.idx`` is missing, and
    ``ShardError`` if it is unreadable, of another format version or inconsistent.
    """
    tar_path = Path(tar_path)
    idx = index_path(tar_path)
    hint = reindex_hint(tar_path, vocab_name)
    if not idx.is_file():
        raise FileNotFoundError(f"{idx}: index of shard {tar_path} not found; {hint}")
    try:
        with np.load(idx, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except Exception as e:  # zipfile/numpy raise many types on a damaged file
        raise ShardError(f"{idx}: unreadable index ({e}); {hint}") from None
    version = int(data.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise ShardError(f"{idx}: index format version {version}, expected {FORMAT_VERSION}; {hint}")
    try:
        supervised = {} if version == 1 else {"loss_span_offsets": data["loss_span_offsets"],
                                              "loss_span_data": data["loss_spans"]}
        if version >= 3:
            supervised.update(pair_role=data["pair_role"], pair_partner=data["pair_partner"])
        index = Index(path=tar_path, vocab_name=str(data["vocab_name"]), vocab_size=int(data["vocab_size"]),
                      shard_size=int(data["shard_size"]), span_offsets=data["span_offsets"],
                      spans=data["spans"], version=version, **supervised,
                      **{name: data[name] for name in _ARRAYS})
    except KeyError as e:
        raise ShardError(f"{idx}: index lacks array {e}; {hint}") from None
    n = len(index.keys)
    if any(len(getattr(index, a)) != n for a in _ARRAYS) or len(index.span_offsets) != n + 1 \
            or index.spans.shape != (int(index.span_offsets[-1]), 2) \
            or len(index.loss_span_offsets) != n + 1 \
            or index.loss_span_data.shape != (int(index.loss_span_offsets[-1]), 2) \
            or len(index.pair_role) != n or len(index.pair_partner) != n:
        raise ShardError(f"{idx}: index arrays have inconsistent lengths; {hint}")
    return index


def indexed_end(index: Index) -> int:
    """Byte offset just past the last indexed payload, rounded up to a tar block (0 if empty)."""
    if not len(index):
        return 0
    end = max(int((index.tokens_offset + index.tokens_size).max()),
              int((index.meta_offset + index.meta_size).max()))
    return -(-end // BLOCK) * BLOCK


def read_index(tar_path: str | os.PathLike, vocab: Vocab | None = None) -> Index:
    """The index of shard ``tar_path``, checked against the format version, ``vocab`` and the tar.

    The tar must have the size it had when indexed, and only zero bytes (end marker, padding) may
    follow the last indexed member: a member appended into the end padding keeps the size. This
    reads the tar's tail only (normally under 11 KiB). Raises ``FileNotFoundError`` (with the
    command that builds it) if ``X.idx`` or the tar is missing, and ``ShardError`` if the index is
    unreadable, of another format version or vocabulary, or stale.
    """
    tar_path = Path(tar_path)
    idx = index_path(tar_path)
    vocab_name = vocab.name if vocab is not None else "NAME"
    hint = reindex_hint(tar_path, vocab_name)
    index = load_index(tar_path, vocab_name)
    if vocab is not None and (index.vocab_name, index.vocab_size) != (vocab.name, vocab.size):
        raise ShardError(f"{idx}: indexed for vocabulary {index.vocab_name!r} (size {index.vocab_size}), "
                         f"but vocabulary {vocab.name!r} (size {vocab.size}) was asked for")
    if not tar_path.is_file():
        raise FileNotFoundError(f"shard not found: {tar_path} (its index {idx} exists)")
    size = tar_path.stat().st_size
    if size != index.shard_size:
        cut = (f" (cut short by {index.shard_size - size} bytes; the command keeps its complete samples)"
               if size < index.shard_size else "")
        raise ShardError(f"{idx}: stale index: shard {tar_path} is {size} bytes, indexed at "
                         f"{index.shard_size}; {hint}{cut}")
    end = indexed_end(index)
    try:
        with open(tar_path, "rb") as f:
            extra = first_nonzero_byte(f, end)
    except OSError as e:
        raise ShardError(f"{tar_path}: cannot read the shard ({e})") from None
    if extra >= 0:
        raise ShardError(f"{idx}: stale index: shard {tar_path} holds data at byte {extra}, after its last "
                         f"indexed sample {str(index.keys[-1])!r} (ends at byte {end}): a member was added "
                         f"after indexing (the size is unchanged); {hint}")
    return index


def index_shards(shard_dir: str | os.PathLike, vocab: Vocab) -> list[Path]:
    """Build and write the index of every ``*.tar`` in ``shard_dir``; returns the ``.idx`` paths."""
    shard_dir = Path(shard_dir)
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {shard_dir}")
    return [write_index(build_index(t, vocab)) for t in tars]
