"""What one rank does with a packed batch under its layout: :class:`StepPlan`, made by ``parallelize``.

The step (``emu3_train/step.py``) knows nothing of tensor, context or data parallelism beyond this
object: how to turn the loader's batch into this rank's device tensors (:meth:`StepPlan.prepare`:
the context-parallel shard plus its global token indices, pinned and copied without a host sync),
where the output head is (:meth:`StepPlan.head`: the plain ``lm_head.weight`` or this tp rank's
vocabulary rows and the tp group), and over which groups the step's sums are reduced.

    plan = parallelize(model, dims, mesh, cfg)
    inputs = plan.prepare(batch)                       # tokens, position_ids, cu_seqlens, ... on device
    hidden = model(**plan.model_inputs(inputs))
    weight, vocab_start, tp_group = plan.head(model)

Collectives of a step that the plan issues (all on the model's device; see ``step.py``):
``all_reduce`` of [loss-weight total, stop flag] over the whole world, and of the loss sums over
``dp_cp``. Everything else (FSDP2 all-gathers and reduce-scatters, TP and CP collectives, the
gradient-norm all-reduce) belongs to the passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from emu3_train.parallel.mesh import named_collective

MODEL_INPUTS = ("tokens", "position_ids", "cu_seqlens")
TARGETS = ("labels", "loss_weight")
OPTIONAL_TARGETS = ("doc_index",)  # [B, S] keys of preference-pair batches (DPO), sharded like labels


@dataclass(frozen=True)
class StepPlan:
    """How this rank prepares a batch and finds the output head (see the module docstring).

    Attributes:
        device: the model's device; every prepared tensor and every step statistic lives there.
        distributed: whether there is a process group (the world) to reduce over.
        groups: the process groups of the mesh dimensions the step reduces over ("dp", "cp", "dp_cp"),
            absent where that dimension has size 1.
        loss_scale: |dp_cp|, the factor that turns FSDP2's gradient average back into a sum.
        cp, cp_rank: context-parallel size and this rank's index (its two row chunks).
        tp_mesh: the tensor-parallel mesh the head is sharded over, or None.
        owns_rows: whether this rank counts its rows' loss weight in the world-wide total
            (cp rank 0 and tp rank 0 of its replica: the others hold the same rows).
    """

    device: torch.device
    distributed: bool = False
    groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    loss_scale: int = 1
    cp: int = 1
    cp_rank: int = 0
    tp_mesh: DeviceMesh | None = None
    owns_rows: bool = True

    @property
    def model_keys(self) -> tuple[str, ...]:
        return MODEL_INPUTS + (("token_index",) if self.cp > 1 else ())

    def prepare(self, batch: dict) -> dict:
        """This rank's part of a packed batch (``data.batch`` contract) on :attr:`device`:
        ``tokens``, ``position_ids``, ``cu_seqlens`` (+ ``token_index`` under CP), ``labels``,
        ``loss_weight`` (and ``doc_index`` when the batch has one). On CUDA the host tensors are
        pinned first, so the copies are queued without waiting for the device."""
        if self.cp > 1:
            from emu3_train.parallel.context_parallel import shard_batch

            batch = shard_batch(batch, self.cp_rank, self.cp)
        pin = self.device.type == "cuda"
        keys = self.model_keys + TARGETS + tuple(k for k in OPTIONAL_TARGETS if k in batch)
        return {k: (batch[k].pin_memory() if pin else batch[k]).to(self.device, non_blocking=pin)
                for k in keys}

    def model_inputs(self, prepared: dict) -> dict:
        """The model's keyword arguments out of :meth:`prepare`'s result."""
        return {k: prepared[k] for k in self.model_keys}

    def head(self, model) -> tuple[torch.Tensor, int, dist.ProcessGroup | None]:
        """(output weight [V_local, H], vocab_start, tp_group) for the loss kernel; call it after
        the forward (under FSDP2 the head is whole only between forward and backward)."""
        if self.tp_mesh is None:
            return model.lm_head.weight, 0, None
        from emu3_train.parallel.tensor_parallel import output_shard

        return output_shard(model, self.tp_mesh)

    def all_reduce(self, t: torch.Tensor, dim: str | None, what: str) -> torch.Tensor:
        """Sum ``t`` in place over the mesh dimension ``dim`` ("dp", "cp" or "dp_cp"; None: the world)."""
        if dim is None and self.distributed:
            named_collective(f"all_reduce({what}) over the world", dist.all_reduce, t)
        elif dim in self.groups:
            named_collective(f"all_reduce({what}) over '{dim}'", dist.all_reduce, t, group=self.groups[dim])
        return t


def build_step_plan(dims, mesh: DeviceMesh | None, dp_cp: DeviceMesh | None, device: torch.device,
                    rank: int) -> StepPlan:
    """The plan of global rank ``rank`` on ``mesh`` (with its flattened ``dp_cp`` mesh)."""
    if mesh is None:
        return StepPlan(device=device)
    _, cp_rank, tp_rank = dims.coords(rank)
    groups = {dim: m.get_group() for dim, m in (("dp", mesh["dp"]), ("cp", mesh["cp"]), ("dp_cp", dp_cp))
              if m.size() > 1}
    return StepPlan(device=device, distributed=True, groups=groups, loss_scale=dp_cp.size(), cp=dims.cp,
                    cp_rank=cp_rank, tp_mesh=mesh["tp"] if dims.tp > 1 else None,
                    owns_rows=cp_rank == 0 and tp_rank == 0)
