"""``ParallelDims``: the (dp, cp, tp) layout as a value object, built from degrees and a world size,
validated without any process group; :func:`check_layout`: every check of a layout against the
recipe (model shape, sequence length, batch, attention kernel), run by ``config.validate`` before
anything is allocated.

Megatron's rank order: tp varies fastest, then cp, then dp — rank = (dp_i * cp + cp_i) * tp + tp_i.

    >>> ParallelDims.build(dp="auto", cp=1, tp=4, world_size=8)
    ParallelDims(dp=2, cp=1, tp=4)
    >>> dims = layout_of(cfg, world_size=8)          # build + check_layout, naming the field
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from emu3_train.config import ConfigError

if TYPE_CHECKING:
    from emu3_train.config import TrainConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @classmethod
    def build(cls, dp: int | str, cp: int, tp: int, world_size: int) -> ParallelDims:
        """Resolve ``dp="auto"`` (what cp·tp leave of ``world_size``) and check the product."""
        for name, value in (("parallel.cp", cp), ("parallel.tp", tp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if dp == "auto":
            if world_size % (cp * tp):
                raise ConfigError(f"world size {world_size} is not divisible by parallel.cp * parallel.tp "
                                  f"= {cp} * {tp}")
            dp = world_size // (cp * tp)
        elif not isinstance(dp, int) or dp < 1:
            raise ConfigError(f"parallel.dp must be a positive integer or 'auto', got {dp!r}")
        dims = cls(dp, cp, tp)
        if dims.world_size != world_size:
            raise ConfigError(f"parallel.dp * parallel.cp * parallel.tp = {dp} * {cp} * {tp} "
                              f"= {dims.world_size} != world size {world_size}")
        return dims

    def grad_accum_steps(self, global_batch_size: int, micro_batch_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        return global_batch_size // (micro_batch_size * self.dp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, cp, tp) coordinates of a global rank in Megatron's order (tp fastest)."""
        return rank // (self.cp * self.tp), (rank // self.tp) % self.cp, rank % self.tp


def layout_of(cfg: TrainConfig, world_size: int) -> ParallelDims:
    """The recipe's layout on ``world_size`` ranks, checked against the recipe (:func:`check_layout`)."""
    p = cfg.parallel
    dims = ParallelDims.build(p.dp, p.cp, p.tp, world_size)
    check_layout(dims, cfg)
    return dims


def check_layout(dims: ParallelDims, cfg: TrainConfig) -> None:
    """Reject layouts the model, data, attention kernel or device cannot take, naming the field."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.trainer
    if m.num_heads % dims.tp or m.num_kv_heads % dims.tp:
        raise ConfigError(f"model.num_heads={m.num_heads} and model.num_kv_heads={m.num_kv_heads} must "
                          f"be divisible by parallel.tp={dims.tp}")
    if dims.tp > 1 and (m.intermediate_size % dims.tp or m.hidden_size % dims.tp):
        raise ConfigError(f"model.hidden_size={m.hidden_size} and model.intermediate_size="
                          f"{m.intermediate_size} must be divisible by parallel.tp={dims.tp}")
    if (dims.cp > 1 or dims.tp > 1) and d.seq_len % (2 * dims.cp * dims.tp):
        raise ConfigError(f"data.seq_len={d.seq_len} must be divisible by 2 * parallel.cp * parallel.tp "
                          f"= {2 * dims.cp * dims.tp}")
    if dims.cp > 1 and p.cp_impl == "ulysses" and (m.num_kv_heads // dims.tp) % dims.cp:
        local = m.num_kv_heads // dims.tp
        raise ConfigError(f"parallel.cp_impl=ulysses needs the local KV heads (model.num_kv_heads / "
                          f"parallel.tp = {local}) divisible by parallel.cp={dims.cp}")
    if d.global_batch_size % (d.micro_batch_size * dims.dp):
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not divisible by "
                          f"data.micro_batch_size * dp = {d.micro_batch_size} * {dims.dp}")
    if m.attn_impl in ("flex", "varlen"):
        _check_gpu_attention(m.attn_impl, m.attention_dropout, dims.cp, p.cp_impl, t.device, t.precision)


def _check_gpu_attention(impl: str, dropout: float, cp: int, cp_impl: str, device: str,
                         precision: str) -> None:
    """flex and varlen train only on CUDA, without attention dropout (varlen: bf16, and not under CP;
    flex under CP only with the allgather core)."""
    if device == "cpu":
        why = "FlexAttention has no CPU backward" if impl == "flex" else "varlen_attn is CUDA-only"
        raise ConfigError(f"model.attn_impl={impl} cannot train with trainer.device=cpu ({why}); "
                          "use sdpa or auto")
    if dropout:
        raise ConfigError(f"model.attn_impl={impl} has no attention dropout, but model.attention_dropout="
                          f"{dropout}; use sdpa or auto")
    if cp > 1 and (impl == "varlen" or cp_impl != "allgather"):
        raise ConfigError(f"model.attn_impl={impl} has no context-parallel core with "
                          f"parallel.cp_impl={cp_impl} (parallel.cp={cp}): flex needs parallel.cp_impl="
                          "allgather, varlen has none; use sdpa or auto")
    if impl == "varlen" and precision != "bf16":
        raise ConfigError(f"model.attn_impl=varlen needs trainer.precision=bf16 (flash attention has no "
                          f"{precision}); use flex or auto")
