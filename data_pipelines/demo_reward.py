"""The demo's reward model for DPO: a k-nearest-neighbours digit classifier (not the evaluation judge).

``make_preferences`` scores the demo's candidates with it; the evaluation judge stays the logistic
regression of ``emu3_train.evaluate``, a classifier of another kind trained on all training images,
so DPO cannot simply fit its judge. This one is trained on one half of the training images
(:func:`reward_indices`: a fixed ``default_rng(1)`` half of the images outside the held-out split).
The score of a candidate is the distance-weighted k-NN probability (k = 10) of the prompted digit.

    python -m emu3_train.data_pipelines.make_preferences runs/demo-stage1/ckpt/latest ... \\
        --scorer emu3_train.data_pipelines.demo_reward:make_scorer()
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .demo import caption, held_out_indices, load_images, parse_caption

MAX_LEVEL = 16  # the digits' gray levels 0..16 are the demo codes
NEIGHBOURS = 10


def reward_indices() -> np.ndarray:
    """Sorted image indices the reward model is trained on: half of the training split."""
    images, _ = load_images()
    train = np.setdiff1d(np.arange(len(images)), held_out_indices(len(images)))
    return np.sort(np.random.default_rng(1).permutation(train)[: len(train) // 2])


def make_scorer() -> Callable[[np.ndarray, str, np.ndarray | None], float]:
    """``score(codes [8, 8], prompt, pixels) -> P(prompted digit)`` of the k-NN reward model; a prompt
    naming no digit is a ``ValueError`` (make_preferences counts it as a scorer error)."""
    from sklearn.neighbors import KNeighborsClassifier

    images, labels = load_images()
    idx = reward_indices()
    knn = KNeighborsClassifier(n_neighbors=NEIGHBOURS, weights="distance")
    knn.fit(images[idx].reshape(len(idx), -1) / MAX_LEVEL, labels[idx])
    column = {int(c): i for i, c in enumerate(knn.classes_)}

    def score(codes: np.ndarray, prompt: str, pixels: np.ndarray | None = None) -> float:
        digit = parse_caption(prompt)
        if digit is None:
            raise ValueError(f"prompt {prompt!r} names no digit")
        proba = knn.predict_proba(np.asarray(codes, np.float64).reshape(1, -1) / MAX_LEVEL)[0]
        return float(proba[column[digit]])

    return score


def write_prompts(path: str | os.PathLike) -> int:
    """The training captions, one ``{"prompt", "label", "index"}`` line per training image (the
    demo's K = 8 samples per training caption); returns the count."""
    images, labels = load_images()
    train = np.setdiff1d(np.arange(len(images)), held_out_indices(len(images)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": caption(labels[i]), "label": int(labels[i]), "index": int(i)})
             for i in train]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m emu3_train.data_pipelines.demo_reward --prompts FILE``: write the DPO demo's prompts."""
    parser = argparse.ArgumentParser(prog="python -m emu3_train.data_pipelines.demo_reward")
    parser.add_argument("--prompts", required=True, help="output .jsonl of the training captions")
    args = parser.parse_args(argv)
    print(f"{write_prompts(args.prompts)} prompts -> {args.prompts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
