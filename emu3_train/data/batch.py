"""The packed-batch contract (DESIGN.md §4, "Packed batch"): rows of pieces -> model inputs.

:func:`build_batch` returns a plain dict; B rows of S = ``seq_len`` tokens each. A *segment* is
one piece (a whole document, or a part of one split by packing) or the padding tail of a row.

===============  ==============  ==================================================================
key              type            meaning
===============  ==============  ==================================================================
tokens           int64 [B, S]    token ids; the padding tail of a row holds ``vocab.pad``
labels           int64 [B, S]    ``tokens[b, t+1]`` when t+1 lies in the same piece, else -100
                                 (the last token of every piece, and all padding)
loss_weight      float32 [B, S]  0 where labels == -100; visual-code target (``labels >=
                                 vocab.vision_start``) -> ``vision_weight``, or 0 in understanding
                                 documents (task in ``format.UNDERSTANDING_TASKS``); else 1.0;
                                 times the document's task weight (``loss.task_weights``); 0 for a
                                 target outside the document's ``loss_spans`` (below)
position_ids     int64 [B, S]    0, 1, 2, ... restarting at every segment (pieces and padding)
cu_seqlens       int32 [K+1]     segment boundaries over the flattened ``B*S`` tokens, row-major:
                                 ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == B*S``, K segments
max_seqlen       int             longest segment (tokens)
num_docs         int             pieces (document segments) in the batch
num_pad          int             padding tokens
num_vision       int             visual-code tokens among ``tokens``
num_tokens       int             non-padding tokens (``B*S - num_pad``)
weight_sum       float           ``loss_weight.sum()`` (fp64), so the step's loss normalization
                                 never reads a device tensor back
===============  ==============  ==================================================================

**Preference pairs** (``pairs`` given, DPO; ``data.pairs``) add:

===============  ==============  ==================================================================
doc_index        int64 [B, S]    the piece's slot 0..num_slots-1 (pieces in row-major order) at
                                 every position of a piece, -1 on padding
pairs            int64 [P, 2]    (chosen slot, rejected slot) of each pair whose two documents are
                                 both in the batch (packing keeps them in one row)
ref_logp         float32 [P, 2]  the documents' precomputed reference log-probs (``ref_logp`` of
                                 the sample json), NaN where absent
num_slots        int             pieces (= ``num_docs``)
num_pairs        int             P
chosen_weight    float           ``loss_weight`` total over the chosen documents (fp64): the
                                 normalizer of DPO's next-token term
===============  ==============  ==================================================================

**Supervised spans.** A document with ``loss_spans`` (``data.format``: span ``[s, e)`` supervises
the targets ``tokens[s:e]``) keeps weight only where the label is a token ``p`` of the document with
``s <= p < e``: row position ``o + i`` of a piece ``[start, end)`` placed at ``o`` predicts
document token ``start + i + 1``. Spans are in document coordinates, so every piece of a split
document keeps exactly its part of them, and no span reaches into a neighbouring piece (the last
token of a piece has no label).

Tensors are CPU torch tensors (``parallel.step_plan.StepPlan.prepare`` moves a rank's part).
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

import numpy as np
import torch

from emu3_train.data.packing import Piece
from emu3_train.vocab import Vocab

IGNORE_INDEX = -100
TENSOR_KEYS = ("tokens", "labels", "loss_weight", "position_ids", "cu_seqlens")


def build_batch(
    rows: Sequence[Sequence[Piece]],
    tokens: Mapping[int, np.ndarray],
    understanding: Container[int],
    seq_len: int,
    vocab: Vocab,
    vision_weight: float = 0.5,
    *,
    loss_spans: Mapping[int, np.ndarray] | None = None,
    doc_weight: Mapping[int, float] | None = None,
    caption_drop: Mapping[tuple[int, int], int] | None = None,
    pairs: Mapping[int, int] | None = None,
    ref_logp: Mapping[int, float] | None = None,
) -> dict:
    """The batch dict (module docstring) of ``rows``.

    ``tokens[doc_id]``: the whole document's ids; ``understanding``: the doc ids whose visual
    tokens are inputs only (weight 0 as targets); ``loss_spans[doc_id]``: ``[k, 2]`` supervised
    spans in document coordinates (absent or ``k == 0``: every target); ``doc_weight[doc_id]``:
    the document's multiplier (its task weight; absent = 1.0); ``caption_drop[(r, doc_id)] = v``:
    in row r, the piece starting document ``doc_id`` loses its caption, tokens [1, v) (v = the
    SOV position): ``BOS SOV meta SOT rows ...``, the empty caption (``data.caption_dropout``); the
    row's padding tail grows by as much. ``pairs[chosen doc_id] = rejected doc_id``: the preference
    pairs (whole documents), ``ref_logp[doc_id]`` their reference log-probs (module docstring).
    """
    if not rows:
        raise ValueError("a batch needs at least one row")
    b, s = len(rows), seq_len
    tok = np.full((b, s), vocab.pad, np.int64)
    lab = np.full((b, s), IGNORE_INDEX, np.int64)
    pos = np.zeros((b, s), np.int64)
    und = np.zeros((b, s), bool)
    scale = np.ones((b, s), np.float32)  # task weight x supervised-span mask, per label position
    slot_of = np.full((b, s), -1, np.int64)
    slots: dict[int, int] = {}  # doc_id -> slot of its whole-document piece
    bounds, num_docs, num_pad = [], 0, 0
    for r, row in enumerate(rows):
        o = 0
        for piece in row:
            doc = tokens[piece.doc_id]
            if not 0 <= piece.start < piece.end <= len(doc):
                raise ValueError(f"piece {piece} lies outside document {piece.doc_id} of {len(doc)} tokens")
            drop = caption_drop.get((r, piece.doc_id)) if caption_drop and piece.start == 0 else None
            at = None if drop is None else np.r_[0, np.arange(drop, piece.end)]  # document positions kept
            ids = doc[piece.start:piece.end] if at is None else doc[at]
            n = len(ids)
            if o + n > s:
                raise ValueError(f"row {r} holds more than seq_len {s} tokens")
            tok[r, o:o + n] = ids
            lab[r, o:o + n - 1] = ids[1:]
            pos[r, o:o + n] = np.arange(n)
            und[r, o:o + n] = piece.doc_id in understanding
            if doc_weight is not None and piece.doc_id in doc_weight:
                scale[r, o:o + n] = doc_weight[piece.doc_id]
            spans = None if loss_spans is None else loss_spans.get(piece.doc_id)
            if spans is not None and len(spans):
                supervised = _supervised(spans, len(doc))  # by the document position each label is
                scale[r, o:o + n] *= (supervised[piece.start + 1:piece.end + 1] if at is None
                                      else supervised[np.append(at[1:], piece.end)])
            bounds.append(r * s + o)
            slot_of[r, o:o + n] = num_docs
            if piece.start == 0 and piece.end == len(doc):
                slots[piece.doc_id] = num_docs
            num_docs += 1
            o += n
        if o < s:  # the padding tail is its own segment
            pos[r, o:] = np.arange(s - o)
            bounds.append(r * s + o)
            num_pad += s - o
    bounds.append(b * s)
    cu = np.array(bounds, np.int32)
    vision_target = lab >= vocab.vision_start
    weight = np.where(vision_target, np.where(und, 0.0, vision_weight), 1.0).astype(np.float32)
    weight *= scale
    weight[lab == IGNORE_INDEX] = 0.0
    out = {
        "tokens": torch.from_numpy(tok),
        "labels": torch.from_numpy(lab),
        "loss_weight": torch.from_numpy(weight),
        "position_ids": torch.from_numpy(pos),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        "num_docs": num_docs,
        "num_pad": num_pad,
        "num_vision": int(vocab.is_vision(tok).sum()),
        "num_tokens": b * s - num_pad,
        "weight_sum": float(weight.sum(dtype=np.float64)),
    }
    if pairs is not None:
        out.update(_pair_keys(pairs, ref_logp or {}, slots, slot_of, weight, num_docs))
    return out


def _pair_keys(pairs, ref_logp, slots, slot_of, weight, num_docs) -> dict:
    """The preference-pair keys of the batch (module docstring)."""
    found = [(slots[c], slots[r], c, r) for c, r in pairs.items() if c in slots and r in slots]
    found.sort()
    table = np.array([f[:2] for f in found], np.int64).reshape(-1, 2)
    ref = np.array([[ref_logp.get(c, np.nan), ref_logp.get(r, np.nan)] for *_, c, r in found],
                   np.float32).reshape(-1, 2)
    chosen = np.isin(slot_of, table[:, 0])
    return {"doc_index": torch.from_numpy(slot_of), "pairs": torch.from_numpy(table),
            "ref_logp": torch.from_numpy(ref), "num_slots": num_docs, "num_pairs": len(found),
            "chosen_weight": float(weight[chosen].sum(dtype=np.float64))}


def _supervised(spans: np.ndarray, length: int) -> np.ndarray:
    """float32 ``[length + 1]``: 1 at the document tokens inside ``spans``, else 0 (the extra last
    entry, past the document, is 0: the last token of a piece has no target)."""
    spans = np.asarray(spans, np.int64).reshape(-1, 2)
    edge = np.zeros(length + 2, np.int64)
    np.add.at(edge, np.minimum(spans[:, 0], length + 1), 1)
    np.add.at(edge, np.minimum(spans[:, 1], length + 1), -1)
    return (np.cumsum(edge[:-1]) > 0).astype(np.float32)
