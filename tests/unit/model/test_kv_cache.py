"""KV-cached decoding equals full recompute (fp32, 1e-5) at every step: text, an image grid and a
video block, batches of 1 and 3 prompts of different lengths, GQA and MHA, padded steps.

    .venv/bin/python -m pytest -q tests/unit/model/test_kv_cache.py
"""

import numpy as np
import pytest
import torch

from emu3_train.config import ModelConfig
from emu3_train.generation import Decoding
from emu3_train.layout import vision_block
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.model.documents import Documents
from emu3_train.sampling import full_recompute_logits
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")
TOK = load_tokenizer(V)
TOL = dict(atol=1e-5, rtol=1e-5)


def model(num_kv_heads=2, seed=0, max_positions=131_072) -> Emu3CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=num_kv_heads, rope_theta=10_000.0, max_position_embeddings=max_positions)
    return Emu3CausalLM(cfg, V.size).eval()


def continuation(kind: str, rng) -> list[int]:
    """What is fed token by token after the prompts."""
    if kind == "text":
        return rng.integers(0, V.text_size, 12).tolist()
    frames = rng.integers(0, V.codebook_size, (1, 3, 4) if kind == "image" else (3, 2, 3))
    return vision_block(V, frames[0] if kind == "image" else frames, TOK.encode)


def prompts(batch: int, rng) -> list[list[int]]:
    lengths = [5, 9, 2][:batch]
    return [[V.bos, *rng.integers(0, V.text_size, n - 1).tolist()] for n in lengths]


@torch.no_grad()
def assert_cached_equals_recompute(m, seqs, fed, multiple=1):
    dec = Decoding(m, seqs, len(fed), length_multiple=multiple)
    seqs = [list(s) for s in seqs]
    torch.testing.assert_close(dec.prefill(), full_recompute_logits(m, seqs, "cpu"), **TOL)
    for t in fed:
        got = dec.step(torch.full((len(seqs),), t, dtype=torch.long))
        for s in seqs:
            s.append(t)
        torch.testing.assert_close(got, full_recompute_logits(m, seqs, "cpu"), **TOL)


@pytest.mark.parametrize("kind", ["text", "image", "video"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_logits_equal_full_recompute_at_every_step(kind, batch):
    rng = np.random.default_rng(batch)
    assert_cached_equals_recompute(model(), prompts(batch, rng), continuation(kind, rng))


@pytest.mark.parametrize("kv_heads", [1, 4])  # MQA and MHA (GQA 2 of 4 is the default above)
def test_cache_parity_for_every_kv_head_count(kv_heads):
    rng = np.random.default_rng(7)
    assert_cached_equals_recompute(model(num_kv_heads=kv_heads), prompts(3, rng), continuation("image", rng))


def test_padded_forwards_with_scratch_tokens_equal_plain_ones():
    # length_multiple=3 (sequence parallel over tp=3): more left padding, 2 scratch tokens per step
    rng = np.random.default_rng(3)
    assert_cached_equals_recompute(model(), prompts(3, rng), continuation("video", rng), multiple=3)


def test_cache_holds_kv_heads_only_preallocated_once():
    m = model(num_kv_heads=1)
    dec = Decoding(m, [[V.bos, 1, 2], [V.bos]], max_new_tokens=4)
    dec.prefill()
    layer = dec.cache.layers[0]
    assert layer.k.shape == (2, 1, 3 + 4, 8)  # [B, Hkv, longest prompt + new tokens, D]
    k = layer.k
    dec.step(torch.tensor([5, 6]))
    assert layer.k is k and dec.cache.length == 4


def test_cached_layout_masks_left_padding_and_the_future():
    docs = Documents.cached(torch.tensor([2, 0]), start=1, length=3)
    mask = docs.causal_mask()[:, 0]  # queries at slots 1..3, keys 0..3
    assert mask[0].tolist() == [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]  # slots 0-1 are padding
    assert mask[1].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert docs.position_ids.tolist() == [[1, 0, 1], [1, 2, 3]]
    assert Documents.cached(torch.tensor([0, 0]), 4, 1, no_padding=True).causal_mask() is None


def test_prompt_plus_generation_longer_than_the_model_is_refused():
    m = model(max_positions=16)
    with pytest.raises(ValueError, match=r"10 tokens plus 7 .* 17 positions.*max_position_embeddings=16"):
        Decoding(m, [[V.bos] * 10], max_new_tokens=7)
