"""Context-parallel attention: memory and time of the chunked SDPA core against the dense-mask core.

One step = forward + backward of one CP rank's attention: its S / cp local queries (row chunks r
and 2·cp−1−r) against the whole row's gathered K/V (S keys, row order), documents masked by global
token index — what ``AllGatherCore`` computes after its all-gather, without the communication.
Implementations:

- ``dense``: the former core, SDPA with the dense bool mask [B, 1, S / cp, S] (saved for backward);
- ``chunked``: ``cp_attention.chunked_document_attention``, query chunks sized by the 64 MiB
  budget, at most 512 queries (or ``--chunk-size``), each chunk's mask built over the keys it can
  reach and recomputed in backward.

Each implementation runs in its own subprocess (this script with ``--worker``). Memory, two ways:
``saved``, the bytes autograd holds for backward after the forward (``saved_tensors_hooks``, each
storage counted once: grows as S²/cp for dense, as S for chunked); ``peak``, the process's peak
resident set (``ru_maxrss``) minus its resident set once the inputs are written, i.e. everything
the step makes resident, transients and gradients included. Time: best of ``--repeats`` steps.
Ratios compare against ``dense`` measured in the same invocation.

    python benchmarks/cp_attention.py                            # CPU: S = 8192 and 16384, cp = 4
    python benchmarks/cp_attention.py --seq-lens 32768 --cp 8 --repeats 1

Documents: lengths drawn once per row length (seed 0) from 256..4096 tokens (``--max-doc``),
the tail of each row a padding segment. Ends with one JSON line per row length:
{"seq_len", "saved_ratio", "peak_ratio", "time_ratio", "<impl>_saved_gb", "<impl>_peak_gb",
"<impl>_s", ...}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time

import torch
from _worker import parse_or_serve, run_worker

from emu3_train.parallel.context_parallel import cp_positions
from emu3_train.parallel.cp_attention import (
    chunked_document_attention,
    dense_document_attention,
    plan_query_chunks,
    query_chunk_size,
)

IMPLS = ("dense", "chunked")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def layout(args, seq: int):
    """(q_index, q_docs, k_index, k_docs, q_first_cols) int64 of CP rank ``args.rank``, B rows."""
    gen = torch.Generator().manual_seed(0)
    bounds = [0]
    for row in range(args.batch):
        pos = 0
        while pos < seq:
            n = int(torch.randint(256, args.max_doc + 1, (), generator=gen))
            pos = min(pos + n, seq)
            bounds.append(row * seq + pos)
    cu = torch.tensor(bounds)
    rows = torch.arange(args.batch)[:, None] * seq
    q_index = rows + cp_positions(seq, args.rank, args.cp)
    k_index = rows + torch.arange(seq)
    q_docs = torch.searchsorted(cu[1:], q_index, right=True)
    k_docs = torch.searchsorted(cu[1:], k_index, right=True)
    return q_index, q_docs, k_index, k_docs, (cu[q_docs] - rows).clamp_min(0)


def saved_bytes(step, *inputs) -> int:
    """Bytes autograd keeps for backward after the forward of ``step`` (each storage once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step(*inputs)
    del out
    return sum(storages.values())


def worker(args) -> dict:
    """One implementation at one row length in this process: {"saved_gb", "peak_gb", "s", ...}."""
    seq = args.seq_len
    q_index, q_docs, k_index, k_docs, first = layout(args, seq)
    gen = torch.Generator().manual_seed(1)
    local, d = seq // args.cp, args.head_dim
    q = torch.randn(args.batch, local, args.heads, d, generator=gen).requires_grad_()
    k = torch.randn(args.batch, seq, args.kv_heads, d, generator=gen).requires_grad_()
    v = torch.randn(args.batch, seq, args.kv_heads, d, generator=gen).requires_grad_()
    grad = torch.randn(args.batch, local, args.heads, d, generator=gen)
    ids = (q_index, q_docs, k_index, k_docs)
    info = {}
    if args.impl == "dense":
        def step(q, k, v):
            return dense_document_attention(q, k, v, *ids)
    else:
        size = args.chunk_size or query_chunk_size(args.batch, seq, args.heads, q.dtype, 0.0)
        chunks = plan_query_chunks(q_index % seq, first, size)
        info = {"chunk_size": size, "chunks": len(chunks),
                "key_fraction": round(sum((e - s) * (ke - ks) for s, e, ks, ke in chunks) / (local * seq), 3)}

        def step(q, k, v):
            return chunked_document_attention(q, k, v, *ids, chunks)

    gc.collect()
    baseline = resident_bytes()
    times = []
    for _ in range(args.repeats):
        q.grad = k.grad = v.grad = None
        gc.collect()
        t0 = time.perf_counter()
        step(q, k, v).backward(grad)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # KiB on Linux
    saved = saved_bytes(step, q, k, v)
    return {"saved_gb": saved / 1e9, "peak_gb": peak / 1e9, "s": min(times),
            "all_s": [round(t, 3) for t in times], **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="8192,16384", help="comma-separated row lengths S (tokens)")
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cp", type=int, default=4, help="context-parallel size (local queries: S / cp)")
    parser.add_argument("--rank", type=int, default=0, help="the CP rank whose queries attend")
    parser.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--heads", type=int, default=8, help="query heads (per TP rank)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (per TP rank)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-doc", type=int, default=4096, help="longest document (tokens)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per implementation (best taken)")
    parser.add_argument("--chunk-size", type=int, default=0, help="queries per chunk; 0 = the 64 MiB budget")
    args = parse_or_serve(parser, IMPLS, worker)
    if args is None:  # this process was one implementation's worker
        return

    print(f"cp={args.cp} rank={args.rank} B={args.batch} Hq={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} fp32 on cpu, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'S':>7} {'impl':<8} {'saved GB':>9} {'peak GB':>8} {'time s':>7} "
          f"{'saved/dense':>11} {'peak/dense':>10} {'time/dense':>10}")
    for seq in (int(s) for s in args.seq_lens.split(",")):
        results = {impl: run_worker(__file__, impl, "--seq-len", str(seq)) for impl in IMPLS}
        base = results["dense"]
        summary = {"seq_len": seq, "cp": args.cp, "local_queries": seq // args.cp}
        for impl, res in results.items():
            if "error" in res:
                print(f"{seq:>7} {impl:<8} failed: {res['error']}")
                summary[f"{impl}_error"] = res["error"]
                continue
            ratios = [res[key] / base[key] if key in base else float("nan")
                      for key in ("saved_gb", "peak_gb", "s")]
            extra = {key: res[key] for key in ("chunk_size", "chunks", "key_fraction") if key in res}
            print(f"{seq:>7} {impl:<8} {res['saved_gb']:>9.4f} {res['peak_gb']:>8.3f} {res['s']:>7.2f} "
                  f"{ratios[0]:>11.4f} {ratios[1]:>10.3f} {ratios[2]:>10.3f}   {extra or ''}")
            summary.update({f"{impl}_saved_gb": round(res["saved_gb"], 5),
                            f"{impl}_peak_gb": round(res["peak_gb"], 4), f"{impl}_s": round(res["s"], 3),
                            **{f"{impl}_{k}": v for k, v in extra.items()}})
            if impl == "chunked":
                summary = {"saved_ratio": round(ratios[0], 4), "peak_ratio": round(ratios[1], 4),
                           "time_ratio": round(ratios[2], 4), **summary}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
