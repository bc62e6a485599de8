"""Our training step vs transformers' ``Emu3ForCausalLM`` trained as BAAI's Emu3 repository does,
on the same model, the same weights and the same documents per optimizer step.

- ours: the trainer's own step (``build_model`` with ``checkpoint.init_from`` = the HF folder,
  ``step.forward_backward`` on packed rows of ``--seq-len``, the fused loss with vision weight
  0.5, per-document attention), then gradient clipping and AdamW;
- the peer: ``Emu3ForCausalLM.from_pretrained`` (SDPA attention), ``model(input_ids,
  attention_mask, labels, num_items_in_batch=<step targets>).loss.backward()`` per micro-batch,
  padded to its longest sequence (no packing; full logits and a plain cross-entropy), then the
  same clipping and the same AdamW (``optim.build_optimizer``), as HF's Trainer steps it. BAAI's
  ``emu3/train/datasets.py`` pads every sample to the tokenizer's ``max_length``; padding to the
  longest of the micro-batch is the kinder peer.

Documents: ``benchmarks/_stage1_docs.py`` (stage-1 mix: ~4,200-token images at 512²-class grids,
t2i and i2t, 40% text, log-normal lengths). Both sides train on exactly the same (input, target)
pairs; the script counts each side's supervised targets from its own tensors and fails (exit 1)
if they differ, or if the first step's loss with vision weight 1 differs from the peer's by more
than 1e-4. Each side and micro-batch size runs in its own process (``_worker.py``), so peaks do
not mix: peak RSS on CPU, ``max_memory_allocated`` on CUDA. A peer micro-batch whose logits
cannot fit in the memory available (estimate: 3 fp32 [b, L, V] buffers) is reported, not run.

Reported per side and micro-batch (``--micro``: rows for ours, sequences for the peer): useful
tokens/s (supervised targets per second), peak memory, seconds per step (of the timed step with
the best rate among ``--steps`` after ``--warmup``: on a shared machine, the least disturbed one),
and the step's needed FLOP/s (6·block weights per token, 6·H·V per supervised
target, causal attention per piece; the same work for both sides) as a fraction of this machine's
matmul FLOP/s at the output head's shape, measured in the same run (the best of plain
``x @ w.t()`` and its two gradient matmuls on 2,048 rows, and the same in 512-row blocks into reused
buffers: a chunked head can beat the plain call, so the plain call alone is no limit). The ratios:
ours (its fastest micro-batch) vs the peer's fastest.

    python benchmarks/vs_hf.py                       # CPU: tiny model (4 layers, d 128), Emu3 vocabulary
    python benchmarks/vs_hf.py --smoke               # seconds: tiny sizes, demo vocabulary, one process
    python benchmarks/vs_hf.py --seq-len 2048 --image-side 32  # 256² images: the peer fits 2 sequences too
    python benchmarks/vs_hf.py --device cuda --micro 1,2,4 --steps 5  # GPU: bf16, auto attention, Triton CE
    python benchmarks/vs_hf.py --profile             # + torch profiler tables of one step of each side
    python benchmarks/vs_hf.py --ce-rows 512         # our CPU CE in 512-row chunks (default: 90)

Ends with one JSON line: {"ours_<m>": {...}, "hf_<m>": {...}, "loss_ours", "loss_ours_w1",
"loss_hf", "targets_ours", "targets_hf", "tokens_per_s_ratio", "peak_ratio", "matmul_tflops", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _stage1_docs import Mix, draw_steps, ours_batches, pack_step, peer_batches, step_work
from _worker import parse_or_serve, run_worker

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: fail at once, never wait for the hub
SIDES = ("ours", "hf", "matmul")
LOSS_TOL = 1e-4
MATMUL_ROWS = 2048  # tokens of the head matmul that sets this machine's limit
MATMUL_BLOCK = 512  # rows per block of its chunked variant


def setup(args):
    """(config, vocab, vocab size, device, bf16, steps of documents with their packed rows)."""
    from emu3_train.recipes import compose
    from emu3_train.tokenizer import load_tokenizer
    from emu3_train.vocab import get_vocab

    cfg = compose(
        [
            f"model={args.model}",
            "data.path=/unused",
            f"data.vocab={args.vocab}",
            f"model.attn_impl={args.attn}",
            "model.attention_dropout=0",
        ]
    )
    vocab = get_vocab(args.vocab)
    mix = (
        Mix.smoke()
        if args.smoke
        else Mix(args.seq_len, args.step_tokens or 2 * args.seq_len, image_area=args.image_side**2)
    )
    steps = draw_steps(mix, vocab, load_tokenizer(vocab).encode, args.warmup + args.steps, args.seed)
    packed = [(docs, pack_step(docs, vocab, mix.seq_len)) for docs in steps]
    device = torch.device(args.device)
    bf16 = args.precision == "bf16" if args.precision else device.type == "cuda"
    return cfg, vocab, cfg.model.vocab_size or vocab.size, device, bf16, packed, mix


def timed(step, n_warmup: int, n_steps: int, device) -> tuple[list[float], list[float]]:
    """(seconds of the timed steps, every step's loss); ``step(i)`` returns a loss tensor."""
    times, losses = [], []
    for i in range(n_warmup + n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step(i))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= n_warmup:
            times.append(time.perf_counter() - t0)
    return times, [float(x) for x in losses]


def peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def profile(step, device, label: str) -> None:
    """One more step under the torch profiler; the top ops by self time go to stderr."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        step(0)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"== profile: {label}\n{prof.key_averages().table(sort_by=key, row_limit=15)}", file=sys.stderr)


def ours(args) -> dict:
    from emu3_train.build import build_model
    from emu3_train.loss import weighted_ce
    from emu3_train.optim import build_optimizer
    from emu3_train.parallel.dims import ParallelDims
    from emu3_train.step import StepContext, clip_grad_norm, forward_backward

    cfg, vocab, vsize, device, bf16, packed, mix = setup(args)
    micro = int(args.micro.split(",")[0])
    if args.ce_rows:  # experiment: exactly this many rows per CPU CE chunk (README, "Against the peer")
        from emu3_train.kernels import reference

        reference.CHUNK_LOGITS_BYTES = 4 * vsize * args.ce_rows
    model, plan = build_model(cfg, vsize, ParallelDims(1, 1, 1), None, device, weights=args.hf_dir)
    optimizer = build_optimizer(model, cfg.optim)
    ctx = StepContext(bf16=bf16, vision_start=vocab.vision_start, impl=args.loss_impl)
    steps = [
        ours_batches(docs, rows, vocab, mix.seq_len, micro, cfg.loss.vision_weight) for docs, rows in packed
    ]
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    with torch.no_grad(), autocast():  # step 0's loss at vision weight 1 (= the peer's plain mean CE)
        num = den = 0.0
        docs, rows = packed[0]
        for batch in ours_batches(docs, rows, vocab, mix.seq_len, micro, 1.0):
            b = plan.prepare(batch)
            weight, vocab_start, tp_group = plan.head(model)
            wsum, _ = weighted_ce(
                model(**plan.model_inputs(b)),
                weight,
                b["labels"],
                b["loss_weight"],
                vision_start=vocab.vision_start,
                impl=args.loss_impl,
            )
            num, den = num + float(wsum), den + batch["weight_sum"]
        loss_w1 = num / den

    def step(i):
        out = forward_backward(model, steps[i], ctx, plan)
        clip_grad_norm(model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out["loss"]

    times, losses = timed(step, args.warmup, args.steps, device)
    if args.profile:
        profile(step, device, f"ours, {micro} row(s) per micro-batch")
    targets = sum(int((b["loss_weight"] > 0).sum()) for s in steps for b in s)
    return {
        "times": times,
        "peak_gb": peak_gb(device),
        "loss": losses[0],
        "loss_w1": loss_w1,
        "targets": targets,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def hf(args) -> dict:
    import transformers

    from emu3_train.optim import build_optimizer

    transformers.utils.logging.disable_progress_bar()

    cfg, vocab, vsize, device, bf16, packed, mix = setup(args)
    micro = int(args.micro.split(",")[0])
    model = (
        transformers.Emu3ForCausalLM.from_pretrained(
            args.hf_dir, attn_implementation="sdpa", dtype=torch.float32
        )
        .to(device)
        .train()
    )
    optimizer = build_optimizer(model, cfg.optim)
    steps = [
        [{k: v.to(device) for k, v in b.items()} for b in peer_batches(docs, rows, vocab, micro)]
        for docs, rows in packed
    ]
    items = [sum(int((b["labels"][:, 1:] != -100).sum()) for b in s) for s in steps]

    def step(i):
        total = torch.zeros((), device=device)
        for b in steps[i]:  # HF Trainer: loss / num_items_in_batch per micro-batch, summed by backward
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(**b, num_items_in_batch=items[i]).loss  # the output (its logits) dies here
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    times, losses = timed(step, args.warmup, args.steps, device)
    if args.profile:
        profile(step, device, f"HF Emu3ForCausalLM, {micro} sequence(s) per micro-batch")
    return {
        "times": times,
        "peak_gb": peak_gb(device),
        "loss": losses[0],
        "targets": sum(items),
    }


def matmul(args) -> dict:
    """FLOP/s of the output head's forward and backward matmuls, [N, H]·[H, V] at N = 2,048: the
    best of one N-row block with fresh outputs (plain torch) and ``MATMUL_BLOCK``-row blocks into
    reused buffers, grad_weight accumulated in place (what a chunked head can reach)."""
    cfg, _, vsize, device, bf16, _, _ = setup(args)
    dtype = torch.bfloat16 if bf16 else torch.float32
    n, h = MATMUL_ROWS, cfg.model.hidden_size
    x, w = torch.randn(n, h, device=device, dtype=dtype), torch.randn(vsize, h, device=device, dtype=dtype)
    c = min(MATMUL_BLOCK, n)
    logits = torch.empty(c, vsize, device=device, dtype=dtype)
    gx, gw = torch.empty(c, h, device=device, dtype=dtype), torch.zeros_like(w)

    def whole(_):
        g = x @ w.t()  # forward logits; stands in for their gradient below
        return (g @ w).sum() + (g.t() @ x).sum()

    def blocks(_):
        for s in range(0, n, c):  # n is a multiple of c: every block fills the buffers
            torch.mm(x[s : s + c], w.t(), out=logits)
            torch.mm(logits, w, out=gx)
            gw.addmm_(logits.t(), x[s : s + c])
        return gw[0, 0]

    best = min(min(timed(f, 1, 3, device)[0]) for f in (whole, blocks))
    return {"tflops": 6 * n * h * vsize / best / 1e12}


def needed_flops(cfg, vocab_size: int, work: dict) -> float:
    """FLOPs the step needs: 6·block weights per token, 6·H·V per supervised target, attention."""
    from emu3_train.flops import attention_flops, layer_params

    blocks = 6.0 * cfg.num_layers * layer_params(cfg) * work["tokens"]
    return (
        blocks
        + 6.0 * cfg.hidden_size * vocab_size * work["supervised"]
        + attention_flops(cfg, work["lengths"])
    )


def peer_fits(args, packed, vocab, vocab_size: int, micro: int) -> tuple[bool, float]:
    """(whether the peer's largest micro-batch fits, its estimated peak GB): 3 fp32 [b, L, V]."""
    longest = max(
        b["input_ids"].numel() for docs, rows in packed for b in peer_batches(docs, rows, vocab, micro)
    )
    need = 3 * longest * vocab_size * 4 / 1e9 + 1.0
    if args.device == "cuda":
        have = torch.cuda.mem_get_info()[0] / 1e9
    else:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        have = int(meminfo["MemAvailable"].split()[0]) * 1024 / 1e9
    return need < 0.8 * have, need


def run_side(args, side: str, *extra: str) -> dict:
    if not args.smoke:
        return run_worker(__file__, side, *extra)
    flags = {k.lstrip("-").replace("-", "_"): v for k, v in zip(extra[::2], extra[1::2])}
    sub = argparse.Namespace(**{**vars(args), **flags})
    return WORKERS[side](sub)


WORKERS = {"ours": ours, "hf": hf, "matmul": matmul}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--model", default="tiny", help="recipes/model/<name>.yaml")
    parser.add_argument("--vocab", default="emu3", help="vocabulary preset (emu3: 184,622 ids)")
    parser.add_argument(
        "--seq-len", type=int, default=5120, help="tokens per packed row; the peer's truncation"
    )
    parser.add_argument(
        "--image-side", type=int, default=64, help="image grid side in codes (64: 512² px, ~4,170 tokens)"
    )
    parser.add_argument("--step-tokens", type=int, default=0, help="tokens per optimizer step (0: 2 rows)")
    parser.add_argument("--micro", default="1,2", help="micro-batch sizes: rows (ours), sequences (peer)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--attn", default="auto", help="our model.attn_impl")
    parser.add_argument("--loss-impl", default="auto", help="our loss.impl (auto: Triton on cuda)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the fastest is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--seed", type=int, default=0, help="of the documents and the initial weights")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one process (a test)")
    parser.add_argument("--profile", action="store_true", help="profile one step of each side (stderr)")
    parser.add_argument(
        "--ce-rows", type=int, default=0, help="rows per chunk of our CPU CE (0: the kernel's chunk_rows)"
    )
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)  # the exported weights, for the workers
    args = parse_or_serve(parser, SIDES, lambda a: WORKERS[a.impl](a))
    if args is None:
        return 0
    if args.smoke:
        args.vocab, args.steps, args.warmup = "demo", 1, 0

    from emu3_train.build import build_model
    from emu3_train.interop.hf import save_hf
    from emu3_train.parallel.dims import ParallelDims

    cfg, vocab, vsize, device, bf16, packed, mix = setup(args)
    works = [step_work(docs, rows, vocab) for docs, rows in packed]
    tmp = Path(tempfile.mkdtemp(prefix="vs_hf_"))
    try:
        model, _ = build_model(cfg, vsize, ParallelDims(1, 1, 1), None, torch.device("cpu"))  # seeded init
        special = {"pad_token_id": vocab.pad, "bos_token_id": vocab.bos, "eos_token_id": vocab.eos}
        hf_dir = str(save_hf(model, cfg.model, tmp / "hf", special))
        del model
        results = {}
        for m in (int(x) for x in args.micro.split(",")):
            results[f"ours_{m}"] = run_side(args, "ours", "--micro", str(m), "--hf-dir", hf_dir)
            fits, need = peer_fits(args, packed, vocab, vsize, m)
            results[f"hf_{m}"] = (
                run_side(args, "hf", "--micro", str(m), "--hf-dir", hf_dir)
                if fits or args.smoke
                else {"error": f"not run: its logits need ~{need:.0f} GB, more than available"}
            )
        results["matmul"] = run_side(args, "matmul")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(args, cfg, vsize, bf16, mix, works, results)


def report(args, cfg, vsize, bf16, mix, works, results) -> int:
    timed_works = works[args.warmup :]
    limit = results["matmul"].get("tflops")
    w0, h = works[0], cfg.model.hidden_size
    by_task = ", ".join(f"{k} {v}" for k, v in w0["docs"].items())
    print(
        f"model={args.model} ({cfg.model.num_layers} layers, d {cfg.model.hidden_size}), vocabulary "
        f"{args.vocab} ({vsize:,}), seq_len {mix.seq_len}, images of {mix.image_area:,} codes, {args.device} "
        f"{'bf16' if bf16 else 'fp32'}; "
        f"step 0: {sum(w0['docs'].values())} documents ({by_task}), "
        f"{w0['tokens']:,} tokens ({w0['text_tokens'] / w0['tokens']:.0%} text), {w0['supervised']:,} "
        f"supervised targets, {w0['rows']} packed rows; best of {args.steps} steps after {args.warmup}"
    )
    print(
        f"{'side':<6} {'micro':>5} {'useful tok/s':>12} {'peak GB':>8} {'s/step':>7} {'TFLOP/s':>8} "
        f"{'of matmul':>9}"
    )
    summary, best = {"device": args.device, "seq_len": mix.seq_len, "vocab_size": vsize}, {}
    for name, r in results.items():
        if name == "matmul":
            continue
        side, m = name.split("_")
        if "error" in r:
            print(f"{side:<6} {m:>5} {r['error']}")
            summary[name] = r
            continue
        rates = [w["supervised"] / t for w, t in zip(timed_works, r["times"])]
        best_step = max(range(len(rates)), key=rates.__getitem__)
        r.update(tokens_per_s=rates[best_step], s=r["times"][best_step])
        r["tflops"] = needed_flops(cfg.model, vsize, timed_works[best_step]) / r["s"] / 1e12
        r["of_matmul"] = r["tflops"] / limit if limit else None
        frac = f"{r['of_matmul']:.0%}" if r["of_matmul"] is not None else "n/a"
        print(
            f"{side:<6} {m:>5} {r['tokens_per_s']:>12,.0f} {r['peak_gb']:>8.2f} {r['s']:>7.2f} "
            f"{r['tflops']:>8.3f} {frac:>9}"
        )
        summary[name] = {
            k: r[k] for k in ("tokens_per_s", "peak_gb", "s", "tflops", "of_matmul", "loss", "targets")
        }
        if side not in best or r["tokens_per_s"] > results[best[side]]["tokens_per_s"]:
            best[side] = name
    summary["matmul_tflops"] = limit
    print(
        f"matmul at the output head's shape [{MATMUL_ROWS} x {h}]·[{h} x {vsize:,}], fwd + bwd "
        f"(best of one block and {MATMUL_BLOCK}-row blocks): {limit:.3f} TFLOP/s"
        if limit
        else f"matmul: {results['matmul']}"
    )
    if "ours" not in best or "hf" not in best:
        print(json.dumps(summary))
        print("error: a side failed; see above", file=sys.stderr)
        return 1
    o, p = results[best["ours"]], results[best["hf"]]
    summary.update(
        loss_ours=o["loss"],
        loss_ours_w1=o["loss_w1"],
        loss_hf=p["loss"],
        targets_ours=o["targets"],
        targets_hf=p["targets"],
        tokens_per_s_ratio=o["tokens_per_s"] / p["tokens_per_s"],
        peak_ratio=o["peak_gb"] / p["peak_gb"],
        best_ours=best["ours"],
        best_hf=best["hf"],
    )
    diff = abs(o["loss_w1"] - p["loss"])
    print(
        f"first-step loss: ours {o['loss']:.6f} (vision weight {cfg.loss.vision_weight}) | ours "
        f"{o['loss_w1']:.6f} (vision weight 1) | HF {p['loss']:.6f} | |ours(1) - HF| = {diff:.2e}"
    )
    print(
        f"supervised targets in {args.warmup + args.steps} steps: ours {o['targets']:,}, HF {p['targets']:,}"
    )
    print(
        f"ours ({best['ours']}) vs HF ({best['hf']}): useful tokens/s {summary['tokens_per_s_ratio']:.2f}x, "
        f"peak memory {summary['peak_ratio']:.2f}x"
    )
    print(json.dumps(summary))
    problems = [f"loss differs by {diff:.2e} > {LOSS_TOL}" for _ in [0] if diff > LOSS_TOL]
    problems += (
        [f"targets differ: ours {o['targets']}, HF {p['targets']}"] if o["targets"] != p["targets"] else []
    )
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
