"""Attention of a context-parallel shard over the whole row, without an [S_local, S] mask.

Every query and key carries its global token index (over the flattened B*S tokens of the batch,
the index space of ``cu_seqlens``) and its document id; query i may attend key j iff both are in
the same document and index_j <= index_i. :func:`gather_sequence` hands every rank the row's K/V
in *row order* (key j of row b is token b*S + j), so each block of queries can skip every key
before its earliest document's first token and after its last query.

- :func:`chunked_document_attention` (SDPA; CPU, and the GPU path with dropout): queries in
  chunks, each chunk's boolean mask [B, 1, chunk, K_c] built inside the chunk computation over
  only the key range it can reach. An autograd Function recomputes each chunk in backward, so
  what is saved for backward is q, k, v and the integer vectors: O(S) memory instead of the dense
  mask's O(S_local * S), same numbers. Transient memory: one chunk's mask, a
  :data:`CHUNK_BUDGET_BYTES` budget (:func:`query_chunk_size`).
- :func:`cp_block_mask` (flex; GPU): the same mask as a flex ``BlockMask`` over Q_LEN = S_local,
  KV_LEN = S: ``model.flex.document_block_mask``, the one block mask of every layout, classified
  per (query block, key block) from the blocks' index and document ranges, never a dense mask.
- :func:`dense_document_attention`: the dense-mask reference (tests, benchmark).

The mask itself, the chunk planner and the layout type (``model.documents.Documents``, built by
``context_parallel.context_parallel_layout``) are the model's; this module re-exports
``document_causal_mask``, ``plan_query_chunks`` and ``Chunk``.

The cores (``forward(q, k, v, docs)``, ``docs`` a shard's ``Documents``):
:class:`AllGatherCore` (chunked SDPA), :class:`FlexAllGatherCore`, :class:`AutoAllGatherCore`, and
:func:`row_order_attention`, the local attention of the Ulysses core.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from emu3_train.model.attention import choose_attn_impl, masked_sdpa
from emu3_train.model.documents import Chunk, Documents, document_causal_mask, plan_query_chunks
from emu3_train.model.flex import BLOCK_SIZE, document_block_mask, flex_attend
from emu3_train.model.varlen import HALF_DTYPES

CHUNK_BUDGET_BYTES = 64 * 2**20  # per query chunk: its mask and what SDPA derives from it
# Smaller chunks reach fewer keys (a tighter [lo, hi) per chunk); 512 was faster than 1,024 or
# 4,096 on CPU at S = 16,384 with 256..4,096-token documents (benchmarks/cp_attention.py).
MAX_CHUNK_QUERIES = 512

__all__ = ["Chunk", "document_causal_mask", "plan_query_chunks", "cp_block_mask"]  # re-exported
cp_block_mask = document_block_mask  # the CP flex mask is the model's one document BlockMask


def rank_to_row_order(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The cp ranks' shards in rank order ([.., S / cp, ..] each, row chunks r and 2·cp−1−r)
    -> the row [.., S, ..] in row order. One copy; differentiable."""
    cp = len(shards)
    halves = [piece for shard in shards for piece in shard.chunk(2, dim=dim)]
    order = [None] * (2 * cp)
    for r in range(cp):
        order[r], order[2 * cp - 1 - r] = halves[2 * r], halves[2 * r + 1]
    return torch.cat(order, dim=dim)


