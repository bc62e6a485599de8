"""Preference pairs for DPO: sample K images per prompt with the generation engine, score them,
keep the best and the worst, write pair shards (with the reference log-probs, by default).

    python -m emu3_train.data_pipelines.make_preferences runs/demo-stage1/ckpt/latest \\
        --prompts data/demo/prompts/train.jsonl --out data/demo_dpo --grid 8x8 --k 8 \\
        --scorer emu3_train.data_pipelines.demo_reward:make_scorer() --top-k 0 --seed 0
    # one node, 8 workers (each takes every 8th prompt file)
    torchrun --nproc-per-node 8 -m emu3_train.data_pipelines.make_preferences /ckpt/qft/latest \\
        --prompts 'prompts/*.jsonl' --out /shards/dpo --grid 64x64 --k 8 --cfg 3.0 --top-k 2048 \\
        --vq /models/Emu3-VisionTokenizer-hf --scorer mypkg.reward:score

SOURCE: a run's checkpoint (any layout, ``latest`` resolved) or an HF folder
(``emu3_train.model_source``). Inputs (``--prompts``): ``.jsonl`` files with one object per line
holding ``"prompt"`` (other fields, e.g. ``label``, are copied into both documents' json), or
``.txt`` files with one prompt per line. Each input file gives one output shard set
(``shard_output``: ``OUT/NAME-000000.tar`` + ``.idx``, then ``OUT/NAME.stats.json``), so reruns
skip finished files and redo half-done ones, and worker ``i`` of ``N`` (``--rank/--world-size``,
else torchrun's or slurm's environment) takes files ``i, i+N, ...``.

Per prompt (line ``j`` of its file): ``--k`` candidates on a ``--grid HxW`` code grid, sampled with
``--temperature``/``--top-k``/``--top-p`` and classifier-free guidance ``--cfg`` (against the empty
caption) by ``emu3_train.generation``. ``--prompts-per-batch`` prompts run as one batch, drawn from
the seed ``[--seed, file number, first line]`` (the same files, seed and batch size give the same
pairs on any worker, in any rerun). The scorer (``--scorer module:function``, or
``module:factory()`` to build it once) is called per candidate as ``fn(codes, prompt, pixels)``:
codes int64 ``[h, w]``, the prompt string, pixels uint8 ``[H, W, 3]`` (VQ-decoded with ``--vq``,
else None); it returns a float, higher is better. The best and the worst candidate become a pair,
unless their gap is ``<= --min-gap`` (a tie: counted, no pair).

Documents: ``BOS prompt SOV meta SOT rows EOF EOV EOS`` (t2i), keys ``{line:09d}-chosen`` /
``-rejected``; the json holds ``pair`` (``NAME-{line}``), ``role``, ``score``, ``gap``, ``prompt``,
``loss_spans`` (the vision block after SOT through EOV: the prompt is unsupervised) and, unless
``--no-reference``, ``ref_logp``: the log-prob of those targets under SOURCE (the frozen DPO
reference), computed exactly as the DPO loss computes the policy's. Each stats file holds the
score distributions (all candidates, chosen, rejected, gaps); the console prints their summary.

Bad input: a prompt line that is not JSON or has no prompt, a scorer that raises or returns a
non-finite value: skipped and counted with the file and line named (``--on-error error``: stop at
the first with one line).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from emu3_train.vocab import Vocab

from ._cli import run_cli
from .shard_output import DEFAULT_MAX_COUNT, ShardSetWriter, is_done, read_stats
from .work import Skips, add_worker_args, expand_inputs, input_name, local_device, my_share, worker_identity


def load_scorer(spec: str):
    """The callable of ``module:function`` (or the result of calling ``module:factory()`` once)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--scorer {spec!r}: expected module:function or module:factory()")
    build = name.endswith("()")
    name = name[:-2] if build else name
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--scorer {spec!r}: {e}") from None
    obj = obj() if build else obj
    if not callable(obj):
        raise ValueError(f"--scorer {spec!r} is not callable")
    return obj


def read_prompts(path: Path, skips: Skips) -> list[tuple[int, str, dict]]:
    """``(line, prompt, extra fields)`` of an input file; bad lines counted (or raised)."""
    out = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not text.strip():
            continue
        if path.suffix.lower() != ".jsonl":
            out.append((line, text.strip(), {}))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            skips.bad("bad_json", f"{path}:{line + 1}", str(e))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            skips.bad("no_prompt", f"{path}:{line + 1}", 'expected an object with a "prompt" string')
            continue
        extra = {k: v for k, v in rec.items() if k not in ("prompt", "task", "source", "loss_spans", "pair",
                                                               "role", "ref_logp", "score", "gap")}
        out.append((line, rec["prompt"], extra))
    return out


