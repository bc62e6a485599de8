"""Write token documents into webdataset shards with their ``.idx`` indexes (offline, DESIGN.md §1).

Input: JSON lines, one document each: ``{"tokens": [ids...], "task": "t2i"|"i2t"|"text"|"video",
"source": "...", ...}``; keys other than ``tokens`` are kept in the sample's ``.json``. Every
document is validated against the vocabulary before it is written (an error names the document's
number, counted from 0); output is ``OUT/shard-000000.tar`` + ``OUT/shard-000000.idx``, ...

    python -m emu3_train.data_pipelines.write_shards --input docs.jsonl --out data/mine --vocab emu3
    python -m emu3_train.data_pipelines.write_shards --reindex data/mine --vocab emu3   # rebuild .idx

``--reindex`` rebuilds every index; a truncated shard keeps its complete samples with a warning
saying what was kept and lost (the original moves to ``X.tar.damaged``; see ``index_shards``).

Library: ``write_shards(docs, out_dir, vocab)`` returns the shard paths.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from emu3_train.data.format import check_meta, check_tokens, encode_sample
from emu3_train.data.index import build_index, index_path, write_index
from emu3_train.vocab import PRESETS, Vocab, get_vocab

from ._cli import run_cli
from .index_shards import reindex_dir, summary

DEFAULT_MAX_COUNT = 10_000  # documents per shard
DEFAULT_MAX_SIZE = 1_000_000_000  # bytes per shard (approximate: checked before each sample)


def _sample(doc: dict, number: int, vocab: Vocab) -> dict:
    """The webdataset sample of input document ``number`` (key ``doc-NNNNNNNNN``), else ``ValueError``."""
    try:
        if not isinstance(doc, dict) or "tokens" not in doc:
            raise ValueError("expected an object with a 'tokens' field")
        tokens = np.asarray(doc["tokens"])
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise ValueError(f"'tokens' must be a flat list of integers (got dtype {tokens.dtype}, "
                             f"shape {tokens.shape})")
        check_tokens(tokens, vocab)
        meta = check_meta({k: v for k, v in doc.items() if k != "tokens"})
        return encode_sample(f"doc-{number:09d}", tokens, meta)
    except (ValueError, TypeError, OverflowError) as e:  # TypeError: metadata json cannot encode
        raise ValueError(f"document {number}: {e}") from None


def write_shards(docs: Iterable[dict], out_dir: str | os.PathLike, vocab: Vocab | str, prefix: str = "shard",
                 max_count: int = DEFAULT_MAX_COUNT, max_size: int = DEFAULT_MAX_SIZE) -> list[Path]:
    """Write ``docs`` to ``out_dir/{prefix}-NNNNNN.tar`` and index each shard; returns the tar paths.

    Sample keys are ``doc-NNNNNNNNN`` (input order). Refuses a directory that already holds
    ``{prefix}-*.tar``. On any error the shards written by this call are removed.
    """
    import webdataset as wds

    vocab = get_vocab(vocab) if isinstance(vocab, str) else vocab
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob(f"{prefix}-*.tar")):
        raise FileExistsError(f"{out_dir} already holds {prefix}-*.tar shards; remove them or choose "
                              "another output directory")
    pattern = str(out_dir / prefix).replace("%", "%%") + "-%06d.tar"  # ShardWriter fills in % shard
    written: list[Path] = []
    writer = None
    try:
        for number, doc in enumerate(docs):
            sample = _sample(doc, number, vocab)
            if writer is None:  # ShardWriter creates its first file on construction
                writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0,
                                         mtime=0.0, post=lambda name: written.append(Path(name)))
            writer.write(sample)
        if writer is None:
            raise ValueError(f"no documents to write to {out_dir}")
        writer.close()
        writer = None
        for tar in written:
            write_index(build_index(tar, vocab))
    except BaseException:
        if writer is not None:
            writer.close()
        for tar in written:
            tar.unlink(missing_ok=True)
            index_path(tar).unlink(missing_ok=True)
        raise
    return written


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.write_shards",
        description="Write JSON-lines token documents into webdataset shards with .idx indexes, "
                    "or rebuild the indexes of existing shards.",
        epilog="example: python -m emu3_train.data_pipelines.write_shards --input docs.jsonl "
               "--out data/mine --vocab emu3",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--input", type=Path, help="JSON-lines file of documents")
    group.add_argument("--reindex", type=Path, metavar="DIR",
                       help="rebuild the .idx of every shard in DIR (a truncated one keeps its complete "
                            "samples)")
    parser.add_argument("--out", type=Path, help="output directory (with --input)")
    parser.add_argument("--vocab", default="emu3", choices=sorted(PRESETS),
                        help="vocabulary preset (default emu3)")
    parser.add_argument("--prefix", default="shard", help="shard file name prefix (default shard)")
    parser.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT, help="documents per shard")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="bytes per shard")
    args = parser.parse_args(argv)
    vocab = get_vocab(args.vocab)
    if args.reindex is not None:
        print(summary(reindex_dir(args.reindex, vocab), args.reindex))
        return 0
    if args.out is None:
        parser.error("--out is required with --input")
    if not args.input.is_file():
        parser.error(f"input file not found: {args.input}")
    from tqdm import tqdm

    counts = {"docs": 0, "tokens": 0}

    def counted(docs: Iterable[dict]) -> Iterator[dict]:
        for doc in docs:
            counts["docs"] += 1
            counts["tokens"] += len(doc.get("tokens", ())) if isinstance(doc, dict) else 0
            yield doc

    docs = tqdm(counted(_read_jsonl(args.input)), desc="writing", unit="doc", file=sys.stderr)
    shards = write_shards(docs, args.out, vocab, args.prefix, args.max_count, args.max_size)
    print(f"wrote {counts['docs']} documents ({counts['tokens']} tokens) to {len(shards)} shards "
          f"in {args.out}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
