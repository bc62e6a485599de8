"""One optimizer step's forward/backward over its micro-batches, on any (dp, cp, tp) layout.

The loss of a step is Σ loss_weight·CE over the whole global batch divided by its total loss
weight (DESIGN.md §4). Each rank knows the weight of its own rows; the total is all-reduced over
the data-parallel group (context/tensor-parallel ranks hold the same rows). FSDP2 averages
gradients over ``dp_cp``, so each rank back-propagates ``local_sum * |dp_cp| / total``.
Logged sums and counts are all-reduced over ``dp_cp`` (tp ranks already hold global values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from emu3_train.loss import weighted_ce
from emu3_train.parallel.data_parallel import loss_scale
from emu3_train.parallel.mesh import named_collective

MODEL_INPUTS = ("tokens", "position_ids", "cu_seqlens")


def _head_plain(model):
    return model.lm_head.weight, 0, None


@dataclass
class StepContext:
    """What a step needs besides the model and the batches."""

    device: torch.device
    bf16: bool
    vision_start: int
    z_loss: float = 0.0
    impl: str = "auto"
    chunk_size: int = 1024
    mesh: DeviceMesh | None = None
    # (model) -> (output weight [V_local, H], vocab_start, tp_group); replaced under tensor parallel
    head: Callable = _head_plain
    # (batch) -> this context-parallel rank's part of it (plus whatever the model needs); identity
    shard: Callable = lambda batch: batch
    # extra model keyword arguments taken from the (sharded) batch, e.g. ("token_index",) under CP
    extra_inputs: tuple = ()
    fault_nan: bool = False  # test hook: poison this step's loss


def _all_reduce(t: torch.Tensor, mesh: DeviceMesh | None, dim: str, what: str) -> torch.Tensor:
    if mesh is not None and mesh[dim].size() > 1:
        named_collective(f"all_reduce({what}) over '{dim}'", dist.all_reduce, t,
                         group=mesh[dim].get_group())
    return t


def forward_backward(model, batches: list[dict], ctx: StepContext) -> dict:
    """Accumulate gradients of the step; returns the global loss, its text/vision sums and counts."""
    total = torch.tensor([float(sum(b["loss_weight"].sum() for b in batches))], dtype=torch.float64)
    total = float(_all_reduce(total, ctx.mesh, "dp", "step loss weight"))
    scale = loss_scale(ctx.mesh) / max(total, 1e-12)
    sums = torch.zeros(6, dtype=torch.float64)  # loss, text, vision, z, tokens_text, tokens_vision
    for batch in batches:
        b = ctx.shard(batch)
        inputs = [b[k].to(ctx.device) for k in MODEL_INPUTS]
        extra = {k: b[k].to(ctx.device) for k in ctx.extra_inputs}
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
            hidden = model(*inputs, **extra)
        weight, vocab_start, tp_group = ctx.head(model)
        wsum, st = weighted_ce(hidden, weight, b["labels"].to(ctx.device), b["loss_weight"].to(ctx.device),
                               vision_start=ctx.vision_start, z_loss=ctx.z_loss, impl=ctx.impl,
                               chunk_size=ctx.chunk_size, vocab_start=vocab_start, tp_group=tp_group)
        if ctx.fault_nan:
            wsum = wsum * float("nan")
        (wsum * scale).backward()
        sums += torch.stack([wsum.detach().double().cpu(), *(st[k].double().cpu() for k in (
            "loss_text_sum", "loss_vision_sum", "z_loss_sum", "tokens_text", "tokens_vision"))])
    sums = _all_reduce(sums, ctx.mesh, "dp_cp", "loss sums")
    loss, text, vision, _, n_text, n_vision = sums.tolist()
    nan = float("nan")
    return {"loss": loss / max(total, 1e-12), "loss_text": text / n_text if n_text else nan,
            "loss_vision": vision / n_vision if n_vision else nan, "weight": total}


def clip_grad_norm(model, max_norm: float) -> float:
    """Global gradient norm (DTensor-aware) after clipping to ``max_norm`` (0 = no clipping)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
