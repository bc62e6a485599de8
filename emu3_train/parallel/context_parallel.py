"""Context parallelism (CP) for packed rows with per-document causal attention.

Each row of S tokens is cut into 2·cp equal chunks; CP rank r keeps chunks r and 2·cp−1−r, so
every rank holds as many early (cheap) as late (expensive) causal queries. Everything outside
attention is per token and runs on the shard unchanged; attention sees the whole row through one
of two cores (``parallel.cp_impl``):

- ``allgather``: each rank all-gathers K and V over the CP group (gradients reduce-scattered back)
  and attends its local queries to every key, masked by document and by global token index.
- ``ulysses``: DeepSpeed's ``DistributedAttention`` all-to-alls q/k/v from sequence shards to head
  shards (every rank: the whole row, Hkv / cp KV heads), attends with the same mask, and
  all-to-alls back. Needs the local KV heads divisible by cp.

Neither core reorders the gathered tokens into row order: the mask is built from the global index
of every token, so the rank-major order of the gathered sequence is as good as any. The masks are
dense booleans for SDPA — [B, S / cp, S] (allgather) and [B, S, S] (ulysses) — fine for tests and
short rows; long rows need a varlen/flex core fed the same global indices.

    batch = shard_batch(batch, cp_rank=mesh["cp"].get_local_rank(), cp=dims.cp)
    apply_cp(model, mesh["cp"], cfg.parallel.cp_impl)                 # once, after TP
    hidden = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"],
                   token_index=batch.get("token_index"))              # [B, S / cp, H]
    loss_sum, stats = weighted_ce(hidden, ..., batch["labels"], batch["loss_weight"], ...)

The local loss sums and gradients add up over the CP ranks to the unsharded batch's: reduce them
(and the loss weight) over dp × cp (the mesh's flattened ``dp_cp`` dimension).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from emu3_train.model.attention import Attention
from emu3_train.model.decoder import Decoder, Emu3CausalLM

CP_IMPLS = ("allgather", "ulysses")
SEQUENCE_KEYS = ("tokens", "labels", "loss_weight", "position_ids")
CP_EXTRA_INPUTS = ("token_index",)  # keys shard_batch adds that the CP model takes as keywords


def cp_chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two of 2·cp row chunks CP rank ``cp_rank`` holds, in local order: (r, 2·cp−1−r)."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} is outside [0, cp={cp})")
    return cp_rank, 2 * cp - 1 - cp_rank


def cp_positions(seq_len: int, cp_rank: int, cp: int, device: torch.device | None = None) -> torch.Tensor:
    """int64 [seq_len / cp]: the row positions (0..seq_len−1) of CP rank ``cp_rank``'s tokens."""
    if seq_len % (2 * cp):
        raise ValueError(f"row length {seq_len} tokens is not divisible by 2 * cp = {2 * cp} "
                         f"(data.seq_len must be; see ParallelDims.validate)")
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device)
                      for c in cp_chunk_ids(cp_rank, cp)])


def shard_batch(batch: dict, cp_rank: int, cp: int) -> dict:
    """This CP rank's share of a packed batch (``data.batch`` contract).

    tokens, labels, loss_weight, position_ids [B, S] -> [B, S / cp]: row chunks ``cp_rank`` and
    ``2·cp−1−cp_rank`` of S / (2·cp) tokens each, concatenated in that order. Adds
    ``token_index`` int64 [B, S / cp], each local token's index among the flattened B*S tokens
    (the index space of ``cu_seqlens``), which the model's CP layout needs. ``cu_seqlens`` and
    the statistics (num_docs, num_tokens, ...) are kept as they are: they describe the whole batch.
    ``cp == 1`` returns a copy of ``batch`` without ``token_index`` (a plain model rejects one),
    so ``model(..., token_index=batch.get("token_index"))`` serves both.
    """
    cp_chunk_ids(cp_rank, cp)  # validates cp_rank
    out = dict(batch)
    if cp == 1:
        return out
    b, s = batch["tokens"].shape
    cols = cp_positions(s, cp_rank, cp, device=batch["tokens"].device)
    for key in SEQUENCE_KEYS:
        if tuple(batch[key].shape) != (b, s):
            raise ValueError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected [B, S] = "
                             f"{(b, s)} like batch['tokens']")
        out[key] = batch[key][:, cols]
    rows = torch.arange(b, device=cols.device)[:, None] * s
    out["token_index"] = rows + cols[None, :]
    return out


