"""Memory and throughput planner: will this recipe fit on these GPUs, and how fast will it train?

    python -m emu3_train.planner +experiment=stage1 model=emu3_8b parallel.tp=4 --gpus 64 --gpu h100
    python -m emu3_train.planner experiment=stage2 model=emu3_8b parallel.cp=8 --gpus 64 --gpu h200 --json
    python -m emu3_train.planner experiment=demo --gpus 1 --gpu cpu
    python -m emu3_train.planner experiment=stage1 model=emu3_8b parallel=nodes --gpus 64 --dry-run
    python -m emu3_train.planner experiment=stage1 model=emu3_8b --gpus 8 --gpu mi300x \
        --peak-tflops 1307 --gpu-mem-gib 191.5       # a GPU the tables do not list

Takes the same Hydra overrides as ``python -m emu3_train.train``, before, after or between its
flags (``data.path`` and ``checkpoint.init_from`` are not needed), and validates the layout like
training does. Prints parameters, memory per GPU by part (``emu3_train/planner_memory.py`` states
the memory model), whether it fits, and tokens/s/GPU and MFU for an assumed efficiency range.
Exit status: 0 it fits (or no capacity to compare: ``--gpu cpu``), 1 it does not fit, 2 a config
or command-line error (one line naming the field, or the known GPUs for an unknown ``--gpu``).

``--dry-run`` (``emu3_train/planner_dryrun.py``) also builds the real model on ``meta``, applies
the real parallelism passes on a fake process group of ``--gpus`` ranks and an AdamW step, and
prints rank 0's real parameter / gradient / optimizer bytes next to the estimate (``--json``:
the ``dry_run`` key). About 10 s for emu3_8b on 2 CPU cores, any world size; no weights are allocated.

Throughput: tokens/s/GPU = peak FLOP/s × efficiency / training FLOPs per token, with FLOPs from
``emu3_train/flops.py`` (6·N_dense + causal attention). The attention term assumes documents of
``--doc-len`` tokens (default: one document per row, the most attention a row can cost, so the
estimate is a lower bound for packed rows of shorter documents). The efficiency (MFU) range is an
assumption (``--efficiency LOW,HIGH``); the default 0.30-0.40 brackets torchtitan's FSDP2 without
torch.compile on Llama-3.1-8B / 8 H100 (5,762 tokens/s/GPU = 34% MFU by its own count,
pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md); Megatron-Core reports 41-47% with
fused TE kernels. Validation against published figures: tests/unit/test_planner.py.
"""

from __future__ import annotations

import argparse
import json
import sys

from emu3_train.config import ConfigError, TrainConfig, validate
from emu3_train.flops import PEAK_FLOPS, peak_flops, step_flops
from emu3_train.parallel.dims import layout_of
from emu3_train.planner_memory import (
    CUDA_OVERHEAD_GIB,
    GIB,
    GPU_MEMORY_GIB,
    Memory,
    estimate_memory,
    gpu_memory_gib,
)

DEFAULT_EFFICIENCY = (0.30, 0.40)
_DEFAULTS_GROUPS = ("model", "data", "parallel", "experiment")  # train.yaml's defaults list


