"""Run a function on N gloo processes on this CPU and collect each rank's return value.

    from harness import run_distributed
    results = run_distributed(fn, world_size=2, args=(...))   # fn(rank, world_size, *args) -> picklable

Each process gets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and an initialized gloo process group
(timeout 120 s, so a broken test fails instead of hanging). Exceptions are re-raised in the caller
with the failing rank named.
"""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from datetime import timedelta
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        buf = io.BytesIO()  # plain bytes: tensors must not be shared with a process about to exit
        torch.save(fn(rank, world_size, *args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _next_report(queue, procs, deadline: float):
    """The next (rank, status, value) a worker put; fails if a worker died without one (a crash in
    C++ such as a gloo size mismatch) or the deadline passed, instead of waiting forever."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            dead = [f"rank {r} exited with code {p.exitcode} without a result" for r, p in enumerate(procs)
                    if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError("; ".join(dead) + " (see its stderr above)") from None
            if time.monotonic() > deadline:
                raise TimeoutError("distributed test gave no result within its timeout") from None


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 300) -> list:
    """``[fn(0, ...), fn(1, ...), ...]`` computed on ``world_size`` spawned gloo processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    deadline = time.monotonic() + timeout
    for _ in range(world_size):
        rank, status, value = _next_report(queue, procs, deadline)
        if status == "ok":
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
