"""``ParallelDims``: the (dp, cp, tp) layout as a value object, validated without any process group.

Megatron's rank order: tp varies fastest, then cp, then dp — rank = (dp_i * cp + cp_i) * tp + tp_i.

    >>> ParallelDims(dp=2, cp=1, tp=4).world_size
    8
"""

from __future__ import annotations

from dataclasses import dataclass

from emu3_train.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int) -> ParallelDims:
        """Resolve ``parallel.dp: auto`` against ``world_size`` and validate against the recipe."""
        p = cfg.parallel
        for name, value in (("parallel.cp", p.cp), ("parallel.tp", p.tp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if p.dp == "auto":
            if world_size % (p.cp * p.tp):
                raise ConfigError(f"world size {world_size} is not divisible by parallel.cp * parallel.tp "
                                  f"= {p.cp} * {p.tp}")
            dp = world_size // (p.cp * p.tp)
        elif isinstance(p.dp, int) and p.dp >= 1:
            dp = p.dp
        else:
            raise ConfigError(f"parallel.dp must be a positive integer or 'auto', got {p.dp!r}")
        dims = cls(dp, p.cp, p.tp)
        dims.validate(cfg, world_size)
        return dims

    def validate(self, cfg: TrainConfig, world_size: int) -> None:
        """Reject layouts the model, data or world cannot take, naming the field."""
        m, d = cfg.model, cfg.data
        if self.world_size != world_size:
            raise ConfigError(f"parallel.dp * parallel.cp * parallel.tp = {self.dp} * {self.cp} * {self.tp} "
                              f"= {self.world_size} != world size {world_size}")
        if m.num_heads % self.tp or m.num_kv_heads % self.tp:
            raise ConfigError(f"model.num_heads={m.num_heads} and model.num_kv_heads={m.num_kv_heads} must "
                              f"be divisible by parallel.tp={self.tp}")
        if self.tp > 1 and (m.intermediate_size % self.tp or m.hidden_size % self.tp):
            raise ConfigError(f"model.hidden_size={m.hidden_size} and model.intermediate_size="
                              f"{m.intermediate_size} must be divisible by parallel.tp={self.tp}")
        if (self.cp > 1 or self.tp > 1) and d.seq_len % (2 * self.cp * self.tp):
            raise ConfigError(f"data.seq_len={d.seq_len} must be divisible by 2 * parallel.cp * parallel.tp "
                              f"= {2 * self.cp * self.tp}")
        if self.cp > 1 and cfg.parallel.cp_impl == "ulysses" and (m.num_kv_heads // self.tp) % self.cp:
            local = m.num_kv_heads // self.tp
            raise ConfigError(f"parallel.cp_impl=ulysses needs the local KV heads (model.num_kv_heads / "
                              f"parallel.tp = {local}) divisible by parallel.cp={self.cp}")
        if d.global_batch_size % (d.micro_batch_size * self.dp):
            raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not divisible by "
                              f"data.micro_batch_size * dp = {d.micro_batch_size} * {self.dp}")

    def grad_accum_steps(self, cfg: TrainConfig) -> int:
        """Micro-batches per optimizer step on each rank."""
        return cfg.data.global_batch_size // (cfg.data.micro_batch_size * self.dp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(dp, cp, tp) coordinates of a global rank in Megatron's order (tp fastest)."""
        return rank // (self.cp * self.tp), (rank // self.tp) % self.cp, rank % self.tp
