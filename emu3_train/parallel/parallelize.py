"""Apply the parallelism passes to a plain model, in one place and one order (torchtitan style):

    tensor + sequence parallel (mesh["tp"])  ->  context parallel (mesh["cp"])
    ->  activation recompute  ->  torch.compile per block (trainer.compile)  ->  FSDP2 (mesh["dp_cp"])

The passes run on the model as built on the meta device (no memory), then the trainer allocates
and initializes only this rank's shards (``model/init.py``). Recompute wraps each block and compile
wraps the recomputed block. Parameter names never change (HF names), so DCP checkpoints reshard
across any (dp, cp, tp). The returned :class:`~emu3_train.parallel.step_plan.StepPlan` is all the
step knows of the layout.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from emu3_train.config import TrainConfig
from emu3_train.model.decoder import apply_compile, apply_recompute
from emu3_train.parallel.data_parallel import apply_fsdp
from emu3_train.parallel.dims import ParallelDims
from emu3_train.parallel.mesh import flat_dp_cp
from emu3_train.parallel.step_plan import StepPlan, build_step_plan


def parallelize(model, dims: ParallelDims, mesh: DeviceMesh | None, cfg: TrainConfig,
                device: torch.device | None = None, rank: int = 0) -> StepPlan:
    """Apply every pass the layout needs, in order, in place; returns this rank's step plan.

    ``model`` may live on the meta device (the trainer builds it there and materializes the local
    shards afterwards, ``model/init.py``). ``device`` is where the step's tensors go (default: the
    mesh's device type, or CPU); ``rank`` is this process's global rank.
    """
    if dims.tp > 1:
        from emu3_train.parallel.tensor_parallel import apply_tp

        apply_tp(model, mesh["tp"], sequence_parallel=True)
    if dims.cp > 1:
        from emu3_train.parallel.context_parallel import apply_cp

        apply_cp(model, mesh["cp"], cfg.parallel.cp_impl)
    apply_recompute(model, cfg.model.recompute)
    if cfg.trainer.compile:
        apply_compile(model)
    dp_cp = flat_dp_cp(mesh) if mesh is not None else None
    if dims.dp * dims.cp > 1:
        apply_fsdp(model, dp_cp, bf16=cfg.trainer.precision == "bf16")
    if device is None:
        device = torch.device(mesh.device_type if mesh is not None else "cpu")
    return build_step_plan(dims, mesh, dp_cp, device, rank)
