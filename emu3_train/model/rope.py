"""Rotary position embedding, Llama/Emu3 "rotate-half" layout, with a configurable base.

Numerically identical to ``Emu3RotaryEmbedding`` + ``apply_rotary_pos_emb`` in Hugging Face
transformers (default rope type). There is no buffer: the inverse frequencies are recomputed in
fp32 each forward (``head_dim / 2`` values), so casting the model to bf16 or building it on the
meta device cannot degrade or lose them, and the state dict holds exactly HF's parameter names.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, i in [0, head_dim/2): fp32 [head_dim / 2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``position_ids`` [B, S] (int, tokens from each document start).

    Returns two [B, S, head_dim] tensors in ``dtype`` (angles are computed in fp32 first).
    """
    inv_freq = rope_inv_freq(head_dim, theta, device=position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, S, Hq, D] and k [B, S, Hkv, D] by cos/sin [B, S, D]; keeps q's dtype."""
    cos = cos.to(q.dtype).unsqueeze(2)  # broadcast over heads
    sin = sin.to(q.dtype).unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
