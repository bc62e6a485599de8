"""Validation loss on held-out shards, in every stage; the same numbers under any dp/cp/tp.

    python -m emu3_train.train experiment=demo eval.val_path=data/demo/eval eval.val_interval=200
    python -m emu3_train.evaluate runs/demo-stage1/ckpt/latest --data data/demo/eval   # offline

**Rows.** ``eval.val_path`` (with ``eval.val_blend``, "WEIGHT:DIR" entries as ``data.blend``) is
packed by the training planner (``plan.RowStream``: ``data.seq_len``, ``data.pack_window``,
oversize documents skipped) with the seed ``eval.val_seed``; ``eval.val_rows`` rows drawn (by that
seed) from the packing windows its first ``eval.val_rows`` rows fall in are the validation set
(:func:`held_out_rows`): planned from the indexes alone, identical on every rank, at every
validation and under any layout. More rows than the held-out set fills wrap into its next epoch.
Data-parallel rank r evaluates the set's rows r, r + dp, r + 2·dp, ... in
micro-batches of ``data.micro_batch_size`` rows; a rank with fewer rows adds empty rows (all
padding, weight 0), so every rank runs the same number of forwards (FSDP2 gathers in each).
cp and tp ranks of one replica take the same rows and split them as in training (the step plan).

**Numbers.** The documents and loss weights are the training ones (``data.tasks``, class weights,
understanding images 0, ``loss_spans``, ``loss.task_weights``):

- ``val/loss``: Σ w·CE / Σ w over the whole set (the definition of ``train/loss``);
- ``val/loss_text``, ``val/loss_vision``: mean CE per counted target of the class (as ``train/*``);
- ``val/<source>/loss``: ``val/loss`` over the tokens of one source (its directory's name).

The sums are float64 and reduced over ``dp_cp`` once per validation (tp ranks already hold global
values), so any layout gives the one-process numbers up to the forward's rounding. In bf16
(``trainer.precision``) the forward runs under autocast, as in training. The console line:

    val step 400 | loss 1.2345 | text 1.0123 | vision 1.4567          (+ " | SOURCE X" when blended)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from emu3_train.data.blend import open_blend, parse_blend
from emu3_train.data.index import load_index
from emu3_train.data.loader import PackedLoader
from emu3_train.loss import weighted_ce
from emu3_train.vocab import PRESETS, Vocab, get_vocab

_SUMS = ("loss", "weight", "text", "vision", "n_text", "n_vision")


def source_names(path, blend) -> list[str]:
    """The name of each held-out source in metric keys: its directory's name (made unique)."""
    names = []
    for d, _ in parse_blend(path, blend):
        name = d.name or str(d)
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


def format_validation(step: int | None, metrics: dict, names: list[str]) -> str:
    """``val step N | loss X | text X | vision X`` (+ ``| SOURCE X`` per source when blended)."""
    def f(v):
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"

    line = (f"val step {'-' if step is None else step} | loss {f(metrics['val/loss'])} | text "
            f"{f(metrics['val/loss_text'])} | vision {f(metrics['val/loss_vision'])}")
    if len(names) > 1:
        line += "".join(f" | {n} {f(metrics[f'val/{n}/loss'])}" for n in names)
    return line


def held_out_rows(stream, rows: int, seed: int) -> list[int]:
    """The global row numbers of the validation set: ``rows`` of the rows of the packing windows
    that the first ``rows`` rows fall in, drawn by ``default_rng([seed, 0x7A1])`` (best-fit
    decreasing emits a window's longest documents first, so its first rows are no sample)."""
    last = stream.seed_at(rows - 1).window
    end = rows
    while stream.seed_at(end).window == last:
        end += 1
    picked = np.random.default_rng([seed, 0x7A1]).choice(end, size=rows, replace=False)
    return sorted(int(k) for k in picked)


