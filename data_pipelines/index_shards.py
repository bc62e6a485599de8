"""Build the ``.idx`` of every shard in a directory (for shards written by other tools, or re-checked).

Each ``X.tar`` gets ``X.idx`` (byte offsets, token counts, vision-block spans per sample; the
format is in ``emu3_train.data.index``). Every sample is validated on the way: ids inside the
vocabulary, well-formed vision blocks, JSON metadata with a known task. An index that is up to
date (readable, same vocabulary and shard size, not older than its shard) is kept unless
``--force``; so a rerun after an interruption continues where it stopped.

    python -m emu3_train.data_pipelines.index_shards data/mine --vocab emu3
    python -m emu3_train.data_pipelines.index_shards data/mine --vocab emu3 --force   # rebuild all

A truncated shard (cut short, no end-of-archive marker, a garbled header) keeps its complete
samples: ``X.tar`` is rewritten to them (plus an end marker), the original is moved to
``X.tar.damaged``, and a ``warning:`` line on stderr says how many samples were kept and which were
lost (the old ``.idx``, if readable, names them). ``write_shards --reindex`` does the same.

A bad sample stops the run with ``error: <shard>: sample '<key>': <what is wrong>`` (exit code 2);
the indexes built before it are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from emu3_train.data.format import META_SUFFIX, TOKENS_SUFFIX
from emu3_train.data.index import (
    BLOCK,
    IncompleteTarError,
    Index,
    ShardError,
    build_index,
    first_nonzero_byte,
    index_path,
    load_index,
    read_index,
    write_index,
)
from emu3_train.vocab import PRESETS, Vocab, get_vocab

from ._cli import run_cli

DAMAGED_SUFFIX = ".damaged"
RECORD = 20 * BLOCK  # tarfile pads an archive to a multiple of this


def index_is_current(tar: Path, vocab: Vocab) -> bool:
    """True if ``X.idx`` reads back for ``vocab``, matches the shard's size and is not older than it."""
    idx = index_path(tar)
    try:
        read_index(tar, vocab)
    except (ValueError, OSError):  # missing, unreadable, stale, other vocabulary (ShardError is a ValueError)
        return False
    return idx.stat().st_mtime_ns >= tar.stat().st_mtime_ns


def read_shard(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes], dict[str, int]]]:
    """``(key, {suffix: payload}, {suffix: payload byte offset})`` of each sample in tar order;
    ``tarfile.TarError``/``OSError`` on a damaged or truncated tar (after the samples read before
    the damage, the last of them included when a header after it is cut short or garbled)."""
    with open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        key, members, offsets = None, {}, {}
        headers = iter(tf)
        while True:
            try:
                ti = next(headers, None)
            except tarfile.ReadError:
                if key is not None:
                    yield key, members, offsets
                raise
            if ti is None:
                break
            name_key, _, suffix = ti.name.partition(".")
            if name_key != key:
                if key is not None:
                    yield key, members, offsets
                key, members, offsets = name_key, {}, {}
            if ti.isfile():
                data = tf.extractfile(ti).read()
                if len(data) != ti.size:
                    raise tarfile.ReadError(f"member {ti.name!r} is cut short")
                members[suffix], offsets[suffix] = data, ti.offset_data
        end = tf.offset
        if key is not None:
            yield key, members, offsets
        f.seek(end)
        tail = f.read(2 * BLOCK)
        if len(tail) != 2 * BLOCK or any(tail):  # tarfile stops silently at a garbled header
            raise tarfile.ReadError(f"no end-of-archive marker at byte {end} (truncated, or a bad header)")
        if (after := first_nonzero_byte(f, end)) >= 0:
            raise tarfile.ReadError(f"data at byte {after}, after the end-of-archive marker at byte {end} "
                                    "(concatenated tars?), is never read")