def tokens_per_s_per_gpu(cfg: TrainConfig, vocab_size: int, peak: float, efficiency: float,
                         doc_len: int | None = None) -> float:
    """peak·efficiency / (training FLOPs per token), documents of ``doc_len`` (default: whole rows)."""
    seq = cfg.data.seq_len
    doc = min(doc_len or seq, seq)
    docs = [doc] * (seq // doc) + ([seq % doc] if seq % doc else [])
    return peak * efficiency / (step_flops(cfg.model, vocab_size, docs) / seq)


def known_gpus() -> list[str]:
    """GPU names with both a peak FLOP/s (``flops.py``) and a capacity (``planner_memory.py``)."""
    return sorted(set(PEAK_FLOPS) & set(GPU_MEMORY_GIB))


def check_gpu(gpu: str, peak_tflops: float | None = None, capacity_gib: float | None = None) -> str | None:
    """None if ``gpu`` can be planned for (listed, ``cpu``, or its missing numbers given), else the
    one-line reason naming the known GPUs and the flags that would stand in for the tables."""
    if gpu.lower() == "cpu":
        return None
    missing = [flag for flag, known in (("--peak-tflops", peak_tflops or peak_flops(gpu)),
                                        ("--gpu-mem-gib", capacity_gib or gpu_memory_gib(gpu))) if not known]
    if not missing:
        return None
    return (f"--gpu {gpu!r} is not a known GPU (known: {', '.join(known_gpus())}, cpu); "
            f"for another GPU give {' and '.join(missing)}")


def plan(cfg: TrainConfig, world_size: int, gpu: str, vocab_size: int,
         efficiency: tuple[float, float] = DEFAULT_EFFICIENCY, doc_len: int | None = None,
         peak_tflops: float | None = None, capacity_gib: float | None = None) -> dict:
    """The whole estimate as a JSON-able dict (what ``--json`` prints).

    ``peak_tflops`` (dense, at ``trainer.precision``) and ``capacity_gib`` replace the tables'
    numbers for ``gpu`` (needed for a GPU they do not list).
    """
    validate(cfg, world_size, vocab_size)
    dims = layout_of(cfg, world_size)
    on_gpu = gpu.lower() != "cpu"
    mem: Memory = estimate_memory(cfg, dims, vocab_size, on_gpu)
    precision = cfg.trainer.precision
    peak = (peak_tflops * 1e12 if peak_tflops else peak_flops(gpu, precision)) if on_gpu else None
    capacity = (capacity_gib or gpu_memory_gib(gpu)) if on_gpu else None
    seq = cfg.data.seq_len
    doc = min(doc_len or seq, seq)
    result = {
        "model": cfg.model.name, "gpu": gpu, "gpus": world_size,
        "layout": {"dp": dims.dp, "cp": dims.cp, "tp": dims.tp,
                   "grad_accum": dims.grad_accum_steps(cfg.data.global_batch_size,
                                                       cfg.data.micro_batch_size)},
        "seq_len": seq, "micro_batch_size": cfg.data.micro_batch_size,
        "global_batch_size": cfg.data.global_batch_size, "precision": precision,
        "recompute": cfg.model.recompute, "attn_impl": cfg.model.attn_impl,
        "attention_kernel": mem.attention_kernel, "vocab_size": vocab_size,
        "memory_bytes": mem.as_dict(), "memory_gib": mem.total / GIB,
        "capacity_gib": capacity, "fits": None if capacity is None else mem.total / GIB <= capacity,
        "doc_len": doc, "efficiency": list(efficiency),
        "flops_per_token": step_flops(cfg.model, vocab_size, [doc] * (seq // doc)) / (seq // doc * doc),
        "peak_flops": peak, "tokens_per_s_per_gpu": None, "step_time_s": None,
    }
    if peak:
        tps = [tokens_per_s_per_gpu(cfg, vocab_size, peak, e, doc_len) for e in efficiency]
        step_tokens = cfg.data.global_batch_size * seq
        result["tokens_per_s_per_gpu"] = tps
        result["step_time_s"] = [step_tokens / (x * world_size) for x in reversed(tps)]
    return result


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_table(r: dict) -> str:
    """The human-readable report: one line per memory part, the verdict, throughput, assumptions."""
    m, lay = r["memory_bytes"], r["layout"]
    lines = [
        f"{r['model']} on {r['gpus']} x {r['gpu']}: dp {lay['dp']} x cp {lay['cp']} x tp {lay['tp']}, "
        f"{lay['grad_accum']} micro-batches of {r['micro_batch_size']} x {r['seq_len']} tokens per rank "
        f"per step, {r['precision']}, recompute {r['recompute']}, attention {r['attn_impl']} "
        f"({r['attention_kernel']} kernel)",
        f"parameters: {m['params_total'] / 1e9:.3f} B total, {m['params_per_gpu'] / 1e6:.1f} M per GPU "
        f"(vocab {r['vocab_size']:,})",
        "",
        f"{'memory per GPU':<44}{'GiB':>8}",
        f"{'-' * 52}",
    ]
    rows = [
        ("weights (fp32 shard)", m["weights"]), ("gradients (fp32 shard)", m["grads"]),
        ("optimizer (AdamW, 2 x fp32 shard)", m["optimizer"]),
        ("unsharded / cast weights (FSDP2, autocast)", m["unsharded_weights"]),
        ("activations saved for backward", m["activations"]),
        ("attention mask (sdpa core)", m["attention_mask"]),
        ("loss (fused linear-CE) saved", m["loss_saved"]),
        ("transient (loss / backward recompute)", m["transient"]),
        ("CUDA context + NCCL + workspaces", m["overhead"]),
    ]
    lines += [f"{name:<44}{_gib(value)}" for name, value in rows]
    lines += [f"{'-' * 52}", f"{'total (estimated peak)':<44}{_gib(m['total'])}"]
    if r["capacity_gib"] is not None:
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        lines.append(f"{r['gpu']} capacity {r['capacity_gib']:.1f} GiB: {verdict} "
                     f"({r['capacity_gib'] - r['memory_gib']:+.1f} GiB headroom)")
    if r["attention_kernel"] == "dense-bias":
        lines.append("note: the sdpa core feeds a dense [seq, seq] document mask (O(seq^2) per layer); "
                     "attn_impl=flex|varlen (model.attention_dropout=0) avoid it")
    lines.append("")
    gflops = r["flops_per_token"] / 1e9
    if r.get("dry_run"):
        from emu3_train.planner_dryrun import format_dry_run

        lines += format_dry_run(r["dry_run"]) + [""]
    if r["tokens_per_s_per_gpu"]:
        lo, hi = r["tokens_per_s_per_gpu"]
        e_lo, e_hi = r["efficiency"]
        t_hi, t_lo = r["step_time_s"]
        peak = r["peak_flops"] / 1e12
        lines.append(f"throughput: {lo:,.0f} - {hi:,.0f} tokens/s/GPU at MFU {e_lo:.0%} - {e_hi:.0%} "
                     f"(peak {peak:.0f} TFLOP/s {r['precision']}, {gflops:.1f} GFLOP/token); "
                     f"step {t_lo:.2f} - {t_hi:.2f} s")
    else:
        lines.append(f"throughput: no peak FLOP/s known for '{r['gpu']}' ({gflops:.1f} GFLOP/token)")
    lines += [
        "",
        "assumptions: FSDP2 over dp x cp, 16 B/param (fp32 weights, grads, 2 Adam moments); "
        "TP shards blocks and the vocab; sequence parallel divides norm/residual tensors by tp;",
        f"CP divides rows by cp (allgather keeps full-row K/V); fused CE (<= 64 MiB logits chunk); "
        f"{CUDA_OVERHEAD_GIB:.0f} GiB fixed CUDA overhead, fragmentation not modelled;",
        f"attention FLOPs for {r['doc_len']:,}-token documents"
        + (" (one per row: an upper bound; --doc-len for packed rows)" if r["doc_len"] == r["seq_len"]
           else "") + "; the MFU range is assumed (--efficiency).",
    ]
    return "\n".join(lines)


def _compose(overrides: list[str]) -> TrainConfig:
    from emu3_train.recipes import compose

    fixed = []
    for o in overrides:
        key = o.split("=", 1)[0]
        # "+experiment=stage1" adds to a group already in train.yaml's defaults: same as experiment=
        fixed.append(o[1:] if o.startswith("+") and key[1:] in _DEFAULTS_GROUPS else o)
    # fields training needs and the planner never reads (stage 2 requires init_from)
    for key in ("data.path", "checkpoint.init_from"):
        if not any(o.split("=", 1)[0].lstrip("+") == key for o in fixed):
            fixed.append(f"{key}=/unused-by-the-planner")
    return compose(fixed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.planner",
        description="Memory per GPU and throughput of a training recipe; takes train.py's Hydra overrides.",
        epilog="example: python -m emu3_train.planner +experiment=stage1 model=emu3_8b parallel.tp=4 "
               "--gpus 64 --gpu h100")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=stage1 model=emu3_8b")
    parser.add_argument("--gpus", type=int, default=1, help="world size (processes / GPUs)")
    parser.add_argument("--gpu", default="h100",
                        help=f"{' | '.join(known_gpus())} | cpu (another name: give --peak-tflops "
                             "and --gpu-mem-gib)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak TFLOP/s of one GPU at trainer.precision (replaces the table's)")
    parser.add_argument("--gpu-mem-gib", type=float, default=None,
                        help="usable memory of one GPU in GiB (replaces the table's)")
    parser.add_argument("--efficiency", default=None,
                        help="assumed MFU range LOW,HIGH (default {},{})".format(*DEFAULT_EFFICIENCY))
    parser.add_argument("--doc-len", type=int, default=None,
                        help="mean document length in tokens for the attention FLOPs (default: seq_len)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--dry-run", action="store_true",
                        help="also apply the real passes to the model on meta, on a fake process group "
                             "of --gpus ranks, and compare rank 0's parameter/gradient/optimizer bytes")
    # overrides and flags in any order; an unknown --flag is still an error (and named alone:
    # argparse would also list the overrides that follow it)
    args, extra = parser.parse_known_intermixed_args(argv)
    unknown = [x for x in extra if x.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += extra
    try:
        eff = DEFAULT_EFFICIENCY
        if args.efficiency:
            parts = [float(x) for x in args.efficiency.split(",")]
            eff = (parts[0], parts[-1])
            if not all(0 < e <= 1 for e in eff):
                raise ValueError
    except ValueError:
        parser.error(f"--efficiency {args.efficiency!r}: expected LOW,HIGH in (0, 1]")
    if args.gpus < 1 or (args.doc_len is not None and args.doc_len < 1):
        parser.error("--gpus and --doc-len must be >= 1")
    if any(x is not None and x <= 0 for x in (args.peak_tflops, args.gpu_mem_gib)):
        parser.error("--peak-tflops and --gpu-mem-gib must be > 0")
    bad_gpu = check_gpu(args.gpu, args.peak_tflops, args.gpu_mem_gib)
    if bad_gpu:
        print(f"error: {bad_gpu}", file=sys.stderr)
        return 2
    try:
        cfg = _compose(args.overrides)
        from emu3_train.vocab import get_vocab

        vocab_size = cfg.model.vocab_size or get_vocab(cfg.data.vocab).size
        result = plan(cfg, args.gpus, args.gpu, vocab_size, eff, args.doc_len,
                      peak_tflops=args.peak_tflops, capacity_gib=args.gpu_mem_gib)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - Hydra's override errors: one line, like train.py
        if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
            raise
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    if args.dry_run:
        from emu3_train.planner_dryrun import dry_run

        result["dry_run"] = dry_run(cfg, args.gpus, vocab_size).as_dict()
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 1 if result["fits"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
