"""Which keys each query may attend: the one document-mask type of plain, context-parallel and
cached attention.

Every query and every key carries an *index* (int64) and a *document id*; query i may attend key
j iff both are in the same document and ``k_index[j] <= q_index[i]``. The three ways the model
attends differ only in what the vectors hold:

- **packed** (:meth:`Documents.packed`, one process): queries = keys = the [B, S] batch, index =
  the token's place among the flattened B*S tokens, documents from ``cu_seqlens`` (each row's
  padding is its own segment; a row end always ends a document).
- **context-parallel** (:meth:`Documents.sharded`): queries = this rank's shard [B, S / cp]
  (``token_index`` of ``parallel.context_parallel.shard_batch``), keys = the whole row in row order.
- **cached** (:meth:`Documents.cached`, generation): queries = the n new tokens at cache slots
  [start, start + n), keys = slots [0, start + n) of the KV cache; left padding (``pad[b]`` slots)
  is document 0, the sequence document 1.

The derived masks are built on first use and cached, so every layer of a forward shares them:
a dense bool mask (:meth:`causal_mask`), a flex BlockMask (:meth:`block_mask`), varlen segments
(packed only) and query chunk plans (packed and sharded; the CP cores' chunked SDPA).

    docs = Documents.packed(batch["cu_seqlens"], batch["position_ids"])
    docs.causal_mask()          # bool [B, 1, S, S]
"""

from __future__ import annotations

import numpy as np
import torch

# (query start, query end, key start, key end) of one chunk: local query positions, key columns
Chunk = tuple[int, int, int, int]


def document_causal_mask(q_index, q_docs, k_index, k_docs) -> torch.Tensor:
    """int64 [B, Sq] (query index, doc), [B, Sk] (key index, doc) -> bool [B, 1, Sq, Sk]."""
    same_doc = q_docs[:, :, None] == k_docs[:, None, :]
    return (same_doc & (k_index[:, None, :] <= q_index[:, :, None])).unsqueeze(1)


