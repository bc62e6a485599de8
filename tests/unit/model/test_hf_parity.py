"""Our decoder is HF ``Emu3ForCausalLM``: same parameter names, same logits."""

import pytest
import torch

from emu3_train.config import ModelConfig
from emu3_train.model.decoder import Emu3CausalLM

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, THETA = 67, 32, 80, 2, 4, 2, 5_000.0


def hf_model():
    config = transformers.Emu3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, attention_dropout=0.0,
        rms_norm_eps=1e-5, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )
    torch.manual_seed(0)
    model = transformers.Emu3ForCausalLM(config).eval()
    with torch.no_grad():
        # HF's init (std 0.02, norms 1) makes attention nearly uniform, hiding RoPE or mask
        # mistakes; larger weights and random norms make every part of the model show.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return model


def ours():
    cfg = ModelConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_layers=LAYERS, num_heads=HEADS,
                      num_kv_heads=KV_HEADS, rope_theta=THETA, rms_norm_eps=1e-5, attention_dropout=0.0)
    return Emu3CausalLM(cfg, VOCAB).eval()


def test_parameter_names_and_shapes_equal_hf():
    theirs = {k: v.shape for k, v in hf_model().state_dict().items()}
    mine = {k: v.shape for k, v in ours().state_dict().items()}
    assert set(mine) == set(theirs)
    assert mine == theirs


def test_logits_match_hf_on_a_single_document():
    reference = hf_model()
    model = ours()
    model.load_state_dict(reference.state_dict(), strict=True)
    seq = 24
    tokens = torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(seq)[None]
    with torch.no_grad():
        expected = reference(input_ids=tokens, position_ids=positions).logits
        got = model.logits(model(tokens, positions, torch.tensor([0, seq], dtype=torch.int32)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