def unshard_sequence(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_batch` along ``dim``: the cp ranks' shards (rank order) -> row order."""
    cp = len(shards)
    halves = [piece for shard in shards for piece in shard.chunk(2, dim=dim)]
    order = [None] * (2 * cp)
    for r in range(cp):
        first, second = cp_chunk_ids(r, cp)
        order[first], order[second] = halves[2 * r], halves[2 * r + 1]
    return torch.cat(order, dim=dim)


def _gather_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, S_local, ...] on each rank -> [B, cp * S_local, ...], ranks concatenated in rank order."""
    cp = dist.get_world_size(group)
    out = x.new_empty((cp * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    out = out.view(cp, *x.shape).movedim(0, 1)  # [B, cp, S_local, ...]
    return out.reshape(x.shape[0], cp * x.shape[1], *x.shape[2:])


class _GatherSequence(torch.autograd.Function):
    """:func:`_gather_rows` whose backward reduce-scatters (sums) the gradient back to the shards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.local_shape = group, x.shape
        return _gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cp = dist.get_world_size(ctx.group)
        b, s_local = ctx.local_shape[:2]
        per_rank = grad.reshape(b, cp, s_local, *grad.shape[2:]).movedim(1, 0).contiguous()
        out = grad.new_empty(ctx.local_shape)
        dist.reduce_scatter_single(out, per_rank.view(cp * b, s_local, *grad.shape[2:]),
                                   op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather along the sequence: [B, S_local, ...] -> [B, cp * S_local, ...] in
    CP rank order (use the gathered ``token_index`` to place each token)."""
    return _GatherSequence.apply(x, group)


class ContextParallelLayout:
    """The document layout of one CP rank's shard, with the whole row's keys.

    ``cu_seqlens`` is the full batch's (over the flattened global B*S tokens), ``position_ids`` and
    ``token_index`` are the shard's [B, S_local]. ``key_index`` [B, cp * S_local] is every CP
    rank's ``token_index`` in rank order — the order of K/V after the cores' gather or all-to-all.
    A query may attend a key iff they share a document and the key's global index is not larger.

    Attributes:
        token_index, doc_ids: int64 [B, S_local] of the local tokens (queries).
        key_index, key_doc_ids: int64 [B, cp * S_local] of the gathered tokens.
    """

    def __init__(self, cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
                 token_index: torch.Tensor | None, group: dist.ProcessGroup):
        if token_index is None:
            raise ValueError("context parallelism is applied: shard the batch with "
                             "context_parallel.shard_batch and pass token_index=batch['token_index']")
        if token_index.shape != position_ids.shape or position_ids.dim() != 2:
            raise ValueError(f"token_index {tuple(token_index.shape)} and position_ids "
                             f"{tuple(position_ids.shape)} must have the same [B, S_local] shape")
        cp = dist.get_world_size(group)
        batch, local = position_ids.shape
        torch._assert_async(cu_seqlens[-1] == batch * local * cp,
                            "cu_seqlens must end at B * S_local * cp: is the batch sharded?")
        bounds = cu_seqlens[1:].to(torch.int64)
        self.cu_seqlens = cu_seqlens
        self.position_ids = position_ids
        self.token_index = token_index.to(torch.int64)
        self.doc_ids = torch.searchsorted(bounds, self.token_index, right=True)
        self.key_index = _gather_rows(self.token_index, group)
        self.key_doc_ids = torch.searchsorted(bounds, self.key_index, right=True)
        self._local_mask: torch.Tensor | None = None
        self._gathered_mask: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S_local) of the shard."""
        return tuple(self.doc_ids.shape)

    @staticmethod
    def _mask(q_index, q_docs, k_index, k_docs) -> torch.Tensor:
        same_doc = q_docs[:, :, None] == k_docs[:, None, :]
        return (same_doc & (k_index[:, None, :] <= q_index[:, :, None])).unsqueeze(1)

    def local_mask(self) -> torch.Tensor:
        """bool [B, 1, S_local, cp * S_local]: local queries x gathered keys (cached)."""
        if self._local_mask is None:
            self._local_mask = self._mask(self.token_index, self.doc_ids, self.key_index, self.key_doc_ids)
        return self._local_mask

    def gathered_mask(self) -> torch.Tensor:
        """bool [B, 1, cp * S_local, cp * S_local]: gathered queries x gathered keys (cached)."""
        if self._gathered_mask is None:
            keys = (self.key_index, self.key_doc_ids)
            self._gathered_mask = self._mask(*keys, *keys)
        return self._gathered_mask

    def causal_mask(self) -> torch.Tensor:
        raise TypeError("a context-parallel shard needs a context-parallel attention core: "
                        "apply_cp swaps every Attention.core, do not replace them afterwards")


class ContextParallelLayoutBuilder:
    """``Decoder.make_layout`` under CP: (cu_seqlens, position_ids, token_index) -> layout."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __call__(self, cu_seqlens, position_ids, token_index=None) -> ContextParallelLayout:
        return ContextParallelLayout(cu_seqlens, position_ids, token_index, self.group)


def _masked_sdpa(q, k, v, mask, dropout: float) -> torch.Tensor:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], mask [B, 1, Sq, Sk] -> [B, Sq, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        dropout_p=dropout, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class AllGatherCore(nn.Module):
    """CP attention core: all-gather K/V over the CP group, attend local queries to all keys.

    q [B, S_local, Hq, D], k/v [B, S_local, Hkv, D], docs :class:`ContextParallelLayout`
    -> [B, S_local, Hq, D]. Memory per layer: the gathered K/V, [B, cp * S_local, Hkv, D] each.
    """

    def __init__(self, group: dist.ProcessGroup, dropout: float = 0.0):
        super().__init__()
        self.group = group
        self.dropout = dropout

    def forward(self, q, k, v, docs: ContextParallelLayout) -> torch.Tensor:
        k_all, v_all = gather_sequence(k, self.group), gather_sequence(v, self.group)
        return _masked_sdpa(q, k_all, v_all, docs.local_mask(), self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"cp={dist.get_world_size(self.group)}, dropout={self.dropout}"


class _GatheredSdpa(nn.Module):
    """Ulysses' local attention: the whole row in CP rank order, a head shard, the gathered mask."""

    def __init__(self, dropout: float):
        super().__init__()
        self.dropout = dropout

    def forward(self, q, k, v, docs: ContextParallelLayout) -> torch.Tensor:
        return _masked_sdpa(q, k, v, docs.gathered_mask(), self.dropout if self.training else 0.0)


def _init_deepspeed_comm() -> None:
    """Point ``deepspeed.comm`` at the torch.distributed group already running (idempotent).

    deepspeed's TorchBackend would JIT-compile its shared-memory CPU all-reduce op (~60 s and a
    C++ toolchain) on CPU accelerators; Ulysses only all-to-alls, so that build is skipped.
    """
    import deepspeed
    import deepspeed.comm as ds_comm

    if ds_comm.is_initialized():
        return
    compatible = deepspeed.ops.__compatible_ops__
    saved = compatible.get("deepspeed_shm_comm")
    compatible["deepspeed_shm_comm"] = False
    try:
        ds_comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    finally:
        if saved is None:
            compatible.pop("deepspeed_shm_comm", None)
        else:
            compatible["deepspeed_shm_comm"] = saved


class UlyssesCore(nn.Module):
    """CP attention core on DeepSpeed's ``DistributedAttention`` (Ulysses all-to-all).

    Same interface as :class:`AllGatherCore`. DeepSpeed 0.19.8 takes batch-first [B, S, H, D]
    with ``batch_dim_idx=0`` at call time, ``scatter_idx=2`` (heads) and ``gather_idx=1``
    (sequence); the gathered sequence is in CP rank order, which ``gathered_mask`` accounts for.
    Query heads h of KV head h // (Hq / Hkv) stay together because both are split contiguously.
    """

    def __init__(self, group: dist.ProcessGroup, dropout: float = 0.0):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        _init_deepspeed_comm()
        self.cp = dist.get_world_size(group)
        self.dist_attn = DistributedAttention(_GatheredSdpa(dropout), group, scatter_idx=2, gather_idx=1)

    def forward(self, q, k, v, docs: ContextParallelLayout) -> torch.Tensor:
        if k.shape[2] % self.cp:
            raise ValueError(f"parallel.cp_impl=ulysses needs the local KV heads ({k.shape[2]}) "
                             f"divisible by parallel.cp={self.cp}")
        return self.dist_attn(q, k, v, 0, None, docs)  # batch_dim_idx=0, no rotary (applied already)

    def extra_repr(self) -> str:
        return f"cp={self.cp}"


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh | None, impl: str = "allgather") -> None:
    """Context-parallel pass: swap every attention core for a CP core and install the CP layout.

    ``cp_mesh`` is the 1-D "cp" mesh (``mesh["cp"]``); a size-1 or None mesh leaves the model
    as it is. Afterwards the model takes the shards of :func:`shard_batch` plus their
    ``token_index``. Parameters and their names are unchanged. Attention dropout carries over
    (its masks then differ from a single process's). Accepts an Emu3CausalLM or a Decoder.
    """
    if impl not in CP_IMPLS:
        raise ValueError(f"parallel.cp_impl={impl!r} is unknown; choose one of {CP_IMPLS}")
    decoder = model.model if isinstance(model, Emu3CausalLM) else model
    if not isinstance(decoder, Decoder):
        raise TypeError(f"apply_cp expects Emu3CausalLM or Decoder, got {type(model).__name__}")
    if cp_mesh is None or cp_mesh.size() == 1:
        return
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_cp needs the 1-D 'cp' mesh (mesh['cp']), got {cp_mesh.ndim} dims")
    group = cp_mesh.get_group()
    core_cls = AllGatherCore if impl == "allgather" else UlyssesCore
    for module in decoder.modules():
        if isinstance(module, Attention):
            module.core = core_cls(group, dropout=getattr(module.core, "dropout", 0.0))
    decoder.make_layout = ContextParallelLayoutBuilder(group)
