"""The Emu3 decoder: a Llama-style transformer identical to HF ``Emu3ForCausalLM``'s text model.

RMSNorm, SwiGLU MLP, grouped-query attention with rotate-half RoPE, untied input embedding and
output head, no biases, dropout ``model.attention_dropout`` on attention weights and on both
residual branches (as HF's ``Emu3DecoderLayer``). Parameter names equal HF's state dict
(``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_proj.weight``, ..., ``lm_head.weight``)
so export and import are rename-free.

The model is plain: no parallel code. Activation recompute is a pass (:func:`apply_recompute`)
that ``parallel/parallelize.py`` applies like the others; the attention kernel is
``model.attn_impl`` (``model/attention.py``).

    model = Emu3CausalLM(cfg.model, vocab_size=get_vocab("demo").size)
    hidden = model(tokens, position_ids, cu_seqlens)          # [B, S, H], final norm applied
    loss_sum, stats = weighted_ce(hidden, model.lm_head.weight, labels, loss_weight, ...)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from emu3_train.config import CHOICES, ConfigError, ModelConfig
from emu3_train.model.attention import Attention
from emu3_train.model.documents import Documents
from emu3_train.model.kv_cache import KVCache
from emu3_train.model.recompute import selective_checkpoint_context
from emu3_train.model.rope import rope_cos_sin

RECOMPUTE_MODES = CHOICES["model.recompute"]


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalized in fp32 and cast back first (as HF)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, [B, S, H] -> [B, S, H]."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + drop(attn(norm(x)))`` then ``x + drop(mlp(norm(x)))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.dropout = nn.Dropout(cfg.attention_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs: Documents, kv=None):
        """x [B, S, H], cos/sin [B, S, D] -> [B, S, H]; ``kv``: this layer's KV cache (generation)."""
        # kv by keyword: tensor parallelism prepares the three positional inputs only
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), (cos, sin), docs, kv=kv))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


def document_layout(
    cu_seqlens: torch.Tensor, position_ids: torch.Tensor, token_index: torch.Tensor | None = None
) -> Documents:
    """The single-process layout of a whole batch (what plain attention cores take).

    ``token_index`` marks a context-parallel shard; only a context-parallel attention core (which
    ``parallel.context_parallel.apply_cp`` installs, with its own ``layout``) knows what to do
    with it.
    """
    if token_index is not None:
        raise ValueError("token_index marks a context-parallel shard, but this model has no "
                         "context-parallel layout: apply parallel.context_parallel.apply_cp first")
    return Documents.packed(cu_seqlens, position_ids)


class Decoder(nn.Module):
    """Embedding, ``cfg.num_layers`` decoder layers, final RMSNorm (HF ``Emu3TextModel``).

    Args:
        cfg: the ``model`` config section.
        vocab_size: embedding rows (the resolved ``model.vocab_size`` or the data vocabulary's).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        if vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be positive, got {vocab_size}")
        self.rope_theta = cfg.rope_theta
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.init_std = cfg.init_std
        self.max_positions = cfg.max_position_embeddings  # generation refuses longer sequences
        self.embed_tokens = nn.Embedding(vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.init_weights()

    def init_weights(self) -> None:
        """Every Linear/Embedding weight ~ N(0, model.init_std); every norm weight = 1.

        Also the re-init after building on the meta device and ``to_empty``.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        token_index: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens, position_ids int64 [B, S]; cu_seqlens int32 [D + 1] over the flattened B*S
        tokens (see :meth:`Documents.packed`) -> hidden [B, S, H] after the final norm.

        Under context parallelism the inputs are this rank's shard ([B, S / cp]), ``cu_seqlens``
        still describes the whole batch, and ``token_index`` int64 [B, S / cp] gives each local
        token's index among the flattened global B*S tokens (``context_parallel.shard_batch``).

        With a ``cache`` (:class:`~emu3_train.model.kv_cache.KVCache`, generation) ``tokens`` are
        the next S tokens of each cached sequence, ``position_ids`` and ``cu_seqlens`` must be None
        (the cache knows both), attention runs over the cached prefix (SDPA, whatever the core)
        and the cache advances by S.
        """
        if cache is not None:
            if position_ids is not None or cu_seqlens is not None or token_index is not None:
                raise ValueError("with a KV cache, pass position_ids=None and cu_seqlens=None: the "
                                 "cache's slots give the positions and the mask")
            docs = cache.documents(tokens.shape[1])
            position_ids = docs.position_ids
        else:
            if position_ids is None or tokens.shape != position_ids.shape:
                raise ValueError(f"tokens {tuple(tokens.shape)} and position_ids "
                                 f"{None if position_ids is None else tuple(position_ids.shape)} must "
                                 "have the same [B, S] shape")
            docs = self.layout(cu_seqlens, position_ids, token_index)
        x = self.embed_tokens(tokens)
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, dtype=x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, docs) if cache is None else layer(x, cos, sin, docs, cache.layers[i])
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.norm(x)

    def layout(self, cu_seqlens: torch.Tensor, position_ids: torch.Tensor,
               token_index: torch.Tensor | None = None) -> Documents:
        """The ``docs`` every attention core of this forward receives, built once: the attention
        cores say which layout they take (a context-parallel core's ``layout`` knows its group and
        the shard's global token indices); plain cores take :func:`document_layout`'s."""
        core = self.layers[0].self_attn.core if len(self.layers) else None
        return getattr(core, "layout", document_layout)(cu_seqlens, position_ids, token_index)


class Emu3CausalLM(nn.Module):
    """``model`` (the :class:`Decoder`) plus an untied ``lm_head`` [V, H], as HF ``Emu3ForCausalLM``.

    ``forward`` returns hidden states, not logits: the loss consumes them with ``lm_head.weight``
    in a fused kernel so [B, S, V] logits never exist. Use :meth:`logits` for small batches.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.model = Decoder(cfg, vocab_size)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)  # the decoder inits itself

    def init_weights(self) -> None:
        """Re-initialize every parameter (see :meth:`Decoder.init_weights`)."""
        self.model.init_weights()
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=self.model.init_std)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        token_index: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Same as :meth:`Decoder.forward`: -> hidden [B, S, H]."""
        return self.model(tokens, position_ids, cu_seqlens, token_index, cache=cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] (for sampling and evaluation)."""
        return self.lm_head(hidden)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters; without the input embedding table if ``exclude_embedding``."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embedding else n


