"""Tiny random documents and shards for the data tests (demo vocabulary, byte-level text)."""

from __future__ import annotations

import numpy as np
import pytest

from emu3_train.layout import vision_block
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

# isort: split
from emu3_train.data_pipelines.write_shards import write_shards  # installed from data_pipelines/


@pytest.fixture
def vocab():
    return get_vocab("demo")


def random_document(rng: np.random.Generator, vocab, max_text: int = 40, max_side: int = 4) -> dict:
    """A write_shards input dict: text runs around 0..2 vision blocks (images or 2-frame videos)."""
    encode = load_tokenizer(vocab).encode
    task = str(rng.choice(["t2i", "i2t", "text", "video"]))
    tokens = [vocab.bos]
    blocks = 0 if task == "text" else int(rng.integers(1, 3))
    for _ in range(blocks):
        tokens += rng.integers(0, vocab.text_size, int(rng.integers(0, max_text))).tolist()
        shape = (2 if task == "video" else 1, *rng.integers(1, max_side + 1, 2))
        tokens += vision_block(vocab, rng.integers(0, vocab.codebook_size, shape), encode)
    tokens += rng.integers(0, vocab.text_size, int(rng.integers(1, max_text))).tolist()
    tokens.append(vocab.eos)
    return {"tokens": tokens, "task": task, "source": "random", "n": int(rng.integers(0, 1000))}


@pytest.fixture
def make_docs(vocab):
    def make(n: int, seed: int = 0, **kw) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [random_document(rng, vocab, **kw) for _ in range(n)]
    return make


@pytest.fixture
def make_shards(tmp_path, vocab):
    """``make(docs, max_count, name) -> directory`` of indexed shards under tmp_path."""
    def make(docs: list[dict], max_count: int = 10, name: str = "shards"):
        out = tmp_path / name
        write_shards(docs, out, vocab, max_count=max_count)
        return out
    return make
