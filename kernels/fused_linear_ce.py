"""Fused linear + weighted cross-entropy: the public entry point of the loss kernels.

    from emu3_train.kernels.fused_linear_ce import fused_linear_cross_entropy
    loss_sum, stats = fused_linear_cross_entropy(hidden, lm_head.weight, labels, loss_weight,
                                                 vision_start=vocab.vision_start)
    (loss_sum / global_weight_sum).backward()

``impl`` (config ``loss.impl``): ``triton`` is the tiled Triton kernel
(:mod:`emu3_train.kernels.triton_ce`, no logits beyond one tile per program), for CUDA tensors, or
for CPU tensors under ``TRITON_INTERPRET=1`` (tests); ``reference`` is the chunked PyTorch
implementation (:mod:`emu3_train.kernels.reference`, the CPU path and the test oracle); ``auto``
is Triton for CUDA tensors and the reference otherwise. All three share one contract.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.distributed as dist

from .reference import STAT_KEYS, chunked_linear_cross_entropy

IMPLS = ("auto", "reference", "triton")

__all__ = ["IMPLS", "STAT_KEYS", "fused_linear_cross_entropy", "resolve_impl"]


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` means for tensors on ``device``: "triton" or "reference".

    Raises NotImplementedError when Triton is asked for where it cannot run (CPU tensors without
    ``TRITON_INTERPRET=1``, or triton not installed).
    """
    if impl not in IMPLS:
        raise ValueError(f"loss.impl={impl!r} is unknown; choose one of {IMPLS}")
    has_triton = importlib.util.find_spec("triton") is not None
    if impl == "auto":
        return "triton" if device.type == "cuda" and has_triton else "reference"
    if impl == "triton":
        if not has_triton:
            raise NotImplementedError("loss.impl='triton' needs the triton package; install it or "
                                      "use loss.impl=reference")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise NotImplementedError(f"loss.impl='triton': the Triton kernel needs a CUDA device or "
                                      f"TRITON_INTERPRET=1 (CPU interpreter, slow); the tensors are on "
                                      f"{device}. Use loss.impl=auto or loss.impl=reference")
    return impl


def _validate(hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    n, h = hidden.shape
    if weight.shape[1] != h:
        raise ValueError(f"hidden size mismatch: hidden is [{n}, {h}] but weight is {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and "
                        f"{weight.dtype}")
    if labels.shape != (n,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32/int64 [{n}], got {labels.dtype} {tuple(labels.shape)}")
    if loss_weight.shape != (n,) or not loss_weight.is_floating_point():
        raise ValueError(f"loss_weight must be float [{n}], got {loss_weight.dtype} "
                         f"{tuple(loss_weight.shape)}")
    devices = {t.device for t in (hidden, weight, labels, loss_weight)}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, labels and loss_weight must be on one device, got {devices}")
    if int(chunk_size) <= 0:
        raise ValueError(f"loss.chunk_size must be a positive number of tokens, got {chunk_size}")
    if tp_group is None and vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start} needs a tp_group (a vocabulary shard)")
    if tp_group is None and n:
        v = weight.shape[0]
        valid = ((labels == ignore_index) | ((labels >= 0) & (labels < v))).all()
        message = f"labels must be in [0, {v}) or {ignore_index} (ignore_index)"
        try:  # on a GPU the check runs on the device (no host sync) and fails as a device assert
            torch._assert_async(valid, message)
        except RuntimeError:  # on the CPU it fails at once
            counted = labels[labels != ignore_index]
            raise ValueError(f"{message}; got min {int(counted.min())}, max {int(counted.max())}") from None


def fused_linear_cross_entropy(
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
    impl: str = "auto",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_i loss_weight_i * (CE_i + z_loss * lse_i^2)`` of logits ``hidden @ weight^T``.

    Args:
        hidden: [N, H] float (fp32/bf16/fp16), differentiable.
        weight: [V_local, H], same dtype, differentiable: the output head, or with ``tp_group``
            this rank's vocabulary shard of rows [vocab_start, vocab_start + V_local).
        labels: int [N] target ids (global vocabulary), ``ignore_index`` for no target.
        loss_weight: float [N], per-token weight (not differentiated); <= 0 means not counted.
        vision_start: ids >= this are visual-code targets in the stats; None = all text.
        z_loss: coefficient of the log-sum-exp^2 regularizer (``loss.z_loss``).
        impl: ``loss.impl``: auto | reference | triton (see the module docstring).
        chunk_size: tokens per logits chunk (``loss.chunk_size``) of the reference; the Triton
            kernel works in fixed tiles and ignores it.

    Returns:
        (weighted_loss_sum, stats). The loss is an fp32 scalar; the caller divides it by the
        global sum of loss weights. ``stats`` holds detached 0-d tensors keyed by
        :data:`STAT_KEYS`: unweighted CE sums and token counts split into text and vision
        targets, and ``z_loss_sum`` (unweighted sum of ``z_loss * lse^2``), all over counted
        tokens. With ``tp_group`` the grad w.r.t. hidden is already all-reduced over the group.
    """
    impl = resolve_impl(impl, hidden.device)
    _validate(hidden, weight, labels, loss_weight, vocab_start, tp_group, ignore_index, chunk_size)
    if impl == "triton":
        from . import triton_ce  # imported on first use: triton decides interpret-or-compile at import

        if hidden.device.type != "cuda" and not triton_ce.INTERPRETED:
            raise NotImplementedError("loss.impl='triton' on CPU: TRITON_INTERPRET=1 was set after "
                                      "emu3_train.kernels.triton_ce was first imported; set it before "
                                      "starting Python")
        return triton_ce.triton_linear_cross_entropy(
            hidden, weight, labels, loss_weight, vocab_start=vocab_start, tp_group=tp_group,
            ignore_index=ignore_index, vision_start=vision_start, z_loss=z_loss,
        )
    return chunked_linear_cross_entropy(
        hidden, weight, labels, loss_weight, vocab_start=vocab_start, tp_group=tp_group,
        ignore_index=ignore_index, vision_start=vision_start, z_loss=z_loss, chunk_size=chunk_size,
    )
