"""Chunked PyTorch fused linear + weighted cross-entropy: the reference for the Triton kernel.

Computes ``sum_i w_i * (CE_i + z_loss * lse_i^2)`` with ``logits = hidden @ weight^T`` without ever
materializing more than one chunk of logits [chunk, V]. Gradients are computed chunk by chunk
*in the forward pass* and stored (Liger-Kernel style) rather than recomputed in backward: that is
three matmuls per chunk instead of four, and the stored grad_hidden [N, H] and grad_weight [V, H]
are needed at the very start of backward anyway, so peak memory is the same. When no gradient is
needed (``torch.no_grad()`` or inputs that do not require grad) the gradient work is skipped.

CPU speed (this is the CPU training path): one [chunk, V] logits buffer serves every chunk (a
fresh one per chunk costs page faults comparable to the matmul); the row max is always subtracted
before ``exp`` (skipping it for small maxima would read them on the host: a sync per chunk); for fp32
inputs the softmax's row scale and the one-hot term are applied to the [c, H]
products instead of the [c, V] block (``_fp32_grads``), so the block is touched by the three
matmuls, ``amax``, the shift, ``exp_`` and ``sum`` only.

Precision: chunk logits, softmax, losses and the grad_weight accumulator are fp32 whatever the
input dtype; the two gradient matmuls run in the input dtype (as a GPU kernel would); gradients
are returned in the input dtype. The loss is an fp32 scalar.

Tokens with ``label == ignore_index`` or ``loss_weight <= 0`` are dropped before any matmul: they
cost nothing and contribute nothing (zero gradient rows).

Vocab parallel (``tp_group``): ``weight`` is this rank's shard of rows
[vocab_start, vocab_start + V_local) of the full output matrix. The row max is all-reduced (MAX),
the sum of exponentials and the target logit (SUM), as in Megatron's vocab-parallel CE, so the
loss and stats are the global values on every rank. Gradient contract: grad_weight is this
rank's shard's gradient; grad_hidden returned on every rank is the FULL gradient (the partial
products are all-reduced over ``tp_group`` here), so the caller must not reduce it again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# caps a chunk's fp32 logits: 90 rows at V = 184,622. Larger chunks cost memory: benchmarks/fused_ce.py's
# peak (goal <= 0.1 of naive's 9.11 GB at N = 4,096, H = 1,024) is 0.85 GB at this cap, 1.00 GB at
# 112 MiB and 1.16 GB at 256 MiB. They are faster for the CE alone on CPU (N = 8,192, H = 128, fwd +
# bwd, quiet 2-core CPU: 9.2 s at 90 rows, 8.9 at 256, 8.2 at 512) but not for the whole step
# (benchmarks/vs_hf.py, 5,120-token rows: 4% more tokens/s at 512 rows for +0.3 GB; at 2,048
# tokens none), so the cap stays.
CHUNK_LOGITS_BYTES = 64 * 2**20


def chunk_rows(chunk_size: int, v_local: int) -> int:
    """Rows per logits chunk: ``chunk_size`` (tokens) lowered so that one chunk's fp32 logits stay
    under ``CHUNK_LOGITS_BYTES``, never below 16 rows."""
    return max(16, min(chunk_size, CHUNK_LOGITS_BYTES // (4 * max(1, v_local))))


STAT_KEYS = ("loss_text_sum", "loss_vision_sum", "tokens_text", "tokens_vision", "z_loss_sum")


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """autograd.Function; use :func:`chunked_linear_cross_entropy`.

    Outputs: loss (fp32 scalar), sums (fp32 [3]: text CE, vision CE, z-loss), counts (int64 [2]:
    text tokens, vision tokens); only the loss is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index,
                vision_start, z_loss, chunk_size, compute_grads):
        need_h = compute_grads and ctx.needs_input_grad[0]
        need_w = compute_grads and ctx.needs_input_grad[1]
        # The kernel runs in the inputs' dtype: autocast would make the matmuls bf16 but leave
        # the fp32 gradient buffers, and the Triton kernel will not see autocast either.
        with torch.autocast(hidden.device.type, enabled=False):
            loss, sums, counts, grad_hidden, grad_weight = _forward_and_grads(
                hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index,
                vision_start, z_loss, chunk_size, need_h, need_w,
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums, _grad_counts):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))  # in place: no [N, H] copy
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss.to(grad_weight.dtype))  # in place: no [V, H] copy
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _forward_and_grads(hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index,
                       vision_start, z_loss, chunk_size, need_h, need_w):
    """The chunk loop: loss, stats and (if asked) grad_hidden [N, H] / grad_weight [V_local, H]."""
    v_local = weight.shape[0]
    w_all = loss_weight.float()
    rows_all = ((labels != ignore_index) & (w_all > 0)).nonzero().squeeze(1)

    device = hidden.device
    loss = torch.zeros((), dtype=torch.float32, device=device)
    sums = torch.zeros(3, dtype=torch.float32, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_w else None

    chunk_size = chunk_rows(chunk_size, v_local)
    # One logits buffer for every chunk: a fresh [c, V] tensor per chunk is a fresh mmap on CPU
    # whose page faults cost as much as the matmul writing it (465 vs 255 ms at c = 512, V = 184,622).
    n_buf = min(chunk_size, rows_all.numel())
    buf = torch.empty(n_buf, v_local, dtype=hidden.dtype, device=device)
    buf32 = buf if hidden.dtype == torch.float32 else torch.empty(n_buf, v_local, device=device)
    for start in range(0, rows_all.numel(), chunk_size):
        rows = rows_all[start : start + chunk_size]
        h = hidden.index_select(0, rows)  # [c, H]
        target = labels.index_select(0, rows)  # global ids
        w = w_all.index_select(0, rows)
        y = target - vocab_start
        on_rank = (y >= 0) & (y < v_local)
        y_safe = y.clamp(0, v_local - 1).unsqueeze(1)

        c = rows.numel()
        logits = torch.mm(h, weight.t(), out=buf[:c])  # [c, V_local], the only chunk of logits alive
        logits = logits if buf32 is buf else buf32[:c].copy_(logits)
        target_logit = torch.where(on_rank, logits.gather(1, y_safe).squeeze(1), 0.0)
        row_max = logits.amax(dim=1)
        if tp_group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        # always shifted: skipping the pass when every |row max| <= 40 needs the rows' maxima on the
        # host: a device sync per chunk, which the step must never make (test_step_collectives)
        logits.sub_(row_max.unsqueeze(1))
        probs = logits.exp_()  # in place: unnormalized softmax
        sum_exp = probs.sum(dim=1)
        if tp_group is not None:
            packed = torch.stack((sum_exp, target_logit))
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=tp_group)
            sum_exp, target_logit = packed[0], packed[1]
        lse = row_max + sum_exp.log()
        ce = lse - target_logit
        z_term = z_loss * lse.square()
        loss += (w * (ce + z_term)).sum()

        is_vision = target >= vision_start if vision_start is not None else torch.zeros_like(on_rank)
        sums[0] += ce.masked_fill(is_vision, 0.0).sum()
        sums[1] += ce.masked_fill(~is_vision, 0.0).sum()
        sums[2] += z_term.sum()
        n_vision = is_vision.sum()
        counts[0] += rows.numel() - n_vision
        counts[1] += n_vision

        if need_h or need_w:
            # d/dlogits of w * (lse - logit_y + z * lse^2) = w * ((1 + 2 z lse) softmax - onehot_y)
            scale = w * (1.0 + 2.0 * z_loss * lse) / sum_exp
            minus_w = torch.where(on_rank, -w, 0.0)
            if hidden.dtype == torch.float32:
                _fp32_grads(probs, scale, minus_w, h, rows, y_safe.squeeze(1), weight, grad_hidden,
                            grad_weight)
            else:
                grad_logits = probs.mul_(scale.unsqueeze(1))
                grad_logits.scatter_add_(1, y_safe, minus_w.unsqueeze(1))
                grad_logits = buf[:c].copy_(grad_logits)  # to the input dtype
                if need_h:
                    grad_hidden.index_copy_(0, rows, grad_logits @ weight)
                if need_w:  # bf16/fp16 product into the fp32 accumulator
                    grad_weight.add_(grad_logits.t() @ h)

    if need_h and tp_group is not None:
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=tp_group)
    if need_w:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, sums, counts, grad_hidden, grad_weight


