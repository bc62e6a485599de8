"""The generation engine against uncached references: classifier-free guidance equals the formula
over two separate full-recompute passes, video frames and continued clips follow the layout,
text stops at EOS, sampling is deterministic per seed, bad input is one line naming the value.

    .venv/bin/python -m pytest -q tests/unit/test_generation.py
"""

import numpy as np
import pytest
import torch

from emu3_train.config import ModelConfig
from emu3_train.generation import (
    Sampling,
    _vision_schedule,
    frame_tokens,
    generate_text,
    generate_vision,
    guide,
    image_prompt,
    sample_tokens,
)
from emu3_train.layout import vision_block
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.sampling import caption_images, full_recompute_logits, generate_images
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")
TOK = load_tokenizer(V)
LO, HI = V.vision_start, V.vision_start + V.codebook_size


def model() -> Emu3CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      rope_theta=10_000.0)
    return Emu3CausalLM(cfg, V.size).eval()


@torch.no_grad()
def reference_vision(m, prompts, negative, h, w, frames, sampling, seed, prefix=None):
    """The grid loop with two separate uncached passes (conditional, unconditional) per code."""
    cond, uncond = [list(p) for p in prompts], [list(p) for p in negative]
    if prefix is not None:
        extra = frame_tokens(V, prefix, TOK.encode)
        cond, uncond = [c + extra for c in cond], [u + extra for u in uncond]
    gen = torch.Generator().manual_seed(seed)
    codes = []
    for item in _vision_schedule(V, h, w, frames):
        if item is None:
            c = full_recompute_logits(m, cond, "cpu")[:, LO:HI]
            u = full_recompute_logits(m, uncond, "cpu")[:, LO:HI]
            logits = u + sampling.guidance_scale * (c - u) if sampling.guided else c
            code = sample_tokens(logits, sampling, gen)
            codes.append(code)
            item = code + LO
        else:
            item = torch.full((len(cond),), item)
        for seqs in (cond, uncond):
            for s, t in zip(seqs, item.tolist()):
                s.append(t)
    return torch.stack(codes, 1).view(len(prompts), frames, h, w)


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.0, guidance_scale=3.0),
                                      Sampling(temperature=1.0, top_k=6, top_p=0.9, guidance_scale=2.5)],
                         ids=["greedy", "sampled"])
def test_guidance_equals_the_formula_over_two_separate_uncached_passes(sampling):
    m = model()
    prompts = [image_prompt(V, TOK.encode, c, 2, 3, frames=2) for c in ("a digit one", "seven")]
    negative = [image_prompt(V, TOK.encode, "", 2, 3, frames=2)] * 2
    got = generate_vision(m, V, prompts, 2, 3, frames=2, sampling=sampling, negative=negative, seed=5)
    want = reference_vision(m, prompts, negative, 2, 3, 2, sampling, seed=5)
    assert got.shape == (2, 2, 2, 3) and torch.equal(got, want)


def test_guidance_changes_the_image_and_scale_one_is_the_conditional_alone():
    m = model()
    base = dict(temperature=0.0)
    plain = generate_images(m, V, TOK.encode, ["x", "a digit two"], 3, 3, **base)
    assert torch.equal(plain, generate_images(m, V, TOK.encode, ["x", "a digit two"], 3, 3,
                                              guidance_scale=1.0, negative_prompt="ignored", **base))
    guided = generate_images(m, V, TOK.encode, ["x", "a digit two"], 3, 3, guidance_scale=4.0, **base)
    assert not torch.equal(plain, guided)
    logits = torch.tensor([[1.0, 2.0], [0.5, 0.0]])  # [cond; uncond]
    torch.testing.assert_close(guide(logits, 3.0), torch.tensor([[2.0, 6.0]]))


def test_continuing_a_clip_generates_the_next_frames_after_the_given_ones():
    m = model()
    first = np.random.default_rng(0).integers(0, V.codebook_size, (1, 2, 2))
    prompts = [image_prompt(V, TOK.encode, "a clip", 2, 2, frames=3)]
    sampling = Sampling(temperature=0.0)
    got = generate_vision(m, V, prompts, 2, 2, frames=2, sampling=sampling, prefix=first, encode=TOK.encode)
    want = reference_vision(m, prompts, prompts, 2, 2, 2, sampling, seed=0, prefix=first)
    assert got.shape == (1, 2, 2, 2) and torch.equal(got, want)