class Validator:
    """The fixed held-out rows of this data-parallel rank, and the loss of a model on them.

    Args:
        path, blend: ``eval.val_path`` and ``eval.val_blend``.
        vocab: the shards' vocabulary.
        seq_len, rows, seed, pack_window: ``data.seq_len``, ``eval.val_rows``, ``eval.val_seed``,
            ``data.pack_window``.
        micro_batch_size: rows per forward (``data.micro_batch_size``).
        vision_weight, task_weights: ``loss.vision_weight``, ``loss.task_weights``.
        tasks: ``data.tasks``: the document tasks the run trains on ([] = all), validated alike.
        dp_rank, dp_size: this rank's data-parallel coordinate and the dp size.
    """

    def __init__(self, path, blend, vocab: Vocab, *, seq_len: int, rows: int, seed: int = 0,
                 pack_window: int = 256, micro_batch_size: int = 1, vision_weight: float = 0.5,
                 task_weights: dict | None = None, tasks=(), dp_rank: int = 0, dp_size: int = 1):
        sources, weights = open_blend(path, blend, vocab)
        self.names = source_names(path, blend)
        self.loader = PackedLoader(sources, seq_len=seq_len, micro_batch_size=1, seed=seed,
                                   vision_weight=vision_weight, pack_window=pack_window, weights=weights,
                                   task_weights=task_weights, tasks=list(tasks))
        self.rows = [self.loader.row(k) for k in held_out_rows(self.loader.stream, rows, seed)]
        per_rank = math.ceil(rows / dp_size)
        forwards = math.ceil(per_rank / micro_batch_size)  # the same on every rank
        mine = self.rows[dp_rank::dp_size]
        mine = mine + [[] for _ in range(forwards * micro_batch_size - len(mine))]
        self.batches_rows = [mine[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(forwards)]

    @classmethod
    def from_config(cls, cfg, vocab: Vocab, dp_rank: int = 0, dp_size: int = 1) -> Validator | None:
        """The validator of a :class:`~emu3_train.config.TrainConfig` (None without ``eval.val_path``)."""
        e, d = cfg.eval, cfg.data
        if not e.val_path:
            return None
        return cls(e.val_path, e.val_blend, vocab, seq_len=d.seq_len, rows=e.val_rows, seed=e.val_seed,
                   pack_window=d.pack_window, micro_batch_size=d.micro_batch_size,
                   vision_weight=cfg.loss.vision_weight, task_weights=dict(cfg.loss.task_weights),
                   tasks=list(d.tasks), dp_rank=dp_rank, dp_size=dp_size)

    def _source_of(self, rows) -> torch.Tensor:
        """int64 ``[B, S]``: the source index of each token (-1 on padding)."""
        out = np.full((len(rows), self.loader.seq_len), -1, np.int64)
        for r, row in enumerate(rows):
            o = 0
            for piece in row:
                out[r, o:o + piece.length] = self.loader.locate(piece.doc_id)[0]
                o += piece.length
        return torch.from_numpy(out)

    @torch.no_grad()
    def __call__(self, model, plan, ctx) -> dict:
        """``val/*`` metrics (module docstring) of ``model`` run by the step plan ``plan`` with the
        loss settings ``ctx`` (``step.StepContext``). Every rank of the world must call it."""
        was_training = model.training
        model.eval()
        n = len(self.names)
        sums = torch.zeros(n, len(_SUMS), dtype=torch.float64, device=plan.device)
        for rows in self.batches_rows:
            batch = self.loader.batch_of(rows)
            b = plan.prepare(batch)
            with torch.autocast(plan.device.type, dtype=torch.bfloat16) if ctx.bf16 else nullcontext():
                hidden = model(**plan.model_inputs(b))
            head, vocab_start, tp_group = plan.head(model)
            source_of = self._source_of(rows) if n > 1 else None
            for s in range(n):
                weight = b["loss_weight"] if n == 1 else plan.prepare(
                    {**batch, "loss_weight": batch["loss_weight"] * (source_of == s)})["loss_weight"]
                wsum, st = weighted_ce(hidden, head, b["labels"], weight, vision_start=ctx.vision_start,
                                       z_loss=ctx.z_loss, impl=ctx.impl, chunk_size=ctx.chunk_size,
                                       vocab_start=vocab_start, tp_group=tp_group)
                sums[s] += torch.stack([wsum.double(), weight.double().sum(), st["loss_text_sum"].double(),
                                        st["loss_vision_sum"].double(), st["tokens_text"].double(),
                                        st["tokens_vision"].double()])
        plan.all_reduce(sums, "dp_cp", "validation sums")
        if hasattr(model, "reshard"):  # FSDP2 keeps the root gathered after a forward without backward
            model.reshard()
        model.train(was_training)
        per_source = sums.tolist()  # the one host sync of a validation
        loss, weight, text, vision, n_text, n_vision = (sum(col) for col in zip(*per_source))
        ratio = lambda a, b: a / b if b > 0 else math.nan  # noqa: E731
        out = {"val/loss": ratio(loss, weight), "val/loss_text": ratio(text, n_text),
               "val/loss_vision": ratio(vision, n_vision)}
        for name, row in zip(self.names, per_source):
            out[f"val/{name}/loss"] = ratio(row[0], row[1])
        return out


# -- offline: python -m emu3_train.evaluate SOURCE --data DIR -------------------------------------
def shard_vocab(path) -> Vocab:
    """The vocabulary the shards in directory ``path`` were indexed for (from the first ``.idx``)."""
    tars = sorted(Path(path).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no *.tar shards in {path}")
    name = load_index(tars[0]).vocab_name
    if name not in PRESETS:
        raise ValueError(f"{tars[0].with_suffix('.idx')}: indexed for vocabulary {name!r}, not a preset "
                         f"({list(PRESETS)})")
    return get_vocab(name)


def _settings(config: dict, args) -> dict:
    """The validation settings: the flags, else the run's config (a checkpoint), else the defaults."""
    from emu3_train.config import DataConfig, EvalConfig, LossConfig, TrainerConfig

    d, e, lo = config.get("data") or {}, config.get("eval") or {}, config.get("loss") or {}
    t = config.get("trainer") or {}

    def pick(flag, section: dict, key: str, default):
        return flag if flag is not None else section.get(key, default)

    return {"seq_len": pick(args.seq_len, d, "seq_len", DataConfig.seq_len),
            "rows": pick(args.rows, e, "val_rows", EvalConfig.val_rows),
            "seed": pick(args.seed, e, "val_seed", EvalConfig.val_seed),
            "pack_window": d.get("pack_window", DataConfig.pack_window),
            "micro_batch_size": pick(args.micro_batch_size, d, "micro_batch_size",
                                     DataConfig.micro_batch_size),
            "vision_weight": lo.get("vision_weight", LossConfig.vision_weight),
            "task_weights": lo.get("task_weights") or None, "tasks": d.get("tasks") or [],
            "bf16": pick(args.precision, t, "precision", TrainerConfig.precision) == "bf16",
            "z_loss": lo.get("z_loss", 0.0), "impl": lo.get("impl", "auto"),
            "chunk_size": lo.get("chunk_size", LossConfig.chunk_size)}


def evaluate_source(source, data, blend=(), device="cpu", args=None) -> tuple[dict, str]:
    """(``val/*`` metrics, console line) of the model at ``source`` (``model_source.load_model``) on
    the held-out shards ``data`` (+ ``blend``), with the settings of the run that saved it."""
    from emu3_train.model_source import load_model
    from emu3_train.parallel.step_plan import StepPlan
    from emu3_train.step import StepContext

    args = args or argparse.Namespace(seq_len=None, rows=None, seed=None, micro_batch_size=None,
                                      precision=None)
    src = load_model(source, device)
    vocab = shard_vocab(parse_blend(data, list(blend))[0][0])
    if vocab.size > src.model_config.vocab_size:
        raise ValueError(f"{data}: vocabulary {vocab.name!r} ({vocab.size} ids) does not fit the model's "
                         f"{src.model_config.vocab_size} embedding rows ({source})")
    s = _settings(src.config, args)
    validator = Validator(data, list(blend), vocab, seq_len=s["seq_len"], rows=s["rows"], seed=s["seed"],
                          pack_window=s["pack_window"], micro_batch_size=s["micro_batch_size"],
                          vision_weight=s["vision_weight"], task_weights=s["task_weights"], tasks=s["tasks"])
    ctx = StepContext(bf16=s["bf16"], vision_start=vocab.vision_start, z_loss=s["z_loss"], impl=s["impl"],
                      chunk_size=s["chunk_size"])
    metrics = validator(src.model, StepPlan(device=torch.device(device)), ctx)
    return metrics, format_validation(src.step, metrics, validator.names)


def main(argv: list[str] | None = None) -> int:
    """``python -m emu3_train.evaluate SOURCE --data DIR``: the validation numbers of any checkpoint
    or HF folder, offline, on one process."""
    from emu3_train.config import ConfigError
    from emu3_train.data.index import ShardError

    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.evaluate",
        description="Validation loss (val/loss, val/loss_text, val/loss_vision, val/<source>/loss) of a "
                    "checkpoint or HF folder on held-out shards: the numbers the run logs in-run.",
        epilog="example: python -m emu3_train.evaluate runs/demo-stage1/ckpt/latest --data data/demo/eval")
    parser.add_argument("source", metavar="SOURCE", help="ckpt folder, ckpt/latest, ckpt/step_N or HF folder")
    parser.add_argument("--data", required=True, metavar="DIR", help="held-out shards (eval.val_path)")
    parser.add_argument("--blend", nargs="*", default=[], metavar="WEIGHT:DIR",
                        help="several held-out sources, DIR relative to --data (eval.val_blend)")
    parser.add_argument("--rows", type=int, help="held-out rows (default: the run's eval.val_rows)")
    parser.add_argument("--seq-len", type=int, help="tokens per row (default: the run's data.seq_len)")
    parser.add_argument("--seed", type=int, help="packing seed of the rows (default: eval.val_seed)")
    parser.add_argument("--micro-batch-size", type=int, help="rows per forward (default: the run's)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: the run's trainer.precision")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--out", type=Path, help="also write the metrics as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("rows", "seq_len", "micro_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        metrics, line = evaluate_source(args.source, args.data, args.blend, args.device, args)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(line, flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    return 0
