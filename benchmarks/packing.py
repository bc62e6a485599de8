"""Packing fill: first-fit-decreasing rows vs one document per row vs in-order greedy rows.

Fill = non-padding fraction of the tokens the model processes. Runs on the demo shards
(built into a temp dir if ``--data`` is absent) or on any shard directory.

    python benchmarks/packing.py                        # demo shards, seq_len 1024
    python benchmarks/packing.py --data /shards --vocab emu3 --seq-len 5120

Ends with one JSON line: {"fill_packed", "fill_one_per_row", "fill_greedy", "ratio_vs_one_per_row", ...}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet
from emu3_train.vocab import get_vocab


def greedy_in_order(lengths: np.ndarray, seq_len: int) -> int:
    """Rows used by concatenating documents in order, opening a row when the next does not fit."""
    rows, used = 1, 0
    for n in lengths:
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="shard directory (default: build the demo)")
    parser.add_argument("--vocab", default="demo")
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    vocab = get_vocab(args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data
        if path is None:
            from emu3_train.data_pipelines.demo import build_demo

            build_demo(tmp)
            path = Path(tmp) / "train"
        shards = ShardSet(path, vocab)
        lengths = shards.lengths[shards.max_block <= args.seq_len]
        loader = PackedLoader(shards, seq_len=args.seq_len, micro_batch_size=1)
        t0 = time.perf_counter()
        rows = loader.rows_in_epoch(0)
        plan_s = time.perf_counter() - t0
    tokens = int(lengths.sum())
    fill_packed = tokens / (rows * args.seq_len)
    fill_one = tokens / (len(lengths) * args.seq_len)
    rng = np.random.default_rng(0)
    fill_greedy = tokens / (greedy_in_order(rng.permutation(lengths), args.seq_len) * args.seq_len)
    print(f"{len(lengths)} documents, {tokens} tokens, seq_len {args.seq_len}")
    print(f"first-fit decreasing: {rows} rows, fill {fill_packed:.3f} (planned in {plan_s * 1e3:.0f} ms)")
    print(f"one document per row: fill {fill_one:.3f}  -> packing gives {fill_packed / fill_one:.2f}x "
          "useful tokens per row")
    print(f"in-order greedy rows: fill {fill_greedy:.3f}  -> ratio {fill_packed / fill_greedy:.3f}")
    print(json.dumps({"fill_packed": round(fill_packed, 4), "fill_one_per_row": round(fill_one, 4),
                      "fill_greedy": round(fill_greedy, 4),
                      "ratio_vs_one_per_row": round(fill_packed / fill_one, 2),
                      "ratio_vs_greedy": round(fill_packed / fill_greedy, 3),
                      "docs_per_s_planned": round(len(lengths) / plan_s)}))


if __name__ == "__main__":
    main()
