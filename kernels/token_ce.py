"""Fused linear + cross-entropy per token (``reduction='none'``): ``CE_i`` of ``hidden @ weight^T``.

    from emu3_train.kernels.token_ce import linear_token_cross_entropy
    ce = linear_token_cross_entropy(hidden, lm_head.weight, labels)   # fp32 [N], 0 where ignored
    logp = -(ce * mask).sum()                                         # e.g. a document's log-prob
    logp.backward()

The weighted kernels (:mod:`.reference`, :mod:`.triton_ce`) return one scalar and fold its
gradient into the forward pass; a per-token loss needs the upstream gradient of every token
(DPO weighs each document's tokens by its own ``dL/dlogp``), so the gradient work moves to the
backward: the forward computes and keeps only ``lse`` [M] for the counted tokens (M = labels !=
``ignore_index``), the backward recomputes the logits chunk by chunk (reference) or tile by tile
(Triton, the same ``_lse_kernel`` / ``_grad_kernel`` as the weighted loss) and forms
``g_i * (softmax_i - onehot_i)``. No [N, V] logits exist in either pass.

``impl`` is ``loss.impl`` (auto | reference | triton, as :mod:`.fused_linear_ce`); vocab parallel
over ``tp_group`` as there: ``weight`` is the rank's shard of rows starting at ``vocab_start``,
``CE_i`` is the global value on every rank and the returned grad_hidden is the full gradient
(all-reduced over the group here). Precision: fp32 logits, softmax and CE whatever the input dtype;
the gradient matmuls run in the input dtype; ``CE`` is fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .fused_linear_ce import _validate, resolve_impl
from .reference import chunk_rows

__all__ = ["linear_token_cross_entropy"]


class ChunkedLinearTokenCE(torch.autograd.Function):
    """autograd.Function of the chunked PyTorch path; use :func:`linear_token_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, tp_group, ignore_index, chunk_size):
        rows_all = (labels != ignore_index).nonzero().squeeze(1)
        v_local = weight.shape[0]
        chunk = chunk_rows(chunk_size, v_local)
        ce = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
        lse_all = torch.zeros(rows_all.numel(), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows_all.numel(), chunk):
                rows = rows_all[start:start + chunk]
                y, on_rank = _local_target(labels.index_select(0, rows), vocab_start, v_local)
                logits = (hidden.index_select(0, rows) @ weight.t()).float()
                target_logit = torch.where(on_rank, logits.gather(1, y.unsqueeze(1)).squeeze(1), 0.0)
                row_max = logits.amax(dim=1)
                if tp_group is not None:
                    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
                sum_exp = logits.sub_(row_max.unsqueeze(1)).exp_().sum(dim=1)
                if tp_group is not None:
                    packed = torch.stack((sum_exp, target_logit))
                    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
                    sum_exp, target_logit = packed[0], packed[1]
                lse = row_max + sum_exp.log()
                lse_all[start:start + chunk] = lse
                ce.index_copy_(0, rows, lse - target_logit)
                del logits
        ctx.save_for_backward(hidden, weight, labels, rows_all, lse_all)
        ctx.meta = (vocab_start, tp_group, chunk)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        hidden, weight, labels, rows_all, lse_all = ctx.saved_tensors
        vocab_start, tp_group, chunk = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if not (need_h or need_w):
            return None, None, None, None, None, None, None
        v_local = weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows_all.numel(), chunk):
                rows = rows_all[start:start + chunk]
                g = grad_ce.index_select(0, rows).float()
                y, on_rank = _local_target(labels.index_select(0, rows), vocab_start, v_local)
                h = hidden.index_select(0, rows)
                # d CE_i / d logits_i = softmax_i - onehot(y_i), times the upstream g_i
                grad_logits = (h @ weight.t()).float().sub_(lse_all[start:start + chunk].unsqueeze(1)).exp_()
                grad_logits.mul_(g.unsqueeze(1))
                grad_logits.scatter_add_(1, y.unsqueeze(1), torch.where(on_rank, -g, 0.0).unsqueeze(1))
                grad_logits = grad_logits.to(hidden.dtype)
                if need_h:
                    grad_h.index_copy_(0, rows, grad_logits @ weight)
                if need_w:
                    grad_w.add_((grad_logits.t() @ h).float())
                del grad_logits
        if need_h and tp_group is not None:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _local_target(target, vocab_start, v_local):
    """(this shard's column of each target, clamped into range; whether it lies on this shard)."""
    y = target - vocab_start
    on_rank = (y >= 0) & (y < v_local)
    return y.clamp(0, v_local - 1), on_rank


def linear_token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token cross-entropy ``lse_i - logit_{i, labels_i}`` (nats), fp32 [N], 0 where ignored.

    Args:
        hidden: [N, H] float, differentiable. weight: [V_local, H] same dtype, differentiable
            (the output head, or this rank's vocabulary shard with ``tp_group``).
        labels: int [N] global target ids, ``ignore_index`` for no target (CE 0, no gradient).
        impl, chunk_size: ``loss.impl`` and ``loss.chunk_size`` (the reference's tokens per chunk).
    """
    impl = resolve_impl(impl, hidden.device)
    ones = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    _validate(hidden, weight, labels.reshape(-1), ones.reshape(-1), vocab_start, tp_group, ignore_index,
              chunk_size)
    if impl == "triton":
        from . import triton_token_ce  # imported on first use, as triton_ce

        return triton_token_ce.triton_linear_token_ce(hidden, weight, labels, vocab_start=vocab_start,
                                                      tp_group=tp_group, ignore_index=ignore_index)
    return ChunkedLinearTokenCE.apply(hidden, weight, labels, int(vocab_start), tp_group, int(ignore_index),
                                      int(chunk_size))
