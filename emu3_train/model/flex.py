"""FlexAttention core: document-causal attention over packed rows as a block-sparse kernel.

The BlockMask is derived from the layout's per-token indices and document ids at the cost of
O(B * (S / block)^2) small integer ops (no [S, S] mask, no compile), once per decoder forward
(:meth:`Documents.block_mask` caches it for every layer); the context-parallel cores use the same
function over their local queries and the row's keys. ``flex_attention`` is compiled once
per process (``dynamic=False``: one graph per row length).

Where it runs (torch 2.13): forward and backward on CUDA; forward only on CPU (compiled, no
backward), so on CPU it serves inference and the parity tests, never training. It has no attention
dropout. Under context parallelism the allgather CP core calls :func:`flex_attend` with its
shard's :class:`~emu3_train.model.documents.Documents` (``parallel/cp_attention.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

if TYPE_CHECKING:
    from emu3_train.model.documents import Documents

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


def _block_ranges(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] -> (min, max) over each ``block``-long slice, [B, ceil(L / block)] (tail: its own)."""
    pad = -x.shape[1] % block
    if pad:
        x = torch.cat([x, x[:, -1:].expand(x.shape[0], pad)], dim=1)
    x = x.view(x.shape[0], -1, block)
    return x.amin(-1), x.amax(-1)


def document_block_mask(q_index, q_docs, k_index, k_docs, block_size: int = BLOCK_SIZE) -> BlockMask:
    """The mask of :func:`~emu3_train.model.documents.document_causal_mask` (query i may attend key
    j iff same document and ``k_index[j] <= q_index[i]``; int64 [B, Sq] and [B, Sk] vectors) as a
    flex BlockMask, Q_LEN = Sq, KV_LEN = Sk, in O(B * Sq * Sk / block^2) integer ops, no dense mask.

    Per (query block, key block): *full* when every key's index is at most every query's and all
    of them share one document; *partial* (mask_mod evaluated per token) when the ranges allow
    some pair (earliest key index <= latest query index, document ranges overlap); else skipped.
    Exact for blocks of consecutive indices with non-decreasing documents (a packed batch; the CP
    cores' shards when the row chunk length is a multiple of ``block_size``), a superset
    otherwise. Tail blocks are never full, as in ``create_block_mask``.
    """
    sq, sk = q_index.shape[1], k_index.shape[1]
    q_lo, q_hi = _block_ranges(q_index, block_size)
    qd_lo, qd_hi = _block_ranges(q_docs, block_size)
    k_lo, k_hi = _block_ranges(k_index, block_size)
    kd_lo, kd_hi = _block_ranges(k_docs, block_size)
    some = ((k_lo[:, None, :] <= q_hi[:, :, None]) & (kd_lo[:, None, :] <= qd_hi[:, :, None])
            & (kd_hi[:, None, :] >= qd_lo[:, :, None]))
    one_doc = ((qd_lo == qd_hi)[:, :, None] & (kd_lo == kd_hi)[:, None, :]
               & (kd_lo[:, None, :] == qd_lo[:, :, None]))
    full = one_doc & (k_hi[:, None, :] <= q_lo[:, :, None])
    if sq % block_size:
        full[:, -1, :] = False
    if sk % block_size:
        full[:, :, -1] = False
    partial = some & ~full

    # The kernel evaluates the mask on whole blocks: padded queries and keys match no document.
    pad = torch.nn.functional.pad
    q_idx, k_idx = pad(q_index, (0, -sq % block_size)), pad(k_index, (0, -sk % block_size))
    q_doc = pad(q_docs, (0, -sq % block_size), value=-1)
    k_doc = pad(k_docs, (0, -sk % block_size), value=-2)

    def same_document_causal(b, h, q, kv):
        return (k_idx[b, kv] <= q_idx[b, q]) & (q_doc[b, q] == k_doc[b, kv])

    return BlockMask.from_kv_blocks(*ordered_blocks(partial), *ordered_blocks(full), BLOCK_SIZE=block_size,
                                    mask_mod=same_document_causal, seq_lengths=(sq, sk))


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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents
    ) -> torch.Tensor:
        return flex_attend(q, k, v, docs.block_mask(self.block_size))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"
