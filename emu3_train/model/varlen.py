"""Varlen core: ``torch.nn.attention.varlen.varlen_attn`` (flash attention) over packed documents.

The [B, S] batch is flattened to B*S tokens and every document (and each row's padding) is one
causal segment of ``cu_seqlens``; no mask exists at all. CUDA only, fp16/bf16 only, no attention
dropout (the kernel's dropout is fixed at 0). Context parallelism has no varlen core (config
validation says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from emu3_train.model.documents import Documents

HALF_DTYPES = (torch.float16, torch.bfloat16)


def row_segments(cu_seqlens: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` over the flattened B*S tokens with every row end added (a document never
    crosses rows, whatever ``cu_seqlens`` says) -> (int32 [N + 1], longest segment in tokens).

    Synchronizes with the device twice (unique, max); called once per decoder forward.
    """
    rows = torch.arange(0, batch * seq + 1, seq, device=cu_seqlens.device)
    bounds = torch.cat([cu_seqlens.to(torch.int64), rows]).unique(sorted=True)
    return bounds.to(torch.int32), int(bounds.diff().max())


def varlen_available(device: torch.device) -> bool:
    """Whether ``varlen_attn`` can run on ``device``: CUDA with flash attention (sm80+)."""
    if device.type != "cuda" or not torch.backends.cuda.is_flash_attention_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


class VarlenCore(nn.Module):
    """Attention core on ``varlen_attn``: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D].

    GQA is native (``enable_gqa``); causal within each segment (``window_size=(-1, 0)``).
    """

    dropout = 0.0  # read by apply_cp when it swaps the core

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents
    ) -> torch.Tensor:
        if q.device.type != "cuda":
            raise RuntimeError(f"model.attn_impl=varlen runs only on CUDA (flash attention), got {q.device}; "
                               "use model.attn_impl=sdpa (or auto)")
        if q.dtype not in HALF_DTYPES:
            raise RuntimeError(f"model.attn_impl=varlen needs fp16/bf16 activations, got {q.dtype}: "
                               "set trainer.precision=bf16 or use model.attn_impl=flex")
        from torch.nn.attention.varlen import varlen_attn

        b, s, hq, d = q.shape
        cu_seqlens, longest = docs.varlen_segments()
        out = varlen_attn(q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                          cu_seqlens, cu_seqlens, longest, longest, window_size=(-1, 0),
                          enable_gqa=hq != k.shape[2])
        return out.view(b, s, hq, d)
