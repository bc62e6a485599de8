"""The embedded demo dataset: scikit-learn's handwritten digits as t2i and i2t documents.

1,797 images of 8×8 pixels with gray levels 0..16, shipped inside scikit-learn (no download);
each gray level is a visual code of the ``demo`` vocabulary (codebook 17). Every image gives two
documents with the caption ``"a handwritten digit seven"``: a generation one (caption, then
image) and an understanding one (image, then caption). A fixed 180 images (about 10%,
:func:`held_out_indices`) go to ``OUT/eval``, the other 1,617 to ``OUT/train``. Each sample's
json holds ``task``, ``source`` ("sklearn-digits"), ``label`` (the digit) and ``index`` (image).

    python -m emu3_train.data_pipelines.demo --out data/demo            # skips a complete dataset
    python -m emu3_train.data_pipelines.demo --out data/demo --force    # rebuild

``OUT/DONE.json`` marks a complete dataset (counts per split); the evaluator parses captions
with :func:`parse_caption`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from emu3_train.data.index import index_path
from emu3_train.layout import i2t_document, t2i_document
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

from .write_shards import write_shards  # emu3_train.data_pipelines (installed from data_pipelines/)

SOURCE = "sklearn-digits"
VOCAB = "demo"
NUM_IMAGES = 1797
NUM_HELD_OUT = 180
CAPTION_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PREFIX = "a handwritten digit "
SHARD_MAX_COUNT = 1000  # documents per shard: the train split spans several shards
DONE_FILE = "DONE.json"
DONE_VERSION = 1


def caption(label: int) -> str:
    """``"a handwritten digit seven"`` for label 7."""
    return CAPTION_PREFIX + CAPTION_WORDS[int(label)]


def parse_caption(text: str) -> int | None:
    """The digit a caption names (``caption`` inverted; tolerates surrounding whitespace), else None."""
    text = text.strip()
    if not text.startswith(CAPTION_PREFIX):
        return None
    word = text[len(CAPTION_PREFIX):].strip()
    return CAPTION_WORDS.index(word) if word in CAPTION_WORDS else None


def held_out_indices(num_images: int = NUM_IMAGES) -> np.ndarray:
    """Sorted int64 ``[180]`` image indices of the eval split (fixed: ``default_rng(0)`` permutation)."""
    return np.sort(np.random.default_rng(0).permutation(num_images)[:NUM_HELD_OUT])


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """``(codes int64 [1797, 8, 8] in 0..16, labels int64 [1797])`` from scikit-learn's bundled digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)


def documents(indices: Sequence[int], images: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
    """For each image index: its t2i document, then its i2t document (write_shards input dicts)."""
    vocab = get_vocab(VOCAB)
    tok = load_tokenizer(vocab)
    for i in indices:
        i = int(i)
        text = tok.encode(caption(labels[i]))
        meta = {"source": SOURCE, "label": int(labels[i]), "index": i}
        yield {"tokens": t2i_document(vocab, text, images[i], tok.encode), "task": "t2i", **meta}
        yield {"tokens": i2t_document(vocab, text, images[i], tok.encode), "task": "i2t", **meta}


def _is_complete(out: Path) -> dict | None:
    """The DONE marker's content if ``out`` holds a complete demo dataset, else None."""
    try:
        done = json.loads((out / DONE_FILE).read_text())
        ok = done.get("version") == DONE_VERSION and all(
            (out / split / name).is_file() and index_path(out / split / name).is_file()
            for split in ("train", "eval") for name in done[split]["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done if ok else None


def _clear(out: Path) -> None:
    """Remove what a previous (possibly interrupted) build left: the marker, shards and indexes."""
    (out / DONE_FILE).unlink(missing_ok=True)
    for split in ("train", "eval"):
        for pattern in ("*.tar", "*.idx", "*.idx.tmp"):
            for path in (out / split).glob(pattern):
                path.unlink()


def build_demo(out: str | os.PathLike, force: bool = False) -> tuple[dict, bool]:
    """Build the demo dataset under ``out``; returns ``(DONE marker dict, built)``.

    ``built`` is False when ``out`` already held a complete dataset (and ``force`` is False).
    """
    out = Path(out)
    done = None if force else _is_complete(out)
    if done is not None:
        return done, False
    _clear(out)
    images, labels = load_images()
    eval_idx = held_out_indices(len(images))
    train_idx = np.setdiff1d(np.arange(len(images)), eval_idx)
    done = {"version": DONE_VERSION, "vocab": VOCAB, "source": SOURCE}
    for split, idx in (("train", train_idx), ("eval", eval_idx)):
        shards = write_shards(documents(idx, images, labels), out / split, VOCAB, max_count=SHARD_MAX_COUNT)
        done[split] = {"images": len(idx), "documents": 2 * len(idx), "shards": [p.name for p in shards]}
    (out / DONE_FILE).write_text(json.dumps(done, indent=1) + "\n")  # last: marks completeness
    return done, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.demo",
        description="Build the digits demo dataset (t2i + i2t shards, train/eval split).",
        epilog="example: python -m emu3_train.data_pipelines.demo --out data/demo",
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo"),
                        help="output directory (default data/demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds a complete dataset")
    args = parser.parse_args(argv)
    done, built = build_demo(args.out, args.force)
    counts = ", ".join(f"{s}: {done[s]['documents']} documents in {len(done[s]['shards'])} shards"
                       for s in ("train", "eval"))
    if built:
        print(f"wrote the digits demo to {args.out} ({counts})")
    else:
        print(f"{args.out} already holds the complete digits demo ({counts}); --force rebuilds it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