def complete_prefix(tar: Path) -> tuple[list[str], int, str]:
    """``(keys, end, why)``: the keys of the complete samples (both members whole) at the start of
    ``tar``, the byte where the last one's data ends (block-padded), and what stopped the scan."""
    keys, end, why, whole = [], 0, "no damage found", True
    try:
        for key, members, offsets in read_shard(tar):
            whole = whole and set(members) == {TOKENS_SUFFIX, META_SUFFIX}  # kept: up to the first gap
            if whole:
                keys.append(key)
                end = max(offsets[s] + -(-len(members[s]) // BLOCK) * BLOCK for s in members)
    except (tarfile.TarError, OSError, EOFError) as e:
        why = str(e)
    return keys, end, why


def _span(keys: list[str]) -> str:
    return "none" if not keys else repr(keys[0]) if len(keys) == 1 else f"{keys[0]!r} .. {keys[-1]!r}"


def recover_prefix(tar: Path, vocab: Vocab, damage: str) -> tuple[Index, str]:
    """Rewrite the incomplete shard ``tar`` to its complete samples and index it; ``(index, warning)``.

    The original moves to ``X.tar.damaged``. ``ShardError`` (the tar untouched) if no sample is
    complete or the kept samples do not validate.
    """
    keys, end, why = complete_prefix(tar)
    if not keys:
        raise ShardError(f"{damage}; no complete sample before the damage ({why}), nothing to recover: "
                         f"rewrite the shard with write_shards --input, or move {tar} and its .idx away")
    try:
        old = [str(k) for k in load_index(tar).keys]
    except (ValueError, OSError):
        old = None
    tmp = tar.with_name(tar.name + ".recovering")
    with open(tar, "rb") as src, open(tmp, "wb") as dst:
        left = end
        while data := src.read(min(left, 1 << 20)):
            dst.write(data)
            left -= len(data)
        dst.write(b"\0" * (2 * BLOCK + -(end + 2 * BLOCK) % RECORD))  # end marker, record padding
    try:
        index = build_index(tmp, vocab)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, ShardError):  # a bad sample in the kept part: name the shard, not the temp file
            raise ShardError(str(e).replace(str(tmp), str(tar))) from None
        raise
    damaged = tar.with_name(tar.name + DAMAGED_SUFFIX)
    n = 0
    while damaged.exists():  # never overwrite what an earlier recovery kept
        n += 1
        damaged = tar.with_name(f"{tar.name}{DAMAGED_SUFFIX}.{n}")
    size = tar.stat().st_size
    os.replace(tar, damaged)
    os.replace(tmp, tar)
    index.path = tar
    write_index(index)
    if old is not None:
        gone = [k for k in old if k not in set(keys)]
        lost = (f"lost the {len(gone)} samples its old index listed after them ({_span(gone)})" if gone
                else "lost none of the samples its old index listed")
    else:
        lost = f"lost the {size - end} bytes after byte {end} (no readable old index says which samples)"
    return index, (f"{tar}: truncated shard ({size} bytes; {why}): kept its {len(keys)} complete samples "
                   f"({_span(keys)}) and {lost}; the original is kept as {damaged} (delete it once you no "
                   "longer need it, or rewrite the shard from its source)")


def reindex(tar: Path, vocab: Vocab) -> tuple[Index, str | None]:
    """``(index written for tar, warning or None)``: :func:`recover_prefix` if the tar is incomplete."""
    try:
        index = build_index(tar, vocab)
    except IncompleteTarError as e:
        return recover_prefix(tar, vocab, str(e))
    write_index(index)
    return index, None


def reindex_dir(shard_dir: Path, vocab: Vocab, force: bool = True) -> dict:
    """Index every ``*.tar`` of ``shard_dir`` (current ones kept unless ``force``); warnings go to
    stderr. Returns counts: ``built``, ``kept``, ``docs``, ``tokens``, ``recovered`` (truncated
    shards cut to their complete samples)."""
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"shard directory not found: {shard_dir}")
    tars = sorted(shard_dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {shard_dir}")
    from tqdm import tqdm

    counts = dict.fromkeys(("built", "kept", "docs", "tokens", "recovered"), 0)
    with tqdm(tars, desc="indexing", unit="shard", file=sys.stderr) as bar:
        for tar in bar:
            if not force and index_is_current(tar, vocab):
                counts["kept"] += 1
                continue
            index, warning = reindex(tar, vocab)
            if warning is not None:
                bar.write(f"warning: {warning}", file=sys.stderr)
                counts["recovered"] += 1
            counts["built"] += 1
            counts["docs"] += len(index)
            counts["tokens"] += int(index.lengths.sum())
    return counts


def summary(counts: dict, shard_dir: Path) -> str:
    """The one-line report of :func:`reindex_dir`."""
    line = (f"indexed {counts['built']} shards ({counts['docs']} documents, {counts['tokens']} tokens) "
            f"in {shard_dir}")
    line += f"; kept {counts['kept']} up-to-date indexes; recovered {counts['recovered']} truncated shards"
    return line + (" (see the warnings above)" if counts["recovered"] else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.index_shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate every sample of the *.tar shards in DIR and write their .idx indexes; a "
                    "truncated shard keeps its complete samples (the original becomes X.tar.damaged).",
        epilog="example:\n  python -m emu3_train.data_pipelines.index_shards data/mine --vocab emu3",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="directory of *.tar shards")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset the ids must fit (default emu3)")
    parser.add_argument("--force", action="store_true", help="rebuild indexes that are up to date")
    args = parser.parse_args(argv)
    counts = reindex_dir(args.dir, get_vocab(args.vocab), force=args.force)
    print(summary(counts, args.dir))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
