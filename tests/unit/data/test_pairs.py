"""Preference pairs (DPO) in shards: indexed, packed whole into one row at any dp, batch keys, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emu3_train.data.format import encode_sample
from emu3_train.data.index import ShardError, build_index
from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet
from emu3_train.layout import t2i_document
from emu3_train.tokenizer import load_tokenizer


def pair_docs(rng, vocab, n_pairs: int, n_text: int = 0, ref: bool = True) -> list[dict]:
    """``n_pairs`` t2i pairs (same caption, two images of random grids; loss_spans over the vision
    block) written chosen-then-rejected, then ``n_text`` text documents."""
    encode = load_tokenizer(vocab).encode
    docs = []
    for p in range(n_pairs):
        caption = encode(f"a digit {p}")
        for role in ("chosen", "rejected"):
            h, w = rng.integers(1, 6, 2)
            tokens = t2i_document(vocab, caption, rng.integers(0, vocab.codebook_size, (h, w)), encode)
            sov = tokens.index(vocab.sov)
            doc = {"tokens": tokens, "task": "t2i", "source": "pairs", "pair": f"p{p}", "role": role,
                   "loss_spans": [[sov + 1, len(tokens)]]}
            if ref:
                doc["ref_logp"] = float(-rng.uniform(1, 50))
            docs.append(doc)
    for _ in range(n_text):
        length = int(rng.integers(20, 90))
        docs.append({"tokens": [vocab.bos, *rng.integers(0, vocab.text_size, length).tolist(), vocab.eos],
                     "task": "text", "source": "text"})
    return docs


def test_pairs_are_indexed(make_shards, vocab):
    docs = pair_docs(np.random.default_rng(0), vocab, 5, n_text=3)
    shards = ShardSet(make_shards(docs, max_count=4), vocab)
    assert shards.pair_role.tolist() == [1, 2] * 5 + [0] * 3
    assert shards.pair_partner.tolist() == [1, 0, 3, 2, 5, 4, 7, 6, 9, 8, -1, -1, -1]


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_packing_never_splits_a_pair_and_keeps_the_global_rows(make_shards, vocab, dp):
    docs = pair_docs(np.random.default_rng(1), vocab, 40, n_text=30)
    shards = ShardSet(make_shards(docs, max_count=10), vocab)
    single = PackedLoader(shards, seq_len=96, micro_batch_size=2, pack_window=16)
    loaders = [PackedLoader(shards, seq_len=96, micro_batch_size=2, dp_rank=r, dp_size=dp, pack_window=16)
               for r in range(dp)]
    steps, seen = 4, {}
    for step in range(steps):
        for r, loader in enumerate(loaders):
            batch = next(loader)
            slots = {}  # slot -> doc, from the rows this batch holds
            k0 = loader.cursor - dp * 2 + r
            rows = [loader.row(k0 + j * dp) for j in range(2)]
            for row in rows:
                for p in row:
                    slots[len(slots)] = p.doc_id
            for d in slots.values():
                seen.setdefault(d, set()).add((step, r))
            table = batch["pairs"].tolist()
            paired = {slots[c] for c, _ in table} | {slots[x] for _, x in table}
            for c, x in table:
                assert docs[slots[c]]["role"] == "chosen" and docs[slots[x]]["role"] == "rejected"
                assert docs[slots[c]]["pair"] == docs[slots[x]]["pair"]
                assert batch["ref_logp"][table.index([c, x])].tolist() == pytest.approx(
                    [docs[slots[c]]["ref_logp"], docs[slots[x]]["ref_logp"]])
            # every pair document in the batch came with its partner
            assert paired == {d for d in slots.values() if "pair" in docs[d]}
            assert batch["num_pairs"] == len(table) and batch["num_slots"] == len(slots)
            di = batch["doc_index"]
            assert di.max() == len(slots) - 1 and ((di >= 0) == (batch["tokens"] != vocab.pad)).all()
            chosen = np.isin(di.numpy(), [c for c, _ in table])
            assert batch["chosen_weight"] == pytest.approx(float(batch["loss_weight"].numpy()[chosen].sum()))
    pair_seen = {d: v for d, v in seen.items() if "pair" in docs[d]}
    assert len(pair_seen) >= 10 and all(len(v) == 1 for v in pair_seen.values())  # one batch each (1 epoch)
    # the global row sequence is the one of a single rank
    for k in range(steps * 2 * dp):
        assert single.row(k) == loaders[0].row(k)


def test_resume_mid_stream_gives_the_same_pair_batches(make_shards, vocab):
    docs = pair_docs(np.random.default_rng(2), vocab, 30, n_text=10)
    shards = ShardSet(make_shards(docs, max_count=10), vocab)
    a = PackedLoader(shards, seq_len=96, micro_batch_size=2, pack_window=16)
    for _ in range(3):
        next(a)
    b = PackedLoader(shards, seq_len=96, micro_batch_size=2, pack_window=16)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(3):
        x, y = next(a), next(b)
        for key in ("tokens", "loss_weight", "doc_index", "pairs", "ref_logp"):
            assert x[key].equal(y[key]), key


def _write(tmp_path, vocab, docs):
    import webdataset as wds

    tar = tmp_path / "pairs.tar"
    with wds.TarWriter(str(tar)) as w:
        for i, doc in enumerate(docs):
            meta = {k: v for k, v in doc.items() if k != "tokens"}
            w.write(encode_sample(f"doc-{i}", doc["tokens"], meta))
    return tar


@pytest.mark.parametrize("change, message", [
    (lambda docs: docs.pop(1), r"sample 'doc-0': pair 'p0' has no 'rejected' partner in this shard"),
    (lambda docs: docs[1].update(role="chosen"), r"sample 'doc-1': pair 'p0' has a second 'chosen'"),
    (lambda docs: docs[2].pop("ref_logp"), r"sample 'doc-2': pair 'p1' has a reference log-prob .* one"),
    (lambda docs: docs[0].update(tokens=[docs[0]["tokens"][0], 5, 6, docs[0]["tokens"][-1]],
                                 loss_spans=[[1, 4]]),
     r"sample 'doc-0': the chosen document of pair 'p0' has no vision block"),
])
def test_bad_pairs_name_the_shard_and_key(tmp_path, vocab, change, message):
    docs = pair_docs(np.random.default_rng(3), vocab, 2)
    change(docs)
    with pytest.raises(ShardError, match=r"pairs\.tar: " + message) as e:
        build_index(_write(tmp_path, vocab, docs), vocab)
    assert "\n" not in str(e.value)


def test_a_pair_longer_than_a_row_is_named_under_oversize_error(make_shards, vocab):
    docs = pair_docs(np.random.default_rng(4), vocab, 3)
    shards = ShardSet(make_shards(docs), vocab)
    longest = max(len(docs[i]["tokens"]) + len(docs[i + 1]["tokens"]) for i in range(0, 6, 2))
    with pytest.raises(ShardError, match="preference pair of .* tokens .both documents. is longer"):
        PackedLoader(shards, seq_len=longest - 1, micro_batch_size=1, oversize_policy="error")
    with pytest.raises(ValueError, match="no document .or preference pair. of the stream fits seq_len"):
        PackedLoader(shards, seq_len=40, micro_batch_size=1)  # every pair too long: never an endless draw


def test_a_pair_without_reference_logps_is_named_when_dpo_needs_them(make_shards, vocab):
    docs = pair_docs(np.random.default_rng(5), vocab, 3, ref=False)
    shards = ShardSet(make_shards(docs), vocab)
    batch = next(PackedLoader(shards, seq_len=128, micro_batch_size=2))
    assert torch.isnan(batch["ref_logp"]).all()  # the frozen-reference path does not need them
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample 'doc-\d+': preference-pair document "
                                         r"without 'ref_logp'.*dpo.reference=frozen"):
        next(PackedLoader(shards, seq_len=128, micro_batch_size=2, require_ref_logp=True))
