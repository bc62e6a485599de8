"""The training loop, read top to bottom like the recipe: data -> model -> weighted CE -> AdamW.

Everything that can be wrong with the configuration or the data is checked in :meth:`Trainer.setup`
before the model is allocated. One optimizer step = ``grad_accum`` micro-batches; the loss of a
step is Σ loss_weight·CE over all its micro-batches divided by their total loss weight (DESIGN.md
§4), so text tokens weigh 1.0, visual-code targets ``loss.vision_weight`` and understanding-image
targets 0.

    python -m emu3_train.train experiment=demo
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from emu3_train.build import build_model
from emu3_train.checkpoint import CheckpointManager, TrainState, restore, training_state
from emu3_train.config import ConfigError, TrainConfig, validate
from emu3_train.data.blend import open_blend
from emu3_train.data.index import ShardError
from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet
from emu3_train.dpo_step import DPOSettings, dpo_forward_backward
from emu3_train.faults import FaultHook
from emu3_train.memory_check import check_fits
from emu3_train.metrics import (
    MetricLogger,
    PerfMeter,
    SpikeDetector,
    StepWindow,
    format_dpo,
    format_skipped,
    format_summary,
    interval_metrics,
)
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.optim import apply_update, build_optimizer, build_scheduler
from emu3_train.parallel.dims import layout_of
from emu3_train.parallel.mesh import build_mesh, init_distributed, named_collective
from emu3_train.samples import InRunSampler
from emu3_train.step import StepContext, clip_grad_norm, forward_backward
from emu3_train.validation import Validator, format_validation
from emu3_train.vocab import get_vocab


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is available")
    return torch.device(name)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs ``trainer.max_steps`` steps."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, rank: int = 0, world_size: int = 1):
        self.cfg, self.run_dir, self.rank, self.world_size = cfg, Path(run_dir), rank, world_size
        self.is_rank0 = rank == 0

    # -- setup: validate and open the data before allocating any tensor -------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.vocab = get_vocab(cfg.data.vocab)
        validate(cfg, self.world_size, self.vocab.size)
        self.dims = layout_of(cfg, self.world_size)
        self.dp = self.dims.dp
        self.accum = self.dims.grad_accum_steps(cfg.data.global_batch_size, cfg.data.micro_batch_size)
        sources, weights = open_blend(cfg.data.path, cfg.data.blend, self.vocab, cfg.data.on_bad_sample)
        if cfg.eval.task == "digits":
            ShardSet(cfg.eval.path, self.vocab)  # fail now, not after training
        self.device = pick_device(cfg.trainer.device)
        self.sampler = self._build_sampler(sources[0])
        if cfg.trainer.threads:
            torch.set_num_threads(cfg.trainer.threads)
        self.rank, _ = init_distributed(self.device.type, cfg.parallel.timeout_s)
        self.is_rank0 = self.rank == 0
        self.mesh = build_mesh(self.dims, self.device.type)
        dp_rank, _, _ = self.dims.coords(self.rank)
        self.validator = Validator.from_config(cfg, self.vocab, dp_rank, self.dp)  # eval.val_path: rows now
        self.faults = FaultHook.from_spec(cfg.trainer.fault, self.rank)

        self.vocab_size = cfg.model.vocab_size or self.vocab.size
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "ckpt")
        resume_from = self._resume_source(cfg.checkpoint.resume)
        init_from = cfg.checkpoint.init_from if resume_from is None else None  # a requeued job resumes
        check_fits(cfg, self.dims, self.vocab_size, self.device, self.world_size)  # or one line, exit 2
        self.model, self.plan = build_model(cfg, self.vocab_size, self.dims, self.mesh, self.device,
                                            self.rank, weights=init_from, init=resume_from is None)
        self.step_ctx = StepContext(bf16=cfg.trainer.precision == "bf16",
                                    vision_start=self.vocab.vision_start, z_loss=cfg.loss.z_loss,
                                    impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size)
        self.dpo = DPOSettings(cfg.dpo.beta, cfg.dpo.ntp_weight) if cfg.loss.objective == "dpo" else None
        self.reference = None  # dpo.reference=frozen: the initial weights, parallelized like the policy
        if self.dpo is not None and cfg.dpo.reference == "frozen":
            self.reference = build_model(cfg, self.vocab_size, self.dims, self.mesh, self.device, self.rank,
                                         weights=cfg.checkpoint.init_from, init=True)[0].requires_grad_(False)
        self.perf = PerfMeter(cfg.model, self.vocab_size, self.dims.cp * self.dims.tp, self.device,
                              cfg.trainer.precision, cfg.trainer.peak_tflops)
        torch.manual_seed(cfg.trainer.seed + 1 + self.rank)  # per-rank dropout streams
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.loader = PackedLoader(
            sources, seq_len=cfg.data.seq_len, micro_batch_size=cfg.data.micro_batch_size,
            dp_rank=dp_rank, dp_size=self.dp,
            seed=cfg.data.seed, vision_weight=cfg.loss.vision_weight,
            pack_window=cfg.data.pack_window, oversize_policy=cfg.data.oversize_policy,
            weights=weights, shard_group=cfg.data.shard_group, num_workers=cfg.data.num_workers,
            prefetch=cfg.data.prefetch, on_bad_sample=cfg.data.on_bad_sample, tasks=cfg.data.tasks,
            caption_dropout=cfg.data.caption_dropout, task_weights=dict(cfg.loss.task_weights),
            require_ref_logp=self.dpo is not None and cfg.dpo.reference == "precomputed")
        if self.dpo is not None and not self.loader.stream.pairs.any:
            raise ConfigError(f"loss.objective=dpo but data.path={cfg.data.path} holds no preference pairs "
                              "(make them with python -m emu3_train.data_pipelines.make_preferences)")
        self.checkpoints = CheckpointManager(
            self.ckpt_dir, async_save=cfg.checkpoint.async_save, keep_last=cfg.checkpoint.keep_last,
            keep_every=cfg.checkpoint.keep_every, is_rank0=self.is_rank0, on_durable=self._on_durable,
            after_launch=self.faults.after_save_launch)
        self.state = TrainState()
        # what a checkpoint holds: Stateful parts (model + optimizer, scheduler, loader, TrainState)
        self.stateful = training_state(self.model, self.optimizer, self.scheduler, self.loader, self.state)
        self.window = StepWindow()  # this interval's step statistics, still on the device
        self.bad_steps = 0
        self.spikes = SpikeDetector(cfg.trainer.spike_factor)
        self.stop_signal: str | None = None  # this rank's, or any rank's once the flag was read
        self._stop_read = False  # some rank's stop flag was read: every rank stops at this step
        if resume_from is not None:
            meta = restore(resume_from, self.stateful)
            if self.is_rank0:
                print(f"resumed from {meta['path']} at step {self.step}", flush=True)
        self.logger = MetricLogger(cfg.wandb, self.run_dir, cfg.run_name, asdict(cfg), self.is_rank0)
        if self.is_rank0:
            n = sum(p.numel() for p in self.model.parameters())
            print(f"model {cfg.model.name}: {n / 1e6:.2f}M parameters, vocab {self.vocab_size}, "
                  f"device {self.device}, dp {self.dp} x cp {self.dims.cp} x tp {self.dims.tp}; "
                  f"{self.dp} x {self.accum} x {cfg.data.micro_batch_size} rows of {cfg.data.seq_len} "
                  "tokens per step", flush=True)

    def _build_sampler(self, source) -> InRunSampler | None:
        if not self.cfg.trainer.sample_interval:
            return None
        if self.dims.cp > 1:
            if self.is_rank0:
                print(f"trainer.sample_interval: no in-run samples under parallel.cp={self.dims.cp} (the CP "
                      "attention cores need sharded rows); sample from an exported checkpoint", flush=True)
            return None
        return InRunSampler(self.cfg.sample, self.vocab, source, self.run_dir, self.device)

    def sample(self) -> dict:
        """One round of in-run samples (every rank takes part; rank 0 writes and logs them)."""
        sync = None
        if self.world_size > 1:
            def sync(t: torch.Tensor) -> torch.Tensor:
                t = t.to(self.device)
                named_collective("broadcast(sampled tokens)", torch.distributed.broadcast, t, src=0)
                return t.cpu()
        result = self.sampler(self.model, self.step, sync=sync, write=self.is_rank0,
                              length_multiple=self.dims.tp)
        if self.is_rank0:
            log = self.logger.log_image
            log("samples/images", result["images"], " | ".join(result["prompts"]), self.step)
            if "caption" in result:
                log("samples/caption", result["caption_image"], result["caption"], self.step)
                tqdm.write(f"step {self.step}: samples {result['images']}; the fixed image is captioned "
                           f"{result['caption']!r}")
        return result

    def _resume_source(self, where: str | None) -> Path | None:
        """What ``checkpoint.resume`` resumes from: a PATH, the run's own checkpoints for ``latest``
        (None, and a fresh start, until the run has one), or None when not resuming."""
        if not where:
            return None
        if where != "latest":
            return Path(where)
        if (self.ckpt_dir / "latest").is_file():
            return self.ckpt_dir
        if self.is_rank0:
            print(f"checkpoint.resume=latest: no checkpoint in {self.ckpt_dir} yet; starting fresh",
                  flush=True)
        return None

    @property
    def step(self) -> int:
        """Optimizer steps done (``TrainState.step``)."""
        return self.state.step

    # -- one optimizer step ----------------------------------------------------------------------
    def step_once(self, batches: list[dict] | None = None) -> None:
        """One optimizer step without waiting for the device: its statistics go to :attr:`window`
        as device tensors (read by :meth:`read_window`). A non-finite step is not applied.
        ``batches``: the step's micro-batches (default: the next ``grad_accum`` from the loader)."""
        cfg = self.cfg
        batches = batches or [next(self.loader) for _ in range(self.accum)]
        poison = self.faults.at_step(self.state.step + 1)
        stop = int(self.stop_signal is not None)
        if self.dpo is not None:
            out = dpo_forward_backward(self.model, batches, self.step_ctx, self.plan, self.dpo, stop, poison,
                                       self.reference)
            out["loss_text"] = out["loss_vision"] = out["dpo/ntp_loss"]  # the chosen documents' NTP
        else:
            out = forward_backward(self.model, batches, self.step_ctx, self.plan, poison=poison, stop=stop)
        self.perf.add(batches, self.vocab.pad)
        grad_norm = clip_grad_norm(self.model, cfg.optim.grad_clip)
        finite = torch.isfinite(out["loss"]) & torch.isfinite(grad_norm)  # the same on every rank
        apply_update(self.optimizer, finite)
        with warnings.catch_warnings():  # a skipped first step is not the misuse torch warns about
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()  # the schedule follows the step count, applied or skipped
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens += cfg.data.global_batch_size * cfg.data.seq_len
        self.window.add({"train/loss": out["loss"], "train/loss_text": out["loss_text"],
                         "train/loss_vision": out["loss_vision"], "train/grad_norm": grad_norm,
                         "finite": finite, "stop": out["stop"],
                         **{k: v for k, v in out.items() if k.startswith("dpo/")}}, {
            "step": self.state.step, "train/lr": self.scheduler.get_last_lr()[0],
            "tokens": sum(int(b["tokens"].numel()) for b in batches),  # this dp rank's rows
            "pad": sum(b["num_pad"] for b in batches), "docs": sum(b["num_docs"] for b in batches),
            "rows": sum(int(b["tokens"].shape[0]) for b in batches)})

    def read_window(self) -> list[dict]:
        """Read the unread steps' statistics (one host sync) and act on them in step order: count
        and report skipped steps (halting after ``trainer.max_bad_steps`` in a row), warn about
        loss spikes, and take up a stop flag any rank raised. Every rank reads at the same steps."""
        steps = self.window.read()
        for m in steps:
            m["train/skipped_step"] = 0.0 if m["finite"] else 1.0
            if m["finite"]:
                self.bad_steps = 0
            else:
                self.bad_steps += 1
                tqdm.write(f"step {m['step']}: non-finite loss/grad norm, update skipped "
                           f"({self.bad_steps} in a row)")
                if self.bad_steps >= self.cfg.trainer.max_bad_steps:
                    raise TrainingError(f"{self.bad_steps} consecutive non-finite steps "
                                        f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); stopping")
            spike = self.spikes.check(m["train/loss"])
            if spike and self.is_rank0:
                tqdm.write(f"step {m['step']}: {spike}")
            if m["stop"]:
                self._stop_read = True
                self.stop_signal = self.stop_signal or "SIGTERM"  # another rank's (the one handled)
        return steps

    def train_step(self) -> dict:
        """:meth:`step_once`, then read its statistics at once (tests and tools; :meth:`fit` reads
        only at log and stop-check steps)."""
        self.step_once()
        return self.read_window()[-1]

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.is_rank0,
                   desc="train", unit="step", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 60.0)  # log files: a line a minute
        interval: list[dict] = []  # steps read since the last summary
        t_window = time.perf_counter()
        last = {}
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        try:
            while self.step < t.max_steps and not self._should_stop():
                self.step_once()
                bar.update(1)
                log = self.step % t.log_interval == 0 or self.step == t.max_steps
                if log or self.step % t.stop_check_interval == 0:
                    interval += self.read_window()
                if log:
                    last = self._summarize(interval, time.perf_counter() - t_window)
                    bar.set_postfix(loss=f"{last['train/loss']:.3f}")
                    if self.is_rank0:
                        tqdm.write(format_summary(self.step, t.max_steps, last))
                        if self.dpo is not None:
                            tqdm.write(format_dpo(last))
                        sys.stdout.flush()  # summary lines reach log files as they happen
                    self.logger.log(last, self.step)
                    interval, t_window = [], time.perf_counter()
                if cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0:
                    self.save()
                t0 = time.perf_counter()
                if self.sampler is not None and self.step % t.sample_interval == 0:
                    self.sample()
                every = cfg.eval.val_interval
                if self.step == t.max_steps or (every and self.step % every == 0):
                    self.validate()
                t_window += time.perf_counter() - t0  # sampling and validation are not training throughput
            self.read_window()  # a stop between reads: the steps since are still reported
        finally:
            bar.close()  # so an error message starts on its own line
            signal.signal(signal.SIGTERM, previous)
        return last

    def _should_stop(self) -> bool:
        """True once a stop signal is known: on one process at once; with several, once the flag
        (riding on each step's loss-weight all-reduce) was read, so every rank stops at one step."""
        if self.world_size == 1:
            return self.stop_signal is not None
        return self._stop_read

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM (slurm's preemption notice): finish this step, checkpoint, exit 0."""
        self.stop_signal = signal.Signals(signum).name

    def _summarize(self, window: list[dict], seconds: float) -> dict:
        return {**interval_metrics(window, seconds, self.dp, self.world_size),
                "data/skipped": self._skipped_docs(), "train/tokens_seen": float(self.state.tokens),
                **self.perf.summarize(seconds)}

    def validate(self) -> dict | None:
        """``val/*`` on ``eval.val_path`` (emu3_train.validation); every rank takes part, rank 0 prints
        ``val step N | loss X | text X | vision X``. None without ``eval.val_path``."""
        if self.validator is None:
            return None
        metrics = self.validator(self.model, self.plan, self.step_ctx)
        if self.is_rank0:
            tqdm.write(format_validation(self.step, metrics, self.validator.names))
            sys.stdout.flush()
        self.logger.log(metrics, self.step)
        return metrics

    def _skipped_docs(self) -> float:
        """Documents skipped so far: oversize and unreadable shards (planned alike on every rank)
        plus bad samples (each rank sees those of its own rows, so they are summed over dp)."""
        stats = self.loader.stats()
        bad = torch.tensor([float(stats.get("skipped_bad", 0))], dtype=torch.float64, device=self.device)
        self.plan.all_reduce(bad, "dp", "data/skipped")  # at log steps only
        return float(stats.get("skipped", 0)) - float(stats.get("skipped_bad", 0)) + float(bad)

    def _on_durable(self, path: Path, seconds: float) -> None:
        """Rank 0, when a checkpoint is complete and published (writer thread for async saves)."""
        tqdm.write(f"checkpoint {path.name} durable ({seconds:.1f} s after the save started); "
                   f"resume with checkpoint.resume=latest")
        sys.stdout.flush()

    def save(self, wait: bool = False) -> Path:
        """Checkpoint the current step (in the background with ``checkpoint.async_save``)."""
        path = self.checkpoints.save(self.stateful, asdict(self.cfg))
        if wait:
            self.checkpoints.wait()
        return path

    def _plain_model(self):
        """The model itself (one process), or on rank 0 a plain copy gathered from every rank."""
        if self.world_size == 1:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        if not self.is_rank0:
            return None
        plain = Emu3CausalLM(self.cfg.model, self.vocab_size)
        plain.load_state_dict(full)
        return plain.to(self.device)

    def evaluate(self) -> dict | None:
        """The recipe's evaluation (rank 0), logged as ``eval/*`` and ``samples/images``."""
        if self.cfg.eval.task != "digits":
            return None
        from emu3_train.evaluate import evaluate_digits

        model = self._plain_model()  # collective: every rank takes part
        if not self.is_rank0:
            return None
        result = evaluate_digits(model, self.vocab, self.cfg.eval, self.cfg.data.path,
                                 self.run_dir, self.device)
        self.logger.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}, self.step)
        self.logger.log_image("samples/images", self.run_dir / "samples.png",
                              "one row per prompted digit 0-9", self.step)
        return result


