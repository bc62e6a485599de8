"""Dry run of a layout at real scale on one CPU: the planner's state estimate against the real shards.

    python -m emu3_train.planner experiment=stage1 model=emu3_8b parallel=nodes --gpus 64 --dry-run

Builds the real model (``Emu3CausalLM``) on the ``meta`` device (no memory, no init), joins a fake
process group of ``world_size`` ranks as rank 0 (``torch.testing``'s ``FakeStore``, collectives do
nothing; torchtitan's fake-backend dry run), builds the real ("dp", "cp", "tp") mesh and applies
the real passes (``parallel.parallelize``: TP+SP, CP, recompute, compile, FSDP2), then makes one
real AdamW step (``optim.build_optimizer``) on zero gradients. Bytes are read from the tensors
this rank holds (a DTensor's ``to_local()``): parameters, their gradients (FSDP2 keeps them in the
parameters' fp32, ``reduce_dtype=float32``) and every optimizer state tensor (the two fp32 Adam
moments and the 4-byte ``step``). Rank 0 holds the largest shard of every uneven split (FSDP2 and
``Shard(0)`` give ``ceil(n / k)`` rows from the first rank on), so its numbers are the per-rank
maximum. Nothing is allocated, no data is read; the emu3_8b layouts take ~10 s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from emu3_train.config import TrainConfig
from emu3_train.parallel.dims import layout_of
from emu3_train.planner_memory import estimate_memory

MIB = 2**20

PARTS = ("params", "param_bytes", "grad_bytes", "optim_bytes")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _nbytes(t: torch.Tensor) -> int:
    local = _local(t)
    return local.numel() * local.element_size()


@dataclass
class DryRun:
    """Rank 0's state after the real passes (``real``) next to ``estimate_memory``'s (``estimate``).

    Both dicts have ``params`` (elements of the parameter shards) and ``param_bytes``,
    ``grad_bytes``, ``optim_bytes``; ``rel_diff`` is (estimate - real) / real per part.
    """

    world_size: int
    layout: dict  # dp, cp, tp
    real: dict
    estimate: dict
    dtensor_params: int  # parameters the passes turned into DTensors
    num_params: int  # parameter tensors of the model
    seconds: float  # build + passes + optimizer step

    @property
    def rel_diff(self) -> dict:
        return {k: (self.estimate[k] - self.real[k]) / self.real[k] if self.real[k] else 0.0 for k in PARTS}

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(rank=0, rel_diff=self.rel_diff)
        return d


def dry_run(cfg: TrainConfig, world_size: int, vocab_size: int) -> DryRun:
    """Apply ``cfg``'s passes to the meta model as rank 0 of ``world_size``; see the module docstring.

    The fake process group is destroyed before returning, also when a pass raises. Refuses to run
    inside a process that already has a process group (it would replace it).
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from emu3_train.model.decoder import Emu3CausalLM
    from emu3_train.optim import build_optimizer
    from emu3_train.parallel.mesh import build_mesh
    from emu3_train.parallel.parallelize import parallelize

    if dist.is_initialized():
        raise RuntimeError("planner --dry-run needs a process without a process group: it creates a "
                           f"fake one of {world_size} ranks (this one has {dist.get_world_size()})")
    dims = layout_of(cfg, world_size)
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        with torch.device("meta"):
            model = Emu3CausalLM(cfg.model, vocab_size)
        mesh = build_mesh(dims, "cpu")
        parallelize(model, dims, mesh, cfg)  # a future return value (the step plan) is not needed
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg.optim)
        for p in params:
            p.grad = torch.zeros_like(p)  # same placement and dtype as the parameter shard
        optimizer.step()
        states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        real = {"params": sum(_local(p).numel() for p in params),
                "param_bytes": sum(_nbytes(p) for p in params),
                "grad_bytes": sum(_nbytes(p.grad) for p in params),
                "optim_bytes": sum(_nbytes(v) for v in states)}
        dtensors, count = sum(isinstance(p, DTensor) for p in params), len(params)
        del optimizer, model, params, states
    finally:
        dist.destroy_process_group()
    seconds = time.perf_counter() - start
    est = estimate_memory(cfg, dims, vocab_size, on_gpu=True)  # the state parts do not depend on it
    estimate = {"params": est.params_per_gpu, "param_bytes": est.weights, "grad_bytes": est.grads,
                "optim_bytes": est.optimizer}
    return DryRun(world_size=world_size, layout={"dp": dims.dp, "cp": dims.cp, "tp": dims.tp},
                  real=real, estimate=estimate, dtensor_params=dtensors,
                  num_params=count, seconds=seconds)


def format_dry_run(d: dict) -> list[str]:
    """Lines of the table's dry-run section (``d`` is :meth:`DryRun.as_dict`)."""
    lay = d["layout"]
    lines = [f"dry run: real passes on meta, fake process group of {d['world_size']} (rank 0 of dp "
             f"{lay['dp']} x cp {lay['cp']} x tp {lay['tp']}), {d['dtensor_params']}/{d['num_params']} "
             f"parameters are DTensors, {d['seconds']:.1f} s",
             f"{'state per GPU (rank 0)':<30}{'real MiB':>10}{'estimate':>10}{'diff':>9}",
             f"{'-' * 59}"]
    for name, key in (("parameters (fp32)", "param_bytes"), ("gradients (fp32)", "grad_bytes"),
                      ("optimizer (AdamW)", "optim_bytes")):
        lines.append(f"{name:<30}{d['real'][key] / MIB:>10.1f}{d['estimate'][key] / MIB:>10.1f}"
                     f"{d['rel_diff'][key]:>+9.3%}")
    lines.append(f"{'parameter elements (M)':<30}{d['real']['params'] / 1e6:>10.3f}"
                 f"{d['estimate']['params'] / 1e6:>10.3f}{d['rel_diff']['params']:>+9.3%}")
    return lines
