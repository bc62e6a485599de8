"""Process groups as one DeviceMesh ("dp", "cp", "tp"), tp fastest (Megatron's rank order).

gloo on CPU, NCCL on GPU; the process-group timeout comes from ``parallel.timeout_s`` so a hung
collective fails with an error instead of waiting 30 minutes. Nothing here is module state: the
mesh is returned and passed to whoever needs a group.

    torchrun --nproc-per-node 4 -m emu3_train.train parallel.tp=2 ...
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from emu3_train.parallel.dims import ParallelDims


def init_distributed(device_type: str, timeout_s: int) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR...); (rank, world).

    Without torchrun's environment this is a single process and no group is created.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The ("dp", "cp", "tp") mesh, plus the flattened "dp_cp" dimension (gradient/loss reduction).

    None for a single process (every pass is then a no-op).
    """
    if dims.world_size == 1:
        return None
    mesh = init_device_mesh(device_type, (dims.dp, dims.cp, dims.tp), mesh_dim_names=("dp", "cp", "tp"))
    mesh["dp", "cp"]._flatten("dp_cp")
    return mesh


def named_collective(what: str, fn, *args, **kwargs):
    """Run a collective; on failure (e.g. the process-group timeout) say which one and why."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"collective {what} failed — a peer rank is dead or hung "
                           f"(see its log; timeout parallel.timeout_s): {e}") from e
