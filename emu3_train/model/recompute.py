"""Selective activation recompute (``model.recompute=selective``), torchtitan style.

Each decoder block runs under ``torch.utils.checkpoint`` with a policy that keeps the expensive
outputs — matmuls (q/k/v/o, gate/up/down projections), the attention kernel, tensor-parallel
reduce-scatters — and recomputes the cheap pointwise ops (norms, RoPE, SiLU, residual adds) in
backward. Memory per block is then roughly the projections' outputs instead of every
intermediate; compute overhead is a few elementwise kernels.

Randomness: an op that is saved is not rerun, so it does not advance its generator during
recompute. Out-of-place random ops (CUDA's fused dropout, attention kernels with dropout) are
therefore all saved, and in-place ones (CPU's ``bernoulli_`` dropout masks) all recomputed:
per device, recompute replays the forward's draws exactly and dropout masks match.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _resolve(*names: str) -> frozenset:
    """Ops by dotted name under ``torch.ops``; names this torch build lacks are skipped."""
    found = []
    for name in names:
        obj = torch.ops
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            continue
        found.append(obj)
    return frozenset(found)


SAVED_OPS = _resolve(
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._flash_attention_forward.default", "aten._efficient_attention_forward.default",
    "torch_attn._varlen_attn.default",
    "higher_order.flex_attention",
    "higher_order.inductor_compiled_code",  # the compiled flex_attention (flex.compiled_flex_attention)
    "_c10d_functional.reduce_scatter_tensor.default",
)


def save_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    """MUST_SAVE matmuls, attention, reduce-scatters and out-of-place random ops; recompute the rest."""
    if func in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    if (isinstance(func, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in func.tags
            and not func._schema.is_mutable):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


selective_checkpoint_context = functools.partial(create_selective_checkpoint_contexts, save_policy)
"""``context_fn`` for ``torch.utils.checkpoint.checkpoint``: a fresh cache per call."""
