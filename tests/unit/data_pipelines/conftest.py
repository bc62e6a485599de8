"""Tiny documents and hand-made tars for the index_shards / inspect_shards tests (demo vocabulary).

Fixtures: ``good_docs`` (write_shards input dicts), ``bad_docs`` (key -> tokens with one problem
each), ``make_tar(path, [(key, tokens, task), ...])`` (a tar written member by member, no checks),
``demo`` (the digits demo's shards, built once per module).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from emu3_train.data.format import encode_sample
from emu3_train.layout import i2t_document, t2i_document, text_document, vision_block
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

VOCAB = get_vocab("demo")
TOK = load_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The digits demo's shards (``data_pipelines.demo.build_demo``): train/ and eval/."""
    from emu3_train.data_pipelines.demo import build_demo

    out = tmp_path_factory.mktemp("demo")
    build_demo(out)
    return out


@pytest.fixture
def good_docs() -> list[dict]:
    """Six documents: two t2i (3x4 image), two i2t (2x2), a text and a 2-frame video (2x3)."""
    rng = np.random.default_rng(0)
    enc = TOK.encode
    codes = lambda *shape: rng.integers(0, VOCAB.codebook_size, shape)
    return [
        {"tokens": t2i_document(VOCAB, enc("a cat"), codes(3, 4), enc), "task": "t2i", "source": "s"},
        {"tokens": t2i_document(VOCAB, enc("a dog"), codes(3, 4), enc), "task": "t2i", "source": "s"},
        {"tokens": i2t_document(VOCAB, enc("red"), codes(2, 2), enc), "task": "i2t", "source": "s"},
        {"tokens": i2t_document(VOCAB, enc("blue sky"), codes(2, 2), enc), "task": "i2t", "source": "s"},
        {"tokens": text_document(VOCAB, enc("just some text, long enough to be split")), "task": "text",
         "source": "s"},
        {"tokens": [VOCAB.bos, *enc("pan"), *vision_block(VOCAB, codes(2, 2, 3), enc), VOCAB.eos],
         "task": "video", "source": "s"},
    ]


@pytest.fixture
def bad_docs() -> dict[str, list[int]]:
    """Keyed documents with one problem each (demo vocabulary)."""
    enc = TOK.encode
    block = vision_block(VOCAB, np.zeros((2, 2), int), enc)
    return {
        "oov": [VOCAB.bos, 65, VOCAB.size + 3, VOCAB.eos],  # id outside the vocabulary
        "noeov": [VOCAB.bos, *block[:-1], VOCAB.eos],  # SOV without EOV
        "rows": [VOCAB.bos, *block[:-3], block[-2], block[-1], VOCAB.eos],  # a row shorter than meta 2*2
    }


def _write_tar(path: Path, samples: list[tuple[str, list[int], str]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, tokens, task in samples:
            members = encode_sample(key, tokens, {"task": task, "source": "hand-made"})
            for suffix in ("json", "tokens.npy"):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(members[suffix])
                tf.addfile(info, io.BytesIO(members[suffix]))
    return path


@pytest.fixture
def make_tar():
    """``make(path, [(key, tokens, task), ...]) -> path``: a shard written without validation."""
    return _write_tar