def _summary(values) -> dict:
    v = np.asarray(values, np.float64)
    if not v.size:
        return {"n": 0}
    q = np.percentile(v, [10, 50, 90])
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "max": float(v.max())}


class PreferenceMaker:
    """Samples, scores and writes the pairs of one input file at a time (module docstring)."""

    def __init__(self, model, vocab: Vocab, encode, args, scorer, renderer, device):
        self.model, self.vocab, self.encode, self.args = model, vocab, encode, args
        self.scorer, self.renderer, self.device = scorer, renderer, device
        from emu3_train.generate import parse_pair

        self.grid = parse_pair(args.grid, "--grid")
        self.skips = Skips(args.on_error)
        self.scores: dict[str, list[float]] = {"all": [], "chosen": [], "rejected": [], "gap": []}

    def _score(self, codes: np.ndarray, prompt: str, where: str) -> list[float] | None:
        pixels = self.renderer(codes) if self.renderer is not None else [None] * len(codes)
        out = []
        for k, (c, px) in enumerate(zip(codes, pixels)):
            try:
                value = float(self.scorer(c, prompt, px))
            except Exception as e:  # noqa: BLE001 - any scorer failure is named, then skipped or raised
                self.skips.bad("scorer_error", where, f"the scorer raised on candidate {k}: "
                               f"{type(e).__name__}: {e}")
                return None
            if not math.isfinite(value):
                self.skips.bad("scorer_not_finite", where, f"the scorer returned {value} for candidate {k}")
                return None
            out.append(value)
        return out

    def run_file(self, path: Path, number: int, progress) -> dict:
        import torch

        from emu3_train.dpo import pair_reference_logps
        from emu3_train.layout import t2i_document
        from emu3_train.sampling import generate_images

        a, (h, w), name = self.args, self.grid, input_name(path)
        file_skips = Skips(a.on_error)
        self.skips, outer = file_skips, self.skips
        prompts = read_prompts(path, file_skips)
        pairs, file_scores = [], {"all": [], "chosen": [], "rejected": [], "gap": []}
        for start in range(0, len(prompts), a.prompts_per_batch):
            batch = prompts[start:start + a.prompts_per_batch]
            captions = [p for _, p, _ in batch for _ in range(a.k)]
            seed = int(np.random.default_rng([a.seed, number, batch[0][0]]).integers(2**62))
            with torch.no_grad():
                codes = generate_images(self.model, self.vocab, self.encode, captions, h, w,
                                        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                        guidance_scale=a.cfg, seed=seed, device=self.device).numpy()
            for i, (line, prompt, extra) in enumerate(batch):
                cand = codes[i * a.k:(i + 1) * a.k]
                scores = self._score(cand, prompt, f"{path}:{line + 1}")
                progress(1)
                if scores is None:
                    continue
                best, worst = int(np.argmax(scores)), int(np.argmin(scores))
                gap = scores[best] - scores[worst]
                file_scores["all"] += scores
                if gap <= a.min_gap:
                    file_skips.filtered("tie", f"{path}:{line + 1}",
                                        f"gap {gap:.4g} <= --min-gap {a.min_gap}")
                    continue
                file_scores["chosen"].append(scores[best])
                file_scores["rejected"].append(scores[worst])
                file_scores["gap"].append(gap)
                pairs.append((line, prompt, extra, cand[best], cand[worst], scores[best], scores[worst]))
        docs = []
        for line, prompt, extra, cbest, cworst, sbest, sworst in pairs:
            ids = self.encode(prompt)
            two = []
            for codes_ in (cbest, cworst):
                tokens = np.asarray(t2i_document(self.vocab, ids, codes_, self.encode), np.int64)
                sot = int(np.flatnonzero(tokens == self.vocab.sot)[0])
                two.append((tokens, np.array([[sot + 1, len(tokens) - 1]], np.int64)))
            docs.append((line, prompt, extra, two, (sbest, sworst)))
        ref = None
        if not a.no_reference and docs:
            ref = pair_reference_logps(self.model, self.vocab, [(d[3][0][0], d[3][1][0]) for d in docs],
                                       [(d[3][0][1], d[3][1][1]) for d in docs], device=self.device)
        writer = ShardSetWriter(a.out, name, self.vocab, max_count=a.max_shard_docs, input_path=path)
        with writer:
            for j, (line, prompt, extra, two, scores) in enumerate(docs):
                for r, role in enumerate(("chosen", "rejected")):
                    tokens, spans = two[r]
                    meta = {**extra, "task": "t2i", "source": f"{name}/{line}", "pair": f"{name}-{line}",
                            "role": role, "score": scores[r], "gap": scores[0] - scores[1], "prompt": prompt,
                            "loss_spans": spans.tolist()}
                    if ref is not None:
                        meta["ref_logp"] = float(ref[j, r])
                    writer.add(tokens, meta, key=f"{line:09d}-{role}")
            stats = writer.finish({"prompts": len(prompts), "pairs": len(docs), "k": a.k,
                                   "skipped": dict(file_skips.counts), "skipped_items": file_skips.items,
                                   "scores": {k: _summary(v) for k, v in file_scores.items()}})
        outer.merge(file_skips)
        self.skips = outer
        for key, values in file_scores.items():
            self.scores[key] += values
        return stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.make_preferences", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="checkpoint (ckpt, ckpt/latest, step_N) or HF folder")
    parser.add_argument("--prompts", nargs="+", required=True, metavar="PATTERN_OR_DIR",
                        help=".jsonl ({\"prompt\": ...} per line) or .txt (a prompt per line) files")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output shard directory")
    parser.add_argument("--scorer", required=True, help="module:function or module:factory()")
    parser.add_argument("--grid", required=True, help="HxW code grid, e.g. 64x64")
    parser.add_argument("--k", type=int, default=8, help="candidates per prompt (default 8)")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale (default 1: none)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: all codes")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-gap", type=float, default=0.0,
                        help="drop a prompt whose best-worst score gap is <= this (ties; default 0)")
    parser.add_argument("--prompts-per-batch", type=int, default=16, help="prompts sampled together")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not store ref_logp (DPO then needs dpo.reference=frozen)")
    parser.add_argument("--vq", default=None, metavar="PATH", help="VQ-VAE folder: the scorer gets pixels")
    parser.add_argument("--max-shard-docs", type=int, default=DEFAULT_MAX_COUNT)
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if present, else cpu), cpu")
    add_worker_args(parser, "bad prompts and scorer failures")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 2 or args.prompts_per_batch < 1:
        parser.error("--k must be >= 2 and --prompts-per-batch >= 1")
    from emu3_train.generate import parse_pair  # torch, as everything below

    parse_pair(args.grid, "--grid")
    worker = worker_identity(args.rank, args.world_size)
    inputs = expand_inputs(args.prompts, [".jsonl", ".txt"])
    numbered = list(enumerate(inputs))
    mine = my_share(numbered, worker)
    todo = [(n, p) for n, p in mine if not is_done(args.out, input_name(p))]
    if not todo:
        print(f"{worker}: all {len(mine)} of its {len(inputs)} prompt files are done in {args.out}")
        return 0
    scorer = load_scorer(args.scorer)
    from tqdm import tqdm

    from emu3_train.model_source import load_model
    from emu3_train.samples import CodeRenderer
    from emu3_train.tokenizer import load_tokenizer

    device = local_device(args.device)
    src = load_model(args.source, device)
    if src.vocab is None:
        raise ValueError(f"{args.source}: its vocabulary is unknown (not a preset)")
    vocab = src.vocab
    renderer = CodeRenderer(vocab.codebook_size, args.vq, device) if args.vq else None
    maker = PreferenceMaker(src.model, vocab, load_tokenizer(vocab).encode, args, scorer, renderer, device)
    start = time.perf_counter()
    bar = tqdm(desc=str(worker), unit="prompt", file=sys.stderr)
    pairs = 0
    try:
        for number, path in todo:
            pairs += maker.run_file(path, number, bar.update)["pairs"]
    finally:
        bar.close()
    s = {k: _summary(v) for k, v in maker.scores.items()}
    fmt = lambda d: "n/a" if not d["n"] else f"mean {d['mean']:.3f} [{d['min']:.3f}, {d['max']:.3f}]"  # noqa: E731
    seconds = time.perf_counter() - start
    print(f"{worker}: wrote {pairs} pairs from {len(todo)} prompt files in {seconds:.1f} s "
          f"to {args.out}; scores: all {fmt(s['all'])}, chosen {fmt(s['chosen'])}, rejected "
          f"{fmt(s['rejected'])}, gap {fmt(s['gap'])}; {maker.skips.summary()}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with bad input reported as one ``error:`` line (exit code 2)."""
    return run_cli(main, argv)


__all__ = ["PreferenceMaker", "cli", "load_scorer", "main", "read_prompts", "read_stats"]

if __name__ == "__main__":
    raise SystemExit(cli())
