"""Model FLOPs of one training step, and the peak FLOP/s that MFU divides them by.

MFU = model FLOPs per second / peak FLOP/s, where model FLOPs count what the model needs, not
what the hardware did: activation recompute is not counted (it is the price of the memory saved),
neither are masked-out attention blocks.

Per training step (forward + backward = 3 x forward):

- dense: ``6 · N_dense`` per token, N_dense = the matmul weights — per layer q, k, v, o, gate,
  up, down — and the output head (``lm_head``). The embedding is a lookup (no FLOPs); norms and
  element-wise ops are ignored (< 1%).
- attention: per layer and document of L tokens the causal scores QK^T and the weighted sum
  P·V each take ``2 · hidden · L(L+1)/2`` forward FLOPs (query ``i`` meets ``i + 1`` keys), so
  ``6 · hidden · L(L+1)`` for training. Summed over the *actual* documents of the packed rows:
  a 5,120-token row of twenty 256-token documents costs 20x less attention than one document
  filling it (``seq_len²`` would overcount it twentyfold). This is PaLM's ``12 · l · h · q · T``
  per-token term (Chowdhery et al. 2022, appendix B) with causal and document masking applied.

    >>> from emu3_train.config import ModelConfig
    >>> cfg = ModelConfig(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    ...                   num_kv_heads=8)
    >>> round(dense_params(cfg, 184_622) / 1e9, 2)
    7.74
"""

from __future__ import annotations

from collections.abc import Iterable

from emu3_train.config import ModelConfig

# Dense (no sparsity) tensor-core peak per GPU, FLOP/s, from the vendors' data sheets (SXM parts).
PEAK_FLOPS = {
    "h100": {"bf16": 989.4e12, "fp32": 494.7e12},  # fp32 = TF32 tensor cores
    "h200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "h800": {"bf16": 989.4e12, "fp32": 494.7e12},
    "gh200": {"bf16": 989.4e12, "fp32": 494.7e12},
    "b200": {"bf16": 2250e12, "fp32": 1100e12},
    "a100": {"bf16": 312e12, "fp32": 156e12},
    "a800": {"bf16": 312e12, "fp32": 156e12},
    "l40s": {"bf16": 362.05e12, "fp32": 183e12},
}


def layer_params(cfg: ModelConfig) -> int:
    """Matmul weights of one decoder block: attention (q, k, v, o) + SwiGLU (gate, up, down)."""
    head_dim = cfg.hidden_size // cfg.num_heads
    attn = cfg.hidden_size * head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size
    return attn + mlp


def dense_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Weights that take part in matmuls: every block's linears and the output head."""
    return cfg.num_layers * layer_params(cfg) + vocab_size * cfg.hidden_size


def total_params(cfg: ModelConfig, vocab_size: int) -> int:
    """All parameters: dense + embedding + RMSNorm weights (2 per block + the final one)."""
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    return dense_params(cfg, vocab_size) + vocab_size * cfg.hidden_size + norms


def attention_flops(cfg: ModelConfig, doc_lengths: Iterable[int]) -> float:
    """Training FLOPs (fwd + bwd) of causal per-document attention: 6·layers·hidden·Σ L(L+1)."""
    pairs = sum(int(n) * (int(n) + 1) for n in doc_lengths)
    return 6.0 * cfg.num_layers * cfg.hidden_size * pairs


def step_flops(cfg: ModelConfig, vocab_size: int, doc_lengths: Iterable[int]) -> float:
    """Training FLOPs of the tokens of documents ``doc_lengths`` (pieces of packed rows)."""
    lengths = [int(n) for n in doc_lengths]
    return 6.0 * dense_params(cfg, vocab_size) * sum(lengths) + attention_flops(cfg, lengths)


def peak_flops(device: str, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of one GPU named like ``h100`` or ``NVIDIA H100 80GB HBM3``; None if unknown.

    ``precision``: ``bf16`` (also fp16) or ``fp32`` (TF32 tensor cores).
    """
    name = device.lower().replace("nvidia", "").replace("-", " ")
    key = "fp32" if precision == "fp32" else "bf16"
    for gpu in sorted(PEAK_FLOPS, key=len, reverse=True):  # "gh200" before "h200"
        if gpu in name.split() or name.strip().startswith(gpu):
            return PEAK_FLOPS[gpu][key]
    return None