def _fp32_grads(probs, scale, minus_w, h, rows, y, weight, grad_hidden, grad_weight):
    """One fp32 chunk's gradients without touching the [c, V] block beyond the two matmuls:
    grad_logits = scale * probs + minus_w * onehot_y, so its row scale is applied to the [c, H]
    products (rows of grad_hidden, rows of h for grad_weight); the one-hot term adds rows of W to
    grad_hidden and enters the block as one element a row for grad_weight. In fp32 the cancellation this moves
    out of the block costs nothing measurable; bf16/fp16 chunks keep it inside (the caller)."""
    if grad_hidden is not None:
        gh = (probs @ weight).mul_(scale.unsqueeze(1))
        gh.addcmul_(weight.index_select(0, y), minus_w.unsqueeze(1))
        grad_hidden.index_copy_(0, rows, gh)
    if grad_weight is not None:
        # the one-hot term enters the block as minus_w / scale at (row, y) -- one element a row,
        # deterministic -- and the row scale is applied to h: grad_weight += block^T (scale * h).
        # (Adding it to the target rows of grad_weight instead needs a scatter over repeated ids:
        # index_add_ takes ~100 ms for 512 rows on two CPU threads, and index_put_(accumulate=True)
        # sums repeated ids in a varying order, which broke bitwise resume.) A row of scale 0 has
        # w = 0, hence minus_w = 0: its h * scale is 0 and it adds nothing.
        safe = torch.where(scale != 0, scale, torch.ones_like(scale))
        probs.scatter_add_(1, y.unsqueeze(1), (minus_w / safe).unsqueeze(1))
        grad_weight.addmm_(probs.t(), h * scale.unsqueeze(1))  # accumulate without a [V, H] temporary


def chunked_linear_cross_entropy(
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
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted CE of ``hidden @ weight^T``; inputs are assumed validated (see fused_linear_ce).

    Args:
        hidden: [N, H] float. weight: [V_local, H], same dtype. labels: int [N] global ids.
        loss_weight: float [N]; no gradient flows to it.
        vision_start: targets with id >= this count as vision in the stats; None = all text.
        chunk_size: tokens (rows) per logits chunk, at most; :func:`chunk_rows` sets the rows.

    Returns:
        (weighted_loss_sum, stats): fp32 scalar ``sum w * (CE + z_loss * lse^2)`` over counted
        tokens, and detached 0-d tensors ``loss_text_sum``/``loss_vision_sum`` (unweighted CE
        sums, fp32), ``tokens_text``/``tokens_vision`` (int64), ``z_loss_sum`` (unweighted
        ``sum z_loss * lse^2``, fp32). Counted = label != ignore_index and loss_weight > 0.
        Under vocab parallelism the stats are the global values, identical on every tp rank.
    """
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, sums, counts = ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index, vision_start,
        float(z_loss), int(chunk_size), compute_grads,
    )
    stats = {
        "loss_text_sum": sums[0],
        "loss_vision_sum": sums[1],
        "tokens_text": counts[0],
        "tokens_vision": counts[1],
        "z_loss_sum": sums[2],
    }
    return loss, stats
