"""The packed-batch contract: labels, loss weights, positions and cu_seqlens per piece and padding."""

from __future__ import annotations

import numpy as np
import torch

from emu3_train.data.batch import IGNORE_INDEX, build_batch
from emu3_train.data.packing import Piece
from emu3_train.layout import i2t_document, t2i_document, text_document
from emu3_train.tokenizer import load_tokenizer


def _docs(vocab):
    enc = load_tokenizer(vocab).encode
    codes = np.array([[1, 2], [3, 4]])
    return {
        0: np.array(text_document(vocab, enc("hello world")), np.int32),
        1: np.array(t2i_document(vocab, enc("a cat"), codes, enc), np.int32),
        2: np.array(i2t_document(vocab, enc("a cat"), codes, enc), np.int32),
    }


def test_batch_contract_on_a_hand_built_batch(vocab):
    docs = _docs(vocab)
    n0, n1, n2 = (len(docs[d]) for d in range(3))
    S = n1 + 6
    rows = [[Piece(1, 0, n1), Piece(0, 0, 4)],  # 2 pieces, 2 padding tokens
            [Piece(2, 0, n2)],
            [Piece(0, 4, n0)]]  # a continuation piece
    b = build_batch(rows, docs, understanding={2}, seq_len=S, vocab=vocab, vision_weight=0.5)
    tok, lab, w, pos = b["tokens"], b["labels"], b["loss_weight"], b["position_ids"]
    assert tok.shape == lab.shape == w.shape == pos.shape == (3, S)
    assert tok.dtype == lab.dtype == pos.dtype == torch.int64 and w.dtype == torch.float32
    assert b["cu_seqlens"].dtype == torch.int32

    # row 0: doc 1 then the first 4 tokens of doc 0, then padding
    assert tok[0, :n1].tolist() == docs[1].tolist() and tok[0, n1:n1 + 4].tolist() == docs[0][:4].tolist()
    assert tok[0, n1 + 4:].tolist() == [vocab.pad] * 2
    assert lab[0, :n1 - 1].tolist() == docs[1][1:].tolist()
    assert lab[0, n1 - 1] == IGNORE_INDEX  # no label across the document end
    assert lab[0, n1 + 3] == IGNORE_INDEX and (lab[0, n1 + 4:] == IGNORE_INDEX).all()
    assert pos[0].tolist() == list(range(n1)) + [0, 1, 2, 3] + [0, 1]
    assert tok[2, 0] == docs[0][4] and pos[2, 0] == 0  # continuation: no BOS, positions restart

    # weights by target class
    vis = lab >= vocab.vision_start
    text = (lab != IGNORE_INDEX) & ~vis
    assert vis[0].any() and vis[1].any()
    assert (w[0][vis[0]] == 0.5).all()  # generation: visual targets at vision_weight
    assert (w[1][vis[1]] == 0.0).all()  # understanding: visual targets not trained
    assert (w[text] == 1.0).all()  # text and structure targets, in every task
    assert (w[lab == IGNORE_INDEX] == 0).all()

    cu = [0, n1, n1 + 4, S, S + n2, 2 * S, 2 * S + n0 - 4, 3 * S]
    assert b["cu_seqlens"].tolist() == cu
    assert b["max_seqlen"] == max(np.diff(cu))
    assert b["num_docs"] == 4
    assert b["num_pad"] == 2 + (S - n2) + (S - (n0 - 4))
    assert b["num_tokens"] == 3 * S - b["num_pad"]
    assert b["num_vision"] == 8  # two 2x2 images


def test_labels_and_positions_follow_cu_seqlens_on_random_rows(vocab, make_docs):
    rng = np.random.default_rng(0)
    docs = {d: np.array(doc["tokens"], np.int32) for d, doc in enumerate(make_docs(20))}
    S = 160
    rows, free, row = [], S, []
    for d in range(20):
        start = int(rng.integers(0, 3))
        n = min(len(docs[d]) - start, S)
        if n > free:
            rows.append(row)
            row, free = [], S
        row.append(Piece(d, start, start + n))
        free -= n
    rows.append(row)
    b = build_batch(rows, docs, understanding=set(), seq_len=S, vocab=vocab)
    tok, lab, pos = (b[k].reshape(-1).numpy() for k in ("tokens", "labels", "position_ids"))
    cu = b["cu_seqlens"].numpy()
    assert cu[0] == 0 and cu[-1] == len(rows) * S and np.all(np.diff(cu) > 0)
    assert set(np.arange(len(rows)) * S) <= set(cu)  # segments never cross rows
    seg = np.searchsorted(cu, np.arange(len(tok)), side="right") - 1
    assert np.array_equal(pos, np.arange(len(tok)) - cu[seg])
    has = lab != IGNORE_INDEX
    t = np.flatnonzero(has)
    assert np.all(seg[t + 1] == seg[t]) and np.array_equal(lab[t], tok[t + 1])
    ends = cu[1:] - 1
    assert np.all(lab[ends] == IGNORE_INDEX)
    assert np.all(~has[tok == vocab.pad])
