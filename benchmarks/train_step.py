"""Single-device training throughput and MFU: the real model, fused loss and AdamW on packed rows.

One step = ``step.forward_backward`` (the trainer's own: autocast, fused linear-CE with vision
weights) + gradient clipping + AdamW on ``--micro`` rows of ``--seq-len`` tokens, each row packed
with random-text documents whose lengths are drawn around ``--doc-len`` (uniform in
[doc_len / 2, 3 doc_len / 2], the last one cut to fit). Each attention implementation
(``model.attn_impl``) runs in its own subprocess (this script with ``--worker``); ``sdpa`` is the
baseline of the ratios. Reported per implementation: tokens/s, model TFLOP/s and MFU
(``emu3_train.flops``: 6·N_dense per token + causal attention over the actual documents; peak
from the device name or ``--peak-tflops``), peak memory (CUDA ``max_memory_allocated``; CPU peak
RSS), and time per step (median of ``--steps`` after ``--warmup``).

    python benchmarks/train_step.py                          # CPU smoke run: tiny model, 1,024 tokens
    python benchmarks/train_step.py --device cuda --model emu3_1b --seq-len 5120 --precision bf16 \\
        --impls sdpa,flex,varlen --recompute selective --compile   # the README's single-GPU MFU row

Ends with one JSON line: {"<impl>_tokens_per_s", "<impl>_mfu", "<impl>_peak_gb", "<impl>_s",
"<impl>_speedup" (vs sdpa), "device", ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
from _worker import parse_or_serve, run_worker

IMPLS = ("sdpa", "flex", "varlen", "auto")


def synthetic_batch(rows: int, seq_len: int, doc_len: int, vocab, seed: int = 0) -> dict:
    """A packed batch (``data.batch`` contract) of random text documents around ``doc_len`` tokens."""
    from emu3_train.data.batch import build_batch
    from emu3_train.data.packing import Piece

    rng = np.random.default_rng(seed)
    docs, layout = {}, []
    for _ in range(rows):
        row, used = [], 0
        while used < seq_len:
            n = min(int(rng.integers(max(2, doc_len // 2), max(3, 3 * doc_len // 2 + 1))), seq_len - used)
            d = len(docs)
            docs[d] = rng.integers(0, vocab.text_size, n).astype(np.int64)
            row.append(Piece(d, 0, n))
            used += n
        layout.append(row)
    return build_batch(layout, docs, (), seq_len, vocab)


def worker(args) -> dict:
    from emu3_train.build import build_model
    from emu3_train.flops import peak_flops, step_flops, total_params
    from emu3_train.metrics import doc_lengths
    from emu3_train.optim import build_optimizer
    from emu3_train.parallel.dims import ParallelDims
    from emu3_train.recipes import compose
    from emu3_train.step import StepContext, clip_grad_norm, forward_backward
    from emu3_train.vocab import get_vocab

    cfg = compose([f"model={args.model}", "data.path=/unused", f"model.attn_impl={args.impl}",
                   f"trainer.compile={str(args.compile).lower()}",
                   "model.attention_dropout=0", f"model.recompute={args.recompute}",
                   f"data.vocab={'demo' if args.model == 'tiny' else 'emu3'}"])
    vocab = get_vocab(cfg.data.vocab)
    vocab_size = cfg.model.vocab_size or vocab.size
    device = torch.device(args.device)
    # the trainer's own set-up: meta build, passes (recompute, compile), local init, step plan
    model, plan = build_model(cfg, vocab_size, ParallelDims(1, 1, 1), None, device)
    optimizer = build_optimizer(model, cfg.optim)
    batch = synthetic_batch(args.micro, args.seq_len, args.doc_len, vocab)
    ctx = StepContext(bf16=args.precision == "bf16", vision_start=vocab.vision_start)
    flops = step_flops(cfg.model, vocab_size, doc_lengths(batch, vocab.pad))
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        forward_backward(model, [batch], ctx, plan)
        clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    if device.type == "cuda":
        peak_gb, name = torch.cuda.max_memory_allocated(device) / 1e9, torch.cuda.get_device_name(device)
    else:
        peak_gb, name = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name, args.precision)
    return {"s": s, "tokens_per_s": batch["num_tokens"] / s, "tflops": flops / s / 1e12,
            "mfu": flops / s / peak if peak else None, "peak_gb": peak_gb, "device": name,
            "params": total_params(cfg.model, vocab_size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="recipes/model/<name>.yaml (tiny, emu3_1b, emu3_8b)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--micro", type=int, default=1, help="rows per step")
    parser.add_argument("--doc-len", type=int, default=512, help="mean document length (tokens)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--recompute", choices=("none", "full", "selective"), default="none")
    parser.add_argument("--impls", default="sdpa", help=f"comma-separated subset of {','.join(IMPLS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder block")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak per device; 0 = by name")
    args = parse_or_serve(parser, IMPLS, worker)
    if args is None:  # this process was one implementation's worker
        return

    print(f"model={args.model} {args.micro} x {args.seq_len} tokens (documents ~{args.doc_len}), "
          f"{args.precision}, recompute {args.recompute}{', compiled' if args.compile else ''}, on "
          f"{args.device}, median of {args.steps} steps")
    print(f"{'impl':<8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8} {'s/step':>7} "
          f"{'speedup':>8}")
    summary, base = {"model": args.model, "seq_len": args.seq_len}, None
    for impl in args.impls.split(","):
        r = run_worker(__file__, impl)
        if "error" in r:
            print(f"{impl:<8} failed: {r['error']}")
            continue
        base = base or (r["s"] if impl == "sdpa" else None)
        speedup = base / r["s"] if base else float("nan")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{impl:<8} {r['tokens_per_s']:>10,.0f} {r['tflops']:>8.2f} {mfu:>6} {r['peak_gb']:>8.2f} "
              f"{r['s']:>7.3f} {speedup:>7.2f}x")
        summary.update({f"{impl}_{k}": r[k] for k in ("tokens_per_s", "mfu", "peak_gb", "s")},
                       device=r["device"], params=r["params"])
        summary[f"{impl}_speedup"] = speedup
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
