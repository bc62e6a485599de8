"""Supervised spans (``loss_spans``) and per-task loss weights: stored, indexed, packed, weighted.

Span ``[s, e)`` supervises the targets ``tokens[s:e]`` (data.format): the prediction of document
token p has weight only if p lies in a span.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emu3_train.data.batch import IGNORE_INDEX, build_batch
from emu3_train.data.format import TASKS, check_loss_spans, encode_sample
from emu3_train.data.index import ShardError, build_index, index_path, load_index
from emu3_train.data.loader import PackedLoader
from emu3_train.data.packing import Piece
from emu3_train.data.stream import ShardSet
from emu3_train.loss import weighted_ce


def _span_docs(rng, vocab, n: int, long_every: int = 3) -> list[dict]:
    """Text documents (some longer than a row, so packing splits them) with random loss_spans."""
    docs = []
    for i in range(n):
        length = int(rng.integers(60, 200 if i % long_every == 0 else 90))
        tokens = [vocab.bos, *rng.integers(0, vocab.text_size, length - 2).tolist(), vocab.eos]
        doc = {"tokens": tokens, "task": "text", "source": "spans"}
        if i % 4:  # every fourth document has no spans: all targets supervised
            cuts = np.sort(rng.choice(np.arange(1, length + 1), size=4, replace=False))
            doc["loss_spans"] = [[int(cuts[0]), int(cuts[1])], [int(cuts[2]), int(cuts[3])]]
        docs.append(doc)
    return docs


def _expected_weight(doc: dict, p: int) -> float:
    """Naive weight of predicting document token p (text targets: 1.0)."""
    spans = doc.get("loss_spans")
    return 1.0 if spans is None or any(s <= p < e for s, e in spans) else 0.0


@pytest.mark.parametrize("spans, length, message", [
    ([[3, 2]], 10, "empty or negative"),
    ([[0, 4], [3, 6]], 10, "overlaps"),
    ([[5, 6], [1, 2]], 10, "overlaps or precedes"),
    ([[8, 11]], 10, "outside the document of 10 tokens"),
    ([[1, 2.5]], 10, "integers"),
    ([], 10, "non-empty"),
])
def test_bad_spans_are_one_line_errors(spans, length, message):
    with pytest.raises(ValueError, match=message) as e:
        check_loss_spans(spans, length)
    assert "\n" not in str(e.value)


def test_a_bad_span_names_the_shard_and_sample(tmp_path, vocab):
    import webdataset as wds

    tar = tmp_path / "bad.tar"
    sample = encode_sample("doc-7", [vocab.bos, 1, 2, vocab.eos], {"task": "text", "source": "s"})
    sample["json"] = json.dumps({"task": "text", "source": "s", "loss_spans": [[1, 3], [2, 4]]}).encode()
    with wds.TarWriter(str(tar)) as w:
        w.write(sample)
    with pytest.raises(ShardError, match=r"bad\.tar: sample 'doc-7': field 'loss_spans'\[1\].*overlaps"):
        build_index(tar, vocab)
    with pytest.raises(ValueError, match="outside the document of 4 tokens"):  # writers check at write time
        encode_sample("doc-8", [vocab.bos, 1, 2, vocab.eos], {"task": "text", "source": "s",
                                                               "loss_spans": [[1, 5]]})


def test_spans_are_indexed_and_a_version_1_index_still_loads(make_shards, vocab):
    docs = _span_docs(np.random.default_rng(0), vocab, 8)
    shards = ShardSet(make_shards(docs, max_count=5), vocab)
    for d, doc in enumerate(docs):
        assert shards.loss_spans(d).tolist() == doc.get("loss_spans", [])
        assert shards.read(d)[1].get("loss_spans") == doc.get("loss_spans")
    # an index written before loss_spans (version 1): loads with no spans; a read of a sample whose
    # json has spans then asks for a reindex instead of training on every target
    tar = shards.indexes[0].path
    with np.load(index_path(tar)) as z:
        old = {k: z[k] for k in z.files if k not in ("loss_span_offsets", "loss_spans")}
    old["format_version"] = np.int64(1)
    with open(index_path(tar), "wb") as f:
        np.savez(f, **old)
    assert load_index(tar).loss_spans(1).shape == (0, 2)
    with pytest.raises(ShardError, match="loss_spans differ from the index .a version-1 index.*--reindex"):
        ShardSet(tar.parent, vocab).read(1)


def test_packing_keeps_spans_inside_their_documents(make_shards, vocab):
    """No weight outside spans; spans never leak across documents; split documents keep theirs."""
    docs = _span_docs(np.random.default_rng(1), vocab, 40)
    loader = PackedLoader(ShardSet(make_shards(docs), vocab), seq_len=128, micro_batch_size=1, pack_window=16)
    supervised: dict[int, set[int]] = {}
    split = 0
    for k in range(30):
        batch, row = next(loader), loader.row(k)
        w, lab = batch["loss_weight"][0], batch["labels"][0]
        o = 0
        for piece in row:
            doc = docs[piece.doc_id]
            split += piece.start > 0
            for i in range(piece.length):
                p = piece.start + i + 1  # the document token row position o + i predicts
                want = _expected_weight(doc, p) if i < piece.length - 1 else 0.0
                assert float(w[o + i]) == want, (piece, i)
                if want:
                    assert int(lab[o + i]) == doc["tokens"][p]
                    supervised.setdefault(piece.doc_id, set()).add(p)
            o += piece.length
        assert (w[o:] == 0).all()  # padding
    assert split > 0, "no document was split: the test proves nothing about split documents"
    for d, got in supervised.items():  # a cut costs a target, never a supervised token elsewhere
        spans = docs[d].get("loss_spans")
        if spans is not None:
            assert got <= {p for s, e in spans for p in range(s, e)}


def test_loss_with_spans_equals_a_naive_masked_ce(vocab):
    rng = np.random.default_rng(2)
    docs = {d: np.array([vocab.bos, *rng.integers(0, vocab.text_size, 30), vocab.eos], np.int32)
            for d in range(3)}
    spans = {0: np.array([[5, 9], [20, 32]]), 2: np.array([[1, 3]])}  # doc 1: every target
    rows = [[Piece(0, 0, 20), Piece(1, 0, 12)], [Piece(0, 20, 32), Piece(2, 0, 32)]]
    batch = build_batch(rows, docs, set(), 64, vocab, loss_spans=spans, doc_weight={2: 2.0})
    torch.manual_seed(0)
    hidden = torch.randn(2, 64, 16)
    head = torch.randn(vocab.size, 16)
    wsum, _ = weighted_ce(hidden, head, batch["labels"], batch["loss_weight"],
                          vision_start=vocab.vision_start, impl="reference")
    loss = wsum / batch["weight_sum"]

    logits = hidden @ head.T  # naive: from document coordinates, not from the batch's labels
    num = den = 0.0
    for r, row in enumerate(rows):
        o = 0
        for piece in row:
            for i in range(piece.length - 1):
                p = piece.start + i + 1
                inside = piece.doc_id not in spans or any(s <= p < e for s, e in spans[piece.doc_id])
                w = (2.0 if piece.doc_id == 2 else 1.0) * inside
                target = torch.tensor(int(docs[piece.doc_id][p]))
                ce = torch.nn.functional.cross_entropy(logits[r, o + i], target)
                num, den = num + w * float(ce), den + w
            o += piece.length
    assert float(loss) == pytest.approx(num / den, rel=1e-5)
    assert (batch["loss_weight"][batch["labels"] == IGNORE_INDEX] == 0).all()


def test_task_weights_scale_the_documents_of_a_task(make_docs, make_shards, vocab):
    docs = make_docs(60, seed=3)
    shards = ShardSet(make_shards(docs), vocab)
    plain = PackedLoader(shards, seq_len=256, micro_batch_size=2)
    weighted = PackedLoader(shards, seq_len=256, micro_batch_size=2, task_weights={"t2i": 0.0, "text": 2.0})
    seen = set()
    for _ in range(12):
        a, b = next(plain), next(weighted)
        tasks = np.full(a["tokens"].shape, -1)
        for r, row in enumerate(weighted._rank_rows(weighted.cursor - 2)):
            o = 0
            for piece in row:
                tasks[r, o:o + piece.length] = shards.tasks[piece.doc_id]
                o += piece.length
        factor = np.select([tasks == TASKS.index("t2i"), tasks == TASKS.index("text")], [0.0, 2.0], 1.0)
        seen |= set(tasks[a["loss_weight"].numpy() > 0].tolist())
        np.testing.assert_array_equal(b["loss_weight"].numpy(), a["loss_weight"].numpy() * factor)
    assert {TASKS.index("t2i"), TASKS.index("text")} <= seen
    with pytest.raises(ValueError, match="task_weights has tasks \\['chat'\\]"):
        PackedLoader(shards, seq_len=256, micro_batch_size=2, task_weights={"chat": 1.0})
