"""Per-GPU memory model of one training step, following what our code does (used by ``planner.py``).

Bytes per GPU at the peak of a step, in parts (every number is for one rank of the (dp, cp, tp) layout):

- **state**: FSDP2 shards parameters, gradients and AdamW over dp·cp (``parallel/data_parallel.py``):
  fp32 master weights (4 B) + fp32 gradients (4 B) + two fp32 Adam moments (8 B) = 16 B per
  parameter of this rank's shard. Tensor parallelism first divides every block matmul and the
  embedding / output head (vocab-parallel, ``ceil(V / tp)`` rows) by tp; norm weights are
  replicated over tp.
- **unsharded weights**: with dp·cp > 1, FSDP2's all-gathered copies in the compute dtype (bf16
  under ``trainer.precision=bf16``): the root (embedding, final norm, output head) for the whole
  step (the root keeps its parameters after forward), two blocks (current + prefetched) and, in
  backward, one block's unsharded gradients (bf16 plus the fp32 copy reduce-scattered). With
  dp·cp = 1 and bf16 there is no FSDP: autocast keeps a bf16 copy of every matmul weight.
- **activations**: what autograd saves for backward over all layers of one micro-batch, per token
  and layer by ``model.recompute`` (derived op by op from ``model/decoder.py`` and
  ``model/recompute.py``; on CPU it equals the measured saved storages, tests/unit/test_planner.py):
  ``none`` every intermediate (RMSNorm's fp32 input + normed copy, the q/k/v and MLP inputs, roped
  q/k, v, attention output, the four SwiGLU [t, I] tensors, dropout masks); ``selective`` the
  block input plus every matmul, attention and reduce-scatter output (under TP the o/down matmul
  outputs are full-sequence partial sums, [t, H]); ``full`` only the block input. Sequence
  parallelism divides the norm/residual tensors by tp (the matmul inputs are gathered: full t);
  context parallelism divides the row by cp, but the ``allgather`` core keeps full-row K/V per layer.
- **attention**: at cp=1 the ``sdpa`` core keeps a boolean [b, s, s] mask (one per step, shared by
  the layers) and SDPA's fused kernel (CPU flash; CUDA memory-efficient, which takes masks and
  dropout but not grouped-query heads, so ``model.attention.masked_sdpa`` repeats K/V to every
  query head there and that copy is what backward keeps) gets a float bias per layer. Under CP the
  allgather/ulysses cores attend in query chunks (``parallel/cp_attention.py``): no mask or score
  is kept for backward, one chunk's mask, bias and (with dropout) scores live at a time within a
  64 MiB budget. ``flex`` and ``varlen`` (and flex under CP) keep O(s) only; ``auto`` is ``sdpa``
  whenever attention dropout is active, and off GPU without CP one mask-free SDPA per document (O(s)).
- **loss**: the fused linear-CE never holds full logits. CPU reference: grad_hidden [t, H] (t = the rank's
  tokens) and grad_weight [V/tp, H] saved in forward, an fp32 accumulator and one ≤64 MiB logits chunk
  (twice) while it runs. CUDA Triton: the hidden states saved, fp32 grad_hidden + grad_weight in
  backward.
- **transient**: the larger of the loss's working memory and backward's (the block being
  recomputed under full/selective recompute, plus gradients in flight: two [t, H] and two [t, I/tp]).
- **overhead**: a fixed CUDA context + NCCL + cuBLAS workspace allowance (``CUDA_OVERHEAD_GIB``);
  allocator fragmentation is not modelled (reserved memory is typically 5-10% above allocated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from emu3_train.config import TrainConfig
from emu3_train.flops import layer_params
from emu3_train.kernels.reference import chunk_rows
from emu3_train.parallel.cp_attention import CHUNK_BUDGET_BYTES
from emu3_train.parallel.dims import ParallelDims

GIB = 2**30
CUDA_OVERHEAD_GIB = 2.0  # CUDA context (~0.5), NCCL buffers and cuBLAS/cuDNN workspaces
# Usable HBM per GPU (GiB) as torch reports it (total_memory), for the "fits" verdict.
GPU_MEMORY_GIB = {"h100": 79.1, "h800": 79.1, "h200": 139.8, "gh200": 94.5, "a100": 79.1,
                  "a800": 79.1, "b200": 178.4, "l40s": 44.4}


def gpu_memory_gib(gpu: str) -> float | None:
    """Capacity of ``gpu`` (``h100``, ``NVIDIA H100 80GB HBM3``, ``a100-40gb``...) in GiB; None if unknown."""
    name = gpu.lower().replace("nvidia", "").replace("-", " ").strip()
    if "40gb" in name.replace(" ", "") and "a100" in name:
        return 39.4
    for key in sorted(GPU_MEMORY_GIB, key=len, reverse=True):
        if key in name.split() or name.startswith(key):
            return GPU_MEMORY_GIB[key]
    return None


@dataclass
class Memory:
    """Bytes per GPU by part (see the module docstring); ``total`` is the estimated peak."""

    params_total: int  # parameters of the whole model
    params_per_gpu: int  # this rank's FSDP shard of its tp shard
    weights: int
    grads: int
    optimizer: int
    unsharded_weights: int
    activations: int
    attention_mask: int
    loss_saved: int
    transient: int
    overhead: int
    attention_kernel: str  # which attention path the estimate assumes

    @property
    def state(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return (self.state + self.unsharded_weights + self.activations + self.attention_mask
                + self.loss_saved + self.transient + self.overhead)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(state=self.state, total=self.total)
        return d


def attention_kernel(cfg: TrainConfig, cp: int, on_gpu: bool, bf16: bool) -> str:
    """The attention path the step runs: ``fused`` (flash/flex/varlen: O(s) saved), ``dense-bias``
    (SDPA fed a dense mask; on CUDA with K/V repeated to the query heads) or ``chunked`` (the CP
    cores' query chunks: nothing quadratic saved)."""
    m = cfg.model
    impl = m.attn_impl
    if impl == "auto":
        if not on_gpu and cp == 1:
            return "fused"  # one causal SDPA (CPU flash) per document, no mask (model/segments.py)
        gpu_kernel = "flex" if (cp > 1 or not bf16) else "varlen"
        impl = "sdpa" if (not on_gpu or m.attention_dropout > 0) else gpu_kernel
    if impl in ("flex", "varlen") and (cp == 1 or cfg.parallel.cp_impl == "allgather"):
        return "fused"
    return "chunked" if cp > 1 else "dense-bias"


def estimate_memory(cfg: TrainConfig, dims: ParallelDims, vocab_size: int, on_gpu: bool) -> Memory:
    """Peak bytes per GPU of a training step of ``cfg`` on layout ``dims`` (see the module docstring)."""
    m, d = cfg.model, cfg.data
    dp, cp, tp = dims.dp, dims.cp, dims.tp
    bf16 = cfg.trainer.precision == "bf16"
    fsdp = dp * cp > 1
    act = 2 if bf16 else 4  # matmul outputs (autocast or bf16 FSDP params)
    res = 2 if (bf16 and fsdp) else 4  # residual stream: fp32 unless FSDP2 casts the weights to bf16
    p_b = 2 if bf16 else 4  # compute copy of a weight
    h, i, L = m.hidden_size, m.intermediate_size, m.num_layers
    hd = h // m.num_heads
    hq, hkv = m.num_heads * hd, m.num_kv_heads * hd
    heads = m.num_heads // tp
    v_local = math.ceil(vocab_size / tp)
    b, seq = d.micro_batch_size, d.seq_len
    s = seq // cp  # local tokens per row
    t = b * s

    # parameters: per-layer matmuls / tp, embedding + head vocab-parallel, norms replicated
    layer = layer_params(m)
    norms = (2 * L + 1) * h
    total = L * layer + 2 * vocab_size * h + norms
    per_tp = L * layer // tp + 2 * v_local * h + norms
    shard = math.ceil(per_tp / (dp * cp))

    if fsdp:
        root = 2 * v_local * h + h
        unsharded = (root + 2 * layer // tp) * p_b + (layer // tp) * (p_b + (4 if p_b == 2 else 0))
    else:
        unsharded = (L * layer // tp + v_local * h) * 2 if bf16 else 0  # autocast's bf16 casts

    # attention path and its per-layer O(s_q * s_k) part
    kernel = attention_kernel(cfg, cp, on_gpu, bf16)
    ulysses = cp > 1 and cfg.parallel.cp_impl == "ulysses"
    s_q, s_k = (seq, seq) if ulysses else (s, seq if cp > 1 else s)
    att_heads = heads // cp if ulysses else heads
    pairs = b * s_q * s_k
    mask_bool = pairs if kernel == "dense-bias" else 0
    drop = m.attention_dropout > 0
    square = pairs * act if kernel == "dense-bias" else 0  # the float bias SDPA builds per layer
    repeat_kv = on_gpu and m.num_kv_heads != m.num_heads  # masked_sdpa on CUDA
    kv_tokens = b * seq if (cp > 1 and not ulysses) else t  # allgather: full-row K/V per layer
    lse = 4 * b * att_heads * s_q
    drop_mask = 2 * (t * h // tp) * (1 if on_gpu else res) if drop else 0

    norm = (4 + res) * t * h // tp + 4 * t // tp
    qkv_saved = act * (t * hq // tp + kv_tokens * 2 * hkv // tp)
    if kernel == "dense-bias" and repeat_kv:  # backward keeps the K/V repeated to every query head
        qkv_saved += act * kv_tokens * 2 * (hq - hkv) // tp
    attn_out = act * t * hq // tp
    none_layer = (2 * norm + 2 * act * t * h + qkv_saved + attn_out + lse + square
                  + 4 * act * t * i // tp + drop_mask)
    block_in = res * t * h // tp
    if m.recompute == "full":
        per_layer = block_in
    elif m.recompute == "selective":
        rs = 2 * act * t * h // tp if tp > 1 else 0
        per_layer = (block_in + act * t * (hq + 2 * hkv) // tp + act * t * h + 2 * act * t * i // tp
                     + act * t * h + rs + attn_out + lse
                     + (drop_mask + 2 * act * t * h // tp if (drop and on_gpu) else 0))
    else:
        per_layer = none_layer
    shared = 8 * t + 2 * t * hd * res + norm  # token ids, RoPE cos/sin, final norm
    activations = L * per_layer + shared

    # fused linear-CE: hidden states of every token of the local rows (gathered over tp)
    w_b = p_b if fsdp else 4
    if on_gpu:
        loss_saved = res * t * h
        loss_work = 4 * t * h + 4 * v_local * h + res * t * h + w_b * v_local * h
    else:
        chunk = min(chunk_rows(cfg.loss.chunk_size, v_local), t)
        loss_saved = res * t * h + w_b * v_local * h  # grad_hidden, grad_weight
        loss_work = 4 * v_local * h + 2 * 4 * chunk * v_local
    recompute_work = none_layer - per_layer if m.recompute != "none" else 0
    in_flight = 2 * act * t * h + 2 * act * t * i // tp
    if kernel == "chunked":  # one query chunk at a time; on CUDA its keys' K/V repeated to Hq heads
        chunk_work = CHUNK_BUDGET_BYTES + (act * b * s_k * 2 * (hq - hkv) // tp if repeat_kv else 0)
        in_flight += chunk_work
    transient = max(loss_work, recompute_work + in_flight)

    return Memory(params_total=total, params_per_gpu=shard, weights=4 * shard, grads=4 * shard,
                  optimizer=8 * shard, unsharded_weights=unsharded, activations=activations,
                  attention_mask=mask_bool, loss_saved=loss_saved, transient=transient,
                  overhead=int(CUDA_OVERHEAD_GIB * GIB) if on_gpu else 0, attention_kernel=kernel)
