"""The training loss: weighted next-token cross-entropy over text and visual-code targets.

Emu3 weights visual-code targets by ``loss.vision_weight`` (the data pipeline writes the
per-token ``loss_weight``); the loss of a step is ``sum(w * CE) / sum(w)`` over the global batch.
:func:`weighted_ce` returns the numerator for one micro-batch; the trainer sums micro-batches and
divides by the global weight sum. Full [B, S, V] logits are never materialized.

    loss_sum, stats = weighted_ce(hidden, model.lm_head.weight, batch.labels, batch.loss_weight,
                                  vision_start=vocab.vision_start, z_loss=cfg.loss.z_loss,
                                  impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size)

Under tensor parallelism each tp rank passes its rows of ``lm_head.weight``, their first row and
the tp group (``StepPlan.head``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from emu3_train.kernels.fused_linear_ce import fused_linear_cross_entropy


def weighted_ce(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weight: torch.Tensor,
    *,
    vision_start: int | None,
    z_loss: float = 0.0,
    impl: str = "auto",
    chunk_size: int = 1024,
    ignore_index: int = -100,
    vocab_start: int = 0,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of ``loss_weight * (CE + z_loss * lse^2)`` over a micro-batch.

    Args:
        hidden: [B, S, H] final hidden states (after the final norm).
        output_weight: [V, H] the output head (``lm_head.weight``), or with ``tp_group`` this
            rank's vocabulary shard starting at row ``vocab_start``.
        labels: int [B, S] next-token ids, -100 (``ignore_index``) where there is no target.
        loss_weight: float [B, S], e.g. 1.0 text, ``loss.vision_weight`` vision, 0 padding.
        vision_start: first visual-code id (``Vocab.vision_start``) to split the stats; None = all text.
        z_loss, impl, chunk_size: ``loss.z_loss``, ``loss.impl``, ``loss.chunk_size``.

    Returns:
        (weighted_sum, stats): fp32 scalar to divide by the global ``loss_weight`` sum, and
        detached sums/counts (see ``fused_linear_cross_entropy``) to reduce over data-parallel
        ranks and pass to :func:`class_means`.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2] or loss_weight.shape != labels.shape:
        raise ValueError(f"expected hidden [B, S, H] with labels and loss_weight [B, S]; got "
                         f"{tuple(hidden.shape)}, {tuple(labels.shape)}, {tuple(loss_weight.shape)}")
    return fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        output_weight,
        labels.reshape(-1),
        loss_weight.reshape(-1),
        vocab_start=vocab_start,
        tp_group=tp_group,
        ignore_index=ignore_index,
        vision_start=vision_start,
        z_loss=z_loss,
        impl=impl,
        chunk_size=chunk_size,
    )


def class_means(stats: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Per-token mean CE by target class from summed stats (any number of micro-batches/ranks).

    Returns ``{"loss_text": ..., "loss_vision": ...}``: unweighted mean CE in nats per token.
    Both keys are always present; a class with no counted tokens is NaN ("no value", never a
    division error), so average these over steps with ``math.isfinite`` filtering.
    """
    means = {}
    for name in ("text", "vision"):
        tokens = float(stats[f"tokens_{name}"])
        means[f"loss_{name}"] = float(stats[f"loss_{name}_sum"]) / tokens if tokens > 0 else math.nan
    return means
