"""AdamW with decoupled weight decay on matrices only, and linear warmup + cosine decay to a floor.

    lr(step) = lr * step / warmup                                   for step < warmup
             = lr * (floor + (1 - floor) * (1 + cos(pi * t)) / 2)   t = (step - warmup) / (max - warmup)
"""

from __future__ import annotations

import math

import torch

from emu3_train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D weights (linears, embeddings), none on norms and biases.

    ``fused``: the fused kernel (default: on CUDA), which also skips a non-finite step without a
    host sync (:func:`apply_update`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def apply_update(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``finite`` (a bool device tensor, the same on every rank) is False.

    A fused AdamW takes the decision on the device (``found_inf``: parameters, moments and step
    counts stay as they are), so a GPU step never waits for the host. Any other optimizer reads
    the flag, which on the CPU costs nothing. Both skip exactly the same way (tested for parity).
    """
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).to(torch.float32).reshape(())
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(finite):
        optimizer.step()


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A LambdaLR applying :func:`lr_factor` (its state_dict is checkpointed)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio))
