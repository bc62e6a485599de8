"""The digits chat set: three questions about each scikit-learn digit, as Emu3-Chat documents.

Every 8x8 digit of the demo (``data_pipelines.demo``: the same images, the same held-out split)
gives three single-turn conversations in the Emu3-Chat layout (``emu3_train.chat``: system line,
``USER: `` + image block + question, ``. ASSISTANT:`` + answer + EOS), supervised on the answer
only (``loss_spans``):

=============  ===============================  ===========================================
question_type  question                         answer (digit 7 / digit 9)
=============  ===============================  ===========================================
digit          "What digit is this?"            "seven" / "nine"
parity         "Is it even or odd?"             "odd" / "odd"
plus_one       "What is this digit plus one?"   "eight" / "ten"
=============  ===============================  ===========================================

The 1,617 training digits go to ``OUT/train`` (4,851 documents), the 180 held-out ones to
``OUT/eval`` (540). Each sample's json holds ``task`` (i2t), ``source`` (sklearn-digits-chat),
``label``, ``index`` (image), ``question_type``, ``question``, ``answer`` and ``loss_spans``.

    python -m emu3_train.data_pipelines.demo_chat --out data/demo_chat          # skips a complete set
    python -m emu3_train.data_pipelines.demo_chat --out data/demo_chat --force  # rebuild

``OUT/DONE.json`` marks a complete set (counts per split). Deterministic: same bytes every build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from emu3_train.chat import Turn, chat_document
from emu3_train.data.index import index_path
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

from .demo import CAPTION_WORDS, VOCAB, held_out_indices, load_images
from .write_shards import write_shards

SOURCE = "sklearn-digits-chat"
NUMBER_WORDS = (*CAPTION_WORDS, "ten")
QUESTIONS = {
    "digit": "What digit is this?",
    "parity": "Is it even or odd?",
    "plus_one": "What is this digit plus one?",
}
SHARD_MAX_COUNT = 2000
DONE_FILE = "DONE.json"
DONE_VERSION = 1


def answer(question_type: str, label: int) -> str:
    """The reference answer of a question about digit ``label``."""
    label = int(label)
    if question_type == "digit":
        return NUMBER_WORDS[label]
    if question_type == "parity":
        return "odd" if label % 2 else "even"
    if question_type == "plus_one":
        return NUMBER_WORDS[label + 1]
    raise ValueError(f"unknown question_type {question_type!r}; expected one of {list(QUESTIONS)}")


def documents(indices: Sequence[int], images: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
    """Per image index, one document per question type (write_shards input dicts)."""
    vocab = get_vocab(VOCAB)
    tok = load_tokenizer(vocab)
    for i in indices:
        i = int(i)
        for kind, question in QUESTIONS.items():
            reply = answer(kind, labels[i])
            doc = chat_document(vocab, tok.encode, [Turn(question, reply)], images[i])
            yield {"tokens": doc.tokens, "loss_spans": doc.loss_spans, "task": "i2t", "source": SOURCE,
                   "label": int(labels[i]), "index": i, "question_type": kind, "question": question,
                   "answer": reply}


def _is_complete(out: Path) -> dict | None:
    try:
        done = json.loads((out / DONE_FILE).read_text())
        ok = done.get("version") == DONE_VERSION and all(
            (out / split / name).is_file() and index_path(out / split / name).is_file()
            for split in ("train", "eval") for name in done[split]["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done if ok else None


def build_demo_chat(out: str | os.PathLike, force: bool = False) -> tuple[dict, bool]:
    """Build the chat set under ``out``; returns ``(DONE marker dict, built)`` (``built`` False
    when ``out`` already held a complete set and ``force`` is False)."""
    out = Path(out)
    done = None if force else _is_complete(out)
    if done is not None:
        return done, False
    (out / DONE_FILE).unlink(missing_ok=True)
    for split in ("train", "eval"):
        for pattern in ("*.tar", "*.idx", "*.idx.tmp"):
            for path in (out / split).glob(pattern):
                path.unlink()
    images, labels = load_images()
    eval_idx = held_out_indices(len(images))
    train_idx = np.setdiff1d(np.arange(len(images)), eval_idx)
    done = {"version": DONE_VERSION, "vocab": VOCAB, "source": SOURCE, "questions": QUESTIONS}
    for split, idx in (("train", train_idx), ("eval", eval_idx)):
        shards = write_shards(documents(idx, images, labels), out / split, VOCAB, max_count=SHARD_MAX_COUNT)
        done[split] = {"images": len(idx), "documents": len(QUESTIONS) * len(idx),
                       "shards": [p.name for p in shards]}
    (out / DONE_FILE).write_text(json.dumps(done, indent=1) + "\n")  # last: marks completeness
    return done, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emu3_train.data_pipelines.demo_chat",
        description="Build the digits chat set (three questions per digit, answers supervised; "
                    "train/eval split as the digits demo).",
        epilog="example: python -m emu3_train.data_pipelines.demo_chat --out data/demo_chat",
    )
    parser.add_argument("--out", type=Path, default=Path("data/demo_chat"),
                        help="output directory (default data/demo_chat)")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT holds a complete set")
    args = parser.parse_args(argv)
    done, built = build_demo_chat(args.out, args.force)
    counts = ", ".join(f"{s}: {done[s]['documents']} documents in {len(done[s]['shards'])} shards"
                       for s in ("train", "eval"))
    verb = "wrote the digits chat set to" if built else "already complete:"
    print(f"{verb} {args.out} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