def row_to_rank_order(x: torch.Tensor, cp: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`rank_to_row_order`: the row [.., S, ..] -> the shards concatenated in
    rank order [.., S, ..]. One copy; differentiable."""
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([c for r in range(cp) for c in (chunks[r], chunks[2 * cp - 1 - r])], dim=dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence into row order; backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        cp = dist.get_world_size(group)
        ctx.group, ctx.local_shape = group, x.shape
        buf = x.new_empty((cp * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(buf, x.contiguous(), group=group)
        return rank_to_row_order(list(buf.view(cp, *x.shape).unbind(0)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = dist.get_world_size(ctx.group)
        chunks = grad.chunk(2 * cp, dim=1)
        per_rank = grad.new_empty((cp, *ctx.local_shape))
        for r in range(cp):
            torch.cat([chunks[r], chunks[2 * cp - 1 - r]], dim=1, out=per_rank[r])
        out = grad.new_empty(ctx.local_shape)
        dist.reduce_scatter_single(out, per_rank.view(cp * ctx.local_shape[0], *ctx.local_shape[1:]),
                                   op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather of :func:`~emu3_train.parallel.context_parallel.shard_batch`
    shards: [B, S / cp, ...] on each rank -> [B, S, ...] in row order (position j = row column j)."""
    return _GatherSequence.apply(x, group)


def dense_document_attention(q, k, v, q_index, q_docs, k_index, k_docs, dropout: float = 0.0) -> torch.Tensor:
    """The reference: SDPA with the dense [B, 1, Sq, Sk] mask, saved for backward. Same shapes as
    :func:`chunked_document_attention`; memory O(B * Sq * Sk)."""
    return masked_sdpa(q, k, v, document_causal_mask(q_index, q_docs, k_index, k_docs), dropout)


def query_chunk_size(batch: int, keys: int, heads: int, dtype: torch.dtype, dropout: float,
                     budget: int = CHUNK_BUDGET_BYTES) -> int:
    """Queries per chunk (at most :data:`MAX_CHUNK_QUERIES`) so that one chunk's transient
    attention state fits ``budget`` bytes.

    Per (query, key) pair: the boolean mask (1 byte) and the additive bias SDPA converts it to
    (one activation element); with dropout, SDPA's math path also materializes scores,
    probabilities and the dropout mask for each of ``heads`` query heads (fp32, 3 x 4 bytes).
    """
    per_pair = 1 + torch.empty((), dtype=dtype).element_size() + (12 * heads if dropout else 0)
    return max(1, min(MAX_CHUNK_QUERIES, budget // (batch * keys * per_pair)))


def _capture_rng(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replay_rng(state, device: torch.device):
    """Run the block from the generator state ``state`` (CPU, and ``device`` if CUDA); restore after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _chunk_mask(q_index, q_docs, k_index, k_docs, chunk: Chunk) -> torch.Tensor:
    """bool [B, 1, chunk queries, chunk keys], built when the chunk runs (and again in backward)."""
    qs, qe, ks, ke = chunk
    return document_causal_mask(q_index[:, qs:qe], q_docs[:, qs:qe], k_index[:, ks:ke], k_docs[:, ks:ke])


class _ChunkedDocumentAttention(torch.autograd.Function):
    """Forward: chunk by chunk, keeping only the output. Backward: each chunk again (same dropout
    draws: the generator is replayed from the forward's state), its gradients accumulated."""

    @staticmethod
    def forward(ctx, q, k, v, q_index, q_docs, k_index, k_docs, chunks: tuple[Chunk, ...], dropout: float):
        ctx.rng = _capture_rng(q.device) if dropout else None
        ctx.chunks, ctx.dropout = chunks, dropout
        ctx.save_for_backward(q, k, v, q_index, q_docs, k_index, k_docs)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        for qs, qe, ks, ke in chunks:
            mask = _chunk_mask(q_index, q_docs, k_index, k_docs, (qs, qe, ks, ke))
            out[:, qs:qe] = masked_sdpa(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], mask, dropout)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, q_index, q_docs, k_index, k_docs = ctx.saved_tensors
        acc = torch.float32 if k.dtype in HALF_DTYPES else k.dtype  # dk/dv sum over chunks
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        replay = _replay_rng(ctx.rng, q.device) if ctx.rng is not None else contextlib.nullcontext()
        with replay:
            for chunk in ctx.chunks:
                qs, qe, ks, ke = chunk
                inputs = [t.detach().requires_grad_() for t in (q[:, qs:qe], k[:, ks:ke], v[:, ks:ke])]
                with torch.enable_grad():
                    mask = _chunk_mask(q_index, q_docs, k_index, k_docs, chunk)
                    out = masked_sdpa(*inputs, mask, ctx.dropout)
                gq, gk, gv = torch.autograd.grad(out, inputs, grad_out[:, qs:qe])
                dq[:, qs:qe] = gq
                dk[:, ks:ke] += gk
                dv[:, ks:ke] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def chunked_document_attention(q, k, v, q_index, q_docs, k_index, k_docs, chunks: tuple[Chunk, ...],
                               dropout: float = 0.0) -> torch.Tensor:
    """Document-causal attention, chunk by chunk (see the module docstring).

    q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] (Hkv divides Hq); q_index/q_docs int64 [B, Sq],
    k_index/k_docs [B, Sk]; ``chunks`` from :func:`plan_query_chunks` (they must cover every
    query once, and every key a chunk's queries may attend must lie in its key range) ->
    [B, Sq, Hq, D], equal to :func:`dense_document_attention`. ``dropout`` drops attention
    weights with that probability (pass 0 in eval); backward reproduces the forward's drops.
    Saved for backward: q, k, v and the four integer vectors, nothing of size Sq * Sk.
    """
    return _ChunkedDocumentAttention.apply(q, k, v, q_index, q_docs, k_index, k_docs, chunks, dropout)


class ContextParallelCore(nn.Module):
    """Base of the CP attention cores: ``group`` is the CP process group, and :meth:`layout` builds
    the layout they take (``Decoder.layout`` asks its first attention core for it)."""

    group: dist.ProcessGroup

    def layout(self, cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
               token_index: torch.Tensor | None = None) -> Documents:
        """The shard's :class:`~emu3_train.model.documents.Documents`
        (:func:`~emu3_train.parallel.context_parallel.context_parallel_layout`)."""
        from emu3_train.parallel.context_parallel import context_parallel_layout  # with shard_batch

        return context_parallel_layout(cu_seqlens, position_ids, token_index, self.group)


class AllGatherCore(ContextParallelCore):
    """CP attention core: all-gather K/V over the CP group, attend the local queries to the row
    chunk by chunk with SDPA (:func:`chunked_document_attention`).

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D], docs -> [B, S_local, Hq, D]. Memory per layer:
    the gathered K/V [B, S, Hkv, D] each (saved for backward), and one query chunk's mask at a
    time. ``chunk_size``: queries per chunk; None = :func:`query_chunk_size` of the call.
    """

    def __init__(self, group: dist.ProcessGroup, dropout: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        self.group, self.dropout, self.chunk_size = group, dropout, chunk_size

    def forward(self, q, k, v, docs: Documents) -> torch.Tensor:
        k_all, v_all = gather_sequence(k, self.group), gather_sequence(v, self.group)
        dropout = self.dropout if self.training else 0.0
        size = self.chunk_size or query_chunk_size(q.shape[0], k_all.shape[1], q.shape[2], q.dtype, dropout)
        return chunked_document_attention(q, k_all, v_all, docs.q_index, docs.q_docs, docs.k_index,
                                          docs.k_docs, docs.query_chunks(size), dropout)

    def extra_repr(self) -> str:
        return f"cp={dist.get_world_size(self.group)}, dropout={self.dropout}, chunk_size={self.chunk_size}"


class FlexAllGatherCore(ContextParallelCore):
    """CP attention core on compiled ``flex_attention``: all-gather K/V, attend the local queries
    (Q_LEN = S_local) to the row (KV_LEN = S) through the layout's :func:`cp_block_mask`.

    Same interface as :class:`AllGatherCore`. No attention dropout; no backward on CPU (raises).
    ``block_size`` (tokens) is flex's sparse block.
    """

    dropout = 0.0  # no attention dropout (read by apply_cp like the single-process cores')

    def __init__(self, group: dist.ProcessGroup, block_size: int = BLOCK_SIZE):
        super().__init__()
        self.group, self.block_size = group, block_size

    def forward(self, q, k, v, docs: Documents) -> torch.Tensor:
        k_all, v_all = gather_sequence(k, self.group), gather_sequence(v, self.group)
        return flex_attend(q, k_all, v_all, docs.block_mask(self.block_size))

    def extra_repr(self) -> str:
        return f"cp={dist.get_world_size(self.group)}, block_size={self.block_size}"


class AutoAllGatherCore(ContextParallelCore):
    """``model.attn_impl=auto`` under CP: per call :class:`FlexAllGatherCore` where ``auto`` would
    pick a GPU kernel (CUDA, no active dropout), else :class:`AllGatherCore`."""

    def __init__(self, group: dist.ProcessGroup, dropout: float = 0.0):
        super().__init__()
        self.group, self.dropout = group, dropout
        self.sdpa = AllGatherCore(group, dropout)
        self.flex = FlexAllGatherCore(group)

    def forward(self, q, k, v, docs: Documents) -> torch.Tensor:
        impl = choose_attn_impl(q.device, q.dtype, self.training and self.dropout > 0)
        return (self.sdpa if impl == "sdpa" else self.flex)(q, k, v, docs)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class RowOrderAttention(nn.Module):
    """Ulysses' local attention: q/k/v [B, S, H / cp, D] of the whole row in CP rank order (what
    the all-to-all delivers) -> row order, chunked document attention, -> rank order again."""

    def __init__(self, cp: int, dropout: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        self.cp, self.dropout, self.chunk_size = cp, dropout, chunk_size

    def forward(self, q, k, v, docs: Documents) -> torch.Tensor:
        q, k, v = (rank_to_row_order(list(t.chunk(self.cp, dim=1))) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        size = self.chunk_size or query_chunk_size(q.shape[0], k.shape[1], q.shape[2], q.dtype, dropout)
        keys = (docs.k_index, docs.k_docs)
        out = chunked_document_attention(q, k, v, *keys, *keys, docs.row_chunks(size), dropout)
        return row_to_rank_order(out, self.cp)