def plan_query_chunks(q_cols: torch.Tensor, q_first_cols: torch.Tensor, chunk_size: int) -> tuple[Chunk, ...]:
    """Cut the queries into chunks of at most ``chunk_size`` and give each the keys it can reach.

    ``q_cols`` int64 [B, Sq]: each query's column in its row (its key j is column j);
    ``q_first_cols`` [B, Sq]: the column of its document's first token in that row. A chunk never
    spans a jump in the columns (the two row chunks a CP rank holds), and reaches keys
    [min first column, max column + 1) over its queries and rows, a superset of what its mask
    allows. One host synchronization.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    last = q_cols.amax(0).cpu().numpy()
    first = q_first_cols.amin(0).cpu().numpy()
    runs = np.flatnonzero(np.diff(last) != 1) + 1
    bounds = np.concatenate([[0], runs, [len(last)]])
    starts = np.concatenate([np.arange(a, b, chunk_size) for a, b in zip(bounds[:-1], bounds[1:])])
    ends = np.append(starts[1:], len(last))
    lo = np.minimum.reduceat(first, starts)
    hi = np.maximum.reduceat(last, starts) + 1
    return tuple(zip(starts.tolist(), ends.tolist(), lo.tolist(), hi.tolist()))


def _check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, what: str) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seqlens must be an integer [D + 1] tensor, got {cu_seqlens.dtype} "
                         f"of shape {tuple(cu_seqlens.shape)}")
    # Asserted without a host sync on GPU; raises at once on CPU.
    torch._assert_async(cu_seqlens[0] == 0, "cu_seqlens must start at 0")
    torch._assert_async(cu_seqlens[-1] == total, f"cu_seqlens must end at {what}")


class Documents:
    """Queries at ``q_index`` of documents ``q_docs`` [B, Sq], keys at ``k_index`` of ``k_docs``
    [B, Sk] (module docstring); ``position_ids`` [B, Sq] are the queries' RoPE positions.

    Build it with :meth:`packed`, :meth:`sharded` or :meth:`cached`. ``cu_seqlens`` (packed and
    sharded) are the document boundaries over the flattened batch, ``row_start`` [B, 1] the index
    of each row's first token (for chunk plans); ``packed`` marks queries == keys (varlen);
    ``all_visible``: every query sees every key (no mask needed).
    """

    def __init__(self, q_index: torch.Tensor, q_docs: torch.Tensor, k_index: torch.Tensor,
                 k_docs: torch.Tensor, position_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                 row_start: torch.Tensor | None = None, packed: bool = False, all_visible: bool = False):
        self.q_index, self.q_docs, self.k_index, self.k_docs = q_index, q_docs, k_index, k_docs
        self.position_ids, self.cu_seqlens, self.row_start = position_ids, cu_seqlens, row_start
        self.is_packed, self.all_visible = packed, all_visible
        self._mask: torch.Tensor | None = None
        self._block_masks: dict = {}  # flex BlockMask per block size
        self._segments: tuple[torch.Tensor, int] | None = None
        self._chunks: dict = {}

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def packed(cls, cu_seqlens: torch.Tensor, position_ids: torch.Tensor) -> Documents:
        """The single-process layout of a packed [B, S] batch: ``cu_seqlens`` int [D + 1] over the
        flattened B*S tokens (from 0 to B*S), ``position_ids`` int64 [B, S]."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids.shape)}")
        batch, seq = position_ids.shape
        _check_cu_seqlens(cu_seqlens, batch * seq, "B * S")
        flat = torch.arange(batch * seq, device=cu_seqlens.device).view(batch, seq)
        doc_ids = torch.searchsorted(cu_seqlens[1:].to(torch.int64), flat, right=True)
        row_start = torch.arange(batch, device=flat.device)[:, None] * seq
        return cls(flat, doc_ids, flat, doc_ids, position_ids, cu_seqlens=cu_seqlens, row_start=row_start,
                   packed=True)

    @classmethod
    def sharded(cls, cu_seqlens: torch.Tensor, position_ids: torch.Tensor, token_index: torch.Tensor,
                cp: int) -> Documents:
        """A context-parallel shard's layout: local queries [B, S / cp] at ``token_index`` (their
        indices among the flattened global B*S tokens), keys = every row's S tokens in row order.
        ``cu_seqlens`` is the whole batch's."""
        if token_index.shape != position_ids.shape or position_ids.dim() != 2:
            raise ValueError(f"token_index {tuple(token_index.shape)} and position_ids "
                             f"{tuple(position_ids.shape)} must have the same [B, S_local] shape")
        batch, local = position_ids.shape
        seq, device = cp * local, position_ids.device
        _check_cu_seqlens(cu_seqlens, batch * seq, "B * S_local * cp: is the batch sharded?")
        bounds = cu_seqlens[1:].to(torch.int64)
        row_start = torch.arange(batch, device=device)[:, None] * seq
        q_index = token_index.to(torch.int64)
        k_index = row_start + torch.arange(seq, device=device)
        return cls(q_index, torch.searchsorted(bounds, q_index, right=True), k_index,
                   torch.searchsorted(bounds, k_index, right=True), position_ids, cu_seqlens=cu_seqlens,
                   row_start=row_start)

    @classmethod
    def cached(cls, pad: torch.Tensor, start: int, length: int, no_padding: bool = False) -> Documents:
        """``length`` new queries at cache slots [start, start + length) of every sequence, keys at
        slots [0, start + length); sequence b's first ``pad[b]`` slots (int64 [B]) are left padding,
        its own document. Positions count from the sequence's first real slot (padding: from 0).
        ``no_padding`` (the caller knows every pad is 0) with one query per sequence: every key is
        visible and :meth:`causal_mask` is None (SDPA then needs no mask)."""
        device = pad.device
        q_index = torch.arange(start, start + length, device=device).expand(len(pad), length)
        k_index = torch.arange(start + length, device=device).expand(len(pad), start + length)
        q_docs = (q_index >= pad[:, None]).to(torch.int64)
        k_docs = (k_index >= pad[:, None]).to(torch.int64)
        positions = torch.where(q_docs.bool(), q_index - pad[:, None], q_index)
        return cls(q_index, q_docs, k_index, k_docs, positions, all_visible=no_padding and length == 1)

    # -- what the cores take ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(B, Sq) of the queries."""
        return tuple(self.q_docs.shape)

    @property
    def doc_ids(self) -> torch.Tensor:
        """int64 [B, Sq]: each query's document (its segment in ``cu_seqlens``)."""
        return self.q_docs

    def causal_mask(self) -> torch.Tensor | None:
        """bool [B, 1, Sq, Sk], True where query i may attend key j; None when every key is
        visible (a decode step without padding). Computed on first use and cached."""
        if self.all_visible:
            return None
        if self._mask is None:
            self._mask = document_causal_mask(self.q_index, self.q_docs, self.k_index, self.k_docs)
        return self._mask

    def block_mask(self, block_size: int):
        """The same mask as a flex ``BlockMask`` of ``block_size``-token blocks (cached)."""
        if block_size not in self._block_masks:
            from emu3_train.model.flex import document_block_mask

            self._block_masks[block_size] = document_block_mask(self.q_index, self.q_docs, self.k_index,
                                                                self.k_docs, block_size)
        return self._block_masks[block_size]

    def varlen_segments(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens int32 [N + 1] with every row end included, longest segment in tokens), cached.
        Packed layouts only (queries == keys)."""
        if not self.is_packed:
            raise TypeError("varlen attention needs a packed layout (queries == keys); this one is "
                            "context-parallel or cached")
        if self._segments is None:
            from emu3_train.model.varlen import row_segments

            self._segments = row_segments(self.cu_seqlens, *self.shape)
        return self._segments

    def _plan(self, index: torch.Tensor, docs: torch.Tensor, chunk_size: int) -> tuple[Chunk, ...]:
        if self.cu_seqlens is None:
            raise TypeError("query chunks need cu_seqlens: a packed or context-parallel layout")
        doc_starts = self.cu_seqlens[:-1].to(torch.int64)
        first = (doc_starts[docs] - self.row_start).clamp_min(0)  # a row end ends a document
        return plan_query_chunks(index - self.row_start, first, chunk_size)

    def query_chunks(self, chunk_size: int) -> tuple[Chunk, ...]:
        """:func:`plan_query_chunks` of the queries against the keys (cached)."""
        if ("q", chunk_size) not in self._chunks:
            self._chunks["q", chunk_size] = self._plan(self.q_index, self.q_docs, chunk_size)
        return self._chunks["q", chunk_size]

    def row_chunks(self, chunk_size: int) -> tuple[Chunk, ...]:
        """:func:`plan_query_chunks` of the keys taken as queries (Ulysses: the whole row), cached."""
        if ("k", chunk_size) not in self._chunks:
            self._chunks["k", chunk_size] = self._plan(self.k_index, self.k_docs, chunk_size)
        return self._chunks["k", chunk_size]
