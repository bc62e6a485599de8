"""FLOPs accounting against what the model really does: torch's FLOP counter for the matmuls, the
model's own attention mask for the attention term, and the real parameter count."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from emu3_train.config import ModelConfig
from emu3_train.data.batch import build_batch
from emu3_train.data.packing import Piece
from emu3_train.flops import attention_flops, dense_params, peak_flops, step_flops, total_params
from emu3_train.metrics import doc_lengths
from emu3_train.model.attention import DocumentLayout
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.vocab import get_vocab

CFG = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
VOCAB = 101


def test_parameter_counts_match_the_model():
    model = Emu3CausalLM(CFG, VOCAB)
    assert total_params(CFG, VOCAB) == sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for n, p in model.named_parameters()
                 if n.endswith("proj.weight") or n == "lm_head.weight")
    assert dense_params(CFG, VOCAB) == linear


def test_dense_term_equals_torch_flop_counter():
    """6·N_dense per token is exactly what the forward + backward matmuls cost (SDPA aside)."""
    model = Emu3CausalLM(CFG, VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 37))
    positions = torch.arange(37).repeat(2, 1)
    cu = torch.tensor([0, 37, 74], dtype=torch.int32)
    with FlopCounterMode(display=False) as counter:
        hidden = model(tokens, positions, cu)
        model.logits(hidden).float().logsumexp(-1).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if "mm" in str(k))
    assert matmuls == 6 * dense_params(CFG, VOCAB) * tokens.numel()


def test_attention_term_counts_the_pairs_the_mask_allows():
    vocab = get_vocab("demo")
    docs = {0: np.arange(3, 40), 1: np.arange(3, 20), 2: np.arange(3, 60)}
    rows = [[Piece(0, 0, 37), Piece(1, 0, 17)], [Piece(2, 0, 57)]]
    batch = build_batch(rows, docs, (), 64, vocab)
    lengths = doc_lengths(batch, vocab.pad)
    assert sorted(lengths) == [17, 37, 57]  # padding segments are not documents
    mask = DocumentLayout(batch["cu_seqlens"], batch["position_ids"]).causal_mask()[:, 0]
    real = batch["tokens"] != vocab.pad
    pairs = int((mask & real[:, :, None] & real[:, None, :]).sum())
    # per allowed (query, key) pair and layer: QK^T 2·h and P·V 2·h forward, x3 for training
    assert attention_flops(CFG, lengths) == 12 * CFG.num_layers * CFG.hidden_size * pairs
    assert step_flops(CFG, VOCAB, lengths) == (6 * dense_params(CFG, VOCAB) * sum(lengths)
                                               + attention_flops(CFG, lengths))


def test_packing_many_documents_is_cheaper_than_one():
    one = attention_flops(CFG, [5120])
    twenty = attention_flops(CFG, [256] * 20)
    assert one / twenty == pytest.approx(5121 / 257)


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("h200", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GH200 480GB", 989.4e12), ("cpu", None), ("NVIDIA GeForce RTX 3090", None)])
def test_peak_lookup(name, expected):
    assert peak_flops(name, "bf16") == expected
