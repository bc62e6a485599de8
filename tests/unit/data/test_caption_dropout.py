"""data.caption_dropout: a reproducible fraction of t2i documents is trained with the empty caption
(``BOS SOV meta SOT rows ...``), the same for any dp size and after a resume.

    .venv/bin/python -m pytest -q tests/unit/data/test_caption_dropout.py
"""

import json

import numpy as np
import pytest

from emu3_train.data.loader import PackedLoader
from emu3_train.data.stream import ShardSet
from emu3_train.layout import t2i_document
from emu3_train.tokenizer import load_tokenizer

ROWS, SEQ = 2, 128


@pytest.fixture
def t2i_shards(make_shards, vocab):
    encode = load_tokenizer(vocab).encode
    rng = np.random.default_rng(0)
    docs = []
    for i in range(60):
        caption = encode(f"caption number {i}")
        tokens = t2i_document(vocab, caption, rng.integers(0, vocab.codebook_size, (3, 3)), encode)
        docs.append({"tokens": tokens, "task": "t2i" if i % 4 else "i2t", "source": "t2i"})
    return ShardSet(make_shards(docs, max_count=20), vocab)


def docs_of(batch, vocab) -> list[list[int]]:
    """The document segments of a batch (padding left out)."""
    flat, cu = batch["tokens"].reshape(-1).tolist(), batch["cu_seqlens"].tolist()
    segments = [flat[a:b] for a, b in zip(cu[:-1], cu[1:])]
    return [s for s in segments if s and s[0] != vocab.pad]


def batches(loader, n) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_dropped_captions_are_empty_and_counted_at_the_rate(t2i_shards, vocab):
    loader = PackedLoader(t2i_shards, SEQ, ROWS, caption_dropout=0.5, seed=3)
    plain = PackedLoader(t2i_shards, SEQ, ROWS, seed=3)
    dropped = kept = 0
    for got, ref in zip(batches(loader, 12), batches(plain, 12)):
        before = dropped
        for a, b in zip(docs_of(got, vocab), docs_of(ref, vocab)):
            assert a[0] == vocab.bos and a[-1] == vocab.eos
            if a == b:
                kept += b[1] != vocab.sov  # i2t documents start with their image: never dropped
            else:  # the caption went, the rest of the document stayed
                sov = b.index(vocab.sov)
                assert a == [vocab.bos, *b[sov:]] and sov > 1
                dropped += 1
        assert got["num_pad"] > ref["num_pad"] or dropped == before  # freed room is padding
    assert dropped + kept > 60 and 0.35 < dropped / (dropped + kept) < 0.65


def test_the_dropped_documents_are_the_same_for_any_dp_size_and_after_resume(t2i_shards, vocab):
    one = batches(PackedLoader(t2i_shards, SEQ, 2, caption_dropout=0.3), 6)
    two = [PackedLoader(t2i_shards, SEQ, 1, r, 2, caption_dropout=0.3) for r in range(2)]
    for step in range(6):
        rows = [next(ld)["tokens"][0] for ld in two]
        assert all((one[step]["tokens"][r] == rows[r]).all() for r in range(2))  # row k -> rank k % dp

    loader = PackedLoader(t2i_shards, SEQ, 2, caption_dropout=0.3)
    batches(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = PackedLoader(t2i_shards, SEQ, 2, caption_dropout=0.3, num_workers=1)
    resumed.load_state_dict(state)
    for want in one[3:]:
        got = next(resumed)
        assert all((got[k] == want[k]).all() for k in ("tokens", "labels", "loss_weight", "position_ids"))
    resumed.close()


def test_other_seeds_drop_other_documents_and_bad_rates_are_refused(t2i_shards):
    a = batches(PackedLoader(t2i_shards, SEQ, ROWS, caption_dropout=0.5, seed=0), 4)
    b = PackedLoader(t2i_shards, SEQ, ROWS, caption_dropout=0.5, seed=0)
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, batches(b, 4)))  # deterministic
    with pytest.raises(ValueError, match=r"caption_dropout=1.5 must be in \[0, 1\]"):
        PackedLoader(t2i_shards, SEQ, ROWS, caption_dropout=1.5)
