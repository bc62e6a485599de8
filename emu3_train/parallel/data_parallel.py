"""Sharded data parallelism: FSDP2 (``fully_shard``) per decoder block and on the root.

Parameters, gradients and optimizer state are sharded over the flattened ``dp_cp`` mesh (context
parallel ranks hold different tokens of the same rows, so their gradients are reduced too).
FSDP2 *averages* gradients over that group; the trainer therefore scales each rank's loss by the
group size (``StepPlan.loss_scale``), so that the reduced gradient is the gradient of
Σ loss_weight·CE / Σ loss_weight over the whole global batch, as on one process.

On GPU the MixedPrecisionPolicy computes in bf16 and reduces in fp32 (``trainer.precision=bf16``).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def apply_fsdp(model, mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool = True) -> None:
    """Shard every decoder block, then the root (embedding, final norm, output head)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters unsharded after forward (FSDP2's default for the root): the
    # loss reads ``lm_head.weight`` after ``model(...)`` returns, outside any module forward.
    fully_shard(model, mesh=mesh, mp_policy=policy)
