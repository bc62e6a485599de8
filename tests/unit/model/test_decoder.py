"""The decoder on packed batches: document isolation, causality, GQA, gradients, recompute."""

import pytest
import torch

from emu3_train.config import ConfigError, ModelConfig
from emu3_train.model.attention import DocumentLayout, build_attention_core
from emu3_train.model.decoder import Emu3CausalLM, apply_recompute

VOCAB = 61


def tiny_cfg(**overrides) -> ModelConfig:
    fields = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  rope_theta=10_000.0)
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(seed=0, **overrides) -> Emu3CausalLM:
    torch.manual_seed(seed)
    return Emu3CausalLM(tiny_cfg(**overrides), VOCAB).eval()


def packed_batch(doc_lens_per_row, seq_len, seed=1):
    """Rows of documents followed by padding (its own segment); positions restart per document."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(doc_lens_per_row), seq_len), generator=gen)
    positions = torch.zeros_like(tokens)
    bounds, spans = [0], []
    for r, lens in enumerate(doc_lens_per_row):
        start = 0
        for n in lens:
            positions[r, start : start + n] = torch.arange(n)
            spans.append((r, start, n))
            start += n
            bounds.append(r * seq_len + start)
        if start < seq_len:  # padding segment
            positions[r, start:] = torch.arange(seq_len - start)
            bounds.append((r + 1) * seq_len)
    return tokens, positions, torch.tensor(bounds, dtype=torch.int32), spans


def single(model, tokens_1d):
    n = tokens_1d.numel()
    return model(tokens_1d[None], torch.arange(n)[None], torch.tensor([0, n], dtype=torch.int32))[0]


def test_packed_documents_match_running_each_document_alone():
    model = make_model()
    tokens, positions, cu, spans = packed_batch([[5, 7, 3], [9, 4]], seq_len=16)
    hidden = model(tokens, positions, cu)
    assert hidden.shape == (2, 16, 32)
    for r, start, n in spans:
        alone = single(model, tokens[r, start : start + n])
        torch.testing.assert_close(hidden[r, start : start + n], alone, atol=1e-5, rtol=1e-5)


def test_changing_a_later_token_leaves_earlier_hidden_states_unchanged():
    model = make_model()
    tokens, positions, cu, _ = packed_batch([[10, 6]], seq_len=16)
    before = model(tokens, positions, cu)
    changed = tokens.clone()
    changed[0, 7] = (changed[0, 7] + 1) % VOCAB
    after = model(changed, positions, cu)
    torch.testing.assert_close(after[0, :7], before[0, :7], atol=0, rtol=0)
    assert not torch.allclose(after[0, 7:10], before[0, 7:10])
    torch.testing.assert_close(after[0, 10:], before[0, 10:], atol=0, rtol=0)  # next document


def test_document_mask_is_block_diagonal_causal_and_never_crosses_rows():
    positions = torch.zeros(2, 4, dtype=torch.int64)
    docs = DocumentLayout(torch.tensor([0, 2, 6, 8], dtype=torch.int32), positions)  # doc 1 spans rows
    mask = docs.causal_mask()[:, 0]
    expected_row0 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    expected_row1 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected_row0) and torch.equal(mask[1], expected_row1)
    assert docs.causal_mask() is docs.causal_mask()  # built once per forward


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_and_mha_configs_run_and_isolate_documents(kv_heads):
    model = make_model(num_kv_heads=kv_heads)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 8, 32)
    tokens, positions, cu, spans = packed_batch([[6, 6]], seq_len=12)
    hidden = model(tokens, positions, cu)
    torch.testing.assert_close(hidden[0, 6:], single(model, tokens[0, 6:]), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter():
    model = make_model().train()
    tokens, positions, cu, _ = packed_batch([[5, 7], [12]], seq_len=12)
    hidden = model(tokens, positions, cu)
    model.logits(hidden).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_full_recompute_gives_identical_gradients_with_dropout():
    tokens, positions, cu, _ = packed_batch([[5, 7], [12]], seq_len=12)
    grads = []
    for mode in ("none", "full"):
        model = make_model(attention_dropout=0.2).train()
        apply_recompute(model, mode)
        torch.manual_seed(7)
        model.logits(model(tokens, positions, cu)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_init_and_helpers():
    model = make_model(init_std=0.05)
    assert abs(model.lm_head.weight.std().item() - 0.05) < 0.01
    assert torch.equal(model.model.norm.weight, torch.ones(32))
    n = model.num_params()
    assert n == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embedding=True) == n - VOCAB * 32


def test_unsupported_settings_name_the_config_field():
    with pytest.raises(ValueError, match="model.attn_impl"):
        build_attention_core(tiny_cfg(attn_impl="bogus"))
    with pytest.raises(ValueError, match="model.recompute"):
        apply_recompute(make_model(), "bogus")
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        Emu3CausalLM(tiny_cfg(num_kv_heads=3), VOCAB)