def _decoder_of(model: nn.Module, caller: str) -> Decoder:
    """The :class:`Decoder` of an :class:`Emu3CausalLM` (or the decoder itself) a pass applies to."""
    decoder = model.model if isinstance(model, Emu3CausalLM) else model
    if not isinstance(decoder, Decoder):
        raise TypeError(f"{caller} expects Emu3CausalLM or Decoder, got {type(model).__name__}")
    return decoder


class _Recomputed:
    """Mixin of a recomputed decoder block: its forward runs under ``torch.utils.checkpoint``.

    :func:`apply_recompute` swaps each block's class for ``Recomputed<Block>(_Recomputed, Block)``
    (as FSDP2's ``fully_shard`` does), so parameter names, ``isinstance`` and the module tree stay
    as they are, and a later pass (``torch.compile``, FSDP2) wraps the checkpointed block.
    """

    recompute_mode = "full"

    def forward(self, *args):
        if not torch.is_grad_enabled():  # sampling and evaluation: nothing to recompute
            return super().forward(*args)
        context = selective_checkpoint_context if self.recompute_mode == "selective" else None
        kwargs = {"context_fn": context} if context is not None else {}
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


@functools.cache
def _recomputed_class(cls: type, mode: str) -> type:
    """One ``Recomputed<Block>`` class per block class and mode (every block shares it)."""
    return type(f"Recomputed{cls.__name__}", (_Recomputed, cls), {"recompute_mode": mode})


def apply_recompute(model: nn.Module, mode: str) -> None:
    """Activation recompute pass: ``mode`` is ``model.recompute`` (none | full | selective).

    ``full`` recomputes each decoder block in backward (``torch.utils.checkpoint``,
    non-reentrant, RNG state preserved so dropout masks match). ``selective`` checkpoints each
    block too but keeps matmul and attention outputs, recomputing only the pointwise ops
    (``model/recompute.py``). Each block is wrapped in place (its class becomes a recomputed
    subclass, see :class:`_Recomputed`), so the compile pass applied after it compiles the wrapped
    block, as torchtitan does. Parameter names are unchanged. Accepts an :class:`Emu3CausalLM` or
    a :class:`Decoder`; apply it once.
    """
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"model.recompute={mode!r} is not supported; choose one of {RECOMPUTE_MODES}")
    layers = _decoder_of(model, "apply_recompute").layers
    if mode == "none":
        return
    for layer in layers:
        if isinstance(layer, _Recomputed):
            raise RuntimeError("apply_recompute: the decoder blocks are already recomputed; apply it once")
        layer.__class__ = _recomputed_class(type(layer), mode)


def recompute_mode(model: nn.Module) -> str:
    """The recompute mode :func:`apply_recompute` gave the decoder's blocks ("none" before)."""
    layers = _decoder_of(model, "recompute_mode").layers
    return layers[0].recompute_mode if len(layers) and isinstance(layers[0], _Recomputed) else "none"


def apply_compile(model: nn.Module) -> None:
    """``torch.compile`` pass: each decoder layer is compiled in place (``nn.Module.compile``), as
    torchtitan does per block, after :func:`apply_recompute` (the compiled function is the
    checkpointed block) and before FSDP2 (applied after, per layer); parameter names are
    unchanged. Shapes are static for a recipe (``seq_len``, micro-batch), so each layer compiles
    once, plus once more for the layer that first builds the step's shared attention mask."""
    for layer in _decoder_of(model, "apply_compile").layers:
        layer.compile()
