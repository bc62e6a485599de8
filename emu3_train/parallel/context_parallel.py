"""Context parallelism (CP) for packed rows with per-document causal attention.

Each row of S tokens is cut into 2·cp equal chunks; CP rank r keeps chunks r and 2·cp−1−r, so
every rank holds as many early (cheap) as late (expensive) causal queries. Everything outside
attention is per token and runs on the shard unchanged; attention sees the whole row through one
of two cores (``parallel.cp_impl``):

- ``allgather``: each rank all-gathers K and V over the CP group into row order (gradients
  reduce-scattered back) and attends its local queries to the row, masked by document and by
  global token index. ``model.attn_impl`` picks the kernel (``cp_attention.py``): ``sdpa``
  chunked SDPA, ``flex`` a flex BlockMask over Q_LEN = S / cp, KV_LEN = S, ``auto`` flex on CUDA
  without active dropout and chunked SDPA otherwise; ``varlen`` has no CP core.
- ``ulysses``: DeepSpeed's ``DistributedAttention`` all-to-alls q/k/v from sequence shards to head
  shards (every rank: the whole row, Hkv / cp KV heads), attends with chunked SDPA in row order,
  and all-to-alls back. Needs the local KV heads divisible by cp.

No core builds a dense [S / cp, S] (or [S, S]) mask: the layout keeps int64 global token indices
and document ids ([B, S / cp] queries, [B, S] keys), the SDPA path builds one query chunk's mask at
a time (a 64 MiB budget) and recomputes it in backward, so attention memory is O(chunk · S) plus
the gathered K/V; flex derives a block-sparse mask from the same vectors.

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
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from emu3_train.config import CHOICES
from emu3_train.model.attention import ATTN_IMPLS, Attention, AutoCore, SdpaCore
from emu3_train.model.decoder import Decoder, Emu3CausalLM
from emu3_train.model.documents import Documents
from emu3_train.model.flex import BLOCK_SIZE, FlexCore
from emu3_train.model.varlen import VarlenCore
from emu3_train.parallel.cp_attention import (
    AllGatherCore,
    AutoAllGatherCore,
    ContextParallelCore,
    FlexAllGatherCore,
    RowOrderAttention,
)

CP_IMPLS = CHOICES["parallel.cp_impl"]
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
    if "doc_index" in batch:  # preference-pair batches (DPO): each token's document slot
        out["doc_index"] = batch["doc_index"][:, cols]
    rows = torch.arange(b, device=cols.device)[:, None] * s
    out["token_index"] = rows + cols[None, :]
    return out


def context_parallel_layout(cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
                            token_index: torch.Tensor | None, group: dist.ProcessGroup) -> Documents:
    """The :class:`~emu3_train.model.documents.Documents` of one CP rank's shard, with the whole
    row's keys (:meth:`Documents.sharded`).

    ``cu_seqlens`` is the full batch's (over the flattened global B*S tokens), ``position_ids`` and
    ``token_index`` are the shard's [B, S_local] (``token_index`` exactly as :func:`shard_batch`
    makes it: asserted). The keys are the whole row in row order, the order of K/V after the
    cores' gather. Per-forward derived data (query chunk plans, flex BlockMasks) is cached in the
    layout and shared by every layer.
    """
    if token_index is None:
        raise ValueError("context parallelism is applied: shard the batch with "
                         "context_parallel.shard_batch and pass token_index=batch['token_index']")
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    docs = Documents.sharded(cu_seqlens, position_ids, token_index, cp)
    seq = cp * position_ids.shape[1]
    expected = docs.row_start + cp_positions(seq, rank, cp, position_ids.device)
    torch._assert_async((docs.q_index == expected).all(),
                        f"token_index is not shard_batch's for CP rank {rank} of {cp}")
    return docs


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


class UlyssesCore(ContextParallelCore):
    """CP attention core on DeepSpeed's ``DistributedAttention`` (Ulysses all-to-all).

    Same interface as :class:`~emu3_train.parallel.cp_attention.AllGatherCore`. DeepSpeed 0.19.8
    takes batch-first [B, S, H, D] with ``batch_dim_idx=0`` at call time, ``scatter_idx=2`` (heads)
    and ``gather_idx=1`` (sequence); the gathered sequence is in CP rank order, which
    :class:`~emu3_train.parallel.cp_attention.RowOrderAttention` puts in row order for chunked SDPA.
    Query heads h of KV head h // (Hq / Hkv) stay together because both are split contiguously.
    """

    def __init__(self, group: dist.ProcessGroup, dropout: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        _init_deepspeed_comm()
        self.group, self.cp = group, dist.get_world_size(group)
        self.local_attn = RowOrderAttention(self.cp, dropout, chunk_size)
        self.dist_attn = DistributedAttention(self.local_attn, group, scatter_idx=2, gather_idx=1)

    def forward(self, q, k, v, docs: Documents) -> torch.Tensor:
        if k.shape[2] % self.cp:
            raise ValueError(f"parallel.cp_impl=ulysses needs the local KV heads ({k.shape[2]}) "
                             f"divisible by parallel.cp={self.cp}")
        return self.dist_attn(q, k, v, 0, None, docs)  # batch_dim_idx=0, no rotary (applied already)

    def extra_repr(self) -> str:
        return f"cp={self.cp}"


_CORE_IMPLS = ((AutoCore, "auto"), (SdpaCore, "sdpa"), (FlexCore, "flex"), (VarlenCore, "varlen"))


def attn_impl_of(core: nn.Module) -> str:
    """The ``model.attn_impl`` a single-process attention core was built for."""
    for cls, name in _CORE_IMPLS:
        if isinstance(core, cls):
            return name
    raise TypeError(f"apply_cp cannot tell the model.attn_impl of attention core {type(core).__name__}: "
                    "pass attn_impl= (or apply_cp once, to a plain model)")


def _cp_core(old: nn.Module, group: dist.ProcessGroup, impl: str, attn_impl: str) -> nn.Module:
    dropout = getattr(old, "dropout", 0.0)
    if impl == "ulysses":
        return UlyssesCore(group, dropout=dropout)
    if attn_impl == "flex":
        return FlexAllGatherCore(group, block_size=getattr(old, "block_size", BLOCK_SIZE))
    if attn_impl == "auto":
        return AutoAllGatherCore(group, dropout=dropout)
    return AllGatherCore(group, dropout=dropout)


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh | None, impl: str = "allgather",
             attn_impl: str | None = None) -> None:
    """Context-parallel pass: swap every attention core for a CP core and install the CP layout.

    ``cp_mesh`` is the 1-D "cp" mesh (``mesh["cp"]``); a size-1 or None mesh leaves the model
    as it is. ``impl`` is ``parallel.cp_impl``; ``attn_impl`` the ``model.attn_impl`` (None: read
    from the cores the model was built with): allgather + sdpa -> chunked SDPA, + flex -> flex,
    + auto -> flex on CUDA else chunked SDPA; ulysses -> chunked SDPA (sdpa, auto). Afterwards
    the model takes the shards of :func:`shard_batch` plus their ``token_index``. Parameters and
    their names are unchanged. Attention dropout carries over (its masks then differ from a single
    process's). Accepts an Emu3CausalLM or a Decoder.
    """
    if impl not in CP_IMPLS:
        raise ValueError(f"parallel.cp_impl={impl!r} is unknown; choose one of {CP_IMPLS}")
    if attn_impl is not None and attn_impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={attn_impl!r} is unknown; choose one of {ATTN_IMPLS}")
    decoder = model.model if isinstance(model, Emu3CausalLM) else model
    if not isinstance(decoder, Decoder):
        raise TypeError(f"apply_cp expects Emu3CausalLM or Decoder, got {type(model).__name__}")
    if cp_mesh is None or cp_mesh.size() == 1:
        return
    if cp_mesh.ndim != 1:
        raise ValueError(f"apply_cp needs the 1-D 'cp' mesh (mesh['cp']), got {cp_mesh.ndim} dims")
    group = cp_mesh.get_group()
    attention = [m for m in decoder.modules() if isinstance(m, Attention)]
    for module in attention:
        chosen = attn_impl or attn_impl_of(module.core)
        if chosen == "varlen":
            raise ValueError(f"model.attn_impl=varlen has no context-parallel core (parallel.cp="
                             f"{cp_mesh.size()}): use flex, auto or sdpa")
        if chosen == "flex" and impl == "ulysses":
            raise ValueError("model.attn_impl=flex has no parallel.cp_impl=ulysses core: use "
                             "parallel.cp_impl=allgather, or model.attn_impl=sdpa or auto")
    for module in attention:  # the new cores also build the shard's layout (ContextParallelCore.layout)
        module.core = _cp_core(module.core, group, impl, attn_impl or attn_impl_of(module.core))
