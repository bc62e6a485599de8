"""Process groups as one DeviceMesh ("dp", "cp", "tp"), tp fastest (Megatron's rank order).

On CPU the process group is gloo. On GPU it has both backends, ``cpu:gloo,cuda:nccl``: the step's
collectives run on device tensors through NCCL, and whatever host-side bookkeeping needs a
collective (DCP's planning, a CPU tensor a library reduces) stays legal through gloo instead of
failing with "No backend type associated with device type cpu". The process-group timeout comes
from ``parallel.timeout_s`` so a hung collective fails with an error instead of waiting 30 minutes.
Nothing here is module state: the mesh is returned and passed to whoever needs a group.

    torchrun --nproc-per-node 4 -m emu3_train.train parallel.tp=2 ...
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from emu3_train.parallel.dims import ParallelDims


def process_group_backend(device_type: str) -> str:
    """The backend string of the default process group for ``device_type`` (module docstring)."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str, timeout_s: int) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR...); (rank, world).

    Without torchrun's environment this is a single process and no group is created. Under
    torchrun a group is created even for one process (``TORCHELASTIC_RUN_ID`` is set): on one GPU
    that sends the step's collectives through a real NCCL group (``benchmarks/gpu_check.sh``).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if (world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ) or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend, extra = process_group_backend(device_type), {}
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        extra["device_id"] = torch.device("cuda", local)  # NCCL binds this GPU at init, not lazily
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **extra)
    return dist.get_rank(), dist.get_world_size()


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh | None:
    """The ("dp", "cp", "tp") mesh (its flattened "dp_cp" dimension: :func:`flat_dp_cp`).

    None for a single process without a process group (every pass is then a no-op).
    """
    if dims.world_size == 1 and not dist.is_initialized():
        return None
    mesh = init_device_mesh(device_type, (dims.dp, dims.cp, dims.tp), mesh_dim_names=("dp", "cp", "tp"))
    flat_dp_cp(mesh)
    return mesh


def flat_dp_cp(mesh: DeviceMesh) -> DeviceMesh:
    """The flattened ("dp", "cp") mesh, "dp_cp" (FSDP2's shards, the loss sums' reduction). Kept by
    the caller: torch deprecates slicing a flattened dimension out of the root mesh."""
    return mesh["dp", "cp"]._flatten("dp_cp")


def named_collective(what: str, fn, *args, **kwargs):
    """Run a collective; on failure (e.g. the process-group timeout) say which one and why."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise RuntimeError(f"collective {what} failed — a peer rank is dead or hung "
                           f"(see its log; timeout parallel.timeout_s): {e}") from e
