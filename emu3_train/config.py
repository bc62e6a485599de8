"""The training configuration schema: small dataclasses, one per recipe group, each field documented.

Hydra merges ``recipes/train.yaml`` and its groups (``model/``, ``data/``, ``parallel/``,
``experiment/``) into :class:`TrainConfig`; unknown keys are rejected by the schema and
:func:`validate` rejects impossible values, naming the field, before any tensor is allocated.

    python -m emu3_train.train experiment=demo                 # the embedded demo
    python -m emu3_train.train experiment=stage1 model=emu3_8b data=shards data.path=/shards
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An impossible configuration; the message names the field and its value."""


@dataclass
class ModelConfig:
    name: str = "tiny"  # recipe name, shown in logs
    backend: str = "torch"  # decoder implementation: torch (runs everywhere) | te (Transformer Engine)
    vocab_size: int | None = None  # embedding rows; null = the data vocabulary's size
    hidden_size: int = 128  # d_model
    intermediate_size: int = 512  # SwiGLU inner size
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA); must divide num_heads
    rope_theta: float = 1_000_000.0  # RoPE base
    max_position_embeddings: int = 131_072  # longest document position the model is meant for
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    attention_dropout: float = 0.0  # dropout on attention probabilities (Emu3 uses 0.1)
    init_std: float = 0.02  # std of the normal init of every linear and embedding weight
    attn_impl: str = "sdpa"  # sdpa (CPU + reference) | flex | varlen | auto
    recompute: str = "none"  # activation recompute per block: none | full | selective


@dataclass
class DataConfig:
    path: str = "data/demo/train"  # directory of shards: *.tar with their *.idx
    vocab: str = "demo"  # vocabulary preset of the shards (emu3 | demo)
    seq_len: int = 1024  # tokens per packed row
    micro_batch_size: int = 4  # rows per forward/backward on each data-parallel rank
    global_batch_size: int = 8  # rows per optimizer step, over all ranks and accumulation steps
    seed: int = 0  # shuffle seed of the document stream
    pack_window: int = 256  # documents considered together when packing rows
    oversize_policy: str = "skip"  # a vision block longer than seq_len: skip (and count) | error
    num_workers: int = 0  # reserved for background reading; 0 = in the training process


@dataclass
class ParallelConfig:
    dp: Any = "auto"  # data-parallel size; auto = world_size / (cp * tp)
    cp: int = 1  # context-parallel size
    tp: int = 1  # tensor-parallel size
    cp_impl: str = "allgather"  # allgather | ulysses
    timeout_s: int = 600  # process-group timeout: a hung collective fails after this


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not on norms)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class LossConfig:
    vision_weight: float = 0.5  # loss weight of visual-code targets (Emu3: 0.5)
    z_loss: float = 0.0  # coefficient of the log-sum-exp^2 regularizer
    impl: str = "auto"  # fused CE implementation: auto | triton | reference
    chunk_size: int = 1024  # tokens per logits chunk in the reference implementation


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps
    log_interval: int = 10  # steps between summary lines
    seed: int = 1234  # model init and dropout seed
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    max_bad_steps: int = 5  # consecutive non-finite steps before training halts


@dataclass
class CheckpointConfig:
    dir: str | None = None  # null = <run_dir>/ckpt
    interval: int = 0  # steps between checkpoints; 0 = only at the end
    init_from: str | None = None  # load weights only from this checkpoint (stage transitions)


@dataclass
class EvalConfig:
    task: str = "none"  # none | digits (the demo's t2i/i2t accuracy)
    path: str = "data/demo/eval"  # held-out shards
    samples_per_class: int = 10  # generated images per prompted class
    temperature: float = 0.8  # sampling temperature for generation
    top_k: int = 0  # 0 = no top-k filtering


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (no network) | online | disabled
    project: str = "emu3-train"
    entity: str | None = None


@dataclass
class TrainConfig:
    run_name: str = "run"  # run directory name under out_dir
    out_dir: str = "runs"  # where run directories go
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as ``train_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
