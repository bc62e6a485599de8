"""Metrics: one console summary line per log interval, and wandb (offline by default).

Keys follow DESIGN.md §4 (``train/loss``, ``train/loss_text``, ``train/loss_vision``, ``val/loss``,
``perf/tokens_per_s``, ``perf/tokens_per_s_per_gpu``, ``perf/mfu``, ``perf/mem_gb``, ``data/fill``,
...). With ``wandb.mode=offline`` (default) wandb writes to ``<run_dir>/wandb`` and opens no
connection; ``disabled`` logs to the console only; ``online`` syncs
(the ``WANDB_MODE`` environment variable, e.g. ``WANDB_MODE=online``, overrides ``wandb.mode``).

MFU counts model FLOPs (:mod:`emu3_train.flops`: 6·N_dense per token plus causal attention over
the actual documents of each packed row) against the GPU's peak (``trainer.peak_tflops``, or the
data-sheet value looked up from the device name). Each data-parallel replica's rows are computed by
its cp·tp GPUs, so FLOPs per GPU = the replica's FLOPs / (cp·tp).
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path

import torch

from emu3_train.config import ModelConfig, WandbConfig
from emu3_train.flops import peak_flops, step_flops


def format_summary(step: int, max_steps: int, m: dict) -> str:
    """The one-line summary, e.g. ``step 40/300 | loss 2.3142 | text 1.9021 | vision 2.5114 | ...``,
    ending ``| skipped 3`` once the run has skipped documents (``data/skipped``, so far)."""
    def f(key, fmt):
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    skipped = m.get("data/skipped") or 0
    return (f"step {step}/{max_steps} | loss {f('train/loss', '.4f')} | text {f('train/loss_text', '.4f')}"
            f" | vision {f('train/loss_vision', '.4f')} | lr {f('train/lr', '.2e')}"
            f" | gnorm {f('train/grad_norm', '.2f')} | tok/s {f('perf/tokens_per_s', ',.0f')}"
            f" | mfu {f('perf/mfu', '.1%')} | mem {f('perf/mem_gb', '.1f')}GB | fill {f('data/fill', '.2f')}"
            + (f" | skipped {skipped:,.0f}" if skipped > 0 else ""))


def format_dpo(m: dict) -> str:
    """The DPO line after each summary: ``dpo | loss 0.6123 | margin 0.41 | acc 0.72 | chosen -31.2 |
    rejected -35.9 | ntp 1.2345`` (per-pair means over the interval; log-probs in nats)."""
    def f(key, fmt):
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return (f"dpo | loss {f('dpo/loss', '.4f')} | margin {f('dpo/reward_margin', '.3f')} | acc "
            f"{f('dpo/accuracy', '.2f')} | chosen {f('dpo/chosen_logp', '.2f')} | rejected "
            f"{f('dpo/rejected_logp', '.2f')} | ntp {f('dpo/ntp_loss', '.4f')}")


def format_skipped(total: float, stats: dict, step: int) -> str:
    """The end-of-run line on skipped documents, e.g. ``data: 3 documents skipped (oversize 1,
    unreadable 2) in this run, up to step 40``; "" when none were. ``total``: the run's skips with
    bad samples summed over dp (the trainer's ``data/skipped``); ``stats``: ``PackedLoader.stats()``,
    whose oversize and left-out-shard counts are the same on every rank."""
    if not total > 0:
        return ""
    oversize, shards = stats.get("skipped_oversize", 0), stats.get("skipped_shard_docs", 0)
    parts = {"oversize": oversize, "unreadable": total - oversize - shards, "in shards left out": shards}
    detail = ", ".join(f"{name} {n:,.0f}" for name, n in parts.items() if n > 0)
    documents = "document" if total == 1 else "documents"
    return f"data: {total:,.0f} {documents} skipped ({detail}) in this run, up to step {step}"


def doc_lengths(batch: dict, pad_id: int) -> list[int]:
    """Token counts of the document pieces of a packed batch (padding segments left out)."""
    cu = batch["cu_seqlens"].tolist()
    flat = batch["tokens"].reshape(-1)
    starts = torch.as_tensor(cu[:-1], dtype=torch.long)
    is_doc = (flat[starts] != pad_id).tolist() if len(starts) else []
    return [b - a for a, b, keep in zip(cu[:-1], cu[1:], is_doc) if keep]


STEP_KEYS = ("train/loss", "train/loss_text", "train/loss_vision", "train/grad_norm", "finite", "stop")


class StepWindow:
    """The steps since the last read, their statistics kept as device tensors until :meth:`read`
    copies them to the host in one transfer (the only host sync of a logging interval)."""

    def __init__(self):
        self._device: list[dict] = []
        self._host: list[dict] = []

    def __len__(self) -> int:
        return len(self._host)

    def add(self, device_stats: dict, host_stats: dict) -> None:
        """One step: ``device_stats`` holds :data:`STEP_KEYS` (0-dim tensors), ``host_stats`` plain
        numbers (step, tokens, pad, docs, rows, lr)."""
        extra = sorted(k for k in device_stats if k.startswith("dpo/"))  # loss.objective=dpo
        self._device.append({k: device_stats[k] for k in (*STEP_KEYS, *extra)})
        self._host.append(host_stats)

    def read(self) -> list[dict]:
        """Every step's statistics as floats (one device-to-host copy), and the window emptied."""
        if not self._host:
            return []
        keys = list(self._device[0])  # the same keys at every step of a run
        stacked = torch.stack([torch.stack([d[k].detach().double().reshape(()) for k in keys])
                               for d in self._device]).tolist()
        steps = [{**h, **dict(zip(keys, values))} for h, values in zip(self._host, stacked)]
        self._device, self._host = [], []
        return steps


class SpikeDetector:
    """Warns when a loss exceeds ``factor`` x the running mean (EMA 0.9) of the finite losses before."""

    def __init__(self, factor: float):
        self.factor, self.mean = factor, None

    def check(self, loss: float) -> str | None:
        """The warning for ``loss`` (None if it is no spike), then update the running mean."""
        if not math.isfinite(loss):
            return None
        spike = bool(self.factor and self.mean is not None and loss > self.factor * self.mean)
        message = f"loss spike {loss:.4f} > {self.factor} x running mean {self.mean:.4f}" if spike else None
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
        return message


def window_means(steps: list[dict]) -> dict:
    """Mean of each loss and the grad norm over the steps that have it (a class absent from a
    step, or a skipped step, reports NaN)."""
    out = {}
    dpo = sorted({k for m in steps for k in m if k.startswith("dpo/")})  # loss.objective=dpo
    for k in ("train/loss", "train/loss_text", "train/loss_vision", "train/grad_norm", *dpo):
        values = [m[k] for m in steps if math.isfinite(m[k])]
        out[k] = sum(values) / len(values) if values else float("nan")
    return out


def interval_metrics(steps: list[dict], seconds: float, dp: int, world_size: int) -> dict:
    """The summary of a log interval's steps (``StepWindow.read`` dicts) taking ``seconds``: mean
    losses and grad norm, last lr, skipped steps, throughput (``dp`` replicas on ``world_size``
    ranks; ``tokens`` counts one replica's rows) and packing fill."""
    tokens = sum(m["tokens"] for m in steps)
    return {**window_means(steps), "train/lr": steps[-1]["train/lr"],
            "train/skipped_steps": sum(m["train/skipped_step"] for m in steps),
            "perf/tokens_per_s": tokens * dp / seconds,
            "perf/tokens_per_s_per_gpu": tokens * dp / world_size / seconds,
            "data/fill": 1.0 - sum(m["pad"] for m in steps) / max(1, tokens),
            "data/docs_per_row": sum(m["docs"] for m in steps) / max(1, sum(m["rows"] for m in steps))}


class PerfMeter:
    """Model FLOPs and peak memory over a log interval -> ``perf/tflops_per_gpu``, ``perf/mfu``,
    ``perf/mem_gb`` (peak CUDA memory allocated in the interval, or the process's peak RSS on CPU)."""

    def __init__(self, model: ModelConfig, vocab_size: int, gpus_per_replica: int, device: torch.device,
                 precision: str, peak_tflops: float = 0.0):
        self.model, self.vocab_size, self.gpus = model, vocab_size, gpus_per_replica
        self.device = device
        if peak_tflops:
            self.peak = peak_tflops * 1e12
        elif device.type == "cuda":
            self.peak = peak_flops(torch.cuda.get_device_name(device), precision)
        else:
            self.peak = None  # no data-sheet peak for a CPU: set trainer.peak_tflops to get an MFU
        self.flops = 0.0

    def add(self, batches: list[dict], pad_id: int) -> None:
        """Count one step's micro-batches (this replica's rows, before any CP sharding)."""
        for b in batches:
            self.flops += step_flops(self.model, self.vocab_size, doc_lengths(b, pad_id))

    def summarize(self, seconds: float) -> dict:
        per_gpu = self.flops / self.gpus / max(seconds, 1e-9)
        out = {"perf/tflops_per_gpu": per_gpu / 1e12,
               "perf/mfu": per_gpu / self.peak if self.peak else float("nan"),
               "perf/mem_gb": self._memory_gb()}
        self.flops = 0.0
        return out

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


class MetricLogger:
    """Sends metric dicts to wandb (rank 0 only) and keeps the last values for the summary."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, run_name: str, config: dict, enabled: bool):
        self.run = None
        mode = os.environ.get("WANDB_MODE") or cfg.mode  # the environment wins, as wandb users expect
        if not enabled or mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=run_name, dir=str(run_dir),
                              mode=mode, config=config, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, caption: str, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
