"""The documents of ``benchmarks/vs_hf.py``, and each side's micro-batches of them.

A stage-1 mix drawn by token share, as the loader blends sources (the lengths of
``benchmarks/packing.py``'s stage-1 mix, with real token ids in the Emu3 layout of ``layout.py``):

- image-text pairs, 60% of the tokens, half t2i (``BOS caption SOV meta SOT rows EOF EOV EOS``),
  half i2t (the image first; its visual codes are inputs only). Grids of ``image_area`` codes
  (64 × 64 = 512² pixels at the VQ's 8× downsampling; h drawn in [¾, 4⁄3] of the side, w =
  area // h), so a block is h·(w + 1) + 7 ≈ 4,170 tokens; captions of 20-300 tokens;
- text documents, 40% of the tokens: log-normal lengths (median 700 tokens, σ 1), at least 16
  tokens, truncated at ``seq_len`` as the peer's collator truncates.

Each optimizer step takes the next documents until it holds ``step_tokens`` tokens. Both sides
train on the same (input, target) pairs. We pack the step's documents with the trainer's packer
(``data.packing.pack_rows``: best fit, vision blocks never split, text cut to fill a row) into
micro-batches of ``micro`` rows (``data.batch.build_batch``). The peer gets the same pieces in
stream order, ``micro`` sequences per micro-batch, right-padded to the longest, with
``labels = input_ids`` except -100 on padding and on the visual codes of i2t documents. A text
document the packer cut is therefore two sequences there too: a cut costs both sides the same
target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emu3_train.data.batch import IGNORE_INDEX, build_batch
from emu3_train.data.packing import pack_rows
from emu3_train.layout import i2t_document, t2i_document, text_document, vision_spans
from emu3_train.vocab import Vocab

PAIR_SHARE = 0.6  # token share of image-text pairs; the rest is text
TEXT_MEDIAN, TEXT_SIGMA, TEXT_MIN = 700, 1.0, 16
CAPTION = (20, 300)  # caption tokens, uniform


@dataclass(frozen=True)
class Mix:
    """How the documents are drawn (module docstring); ``smoke()`` is the tiny one."""

    seq_len: int = 5120
    step_tokens: int = 10240
    image_area: int = 64 * 64
    caption: tuple[int, int] = CAPTION
    text_median: int = TEXT_MEDIAN

    @staticmethod
    def smoke() -> Mix:
        return Mix(seq_len=256, step_tokens=768, image_area=100, caption=(4, 24), text_median=60)


@dataclass
class Doc:
    tokens: np.ndarray  # int64 [L]
    task: str  # t2i | i2t | text


def draw_steps(mix: Mix, vocab: Vocab, encode, steps: int, seed: int = 0) -> list[list[Doc]]:
    """``steps`` lists of documents, each holding at least ``mix.step_tokens`` tokens."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(mix.image_area))
    out, pairs, text, n_pairs = [], 0, 0, 0
    for _ in range(steps):
        docs, n = [], 0
        while n < mix.step_tokens:
            if pairs <= PAIR_SHARE * (pairs + text):  # keep the token shares as the blend does
                h = int(rng.integers(side * 3 // 4, side * 4 // 3 + 1))
                codes = rng.integers(0, vocab.codebook_size, (h, mix.image_area // h))
                caption = rng.integers(0, vocab.text_size, int(rng.integers(*mix.caption))).tolist()
                task = "i2t" if n_pairs % 2 else "t2i"
                n_pairs += 1
                make = i2t_document if task == "i2t" else t2i_document
                doc = Doc(np.asarray(make(vocab, caption, codes, encode), np.int64), task)
                pairs += len(doc.tokens)
            else:
                length = int(
                    np.clip(rng.lognormal(np.log(mix.text_median), TEXT_SIGMA), TEXT_MIN, mix.seq_len)
                )
                body = rng.integers(0, vocab.text_size, length - 2).tolist()
                doc = Doc(np.asarray(text_document(vocab, body), np.int64), "text")
                text += len(doc.tokens)
            docs.append(doc)
            n += len(doc.tokens)
        out.append(docs)
    return out


def pack_step(docs: list[Doc], vocab: Vocab, seq_len: int) -> list[list]:
    """Rows of pieces (``data.packing.Piece``) of one step's documents, as the loader packs a window."""
    spans = [vision_spans(d.tokens, vocab) for d in docs]
    res = pack_rows(range(len(docs)), np.array([len(d.tokens) for d in docs]), lambda i: spans[i], seq_len)
    if res.skipped:
        raise ValueError(f"{len(res.skipped)} documents have a vision block longer than seq_len {seq_len}")
    return res.rows


def ours_batches(
    docs: list[Doc], rows: list[list], vocab: Vocab, seq_len: int, micro: int, vision_weight: float
) -> list[dict]:
    """The step's packed micro-batches (``data.batch`` contract), ``micro`` rows each."""
    tokens = {i: d.tokens for i, d in enumerate(docs)}
    understanding = {i for i, d in enumerate(docs) if d.task == "i2t"}
    return [
        build_batch(rows[i : i + micro], tokens, understanding, seq_len, vocab, vision_weight)
        for i in range(0, len(rows), micro)
    ]


def peer_labels(ids: np.ndarray, task: str, vocab: Vocab) -> np.ndarray:
    """HF labels of one sequence (the model shifts them): -100 at position 0 and on i2t visual codes."""
    labels = ids.copy()
    labels[0] = IGNORE_INDEX
    if task == "i2t":
        labels[vocab.is_vision(ids)] = IGNORE_INDEX
    return labels


def peer_batches(docs: list[Doc], rows: list[list], vocab: Vocab, micro: int) -> list[dict]:
    """The step's pieces in stream order, ``micro`` per micro-batch, right-padded to the longest:
    ``input_ids``, ``attention_mask``, ``labels`` int64 [b, L]."""
    pieces = sorted(p for row in rows for p in row)
    out = []
    for i in range(0, len(pieces), micro):
        group = pieces[i : i + micro]
        width = max(p.length for p in group)
        ids = np.full((len(group), width), vocab.pad, np.int64)
        labels = np.full((len(group), width), IGNORE_INDEX, np.int64)
        mask = np.zeros((len(group), width), np.int64)
        for r, p in enumerate(group):
            piece = docs[p.doc_id].tokens[p.start : p.end]
            ids[r, : p.length], mask[r, : p.length] = piece, 1
            labels[r, : p.length] = peer_labels(piece, docs[p.doc_id].task, vocab)
        out.append(
            {
                "input_ids": torch.from_numpy(ids),
                "attention_mask": torch.from_numpy(mask),
                "labels": torch.from_numpy(labels),
            }
        )
    return out


def step_work(docs: list[Doc], rows: list[list], vocab: Vocab) -> dict:
    """What one step asks of both sides: documents by task, tokens, supervised targets and the
    piece lengths (``flops``)."""
    pieces = [p for row in rows for p in row]
    supervised = 0
    for p in pieces:
        supervised += int(
            (
                peer_labels(docs[p.doc_id].tokens[p.start : p.end], docs[p.doc_id].task, vocab)
                != IGNORE_INDEX
            ).sum()
        )
    tasks = [d.task for d in docs]
    return {
        "docs": {t: tasks.count(t) for t in ("t2i", "i2t", "text")},
        "tokens": sum(p.length for p in pieces),
        "text_tokens": sum(len(d.tokens) for d in docs if d.task == "text"),
        "supervised": supervised,
        "lengths": [p.length for p in pieces],
        "rows": len(rows),
    }
