"""Triton per-token linear cross-entropy: the ``impl="triton"`` path of :mod:`.token_ce`.

Reuses the weighted loss's kernels (:mod:`.triton_ce`): ``_lse_kernel`` gives each counted row's
max / sum-exp / target logit, so ``CE_i = lse_i - logit_{y_i}``; ``_grad_kernel`` with per-row
coefficients ``coef_i = onehot_i = g_i`` (the upstream gradient of ``CE_i``) gives
``g_i * (softmax_i - onehot_i)`` tile by tile. Nothing of size [*, V] is written to memory.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton

from .triton_ce import INTERPRETED, TritonCEConfig, _dot_options, _grad_kernel, row_lse

__all__ = ["triton_linear_token_ce"]


class TritonLinearTokenCE(torch.autograd.Function):
    """autograd.Function; use :func:`emu3_train.kernels.token_ce.linear_token_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, tp_group, ignore_index, cfg):
        device = hidden.device
        v_local = weight.shape[0]
        rows = (labels != ignore_index).nonzero().squeeze(1)
        m = rows.numel()
        local_target = (labels.index_select(0, rows) - vocab_start).to(torch.int64)
        local_target = local_target.masked_fill((local_target < 0) | (local_target >= v_local), -1)
        ce = torch.zeros(labels.shape[0], dtype=torch.float32, device=device)
        lse = torch.zeros(m, dtype=torch.float32, device=device)
        if m:
            lse, target_logit = row_lse(hidden, weight, rows, local_target, tp_group, cfg)
            ce.index_copy_(0, rows, lse - target_logit)
        ctx.save_for_backward(hidden, weight, rows, local_target, lse)
        ctx.meta = (tp_group, cfg)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, rows, local_target, lse = ctx.saved_tensors
        tp_group, cfg = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        m = rows.numel()
        v_local, h_size = weight.shape
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if m and (need_h or need_w):
            g = grad_ce.float().index_select(0, rows).contiguous()
            grid = (triton.cdiv(m, cfg.block_n) * triton.cdiv(v_local, cfg.block_v),)
            _grad_kernel[grid](
                hidden, weight, rows, local_target, lse, g, g,
                grad_h if need_h else lse, grad_w if need_w else lse,
                m, v_local, h_size, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                h_size, h_size,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n,
                COMPUTE_DH=need_h, COMPUTE_DW=need_w, **_dot_options(hidden.dtype, cfg),
            )
        if need_h and tp_group is not None:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
        return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None,
                None, None, None, None, None)


def triton_linear_token_ce(hidden, weight, labels, *, vocab_start=0, tp_group=None, ignore_index=-100,
                           config: TritonCEConfig | None = None) -> torch.Tensor:
    """Per-token CE fp32 [N] by the Triton kernels; inputs assumed validated (see token_ce)."""
    if hidden.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the Triton cross-entropy kernels need CUDA tensors (got {hidden.device}) "
                           "or TRITON_INTERPRET=1 set before emu3_train.kernels.triton_ce is imported")
    cfg = config or TritonCEConfig.default(hidden.device, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return TritonLinearTokenCE.apply(hidden, weight, labels, int(vocab_start), tp_group,
                                         int(ignore_index), cfg)
