"""The digits demo: split sizes, decodable captions and images, idempotent rebuilds."""

from __future__ import annotations

import numpy as np
import pytest

from emu3_train.data.stream import ShardSet
from emu3_train.layout import parse_vision_block
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.demo import (  # installed from data_pipelines/
    CAPTION_WORDS,
    build_demo,
    caption,
    held_out_indices,
    load_images,
    main,
    parse_caption,
)

VOCAB = get_vocab("demo")


def test_splits_hold_two_documents_per_image(demo):
    train, evalset = ShardSet(demo / "train", VOCAB), ShardSet(demo / "eval", VOCAB)
    assert len(train) == 1617 * 2 and len(evalset) == 180 * 2
    assert sorted(train.task_names.tolist()) == ["i2t"] * 1617 + ["t2i"] * 1617
    eval_images = {evalset.read(d)[1]["index"] for d in range(len(evalset))}
    assert eval_images == set(held_out_indices().tolist())
    assert len(held_out_indices()) == 180


@pytest.mark.parametrize("split, doc_ids", [("train", [0, 1, 2000, 3233]), ("eval", [0, 359])])
def test_captions_and_images_decode_back(demo, split, doc_ids):
    images, labels = load_images()
    tok = load_tokenizer(VOCAB)
    shards = ShardSet(demo / split, VOCAB)
    for d in doc_ids:
        tokens, meta = shards.read(d)
        i = meta["index"]
        assert meta["source"] == "sklearn-digits" and meta["label"] == labels[i]
        (start, end), = shards.vision_spans(d)
        codes = parse_vision_block(tokens[start:end], VOCAB, tok.decode)
        assert np.array_equal(codes[0], images[i])
        text = tokens[1:start] if meta["task"] == "t2i" else tokens[end:-1]
        assert tokens[0] == VOCAB.bos and tokens[-1] == VOCAB.eos
        assert parse_caption(tok.decode(text)) == labels[i]


def test_caption_words_round_trip():
    assert [parse_caption(caption(k)) for k in range(10)] == list(range(10))
    assert caption(7) == "a handwritten digit seven" and CAPTION_WORDS[0] == "zero"
    assert parse_caption("a handwritten digit eleven") is None and parse_caption("seven") is None


def test_second_run_keeps_the_dataset_and_force_rebuilds(demo, capsys):
    tar = demo / "train" / "shard-000000.tar"
    before = tar.stat().st_mtime_ns
    assert main(["--out", str(demo)]) == 0
    assert "already holds the complete digits demo" in capsys.readouterr().out
    assert tar.stat().st_mtime_ns == before
    data = tar.read_bytes()
    assert main(["--out", str(demo), "--force"]) == 0
    assert "wrote the digits demo" in capsys.readouterr().out
    assert tar.stat().st_mtime_ns != before
    assert tar.read_bytes() == data  # deterministic shards
    (demo / "DONE.json").unlink()  # an interrupted build is redone
    done, built = build_demo(demo)
    assert built and done["train"]["documents"] == 3234 and done["eval"]["documents"] == 360
