"""The DPO demo's evaluation: the same digit evaluation before and after DPO, plus diversity.

    python -m emu3_train.dpo_eval runs/demo-stage1/ckpt/latest runs/demo-dpo/ckpt/latest \\
        --train data/demo/train --eval data/demo/eval --out runs/demo-dpo

For each of BEFORE and AFTER (checkpoints or HF folders), as ``emu3_train.evaluate`` does and with its
defaults (``eval.*``: 10 samples per digit at temperature 0.8, seed 0, no guidance):
``t2i_accuracy`` (the independent judge, logistic regression on the training images, labels each
generated digit), ``i2t_accuracy`` (greedy captions of the held-out images) and ``diversity``: the
mean pairwise Euclidean distance between the generated images of the same digit (gray levels scaled
to [0, 1], an 8x8 image as a 64-vector), averaged over the ten digits: a collapse onto one image per
prompt drives it to 0. ``OUT/eval.json`` holds the AFTER values and the same three with the suffix
``_before``, and ``diversity_ratio`` (after / before); ``OUT/samples_before.png`` and
``OUT/samples_after.png`` show one row per digit.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from emu3_train.config import EvalConfig
from emu3_train.data.stream import ShardSet
from emu3_train.evaluate import DIGIT_WORDS, _images, digits_from_caption, save_grid, train_classifier
from emu3_train.model_source import load_model
from emu3_train.sampling import caption_images, generate_images
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab


def diversity(codes: np.ndarray, max_level: int) -> float:
    """Mean over digits of the mean pairwise L2 distance between ``codes [10, n, h, w]`` of a digit."""
    per_digit = []
    for samples in codes.reshape(codes.shape[0], codes.shape[1], -1).astype(np.float64) / max_level:
        per_digit.append(np.mean([np.linalg.norm(a - b) for a, b in combinations(samples, 2)]))
    return float(np.mean(per_digit))


def evaluate_model(model, vocab, clf, eval_images, eval_labels, cfg: EvalConfig, h: int, w: int):
    """(metrics, codes [10, n, h, w]) of one model."""
    tok = load_tokenizer(vocab)
    max_level = vocab.codebook_size - 1
    n = cfg.samples_per_class
    prompts = [f"a handwritten digit {DIGIT_WORDS[d]}" for d in range(10) for _ in range(n)]
    codes = generate_images(model, vocab, tok.encode, prompts, h, w, temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, seed=0).numpy()
    predicted = clf.predict(codes.reshape(len(codes), -1) / max_level)
    t2i = float(np.mean(predicted == np.repeat(np.arange(10), n)))
    captions = caption_images(model, vocab, tok.encode, torch.as_tensor(eval_images))
    named = [digits_from_caption(tok.decode(c)) for c in captions]
    i2t = float(np.mean([s == {int(y)} for s, y in zip(named, eval_labels)]))
    codes = codes.reshape(10, n, h, w)
    return {"t2i_accuracy": t2i, "i2t_accuracy": i2t, "diversity": diversity(codes, max_level)}, codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu3_train.dpo_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="the model before DPO (checkpoint or HF folder)")
    parser.add_argument("after", help="the model after DPO")
    parser.add_argument("--train", default="data/demo/train", help="training shards (the judge's images)")
    parser.add_argument("--eval", default="data/demo/eval", help="held-out shards (i2t)")
    parser.add_argument("--out", type=Path, required=True, help="directory for eval.json and the PNGs")
    parser.add_argument("--samples-per-class", type=int, default=EvalConfig.samples_per_class)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    vocab = get_vocab("demo")
    decode = load_tokenizer(vocab).decode
    cfg = EvalConfig(samples_per_class=args.samples_per_class)
    train_images, train_labels = _images(ShardSet(args.train, vocab), vocab, decode, "t2i")
    clf = train_classifier(train_images, train_labels, vocab.codebook_size - 1)
    eval_images, eval_labels = _images(ShardSet(args.eval, vocab), vocab, decode, "i2t")
    h, w = train_images.shape[1:]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, source in (("before", args.before), ("after", args.after)):
        model = load_model(source).model
        metrics, codes = evaluate_model(model, vocab, clf, eval_images, eval_labels, cfg, h, w)
        save_grid(codes, vocab.codebook_size - 1, args.out / f"samples_{name}.png")
        suffix = "_before" if name == "before" else ""
        result.update({k + suffix: v for k, v in metrics.items()})
    result["diversity_ratio"] = result["diversity"] / max(result["diversity_before"], 1e-12)
    result.update({"samples_per_class": cfg.samples_per_class, "temperature": cfg.temperature,
                   "before": str(args.before), "after": str(args.after)})
    (args.out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(" | ".join(f"{k} {result[k + '_before']:.3f} -> {result[k]:.3f}"
                     for k in ("t2i_accuracy", "i2t_accuracy", "diversity")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
