"""The test oracle shared by the kernel tests: full-logits weighted CE and odd-shaped inputs."""

import torch

IGNORE = -100

def naive(hidden, weight, labels, loss_weight, *, vision_start=None, z_loss=0.0):
    """Full fp32 logits; the textbook definition of the loss and stats."""
    logits = hidden.float() @ weight.float().t()
    lse = torch.logsumexp(logits, dim=-1)
    counted = (labels != IGNORE) & (loss_weight > 0)
    ce = lse - logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    per_token = loss_weight.float() * (ce + z_loss * lse.square())
    vision = labels >= vision_start if vision_start is not None else torch.zeros_like(counted)
    stats = {
        "loss_text_sum": ce[counted & ~vision].sum(),
        "loss_vision_sum": ce[counted & vision].sum(),
        "tokens_text": (counted & ~vision).sum(),
        "tokens_vision": (counted & vision).sum(),
        "z_loss_sum": (z_loss * lse.square())[counted].sum(),
    }
    return per_token[counted].sum(), stats


def make_inputs(n=37, v=53, h=16, dtype=torch.float32, seed=0):
    """Odd sizes (not multiples of any chunk), ~20% ignored, weights in {0, 0.5, 1}."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.2] = IGNORE
    loss_weight = torch.tensor([0.0, 0.5, 1.0])[torch.randint(0, 3, (n,), generator=gen)]
    return hidden, weight, labels, loss_weight


def loss_and_grads(fn, hidden, weight, labels, loss_weight, upstream=1.0, **kwargs):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    loss, stats = fn(hidden, weight, labels, loss_weight, **kwargs)
    (loss * upstream).backward()
    return loss.detach(), hidden.grad, weight.grad, {k: v.detach() for k, v in stats.items()}
