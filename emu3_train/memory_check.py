"""Refuse, before any tensor is allocated, a model whose training state cannot fit on this rank.

The planner's memory model (``emu3_train/planner_memory.py``) gives this rank's bytes by part; the
check compares only the part no layout trick removes at a given (dp, cp, tp) — fp32 weights,
gradients and the two AdamW moments of this rank's shard (16 B per parameter) — against the
memory this rank can have, so it never refuses a run that could fit (activations, the CUDA
context and fragmentation come on top):

- CUDA: the device's total memory (``torch.cuda.mem_get_info``);
- CPU: the host's ``MemAvailable`` (``/proc/meminfo``) shared by the ranks on this host
  (``LOCAL_WORLD_SIZE``, default 1); no check where ``/proc/meminfo`` does not exist.

Without the check, ``python -m emu3_train.train experiment=demo model=emu3_8b`` on a 24 GiB host is
killed by the kernel (exit 137) with nothing printed; with it, one line names the planner command
that finds a layout which fits, and the CLI exits 2.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch

from emu3_train.config import ConfigError, TrainConfig
from emu3_train.flops import peak_flops
from emu3_train.parallel.dims import ParallelDims
from emu3_train.planner_memory import GIB, estimate_memory, gpu_memory_gib

MEMINFO = Path("/proc/meminfo")


def host_available_bytes() -> int | None:
    """``MemAvailable`` of this host in bytes; None where the kernel does not report it."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def capacity_bytes(device: torch.device) -> tuple[int, str] | None:
    """(bytes this rank can use, where the number comes from), or None when nothing is known."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return total, f"{torch.cuda.get_device_name(device)} total memory"
    if device.type == "cpu":
        available = host_available_bytes()
        if available is None:
            return None
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        share = f" / {ranks} ranks on this host (LOCAL_WORLD_SIZE)" if ranks > 1 else ""
        return available // ranks, f"host MemAvailable{share}"
    return None


def _overrides() -> list[str] | None:
    """This run's command-line overrides (Hydra's task overrides), None outside ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def planner_command(cfg: TrainConfig, device: torch.device, world_size: int,
                    overrides: list[str] | None = None) -> str:
    """The planner call for this run: its overrides, ``--gpus`` and the GPU (or ``--gpu cpu``)."""
    overrides = _overrides() if overrides is None else overrides
    words = ["python -m emu3_train.planner",
             shlex.join(overrides) if overrides is not None else f"model={cfg.model.name} <your overrides>",
             f"--gpus {world_size}"]
    if device.type != "cuda":
        return " ".join([w for w in words if w] + ["--gpu cpu"])
    name = torch.cuda.get_device_name(device)
    words.append(f"--gpu {shlex.quote(name)}")
    if not peak_flops(name):  # a GPU the planner's tables lack: its numbers on the command line
        words.append("--peak-tflops PEAK")
    if not gpu_memory_gib(name):
        words.append(f"--gpu-mem-gib {torch.cuda.mem_get_info(device)[1] / GIB:.1f}")
    return " ".join(w for w in words if w)


def check_fits(cfg: TrainConfig, dims: ParallelDims, vocab_size: int, device: torch.device,
               world_size: int, overrides: list[str] | None = None) -> None:
    """Raise :class:`ConfigError` (one line naming the planner command) when this rank's parameters,
    gradients and optimizer states alone exceed its memory; return silently otherwise.

    ``overrides``: the command line's Hydra overrides for the planner command (default: this
    run's, read from Hydra when called under ``python -m emu3_train.train``).
    """
    capacity = capacity_bytes(device)
    if capacity is None:
        return
    limit, source = capacity
    mem = estimate_memory(cfg, dims, vocab_size, on_gpu=device.type == "cuda")
    if mem.state <= limit:
        return
    raise ConfigError(
        f"model {cfg.model.name} ({mem.params_total / 1e9:.2f} B parameters) cannot fit: its weights, "
        f"gradients and AdamW states alone need {mem.state / GIB:.1f} GiB per rank at dp {dims.dp} x "
        f"cp {dims.cp} x tp {dims.tp}, more than the {limit / GIB:.1f} GiB of {source}; find a layout "
        f"that fits with: {planner_command(cfg, device, world_size, overrides)}")
