"""FlexAttention core: document-causal attention over packed rows as a block-sparse kernel.

The BlockMask is derived from the layout's per-token document ids at the cost of
O(B * (S / block)^2) small integer ops (no [S, S] mask, no compile), once per decoder forward
(:meth:`DocumentLayout.block_mask` caches it for every layer). ``flex_attention`` is compiled once
per process (``dynamic=False``: one graph per row length).

Where it runs (torch 2.13): forward and backward on CUDA; forward only on CPU (compiled, no
backward), so on CPU it serves inference and the parity tests, never training. It has no attention
dropout. Under context parallelism the allgather CP core has its own flex path (``parallel/cp_attention.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

if TYPE_CHECKING:
    from emu3_train.model.attention import DocumentLayout

BLOCK_SIZE = 128  # flex's default sparse block (tokens)
CPU_MIN_BLOCK = 128  # smaller blocks make torch 2.13's compiled CPU flex kernel read garbage

_compiled_flex = None


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, created on first use and shared by every layer.

    Compiled regions are wrapped in the ``inductor_compiled_code`` op so that selective recompute
    (``model.recompute=selective``) sees, and saves, the attention output instead of rerunning it.
    """
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False,
                                       options={"wrap_inductor_compiled_regions": True})
    return _compiled_flex


def ordered_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, Qb, Kb] -> (count int32 [B, 1, Qb], indices int32 [B, 1, Qb, Kb]) as BlockMask wants:
    the key blocks set in each query block row first, in increasing order."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    return counts.unsqueeze(1), order.to(torch.int32).unsqueeze(1)


def document_block_mask(doc_ids: torch.Tensor, block_size: int = BLOCK_SIZE) -> BlockMask:
    """The document-causal BlockMask of doc_ids int64 [B, S] (non-decreasing along each row).

    Query i may attend key j iff j <= i and both are in the same document, as
    :meth:`DocumentLayout.causal_mask`. Per (query block, key block): *full* when the key block is
    earlier and both blocks lie in one document, *partial* (mask evaluated per token) on the
    diagonal and where an earlier key block's last document is the query block's first. A tail
    block shorter than ``block_size`` is never full, as in ``create_block_mask``.
    """
    batch, seq = doc_ids.shape
    n = -(-seq // block_size)
    ends = torch.clamp(torch.arange(n, device=doc_ids.device) * block_size + block_size - 1, max=seq - 1)
    first, last = doc_ids[:, ::block_size], doc_ids[:, ends]  # [B, n] each
    q_blk = torch.arange(n, device=doc_ids.device)[:, None]
    k_blk = torch.arange(n, device=doc_ids.device)[None, :]
    earlier = k_blk < q_blk
    full = earlier & (first[:, None, :] == last[:, :, None])  # key block's first doc == query block's last
    if seq % block_size:
        full[:, -1, :] = False
    touched = (k_blk == q_blk) | (earlier & (last[:, None, :] == first[:, :, None]))
    partial = touched & ~full

    # The kernel evaluates the mask on whole blocks, so pad the ids (-1: out of range, discarded).
    padded = torch.nn.functional.pad(doc_ids, (0, n * block_size - seq), value=-1)

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (padded[b, q_idx] == padded[b, kv_idx])

    return BlockMask.from_kv_blocks(*ordered_blocks(partial), *ordered_blocks(full), BLOCK_SIZE=block_size,
                                    mask_mod=same_document_causal, seq_lengths=(seq, seq))


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> [B, Sq, Hq, D] with compiled flex attention.

    Refuses to build a graph for backward on CPU (FlexAttention has no CPU backward in this torch).
    """
    if q.device.type == "cpu" and min(block_mask.BLOCK_SIZE) < CPU_MIN_BLOCK:
        raise ValueError(f"flex attention on CPU needs blocks of >= {CPU_MIN_BLOCK} tokens, got "
                         f"{block_mask.BLOCK_SIZE}: torch's compiled CPU kernel returns NaN at random for "
                         "smaller blocks (uninitialized reads; measured with torch 2.13)")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("model.attn_impl=flex cannot train on CPU, context parallel or not: FlexAttention "
                           "has no CPU backward in this torch; use model.attn_impl=sdpa (or auto), or run "
                           "under torch.no_grad()")
    out = compiled_flex_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                    block_mask=block_mask, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class FlexCore(nn.Module):
    """Attention core on compiled ``flex_attention`` with the layout's document-causal BlockMask.

    q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hkv divides Hq) -> [B, S, Hq, D]. No attention dropout;
    no backward on CPU (raises naming model.attn_impl). ``block_size`` (tokens) is flex's sparse
    block; tests lower it to exercise full and partial blocks at tiny lengths.
    """

    dropout = 0.0  # read by apply_cp when it swaps the core

    def __init__(self, block_size: int = BLOCK_SIZE):
        super().__init__()
        self.block_size = block_size

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: DocumentLayout
    ) -> torch.Tensor:
        return flex_attend(q, k, v, docs.block_mask(self.block_size))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"
