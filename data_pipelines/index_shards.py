"""Build the ``.idx`` of every shard in a directory (for shards written by other tools, or re-checked).

Each ``X.tar`` gets ``X.idx`` (byte offsets, token counts, vision-block spans per sample; the
format is in ``emu3_train.data.index``). Every sample is validated on the way: ids inside the
vocabulary, well-formed vision blocks, JSON metadata with a known task. An index that is up to
date (readable, same vocabulary and shard size, not older than its shard) is kept unless
``--force``; so a rerun after an interruption continues where it stopped.

    python -m emu3_train.data_pipelines.index_shards data/mine --vocab emu3
    python -m emu3_train.data_pipelines.index_shards data/mine --vocab emu3 --force   # rebuild all

A bad sample stops the run with ``error: <shard>: sample '<key>': <what is wrong>`` (exit code 2);
the indexes built before it are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emu3_train.data.index import build_index, index_path, read_index, write_index
from emu3_train.vocab import PRESETS, Vocab, get_vocab

from ._cli import run_cli


def index_is_current(tar: Path, vocab: Vocab) -> bool:
    """True if ``X.idx`` reads back for ``vocab``, matches the shard's size and is not older than it."""
    idx = index_path(tar)
    try:
        read_index(tar, vocab)
    except (ValueError, OSError):  # missing, unreadable, stale, other vocabulary (ShardError is a ValueError)
        return False
    return idx.stat().st_mtime_ns >= tar.stat().st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.index_shards",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate every sample of the *.tar shards in DIR and write their .idx indexes.",
        epilog="example:\n  python -m emu3_train.data_pipelines.index_shards data/mine --vocab emu3",
    )
    parser.add_argument("dir", type=Path, metavar="DIR", help="directory of *.tar shards")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset the ids must fit (default emu3)")
    parser.add_argument("--force", action="store_true", help="rebuild indexes that are up to date")
    args = parser.parse_args(argv)
    if not args.dir.is_dir():
        raise FileNotFoundError(f"shard directory not found: {args.dir}")
    tars = sorted(args.dir.glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {args.dir}")
    vocab = get_vocab(args.vocab)
    from tqdm import tqdm

    built = kept = docs = tokens = 0
    with tqdm(tars, desc="indexing", unit="shard", file=sys.stderr) as bar:
        for tar in bar:
            if not args.force and index_is_current(tar, vocab):
                kept += 1
                continue
            index = build_index(tar, vocab)
            write_index(index)
            built += 1
            docs += len(index)
            tokens += int(index.lengths.sum())
    print(f"indexed {built} shards ({docs} documents, {tokens} tokens) in {args.dir}; "
          f"kept {kept} up-to-date indexes")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
