"""The training configuration schema: small dataclasses, one per recipe group, each field documented.

Hydra merges ``recipes/train.yaml`` and its groups (``model/``, ``data/``, ``parallel/``,
``experiment/``) into :class:`TrainConfig`; keys it does not define are rejected (also when added
with ``+``: ``emu3_train.recipes``), :func:`validate` rejects impossible values (every numeric field
against its range in :data:`RANGES`) and :func:`check_checkpoint_paths` the checkpoint the run would
load, each naming the field, before any tensor is allocated.

    python -m emu3_train.train experiment=demo                 # the embedded demo
    python -m emu3_train.train experiment=stage1 model=emu3_8b data=shards data.path=/shards
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import MISSING


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
    # attention kernel: sdpa (everywhere, reference) | flex (CUDA) | varlen (CUDA, bf16) | auto (fastest
    # that runs); flex and varlen have no attention dropout; under parallel.cp>1 flex and auto pick the
    # allgather CP core's kernel (varlen has no CP core)
    attn_impl: str = "sdpa"
    recompute: str = "none"  # activation recompute per block: none | full | selective


@dataclass
class DataConfig:
    path: str = MISSING  # directory of shards (*.tar with their *.idx); required
    vocab: str = "demo"  # vocabulary preset of the shards (emu3 | demo)
    seq_len: int = 1024  # tokens per packed row
    micro_batch_size: int = 4  # rows per forward/backward on each data-parallel rank
    global_batch_size: int = 8  # rows per optimizer step, over all ranks and accumulation steps
    seed: int = 0  # shuffle seed of the document stream
    pack_window: int = 256  # documents considered together when packing rows
    oversize_policy: str = "skip"  # a vision block longer than seq_len: skip (and count) | error
    num_workers: int = 0  # background reader threads; 0 = read in the training process
    # several sources mixed by token share, "WEIGHT:DIR" (DIR relative to data.path); [] = data.path
    blend: list[str] = field(default_factory=list)
    shard_group: int = 0  # shards whose documents are shuffled together per epoch; 0 = all shards
    prefetch: int = 2  # micro-batches read ahead per rank when num_workers > 0
    on_bad_sample: str = "error"  # a sample failing its read checks: error (name shard, key) | skip (count)
    # document tasks to train on (t2i, i2t, text, video); [] = all. Stage 1 leaves video out.
    tasks: list[str] = field(default_factory=list)
    # fraction of t2i documents trained with the empty caption (BOS SOV ...), so classifier-free
    # guidance has an unconditional branch; drawn per document and row of the stream (reproducible)
    caption_dropout: float = 0.0


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
    # loss multiplier of every target of a document, by its task (t2i | i2t | text | video); e.g.
    # {text: 0.0} trains a blend's text documents as context only. A document's loss_spans (its
    # shard json) further limit which of its targets train (data.format).
    task_weights: dict[str, float] = field(
        default_factory=lambda: {"t2i": 1.0, "i2t": 1.0, "text": 1.0, "video": 1.0})
    # ntp: weighted next-token prediction | dpo: preference pairs (data.path holds pair shards, dpo.*)
    objective: str = "ntp"


@dataclass
class DPOConfig:
    """Direct preference optimization (``loss.objective=dpo``; ``emu3_train/dpo.py``)."""

    beta: float = 0.1  # DPO's beta: scale of the log-ratio rewards
    ntp_weight: float = 0.0  # weight of the chosen documents' next-token loss added to DPO (Emu3 uses both)
    # precomputed: the pairs' ref_logp (make_preferences, memory-light) | frozen: a frozen copy of
    # checkpoint.init_from, parallelized like the policy, runs every forward
    reference: str = "precomputed"


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps
    log_interval: int = 10  # steps between summary lines
    seed: int = 1234  # model init and dropout seed
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto (cuda if present) | cpu | cuda
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    compile: bool = False  # torch.compile each decoder block (after recompute, before FSDP2)
    max_bad_steps: int = 5  # consecutive non-finite steps before training halts (checked at log steps)
    stop_check_interval: int = 10  # steps between reads of the ranks' stop flag (SIGTERM), besides log steps
    spike_factor: float = 0.0  # log a warning when loss > spike_factor x running mean; 0 = off
    sample_interval: int = 0  # steps between in-run samples (sample.*: images + a caption); 0 = off
    peak_tflops: float = 0.0  # per-GPU peak for perf/mfu; 0 = from the GPU's name (emu3_train.flops)
    # test hook for the fault tests: nan_loss@STEP | sigkill_in_save@STEP | raise@STEP:RANK | hang@STEP:RANK
    fault: str | None = None


@dataclass
class CheckpointConfig:
    dir: str | None = None  # null = <run_dir>/ckpt
    interval: int = 0  # steps between checkpoints; 0 = only at the end
    init_from: str | None = None  # start from these weights (stage transitions); ignored when resuming
    resume: str | None = None  # latest | PATH: continue a run (model, optimizer, schedule, data, RNG)
    init_required: bool = False  # the recipe continues an earlier stage: refuse to start without init_from
    async_save: bool = True  # write shards in the background; the next save waits for this one
    keep_last: int = 3  # keep the newest K checkpoints (0 = keep all) ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of M (0 = none)


@dataclass
class EvalConfig:
    task: str = "none"  # none | digits (the demo's t2i/i2t accuracy)
    path: str = "data/demo/eval"  # held-out shards
    samples_per_class: int = 10  # generated images per prompted class
    temperature: float = 0.8  # sampling temperature for generation
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    # t2i_accuracy is measured without guidance and, as t2i_accuracy_guided, with this classifier-free
    # guidance scale against the empty caption (Emu3: 3.0)
    guidance_scale: float = 3.0
    # validation loss on held-out shards (emu3_train.validation): null = none. The same syntax as
    # data.path + data.blend ("WEIGHT:DIR" relative to val_path); the rows are fixed by eval.val_seed
    val_path: str | None = None
    val_blend: list[str] = field(default_factory=list)
    val_interval: int = 0  # steps between validations (0 = only after the last step)
    val_rows: int = 16  # held-out packed rows of data.seq_len tokens, the same set at every validation
    val_seed: int = 0  # which rows: the packing seed of the held-out stream


@dataclass
class SampleConfig:
    """In-run samples every ``trainer.sample_interval`` steps (``samples/images``, ``samples/caption``)."""

    # text-to-image prompts, one grid row each; [] = "a photo of ..." defaults (emu3_train.samples)
    prompts: list[str] = field(default_factory=list)
    per_prompt: int = 4  # images generated per prompt
    height: int = 0  # code rows of a generated image; 0 = those of the captioned data image
    width: int = 0  # code columns; 0 = as the captioned data image
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # nucleus sampling mass; 1 = off
    guidance_scale: float = 1.0  # classifier-free guidance scale; 1 = none (train data.caption_dropout first)
    negative_prompt: str = ""  # the unconditional prompt of guidance; "" = the empty caption
    seed: int = 0  # sampling seed: the same prompts give comparable images across steps
    vq_path: str | None = None  # Emu3VQVAE folder to decode codes to pixels; null = codes as gray levels
    max_caption_tokens: int = 40  # length cap of the caption generated for the fixed image


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
    dpo: DPOConfig = field(default_factory=DPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as ``train_schema``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


class Range(NamedTuple):
    """The valid values of a numeric field: ``low <= x`` (``low < x`` when not ``low_inclusive``) and
    ``x < high`` (``x <= high`` when ``high_inclusive``). NaN is never in range."""

    low: float = -math.inf
    high: float = math.inf
    low_inclusive: bool = True
    high_inclusive: bool = False

    def contains(self, x: float) -> bool:
        above = x >= self.low if self.low_inclusive else x > self.low
        below = x <= self.high if self.high_inclusive else x < self.high
        return bool(above and below)

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>=' if self.low_inclusive else '>'} {_num(self.low)}"
        return (f"in {'[' if self.low_inclusive else '('}{_num(self.low)}, {_num(self.high)}"
                f"{']' if self.high_inclusive else ')'}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_AT_LEAST_1, _AT_LEAST_0, _POSITIVE = Range(1), Range(0), Range(0, low_inclusive=False)
_FRACTION = Range(0, 1)  # [0, 1)
_NUCLEUS = Range(0, 1, low_inclusive=False, high_inclusive=True)  # (0, 1]
# The valid range of every numeric field (a test fails for a numeric field missing here). ``None``
# (where the field allows it) is always valid. validate() checks these first.
RANGES: dict[str, Range] = {
    "model.vocab_size": _AT_LEAST_1, "model.hidden_size": _AT_LEAST_1,
    "model.intermediate_size": _AT_LEAST_1, "model.num_layers": _AT_LEAST_1,
    "model.num_heads": _AT_LEAST_1, "model.num_kv_heads": _AT_LEAST_1,
    "model.rope_theta": _POSITIVE, "model.max_position_embeddings": _AT_LEAST_1,
    "model.rms_norm_eps": _POSITIVE,  # <= 0 makes every step NaN
    "model.attention_dropout": _FRACTION, "model.init_std": _POSITIVE,
    "data.seq_len": _AT_LEAST_1, "data.micro_batch_size": _AT_LEAST_1,
    "data.global_batch_size": _AT_LEAST_1, "data.seed": _AT_LEAST_0, "data.pack_window": _AT_LEAST_1,
    "data.num_workers": _AT_LEAST_0, "data.shard_group": _AT_LEAST_0, "data.prefetch": _AT_LEAST_1,
    "data.caption_dropout": Range(0, 1, high_inclusive=True),
    "parallel.cp": _AT_LEAST_1, "parallel.tp": _AT_LEAST_1, "parallel.timeout_s": _AT_LEAST_1,
    "optim.lr": _POSITIVE, "optim.min_lr_ratio": Range(0, 1, high_inclusive=True),
    "optim.warmup_steps": _AT_LEAST_0, "optim.weight_decay": _AT_LEAST_0,
    "optim.beta1": _FRACTION, "optim.beta2": _FRACTION, "optim.eps": _POSITIVE,
    "optim.grad_clip": _AT_LEAST_0,
    "loss.vision_weight": _AT_LEAST_0, "loss.z_loss": _AT_LEAST_0, "loss.chunk_size": _AT_LEAST_1,
    "dpo.beta": _POSITIVE, "dpo.ntp_weight": _AT_LEAST_0,
    "trainer.max_steps": _AT_LEAST_1, "trainer.log_interval": _AT_LEAST_1, "trainer.seed": _AT_LEAST_0,
    "trainer.threads": _AT_LEAST_0, "trainer.max_bad_steps": _AT_LEAST_1,
    "trainer.spike_factor": _AT_LEAST_0, "trainer.sample_interval": _AT_LEAST_0,
    "trainer.peak_tflops": _AT_LEAST_0, "trainer.stop_check_interval": _AT_LEAST_1,
    "checkpoint.interval": _AT_LEAST_0, "checkpoint.keep_last": _AT_LEAST_0,
    "checkpoint.keep_every": _AT_LEAST_0,
    "eval.samples_per_class": _AT_LEAST_1, "eval.temperature": _AT_LEAST_0,  # 0 = greedy
    "eval.top_k": _AT_LEAST_0, "eval.val_interval": _AT_LEAST_0, "eval.val_rows": _AT_LEAST_1,
    "eval.top_p": _NUCLEUS, "eval.guidance_scale": _AT_LEAST_0,
    "eval.val_seed": _AT_LEAST_0,
    "sample.per_prompt": _AT_LEAST_1, "sample.height": _AT_LEAST_0, "sample.width": _AT_LEAST_0,
    "sample.temperature": _AT_LEAST_0, "sample.top_k": _AT_LEAST_0, "sample.seed": _AT_LEAST_0,
    "sample.top_p": _NUCLEUS, "sample.guidance_scale": _AT_LEAST_0,
    "sample.max_caption_tokens": _AT_LEAST_1,
}


def _check_ranges(cfg: TrainConfig) -> None:
    for name, valid in RANGES.items():
        value = _get(cfg, name)
        if value is not None and not valid.contains(value):
            raise ConfigError(f"{name} must be {valid}, got {value}")


def check_checkpoint_paths(cfg: TrainConfig, run_dir: str | Path) -> None:
    """Check the checkpoint this run will load, before any model is built: ``checkpoint.resume``
    (``latest`` = the run's own ``ckpt`` once it has one) beats ``checkpoint.init_from``.

    Raises :class:`ConfigError` saying what the path is and what to do.
    """
    from emu3_train.checkpoint_paths import check_checkpoint_path  # torch: imported only when checking

    c = cfg.checkpoint
    resume = c.resume
    if resume == "latest":
        ckpt = Path(c.dir or Path(run_dir) / "ckpt")
        resume = str(ckpt) if (ckpt / "latest").is_file() else None
    if resume:
        check_checkpoint_path(resume, "checkpoint.resume")
    elif c.init_from:
        check_checkpoint_path(c.init_from, "checkpoint.init_from")


CHOICES = {
    "model.backend": ("torch",),
    "model.attn_impl": ("sdpa", "auto", "flex", "varlen"),
    "model.recompute": ("none", "full", "selective"),
    "data.vocab": ("demo", "emu3"),
    "data.oversize_policy": ("skip", "error"),
    "data.on_bad_sample": ("error", "skip"),
    "parallel.cp_impl": ("allgather", "ulysses"),
    "loss.impl": ("auto", "reference", "triton"),
    "loss.objective": ("ntp", "dpo"),
    "dpo.reference": ("precomputed", "frozen"),
    "trainer.precision": ("fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "eval.task": ("none", "digits"),
    "wandb.mode": ("offline", "online", "disabled"),
}
# Values that belong to the design but are not implemented yet: rejected with the reason.
_NOT_YET = {
    ("model.backend", "te"): "the Transformer Engine backend is not implemented yet (nothing imports "
                             "transformer-engine); on GPU the fused paths are "
                             "model.attn_impl=auto|varlen|flex and the Triton loss (loss.impl=auto)",
}


def _get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig, world_size: int = 1, vocab_size: int | None = None) -> None:
    """Reject impossible configurations, naming the field. Allocates nothing; touches no file.

    Every numeric field is first checked against its range in :data:`RANGES`.

    ``vocab_size`` is the size of the data vocabulary preset (model.vocab_size must cover it).
    """
    for name, allowed in CHOICES.items():
        value = _get(cfg, name)
        if (name, value) in _NOT_YET:
            raise ConfigError(f"{name}={value}: {_NOT_YET[name, value]}")
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {list(allowed)}")

    _check_ranges(cfg)
    m, d, t = cfg.model, cfg.data, cfg.trainer
    from emu3_train.data.format import TASKS

    unknown = [task for task in d.tasks if task not in TASKS]
    if unknown:
        raise ConfigError(f"data.tasks has {unknown}; expected a subset of {list(TASKS)} ([] = all)")
    bad = {k: v for k, v in cfg.loss.task_weights.items()
           if k not in TASKS or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)}
    if bad:
        raise ConfigError(f"loss.task_weights has {bad}; expected weights >= 0 for tasks among {list(TASKS)}")
    from emu3_train.data.blend import parse_blend  # the blend syntax lives with the loader

    try:
        parse_blend(d.path, d.blend)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.eval.val_path:
        try:
            parse_blend(cfg.eval.val_path, cfg.eval.val_blend)
        except ValueError as e:
            raise ConfigError(str(e).replace("data.blend", "eval.val_blend")) from e
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                          f"model.num_heads={m.num_heads}")
    if (m.hidden_size // m.num_heads) % 2:
        raise ConfigError(f"head dim model.hidden_size/model.num_heads = {m.hidden_size // m.num_heads} "
                          "must be even for RoPE")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by "
                          f"model.num_kv_heads={m.num_kv_heads}")
    if vocab_size is not None and m.vocab_size is not None and m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than vocabulary "
                          f"'{d.vocab}' ({vocab_size} ids)")
    if d.seq_len > m.max_position_embeddings:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings="
                          f"{m.max_position_embeddings}")
    c = cfg.checkpoint
    if cfg.loss.objective == "dpo" and cfg.dpo.reference == "frozen" and not c.init_from:
        raise ConfigError("dpo.reference=frozen copies checkpoint.init_from (the DPO reference); set it, "
                          "or use dpo.reference=precomputed (make_preferences stores ref_logp)")
    if c.init_required and not c.init_from:
        raise ConfigError("checkpoint.init_from is required: this recipe continues an earlier stage "
                          "(checkpoint.init_required=true); set checkpoint.init_from=RUN/ckpt/latest "
                          "(make pretrain-stage2 INIT=...)")
    from emu3_train.faults import FAULT_PATTERN

    if t.fault is not None and not re.fullmatch(FAULT_PATTERN, t.fault):
        raise ConfigError(f"trainer.fault={t.fault!r}: expected nan_loss@STEP, sigkill_in_save@STEP, "
                          "raise@STEP:RANK or hang@STEP:RANK")

    from emu3_train.parallel.dims import layout_of  # the layout's checks live with the layout

    layout_of(cfg, world_size)
