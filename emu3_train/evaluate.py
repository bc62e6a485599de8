"""The demo's evaluation: does the model draw the digit it is asked for, and name the one it sees?

- ``t2i_accuracy``: ``samples_per_class`` digits are generated for each prompt "a handwritten digit
  {word}"; an independent classifier (scikit-learn logistic regression trained on the *training*
  shards' images, never on model output) must label each as the prompted digit.
  ``t2i_accuracy_guided``: the same prompts and seed with classifier-free guidance
  (``eval.guidance_scale`` against the empty caption, which ``data.caption_dropout`` trains).
- ``i2t_accuracy``: each held-out image (``eval.path`` shards) is captioned greedily; the caption
  must name the right digit word and no other.

Writes ``samples.png`` and ``samples_guided.png`` (one row per prompted digit, 8x upscaled square
pixels, ink dark on white). Deterministic: every draw comes from generators seeded with 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from emu3_train.config import EvalConfig
from emu3_train.data.stream import ShardSet
from emu3_train.layout import parse_vision_block, vision_spans
from emu3_train.samples import CodeRenderer
from emu3_train.sampling import caption_images, generate_images
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import Vocab

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _images(shards: ShardSet, vocab: Vocab, decode, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, h, w]`` (codes) and labels of the documents of ``task`` in a shard set."""
    images, labels = [], []
    for i in range(len(shards)):
        tokens, meta = shards.read(i)
        if meta.get("task") != task:
            continue
        start, end = vision_spans(tokens, vocab)[0]
        images.append(parse_vision_block(tokens[start:end], vocab, decode)[0])
        labels.append(int(meta["label"]))
    return np.stack(images), np.asarray(labels)


def train_classifier(images: np.ndarray, labels: np.ndarray, max_level: int):
    """Logistic regression on flattened images scaled to [0, 1]."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=3000)
    clf.fit(images.reshape(len(images), -1) / max_level, labels)
    return clf


def digits_from_caption(text: str) -> set[int]:
    words = text.lower().replace(".", " ").split()
    return {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}


def save_grid(codes: np.ndarray, max_level: int, path: Path, scale: int = 8) -> None:
    """``codes [rows, cols, h, w]`` -> a PNG grid with square pixels and a digit label per row."""
    from PIL import Image, ImageDraw

    rows, cols, h, w = codes.shape
    tiles = CodeRenderer(max_level + 1, scale=scale)(codes.reshape(rows * cols, h, w))[..., 0]
    cell, gap, margin = h * scale, 4, 24
    canvas = Image.new("L", (margin + cols * (cell + gap), rows * (cell + gap) + gap), 255)
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y = gap + r * (cell + gap)
        draw.text((6, y + cell // 2 - 6), str(r), fill=0)
        for c in range(cols):
            canvas.paste(Image.fromarray(tiles[r * cols + c], mode="L"), (margin + c * (cell + gap), y))
    canvas.save(path)


def evaluate_digits(model, vocab: Vocab, cfg: EvalConfig, train_path: str, run_dir: Path,
                    device="cpu") -> dict:
    """Run both evaluations, write ``samples.png`` and ``eval.json`` into ``run_dir``."""
    tok = load_tokenizer(vocab)
    max_level = vocab.codebook_size - 1
    train_images, train_labels = _images(ShardSet(train_path, vocab), vocab, tok.decode, "t2i")
    clf = train_classifier(train_images, train_labels, max_level)
    h, w = train_images.shape[1:]

    n = cfg.samples_per_class
    prompts = [f"a handwritten digit {DIGIT_WORDS[d]}" for d in range(10) for _ in range(n)]
    wanted = np.repeat(np.arange(10), n)

    def t2i(guidance_scale: float) -> tuple[float, np.ndarray]:
        codes = generate_images(model, vocab, tok.encode, prompts, h, w, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p, guidance_scale=guidance_scale, seed=0,
                                device=device).numpy()
        predicted = clf.predict(codes.reshape(len(codes), -1) / max_level)
        return float(np.mean(predicted == wanted)), codes

    accuracy, codes = t2i(1.0)  # no guidance
    accuracy_guided, codes_guided = t2i(cfg.guidance_scale)
    save_grid(codes.reshape(10, n, h, w), max_level, run_dir / "samples.png")
    save_grid(codes_guided.reshape(10, n, h, w), max_level, run_dir / "samples_guided.png")

    eval_images, eval_labels = _images(ShardSet(cfg.path, vocab), vocab, tok.decode, "i2t")
    captions = caption_images(model, vocab, tok.encode, torch.as_tensor(eval_images), device=device)
    named = [digits_from_caption(tok.decode(c)) for c in captions]
    i2t = float(np.mean([s == {int(y)} for s, y in zip(named, eval_labels)]))

    result = {
        "t2i_accuracy": accuracy, "t2i_accuracy_guided": accuracy_guided, "i2t_accuracy": i2t,
        "t2i_samples": int(len(codes)), "i2t_images": int(len(eval_images)),
        "classifier_train_accuracy": float(clf.score(train_images.reshape(len(train_images), -1)
                                                     / max_level, train_labels)),
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
        "guidance_scale": cfg.guidance_scale,
        "example_captions": [tok.decode(c) for c in captions[:5]],
    }
    (run_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m emu3_train.evaluate SOURCE --data DIR [--rows N --seq-len L]``: the validation loss
    of a checkpoint or HF folder on held-out shards (:func:`emu3_train.validation.main`)."""
    from emu3_train.validation import main as validation_main

    return validation_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
