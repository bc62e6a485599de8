"""Generation enforces the image grid: the model only ever chooses visual codes."""

import torch

from emu3_train.config import ModelConfig
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.sampling import caption_images, full_recompute_logits, generate_images
from emu3_train.tokenizer import load_tokenizer
from emu3_train.vocab import get_vocab

V = get_vocab("demo")
TOK = load_tokenizer(V)


def _model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1)
    return Emu3CausalLM(cfg, V.size).eval()


def test_generated_grid_is_codes_and_deterministic():
    model = _model()
    a = generate_images(model, V, TOK.encode, ["a digit one", "two"], 3, 4, temperature=1.0, seed=7)
    b = generate_images(model, V, TOK.encode, ["a digit one", "two"], 3, 4, temperature=1.0, seed=7)
    assert a.shape == (2, 3, 4) and torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < V.codebook_size


def test_left_padding_does_not_change_logits():
    model = _model()
    short = [V.bos, 97, 98]
    alone = full_recompute_logits(model, [short], "cpu")
    padded = full_recompute_logits(model, [short, [V.bos, 1, 2, 3, 4, 5, 6]], "cpu")[0:1]
    torch.testing.assert_close(alone, padded, rtol=1e-5, atol=1e-5)


def test_top_k_one_equals_greedy():
    model = _model()
    greedy = generate_images(model, V, TOK.encode, ["x"], 2, 2, temperature=0.0)
    top1 = generate_images(model, V, TOK.encode, ["x"], 2, 2, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(greedy, top1)


def test_captions_are_text_ids_only():
    model = _model()
    caps = caption_images(model, V, TOK.encode, torch.zeros(2, 3, 3, dtype=torch.long), max_new_tokens=5)
    assert len(caps) == 2
    assert all(0 <= t < V.text_size for c in caps for t in c) and all(len(c) <= 5 for c in caps)
