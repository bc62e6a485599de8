"""One optimizer step's forward/backward over its micro-batches, on any (dp, cp, tp) layout.

The loss of a step is Σ loss_weight·CE over the whole global batch divided by its total loss
weight (DESIGN.md §4). The total is known from the batches before any forward: each replica's
rows are counted once (:attr:`StepPlan.owns_rows`) and summed over the world in one all-reduce
that also carries the stop flag (any rank's SIGTERM), so stopping costs no collective of its own.
FSDP2 averages gradients over ``dp_cp``, so each rank back-propagates
``local_sum * |dp_cp| / total``. The logged sums and counts are all-reduced over ``dp_cp`` (tp
ranks already hold global values).

Nothing here waits for the device: the statistics stay tensors on the model's device and the
caller reads them when it logs (``metrics.StepWindow``). Collectives issued here, per step:
``all_reduce([weight total, stop flag])`` over the world before the first forward, and
``all_reduce(loss sums)`` over ``dp_cp`` after the last backward; :func:`clip_grad_norm` adds the
passes' gradient-norm reduction.

    plan = parallelize(model, dims, mesh, cfg, device, rank)
    out = forward_backward(model, batches, StepContext(bf16=True, vision_start=...), plan)
    grad_norm = clip_grad_norm(model, 1.0)          # device tensors: out["loss"], grad_norm, ...
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from emu3_train.loss import weighted_ce
from emu3_train.parallel.step_plan import StepPlan

STAT_KEYS = ("loss_text_sum", "loss_vision_sum", "z_loss_sum", "tokens_text", "tokens_vision")


@dataclass(frozen=True)
class StepContext:
    """The loss settings of a step (plain values; the layout is the :class:`StepPlan`'s)."""

    bf16: bool
    vision_start: int
    z_loss: float = 0.0
    impl: str = "auto"
    chunk_size: int = 1024


def forward_backward(model, batches: list[dict], ctx: StepContext, plan: StepPlan, stop: int = 0,
                     poison: bool = False) -> dict[str, torch.Tensor]:
    """Accumulate the step's gradients; returns device tensors: ``loss`` (global), ``loss_text``,
    ``loss_vision`` (NaN where a class has no targets), ``weight`` (global loss-weight total) and
    ``stop`` (the largest signal number any rank was sent, 0 = none).

    ``stop``: this rank's pending signal number; ``poison``: make this step's loss NaN (the fault
    hook's ``nan_loss``).
    """
    local = sum(b["weight_sum"] for b in batches) if plan.owns_rows else 0.0  # known on the host
    head = torch.tensor([local, float(stop)], dtype=torch.float64, device=plan.device)
    plan.all_reduce(head, None, "step loss weight + stop flag")
    total = head[0].clamp_min(1e-12)
    scale = plan.loss_scale / total
    sums = torch.zeros(6, dtype=torch.float64, device=plan.device)  # loss, text, vision, z, n_text, n_vision
    for batch in batches:
        b = plan.prepare(batch)
        with torch.autocast(plan.device.type, dtype=torch.bfloat16) if ctx.bf16 else nullcontext():
            hidden = model(**plan.model_inputs(b))
        weight, vocab_start, tp_group = plan.head(model)
        wsum, st = weighted_ce(hidden, weight, b["labels"], b["loss_weight"], vision_start=ctx.vision_start,
                               z_loss=ctx.z_loss, impl=ctx.impl, chunk_size=ctx.chunk_size,
                               vocab_start=vocab_start, tp_group=tp_group)
        if poison:
            wsum = wsum * float("nan")
        (wsum * scale).backward()
        sums += torch.stack([wsum.detach().double(), *(st[k].double() for k in STAT_KEYS)])
    plan.all_reduce(sums, "dp_cp", "loss sums")
    nan = torch.full((), float("nan"), dtype=torch.float64, device=plan.device)
    return {"loss": sums[0] / total,
            "loss_text": torch.where(sums[4] > 0, sums[1] / sums[4].clamp_min(1), nan),
            "loss_vision": torch.where(sums[5] > 0, sums[2] / sums[5].clamp_min(1), nan),
            "weight": head[0], "stop": head[1]}


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Global gradient norm (DTensor-aware) before clipping to ``max_norm`` (0 = no clipping), as a
    device tensor (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
