"""Loader throughput: packed 5,120-token rows out of real shards on disk, one process.

Writes a stage-1 mix with ``write_shards`` into a temp dir (emu3 vocabulary: 512²-area t2i/i2t
pairs, blocks ≈ 4,170 tokens, and random-id text documents, blended 0.6 : 0.4 by tokens as two
sources), then times :class:`PackedLoader` (plan, read by offset + check against the index,
build the batch tensors) with 0, 1 and 2 worker threads, and the time a simulated training step
waits for data with 0 and 1 workers. The baseline is webdataset reading the
same tars sequentially and decoding every ``.tokens.npy`` (no checks, no packing, no batches),
measured in the same run. The files are fresh, so both read from the page cache.

    python benchmarks/loader.py                  # ~12M tokens of shards, ~30 s on 2 cores
    python benchmarks/loader.py --docs 600

Ends with one JSON line: {"tokens_per_s", "tokens_per_s_1_worker", "webdataset_tokens_per_s", ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from emu3_train.data.blend import open_blend
from emu3_train.data.loader import PackedLoader
from emu3_train.layout import i2t_document, t2i_document
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.write_shards import write_shards  # installed from data_pipelines/

NEED = 70_000  # tokens/s of an 8-GPU H100 node at Emu3-8B speed (the figure)
SEQ_LEN, MICRO_BATCH = 5120, 4


def write_mix(out: Path, n_pairs: int, seed: int = 0) -> int:
    """``out/pairs`` and ``out/text`` shards; returns the tokens written."""
    vocab = get_vocab("emu3")
    encode = load_tokenizer(vocab).encode
    rng = np.random.default_rng(seed)
    total = [0]

    def pair_docs():
        for i in range(n_pairs):
            h = int(rng.integers(48, 86))
            codes = rng.integers(0, vocab.codebook_size, (h, 4096 // h))
            caption = rng.integers(0, vocab.text_size, int(rng.integers(20, 300))).tolist()
            make = i2t_document if i % 2 else t2i_document
            tokens = np.array(make(vocab, caption, codes, encode), np.int32)
            total[0] += len(tokens)
            yield {"tokens": tokens, "task": "i2t" if i % 2 else "t2i", "source": "bench"}

    def text_docs(budget: int):
        while budget > 0:
            n = int(np.clip(rng.lognormal(np.log(700), 1.0), 16, 60_000))
            ids = rng.integers(0, vocab.text_size, n)
            tokens = np.concatenate([[vocab.bos], ids, [vocab.eos]]).astype(np.int32)
            budget -= len(tokens)
            total[0] += len(tokens)
            yield {"tokens": tokens, "task": "text", "source": "bench"}

    write_shards(pair_docs(), out / "pairs", vocab, max_count=500)
    write_shards(text_docs(total[0] * 2 // 3), out / "text", vocab, max_count=1000)
    return total[0]


def time_loader(root: Path, workers: int, seconds: float) -> tuple[float, float]:
    """(non-padding tokens/s, fill) of the loader over ~``seconds``."""
    sources, weights = open_blend(root, ["0.6:pairs", "0.4:text"], get_vocab("emu3"))
    loader = PackedLoader(sources, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, weights=weights,
                          num_workers=workers, prefetch=4)
    next(loader)  # threads started, first window planned
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        tokens += next(loader)["num_tokens"]
    elapsed = time.perf_counter() - t0
    fill = loader.stats()["fill"]
    loader.close()
    return tokens / elapsed, fill


def time_waiting(root: Path, workers: int, step_s: float, steps: int) -> float:
    """Seconds per step the trainer waits in ``next(loader)`` when each step computes ``step_s``
    (a sleep: GPU work holds no GIL)."""
    sources, weights = open_blend(root, ["0.6:pairs", "0.4:text"], get_vocab("emu3"))
    loader = PackedLoader(sources, seq_len=SEQ_LEN, micro_batch_size=MICRO_BATCH, weights=weights,
                          num_workers=workers, prefetch=4)
    next(loader)
    waited = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t0
        time.sleep(step_s)
    loader.close()
    return waited / steps


def time_webdataset(root: Path, seconds: float) -> float:
    import webdataset as wds

    urls = [str(p) for d in ("pairs", "text") for p in sorted((root / d).glob("*.tar"))]
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            tokens += len(np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False))
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1600, help="image-text pairs (text adds 40%% of tokens)")
    parser.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        total = write_mix(root, args.docs)
        size = sum(p.stat().st_size for p in root.rglob("*.tar"))
        print(f"wrote {total / 1e6:.1f}M tokens ({size / 2**20:.0f} MiB of tars) in "
              f"{time.perf_counter() - t0:.1f} s")
        base = time_webdataset(root, args.seconds)
        zero, fill = time_loader(root, 0, args.seconds)
        one, _ = time_loader(root, 1, args.seconds)
        two, _ = time_loader(root, 2, args.seconds)
        load_s = SEQ_LEN * MICRO_BATCH / zero  # one batch's load time with 0 workers
        waits = [time_waiting(root, w, step_s=2 * load_s, steps=200) for w in (0, 1)]
    print(f"webdataset sequential decode (baseline): {base / 1e6:.2f}M tokens/s")
    print(f"PackedLoader, 0 workers: {zero / 1e6:.2f}M tokens/s of packed rows (fill {fill:.4f}) "
          f"-> x{zero / base:.2f} the baseline, x{zero / NEED:.0f} an 8-GPU node's need")
    print(f"PackedLoader, 1 worker thread: {one / 1e6:.2f}M tokens/s; 2 threads: {two / 1e6:.2f}M tokens/s "
          "(threads share the GIL: they overlap reads with training, they do not add throughput)")
    print(f"trainer wait per step of {2 * load_s * 1e3:.1f} ms compute: {waits[0] * 1e3:.2f} ms with 0 "
          f"workers, {waits[1] * 1e3:.2f} ms with 1 (prefetching hides the reads)")
    print(json.dumps({"tokens_per_s": round(zero), "tokens_per_s_1_worker": round(one),
                      "tokens_per_s_2_workers": round(two),
                      "wait_ms_0_workers": round(waits[0] * 1e3, 3),
                      "wait_ms_1_worker": round(waits[1] * 1e3, 3),
                      "webdataset_tokens_per_s": round(base), "ratio_vs_webdataset": round(zero / base, 2),
                      "fill": round(fill, 4), "seq_len": SEQ_LEN}))


if __name__ == "__main__":
    main()