def run_training(cfg: TrainConfig, run_dir: Path, rank: int = 0, world_size: int = 1) -> dict:
    """Setup, train, checkpoint, evaluate; returns the last metrics (+ ``eval`` results)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, rank, world_size)
    try:
        trainer.setup()
    except ValueError as e:  # bad values found while opening data or building parts: a config error
        if isinstance(e, (ConfigError, ShardError)):
            raise
        raise ConfigError(str(e)) from e
    try:
        last = trainer.fit()
        skipped = format_skipped(trainer._skipped_docs(), trainer.loader.stats(), trainer.step)  # all ranks
        if skipped and trainer.is_rank0:
            print(skipped, flush=True)
        path = trainer.save(wait=True)
        if trainer.is_rank0:
            print(f"checkpoint: {path}", flush=True)
        if trainer.stop_signal:
            if trainer.is_rank0:
                print(f"{trainer.stop_signal}: stopped at step {trainer.step} after checkpointing; "
                      f"continue with checkpoint.resume=latest", flush=True)
            return last
        result = trainer.evaluate()
        if result is not None:
            print(f"eval: t2i_accuracy {result['t2i_accuracy']:.3f} | i2t_accuracy "
                  f"{result['i2t_accuracy']:.3f}  ({run_dir / 'samples.png'}, {run_dir / 'eval.json'})",
                  flush=True)
            last = {**last, "eval": result}
    finally:
        trainer.loader.close()
        trainer.checkpoints.wait()  # publish a background save even when training failed
        trainer.logger.finish()
    return last
