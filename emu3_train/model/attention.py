"""Grouped-query self-attention over packed documents, with a swappable attention core.

The attention module owns the projections and RoPE; the *core* computes
``softmax(q k^T / sqrt(D) + document-causal mask) v``. ``model.attn_impl`` picks it:

- ``sdpa``: :class:`SdpaCore`, dense boolean mask; runs everywhere, with dropout; the reference.
- ``flex``: :class:`~emu3_train.model.flex.FlexCore`, block-sparse; CUDA training, CPU forward only.
- ``varlen``: :class:`~emu3_train.model.varlen.VarlenCore`, flash attention over ``cu_seqlens``;
  CUDA, fp16/bf16 only.
- ``auto``: :class:`AutoCore`, per call the fastest that runs (:func:`choose_attn_impl`); where
  that is sdpa off CUDA on a packed layout, one causal SDPA call per document
  (:class:`~emu3_train.model.segments.SegmentSdpaCore`, the same function without the dense mask).

flex and varlen have no attention dropout. Context parallelism replaces ``Attention.core`` with its
own cores (same interface), so this module never imports anything parallel; under CP ``attn_impl``
picks the CP core's kernel (sdpa -> chunked SDPA, flex -> flex, auto -> flex on CUDA without
dropout; varlen has no CP core):

    core.forward(q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D], docs) -> [B, S, Hq, D]

``docs`` is a :class:`~emu3_train.model.documents.Documents`, built once per decoder forward and
shared by every layer; it caches what the cores derive from it (dense mask, BlockMask, varlen
segments). With a KV cache (generation) the core is bypassed: the layer's
:class:`~emu3_train.model.kv_cache.LayerCache` stores the new K/V and attends with SDPA over the
cached prefix (``model/kv_cache.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emu3_train.config import CHOICES, ConfigError, ModelConfig
from emu3_train.model.documents import Documents
from emu3_train.model.flex import FlexCore
from emu3_train.model.rope import apply_rope
from emu3_train.model.segments import SegmentSdpaCore
from emu3_train.model.varlen import HALF_DTYPES, VarlenCore, varlen_available

DocumentLayout = Documents.packed  # the single-process layout of a packed batch (its old name)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                dropout: float) -> torch.Tensor:
    """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], bool mask [B, 1, Sq, Sk] -> [B, Sq, Hq, D].

    On CUDA, SDPA's fused kernel that takes a mask (memory-efficient) has no grouped-query
    support, so ``enable_gqa`` with a mask falls back to the math kernel, which keeps
    [B, Hq, Sq, Sk] probabilities per layer: there K/V are repeated to Hq heads instead (Hq/Hkv
    times the K/V bytes, transient). Elsewhere (CPU) ``enable_gqa`` is used as is.
    """
    gqa = q.shape[2] != k.shape[2]
    if gqa and q.is_cuda:
        groups = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        gqa = False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
    return out.transpose(1, 2)


class SdpaCore(nn.Module):
    """Attention core on ``torch.nn.functional.scaled_dot_product_attention`` with a dense mask.

    Runs everywhere (CPU included, with grads). Memory is O(B * S^2) for the boolean mask.
    ``dropout`` is the probability of dropping an attention weight, applied only in training.
    """

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents
    ) -> torch.Tensor:
        """q [B, S, Hq, D], k/v [B, S, Hkv, D] (Hkv divides Hq) -> [B, S, Hq, D]."""
        return masked_sdpa(q, k, v, docs.causal_mask(), self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


ATTN_IMPLS = CHOICES["model.attn_impl"]


def choose_attn_impl(device: torch.device, dtype: torch.dtype, dropout_active: bool) -> str:
    """``auto``'s choice for q/k/v on ``device`` in ``dtype``: varlen on CUDA with flash attention
    and fp16/bf16, else flex on CUDA, else sdpa; sdpa whenever attention dropout is active (only
    sdpa has it) and on every other device (flex has no CPU backward)."""
    if device.type != "cuda" or dropout_active:
        return "sdpa"
    return "varlen" if dtype in HALF_DTYPES and varlen_available(device) else "flex"


class AutoCore(nn.Module):
    """``model.attn_impl=auto``: dispatches each call to the sdpa, flex or varlen core
    (:func:`choose_attn_impl`), sdpa off CUDA on a packed layout as one call per document
    (:class:`SegmentSdpaCore`: no [B, 1, S, S] mask, no blocks between documents; on the 2-core CPU
    the step of ``benchmarks/vs_hf.py`` spent ~20% of its time in the dense-mask path). All compute
    the same function; only speed differs."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout
        self.sdpa = SdpaCore(dropout)
        self.segments = SegmentSdpaCore(dropout)
        self.flex = FlexCore()
        self.varlen = VarlenCore()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents
    ) -> torch.Tensor:
        impl = choose_attn_impl(q.device, q.dtype, self.training and self.dropout > 0)
        if impl == "sdpa" and docs.is_packed and q.device.type != "cuda":
            impl = "segments"
        return getattr(self, impl)(q, k, v, docs)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


def build_attention_core(cfg: ModelConfig) -> nn.Module:
    """The attention core named by ``cfg.attn_impl`` (see the module docstring)."""
    impl = cfg.attn_impl
    if impl == "sdpa":
        return SdpaCore(dropout=cfg.attention_dropout)
    if impl == "auto":
        return AutoCore(dropout=cfg.attention_dropout)
    if impl in ("flex", "varlen"):
        if cfg.attention_dropout:
            raise ConfigError(f"model.attn_impl={impl} has no attention dropout, but "
                              f"model.attention_dropout={cfg.attention_dropout}; use sdpa or auto")
        return FlexCore() if impl == "flex" else VarlenCore()
    raise ValueError(f"model.attn_impl={impl!r} is unknown; choose one of {ATTN_IMPLS}")


class Attention(nn.Module):
    """Emu3/Llama self-attention: q/k/v projections, RoPE, the core, the output projection.

    No biases. Parameter names match HF ``Emu3Attention`` (q_proj, k_proj, v_proj, o_proj);
    the core holds no parameters.
    """

    def __init__(self, cfg: ModelConfig, core: nn.Module | None = None):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ConfigError(f"model.hidden_size={cfg.hidden_size} is not divisible by "
                              f"model.num_heads={cfg.num_heads}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={cfg.num_kv_heads} must divide "
                              f"model.num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        if self.head_dim % 2:
            raise ConfigError(f"head dim model.hidden_size / model.num_heads = {self.head_dim} "
                              "must be even for RoPE")
        h, d = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)
        self.core = core if core is not None else build_attention_core(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], docs: Documents, kv=None
    ) -> torch.Tensor:
        """x [B, S, H], rope = (cos, sin) [B, S, D] -> [B, S, H]. ``kv``: this layer's
        ``LayerCache`` (generation): the new keys/values are cached and the queries attend to the
        cached prefix; the heads are the local ones under tensor parallelism."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        q, k = apply_rope(q, k, *rope)
        out = self.core(q, k, v, docs) if kv is None else kv.attend(q, k, v, docs)
        return self.o_proj(out.reshape(b, s, -1))