def test_sampling_is_deterministic_per_seed_and_top_k_one_is_greedy():
    m = model()
    a = generate_images(m, V, TOK.encode, ["a digit one", "two"], 3, 4, temperature=1.0, seed=7)
    b = generate_images(m, V, TOK.encode, ["a digit one", "two"], 3, 4, temperature=1.0, seed=7)
    c = generate_images(m, V, TOK.encode, ["a digit one", "two"], 3, 4, temperature=1.0, seed=8)
    assert a.shape == (2, 3, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < V.codebook_size
    greedy = generate_images(m, V, TOK.encode, ["x"], 2, 2, temperature=0.0)
    assert torch.equal(greedy, generate_images(m, V, TOK.encode, ["x"], 2, 2, top_k=1, seed=3))
    assert torch.equal(greedy, generate_images(m, V, TOK.encode, ["x"], 2, 2, top_p=1e-6, seed=3))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {int(sample_tokens(logits, Sampling(top_p=0.75), torch.Generator().manual_seed(s)))
             for s in range(200)}
    assert draws == {0, 1}


@torch.no_grad()
def test_text_is_greedy_over_allowed_ids_and_stops_at_eos():
    m = model()
    images = torch.as_tensor(np.random.default_rng(1).integers(0, V.codebook_size, (2, 3, 3)))
    caps = caption_images(m, V, TOK.encode, images, max_new_tokens=6)
    for img, cap in zip(images, caps):  # the uncached greedy loop over text ids + EOS
        seq = [V.bos, *vision_block(V, img.numpy(), TOK.encode)]
        want = []
        for _ in range(6):
            logits = full_recompute_logits(m, [seq], "cpu")[0, :V.size]
            allowed = logits.clone().fill_(float("-inf"))
            allowed[:V.text_size], allowed[V.eos] = logits[:V.text_size], logits[V.eos]
            t = int(allowed.argmax())
            if t == V.eos:
                break
            want.append(t)
            seq.append(t)
        assert cap == want
    only_eos = torch.zeros(V.size, dtype=torch.bool)
    only_eos[V.eos] = True
    assert generate_text(m, V, [[V.bos, 1], [V.bos, 2, 3]], 5, allowed=only_eos) == [[], []]


def test_bad_input_is_one_line_naming_the_value():
    m = model()
    with pytest.raises(ValueError, match=r"guidance_scale=-1.0 must be >= 0"):
        generate_images(m, V, TOK.encode, ["x"], 2, 2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs one negative prompt per prompt"):
        generate_vision(m, V, [image_prompt(V, TOK.encode, "x", 2, 2)], 2, 2,
                        sampling=Sampling(guidance_scale=3.0))
    small = Emu3CausalLM(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                     num_kv_heads=1, max_position_embeddings=64), V.size)
    with pytest.raises(ValueError, match=r"max_position_embeddings=64"):  # 8 x 8 grid: 73 more tokens
        generate_images(small, V, TOK.encode, ["x"], 8, 8)


@torch.no_grad()
def test_the_head_multiplies_only_the_rows_asked_for():
    from emu3_train.generation import Decoding

    m = model()
    prompts = [image_prompt(V, TOK.encode, "seven", 3, 4), image_prompt(V, TOK.encode, "a digit", 3, 4)]
    full, part = Decoding(m, prompts, 3), Decoding(m, prompts, 3)
    a, b = full.prefill(), part.prefill(slice(LO, HI))
    assert b.shape == (2, HI - LO) and torch.allclose(b, a[:, LO:HI], rtol=0, atol=1e-6)
    token = a.argmax(-1)
    assert part.step(token, slice(0, 0)) is None  # before a placed token: no head at all
    full.step(token)
    a, b = full.step(token), part.step(token, slice(LO, HI))
    assert torch.allclose(b, a[:, LO:HI], rtol=0, atol=1e-6)  # the cache advanced the same way
