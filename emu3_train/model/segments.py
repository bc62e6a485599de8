"""Per-document SDPA core: one causal ``scaled_dot_product_attention`` call per document.

The [B, S] batch is flattened to B*S tokens and cut at the documents of ``cu_seqlens`` (each row
end included, :meth:`Documents.varlen_segments`); every segment attends causally to itself with
``is_causal=True`` and no mask. That is exactly the document-causal function of the dense-mask
:class:`~emu3_train.model.attention.SdpaCore`, without its [B, 1, S, S] mask (which SDPA turns into
a float [B, 1, S, S] bias per call on CPU) and without computing the blocks between documents:
``model.attn_impl=auto`` uses it for packed layouts off CUDA (CPU), where the fused varlen and
flex kernels do not train. Attention dropout works as in SdpaCore. Packed layouts only.

    core = SegmentSdpaCore(dropout=0.0)
    out = core(q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], Documents.packed(...))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from emu3_train.model.documents import Documents


class SegmentSdpaCore(nn.Module):
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hkv divides Hq) -> [B, S, Hq, D], per document."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents
    ) -> torch.Tensor:
        b, s, hq, d = q.shape
        bounds = docs.varlen_segments()[0].tolist()  # one host copy of a few ints per layer
        flat = [t.reshape(1, b * s, t.shape[2], d).transpose(1, 2) for t in (q, k, v)]  # [1, H, N, D]
        p = self.dropout if self.training else 0.0
        outs = [
            F.scaled_dot_product_attention(*(t[:, :, a:e] for t in flat), dropout_p=p, is_causal=True,
                                           enable_gqa=hq != k.shape[2]).transpose(1, 2)
            for a, e in zip(bounds[:-1], bounds[1:])
        ]
        return torch.cat(outs, dim=1).view(b, s, hq, d)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"
