"""Triton fused linear + weighted cross-entropy: logits exist one [BLOCK_N, BLOCK_V] tile at a time.

Same contract as :mod:`emu3_train.kernels.reference` (``sum_i w_i * (CE_i + z_loss * lse_i^2)``,
stats split by target class, vocab parallel over ``tp_group``); reached through
``fused_linear_cross_entropy(..., impl="triton")``. The design follows Apple's Cut Cross-Entropy
rather than Liger-Kernel: Liger materializes a [chunk, V] block of logits per token chunk, here no
program ever holds more than one tile of logits and nothing of size [*, V] is written to memory.

Passes (M = counted tokens: ``label != ignore_index`` and ``loss_weight > 0``; the others are
dropped up front through a row-index list, the kernels never touch them):

1. forward, ``_lse_kernel``: grid (M / BLOCK_N, V splits). A program walks the vocabulary tiles of
   its split; per tile it computes ``logits = h[rows] @ W[tile]^T`` with ``tl.dot`` over BLOCK_H
   slices of the hidden size (fp32 accumulator) and folds the tile into an online row max /
   sum-exp (fp32), picking up the target logit when the target lies in the tile. It writes 3
   floats per row and split. Splits give the GPU enough programs when M is small; torch combines
   them (a [splits, M] log-sum-exp), then, with ``tp_group``, the max is all-reduced (MAX) and the
   sum-exp and target logit (SUM), exactly as the reference does. Loss and stats follow in torch
   from [M]-sized vectors.
2. backward, ``_grad_kernel``: grid (M / BLOCK_N) x (V / BLOCK_V), grouped so that concurrent
   programs share weight tiles in L2. A program recomputes its logits tile, forms
   ``grad_logits = g*w*((1 + 2 z lse) * softmax - onehot)`` in registers and, slice by slice of H,
   adds ``grad_logits @ W[tile]`` into grad_hidden rows and ``grad_logits^T @ h[rows]`` into
   grad_weight rows with fp32 atomics. grad_hidden is then all-reduced over ``tp_group`` (the
   reference's gradient contract: every rank gets the full grad_hidden, grad_weight is the shard's).

Cost: 4 matmul-equivalents (Liger: 3, by keeping the chunk logits) in exchange for no logits
memory. Memory beyond inputs and gradients: [splits, M] x 3 + [M] vectors in forward; the fp32
accumulators of grad_hidden [N, H] and grad_weight [V_local, H] in backward (the reference holds the
same fp32 grad_weight). Nothing is computed for gradients in forward, so a forward under
``torch.no_grad()`` (or recomputed by activation checkpointing) costs one matmul-equivalent.

Precision: fp32 accumulation, online softmax and atomics for every input dtype; on GPU the tile
matmuls read bf16/fp16 operands (grad_logits is cast to the input dtype for the two gradient
matmuls, as in the reference) and fp32 inputs use IEEE fp32 unless torch allows TF32 matmuls.
Under ``TRITON_INTERPRET=1`` every dot runs in fp32 (the interpreter mis-computes bf16 dots).
Gradient atomics make the summation order, hence the last bits of the gradients, vary run to run
on GPU.

``TRITON_INTERPRET=1`` must be set before this module is first imported: ``triton.jit`` decides
at decoration time whether a kernel is compiled or interpreted (:data:`INTERPRETED` records it).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from .reference import STAT_KEYS

__all__ = ["INTERPRETED", "STAT_KEYS", "TritonCEConfig", "triton_linear_cross_entropy"]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, offs_v, v_mask, H, stride_hn, stride_hh, stride_wv, stride_wh,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h[rows] @ W[offs_v]^T (columns past V are garbage: mask them)."""
    offs_h = tl.arange(0, BLOCK_H)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh  # [BLOCK_N, BLOCK_H]
    w_ptrs = w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh  # [BLOCK_H, BLOCK_V]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_mask = (h0 + offs_h) < H
        a = tl.load(h_ptrs, mask=h_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=h_mask[:, None] & v_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_H * stride_hh
        w_ptrs += BLOCK_H * stride_wh
    return acc


@triton.jit
def _lse_kernel(h_ptr, w_ptr, rows_ptr, target_ptr, max_ptr, sumexp_ptr, target_logit_ptr,
                M, V, H, stride_hn, stride_hh, stride_wv, stride_wh, tiles_per_split,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Per (row block, vocabulary split): online max / sum-exp / target logit over the split's tiles.

    Writes max_ptr[split, m], sumexp_ptr[split, m] (relative to that max), target_logit_ptr[split, m]
    (0 when the target is not in the split). Every split starts with a tile holding at least one
    valid column, so the running max is finite after the first tile and fully masked tiles later
    in the last split (max -inf) change nothing.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    rows = tl.load(rows_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)  # row 0 stands in for padding
    target = tl.load(target_ptr + offs_n, mask=n_mask, other=-1)  # local vocabulary id
    row_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros([BLOCK_N], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        offs_v = (pid_s * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        logits = _logits_tile(h_ptr, w_ptr, rows, offs_v.to(tl.int64), v_mask, H, stride_hn, stride_hh,
                              stride_wv, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
        logits = tl.where(v_mask[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        row_max = new_max
        target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], logits, 0.0), axis=1)
    out = pid_s * M + offs_n
    tl.store(max_ptr + out, row_max, mask=n_mask)
    tl.store(sumexp_ptr + out, sum_exp, mask=n_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=n_mask)


@triton.jit
def _grad_kernel(h_ptr, w_ptr, rows_ptr, target_ptr, lse_ptr, coef_ptr, onehot_ptr, grad_h_ptr, grad_w_ptr,
                 M, V, H, stride_hn, stride_hh, stride_wv, stride_wh, stride_ghn, stride_gwv,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                 COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """One logits tile: grad_logits = coef * softmax - onehot * target_coef; atomically add its
    products into grad_h[rows] (fp32 [N, H]) and grad_w[tile] (fp32 [V, H])."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(M, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    # Grouped order: GROUP_N row blocks sweep the vocabulary together, so a weight tile loaded by
    # one program is still in L2 for the next GROUP_N - 1.
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < M
    rows = tl.load(rows_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
    target = tl.load(target_ptr + offs_n, mask=n_mask, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    coef = tl.load(coef_ptr + offs_n, mask=n_mask, other=0.0)
    onehot = tl.load(onehot_ptr + offs_n, mask=n_mask, other=0.0)
    offs_v = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    v_mask = offs_v < V

    logits = _logits_tile(h_ptr, w_ptr, rows, offs_v, v_mask, H, stride_hn, stride_hh, stride_wv, stride_wh,
                          BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, PRECISION)
    grad = coef[:, None] * tl.exp(logits - lse[:, None])
    grad -= tl.where(offs_v[None, :] == target[:, None], onehot[:, None], 0.0)
    grad = tl.where(n_mask[:, None] & v_mask[None, :], grad, 0.0)  # padding rows may hold exp overflow
    if DOT_FP32:
        grad_op = grad
    else:
        grad_op = grad.to(h_ptr.dtype.element_ty)

    offs_h = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + offs_h
        h_mask = cols < H
        if COMPUTE_DH:
            w_tile = tl.load(w_ptr + offs_v[:, None] * stride_wv + cols[None, :] * stride_wh,
                             mask=v_mask[:, None] & h_mask[None, :], other=0.0)  # [BLOCK_V, BLOCK_H]
            if DOT_FP32:
                w_tile = w_tile.to(tl.float32)
            part = tl.dot(grad_op, w_tile, input_precision=PRECISION)  # [BLOCK_N, BLOCK_H]
            tl.atomic_add(grad_h_ptr + rows[:, None] * stride_ghn + cols[None, :], part,
                          mask=n_mask[:, None] & h_mask[None, :], sem="relaxed")
        if COMPUTE_DW:
            h_tile = tl.load(h_ptr + rows[:, None] * stride_hn + cols[None, :] * stride_hh,
                             mask=h_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_H]
            if DOT_FP32:
                h_tile = h_tile.to(tl.float32)
            part = tl.dot(tl.trans(grad_op), h_tile, input_precision=PRECISION)  # [BLOCK_V, BLOCK_H]
            tl.atomic_add(grad_w_ptr + offs_v[:, None] * stride_gwv + cols[None, :], part,
                          mask=v_mask[:, None] & h_mask[None, :], sem="relaxed")

INTERPRETED: bool = not isinstance(_grad_kernel, triton.runtime.JITFunction)
"""True when this module's kernels were defined under ``TRITON_INTERPRET=1`` (they run on CPU)."""


@dataclasses.dataclass(frozen=True)
class TritonCEConfig:
    """Launch parameters; :meth:`default` picks them per device and dtype.

    Block sizes must be powers of two >= 16 (``tl.dot``); the same tile shape is used in both
    passes so the backward recomputes the forward's logits in the same order. The GPU defaults
    were checked by compiling for sm_90 (no register spills for bf16/fp16; 160 KiB of shared
    memory in the backward), not yet timed on a GPU.
    """

    block_n: int = 128  # tokens per tile
    block_v: int = 128  # vocabulary entries per tile
    block_h: int = 64  # hidden slice per tl.dot
    group_n: int = 8  # row blocks sweeping the vocabulary together in the backward (L2 reuse)
    v_splits: int | None = None  # forward vocabulary splits; None = enough programs for the GPU
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def default(cls, device: torch.device, dtype: torch.dtype) -> TritonCEConfig:
        if INTERPRETED or device.type != "cuda":
            # The interpreter pays per operation, not per element: few, large tiles are fastest.
            return cls(block_n=64, block_v=128, block_h=64, v_splits=1, num_warps=4, num_stages=1)
        if dtype == torch.float32:
            # IEEE fp32 dots run on FMA units: thinner hidden slices keep the tiles in registers.
            return cls(block_h=32, num_stages=2)
        return cls()


def _num_splits(cfg: TritonCEConfig, m: int, v_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split) with every split owning at least one real tile."""
    if cfg.v_splits is not None:
        wanted = cfg.v_splits
    elif device.type == "cuda" and not INTERPRETED:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(4 * sms, triton.cdiv(m, cfg.block_n))  # ~4 programs per SM
    else:
        wanted = 1
    tiles_per_split = triton.cdiv(v_tiles, max(1, min(wanted, v_tiles)))
    return triton.cdiv(v_tiles, tiles_per_split), tiles_per_split


def _dot_options(dtype: torch.dtype, cfg: TritonCEConfig) -> dict:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_FP32": INTERPRETED or dtype == torch.float32,
        "PRECISION": "tf32" if tf32 else "ieee",
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }


def row_lse(hidden, weight, rows, local_target, tp_group, cfg: TritonCEConfig):
    """(lse, target_logit) fp32 [m] of the counted ``rows`` (m >= 1) over the full vocabulary:
    ``_lse_kernel``'s per-split maxima, sums and target logits combined, then reduced over the tp
    group (local_target -1: the target is on another rank's shard). Shared by the weighted loss and
    the per-token CE (:mod:`.triton_token_ce`)."""
    m, (v_local, h_size) = rows.numel(), weight.shape
    v_tiles = triton.cdiv(v_local, cfg.block_v)
    splits, tiles_per_split = _num_splits(cfg, m, v_tiles, hidden.device)
    part = torch.empty(3, splits, m, dtype=torch.float32, device=hidden.device)
    _lse_kernel[(triton.cdiv(m, cfg.block_n), splits)](
        hidden, weight, rows, local_target, part[0], part[1], part[2],
        m, v_local, h_size, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        tiles_per_split,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h,
        **_dot_options(hidden.dtype, cfg),
    )
    split_max, split_sum, split_target = part.unbind(0)
    row_max = split_max.amax(dim=0)
    if tp_group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = (split_sum * torch.exp(split_max - row_max)).sum(dim=0)
    target_logit = split_target.sum(dim=0)
    if tp_group is not None:
        packed = torch.stack((sum_exp, target_logit))
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, target_logit = packed[0], packed[1]
    return row_max + sum_exp.log(), target_logit


class TritonLinearCrossEntropy(torch.autograd.Function):
    """autograd.Function; use :func:`triton_linear_cross_entropy`.

    Outputs: loss (fp32 scalar), sums (fp32 [3]: text CE, vision CE, z-loss), counts (int64 [2]);
    only the loss is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index,
                vision_start, z_loss, cfg):
        device = hidden.device
        v_local = weight.shape[0]
        w_all = loss_weight.float()
        rows = ((labels != ignore_index) & (w_all > 0)).nonzero().squeeze(1)
        m = rows.numel()
        target = labels.index_select(0, rows)  # global ids
        w = w_all.index_select(0, rows)
        # Targets on another rank's shard become -1, which no column matches (columns past V_local
        # would, and they hold -inf in the forward).
        local_target = (target - vocab_start).to(torch.int64)
        local_target = local_target.masked_fill((local_target < 0) | (local_target >= v_local), -1)

        loss = torch.zeros((), dtype=torch.float32, device=device)
        sums = torch.zeros(3, dtype=torch.float32, device=device)
        counts = torch.zeros(2, dtype=torch.int64, device=device)
        lse = torch.zeros(m, dtype=torch.float32, device=device)
        if m:
            lse, target_logit = row_lse(hidden, weight, rows, local_target, tp_group, cfg)
            ce = lse - target_logit
            z_term = z_loss * lse.square()
            loss = (w * (ce + z_term)).sum()
            is_vision = (target >= vision_start if vision_start is not None
                         else torch.zeros(m, dtype=torch.bool, device=device))
            sums = torch.stack((ce.masked_fill(is_vision, 0.0).sum(), ce.masked_fill(~is_vision, 0.0).sum(),
                                z_term.sum()))
            n_vision = is_vision.sum()
            counts = torch.stack((m - n_vision, n_vision))

        ctx.save_for_backward(hidden, weight, rows, local_target, w, lse)
        ctx.meta = (tp_group, z_loss, cfg)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_counts):
        hidden, weight, rows, local_target, w, lse = ctx.saved_tensors
        tp_group, z_loss, cfg = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        m = rows.numel()
        v_local, h_size = weight.shape
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        if m and (need_h or need_w):
            # d/dlogits of g * w * (lse - logit_y + z * lse^2) = g*w*(1 + 2 z lse) softmax - g*w onehot_y
            onehot = grad_loss.float() * w
            coef = onehot * (1.0 + 2.0 * z_loss * lse)
            dummy = lse  # any fp32 tensor stands in for a gradient buffer that is not computed
            grid = (triton.cdiv(m, cfg.block_n) * triton.cdiv(v_local, cfg.block_v),)
            _grad_kernel[grid](
                hidden, weight, rows, local_target, lse, coef, onehot,
                grad_h if need_h else dummy, grad_w if need_w else dummy,
                m, v_local, h_size, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                h_size, h_size,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, GROUP_N=cfg.group_n,
                COMPUTE_DH=need_h, COMPUTE_DW=need_w, **_dot_options(hidden.dtype, cfg),
            )
        if need_h and tp_group is not None:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
        if need_h:
            grad_h = grad_h.to(hidden.dtype)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def triton_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weight: torch.Tensor,
    *,
    vocab_start: int = 0,
    tp_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    vision_start: int | None = None,
    z_loss: float = 0.0,
    config: TritonCEConfig | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted CE of ``hidden @ weight^T`` by the Triton kernels; inputs assumed validated.

    Same arguments, returns and gradient contract as
    :func:`emu3_train.kernels.reference.chunked_linear_cross_entropy` (no ``chunk_size``: tiles
    replace chunks); ``config`` overrides the launch parameters (:class:`TritonCEConfig`).
    Runs on CUDA tensors, or on CPU tensors when this module was imported under
    ``TRITON_INTERPRET=1``.
    """
    if hidden.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"the Triton cross-entropy kernels need CUDA tensors (got {hidden.device}) "
                           "or TRITON_INTERPRET=1 set before emu3_train.kernels.triton_ce is imported")
    cfg = config or TritonCEConfig.default(hidden.device, hidden.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, sums, counts = TritonLinearCrossEntropy.apply(
            hidden, weight, labels, loss_weight, int(vocab_start), tp_group, int(ignore_index),
            vision_start, float(z_loss), cfg,
        )
    stats = {
        "loss_text_sum": sums[0],
        "loss_vision_sum": sums[1],
        "tokens_text": counts[0],
        "tokens_vision": counts[1],
        "z_loss_sum": sums[2],
    }
    return loss, stats
