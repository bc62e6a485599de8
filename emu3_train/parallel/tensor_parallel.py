"""Tensor parallelism (Megatron) and sequence parallelism as a pass over the plain model, on DTensor.

Follows torchtitan's ``apply_tp``; parameter names are unchanged (HF's), each weight becomes a
DTensor on the tp mesh, so DCP checkpoints reshard across tp sizes:

==========================  =========================  ===========================================
module                      style                      weight
==========================  =========================  ===========================================
embed_tokens                RowwiseParallel            Shard(0): vocab-parallel embedding
q/k/v_proj, gate/up_proj    ColwiseParallel            Shard(0): heads / tp, intermediate / tp
o_proj, down_proj           RowwiseParallel            Shard(1)
norms                       SequenceParallel           Replicate (ReplicateParallel without SP)
lm_head                     ColwiseParallel            Shard(0): vocab-parallel output
==========================  =========================  ===========================================

Activations: with ``sequence_parallel`` the residual stream between blocks is this rank's slice of
the sequence ([B, S / tp, H]): the embedding and o/down projections reduce-scatter onto it, the
norms run on it, and attention/MLP all-gather it at their input (one all-gather forward, one
reduce-scatter backward per block input). Without it the residual stream is the full [B, S, H] on
every rank: one all-reduce forward per o/down and one per attention/MLP input in backward. Either
way the decoder returns the full hidden [B, S, H] as a plain tensor, identical on every tp rank.

The output head is not run as a module: the loss takes the hidden states and this rank's rows of
``lm_head.weight`` (:func:`output_shard`), computes the vocab-parallel CE and returns the FULL
gradient of the hidden states, already all-reduced over tp. That gradient enters the model through
the final gather (Shard(1) -> Replicate), whose backward only slices it (Replicate -> Shard(1)), so
it is never reduced twice. ``model.logits(hidden)`` still works (all-gathered full logits).

Uneven vocabulary (e.g. 283 on tp=2): no padding, the shapes stay HF's. DTensor ``Shard(0)`` uses
``torch.chunk`` semantics: ``ceil(V / tp)`` rows per rank from rank 0 on, the last ones short
(:func:`vocab_range`); :func:`output_shard` checks that against the shard it gets.

Not done: dropout under TP draws the same random stream on every tp rank (no Megatron-style RNG
tracker), so with ``model.attention_dropout > 0`` masks are correlated across head/sequence
shards and differ from one process; exact only with dropout 0.

    apply_tp(model, mesh["tp"], sequence_parallel=True)   # first pass: before CP and FSDP2
    hidden = model(tokens, position_ids, cu_seqlens)      # [B, S, H], replicated over tp
    weight, vocab_start, tp_group = output_shard(model, mesh["tp"])
    loss_sum, stats = weighted_ce(hidden, weight, labels, loss_weight, vocab_start=vocab_start,
                                  tp_group=tp_group, vision_start=...)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from emu3_train.config import ConfigError
from emu3_train.model.decoder import Emu3CausalLM

_FSDP_HINT = ("Under FSDP2 the head is whole (over dp) only between the model's forward and backward, "
              "and only if the root module keeps its parameters unsharded after forward: "
              "fully_shard(model, reshard_after_forward=False) for the root")


class ReplicateParallel(ParallelStyle):
    """Parameters as Replicate DTensors on the tp mesh; plain tensors in and out.

    For the norms without sequence parallelism: every parameter of a tensor-parallel model is then
    a DTensor on one mesh (what ``clip_grad_norm_`` and FSDP2 expect), while the module computes
    on the full, replicated activations as in one process.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                # from_local: the weights are identical on every rank (same seed, or ones)
                mod.register_parameter(p_name, nn.Parameter(
                    DTensor.from_local(param, mesh, [Replicate()], run_check=False)))

        def to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                         if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
                         for x in inputs)

        def to_local(mod, outputs, mesh):
            return outputs.to_local() if isinstance(outputs, DTensor) else outputs

        return distribute_module(module, device_mesh, replicate, to_dtensor, to_local)


def vocab_range(vocab_size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Rows [start, end) of a ``vocab_size``-row matrix that tp rank ``tp_rank`` holds under
    DTensor ``Shard(0)`` (``torch.chunk``: ``ceil(V / tp)`` rows each, the remainder short)."""
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp={tp})")
    chunk = math.ceil(vocab_size / tp)
    start = min(tp_rank * chunk, vocab_size)
    return start, min(start + chunk, vocab_size)


def apply_tp(model: Emu3CausalLM, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Tensor (+ sequence) parallelism over the 1-D ``tp_mesh``, in place; names unchanged.

    Apply it first, before context parallelism and FSDP2, on a model whose weights are identical
    on every tp rank (same seed; ``distribute_tensor`` scatters rank 0's copy of the sharded
    weights, the norms are taken as they are). Heads and KV heads must be divisible by tp.
    """
    if not isinstance(model, Emu3CausalLM):
        raise TypeError(f"apply_tp expects an Emu3CausalLM, got {type(model).__name__}")
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp needs a 1-D tp mesh, got {tp_mesh.ndim}-D {tp_mesh}")
    if isinstance(model.lm_head.weight, DTensor):
        raise RuntimeError("apply_tp: the model's weights are already DTensors (apply_tp or FSDP2 "
                           "ran before); apply tensor parallelism once, as the first pass")
    tp = tp_mesh.size()
    decoder = model.model
    if decoder.layers:
        attn = decoder.layers[0].self_attn
        if attn.num_heads % tp or attn.num_kv_heads % tp:
            raise ConfigError(f"model.num_heads={attn.num_heads} and model.num_kv_heads="
                              f"{attn.num_kv_heads} must be divisible by parallel.tp={tp}")

    # The residual stream's layout between blocks, and the norms' style.
    stream = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel if sequence_parallel else ReplicateParallel

    plan: dict[str, ParallelStyle] = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream),
        "norm": norm_style(),
    }
    for i in range(len(decoder.layers)):
        p = f"layers.{i}"
        plan.update({
            f"{p}.input_layernorm": norm_style(),
            # One gather (SP) or one from_local (no SP) for q, k and v together, so backward has
            # one reduce-scatter / all-reduce of their summed partial gradients, not three.
            f"{p}.self_attn": PrepareModuleInput(input_layouts=(stream, None, None),
                                                 desired_input_layouts=(Replicate(), None, None)),
            f"{p}.self_attn.q_proj": ColwiseParallel(),
            f"{p}.self_attn.k_proj": ColwiseParallel(),
            f"{p}.self_attn.v_proj": ColwiseParallel(),
            f"{p}.self_attn.o_proj": RowwiseParallel(output_layouts=stream),
            f"{p}.post_attention_layernorm": norm_style(),
            f"{p}.mlp": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            f"{p}.mlp.gate_proj": ColwiseParallel(),
            f"{p}.mlp.up_proj": ColwiseParallel(),
            f"{p}.mlp.down_proj": RowwiseParallel(output_layouts=stream),
        })
    parallelize_module(decoder, tp_mesh, plan)
    if sequence_parallel:
        # The loss needs every token's hidden state: gather the final norm's sequence shards.
        # Backward slices the (already tp-reduced) full gradient: no second reduction.
        parallelize_module(decoder, tp_mesh, PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    # Vocab-parallel head. The loss reads its shard (output_shard); the hooks serve logits().
    parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(
        input_layouts=Replicate(), output_layouts=Replicate()))


def output_shard(model: Emu3CausalLM, tp_mesh: DeviceMesh | None = None
                 ) -> tuple[torch.Tensor, int, dist.ProcessGroup | None]:
    """(weight [V_local, H], vocab_start, tp_group) of the output head for the loss kernel.

    ``tp_mesh``: the mesh :func:`apply_tp` used (the step plan passes it); None = a plain model,
    or the weight's own 1-D mesh when it is named "tp" (``mesh["tp"]``).
    A plain model gives ``(lm_head.weight, 0, None)``. After :func:`apply_tp`: this rank's rows
    ``[vocab_start, vocab_start + V_local)`` as a plain tensor in the autograd graph (its gradient
    lands in the DTensor's ``.grad``) and the tp process group. Call it after the forward, each
    step: under FSDP2 the weight is whole over dp only while the root module is unsharded, so
    the root must be ``fully_shard(model, reshard_after_forward=False)`` (lm_head not wrapped
    on its own: it never runs as a module, so FSDP2 would never unshard it).
    """
    weight = model.lm_head.weight
    if tp_mesh is None and isinstance(weight, DTensor) and weight.device_mesh.mesh_dim_names == ("tp",):
        tp_mesh = weight.device_mesh
    if tp_mesh is None:
        if isinstance(weight, DTensor):
            raise RuntimeError(f"lm_head.weight is a DTensor {weight.placements} on {weight.device_mesh} "
                               f"but the model is not tensor-parallel: it is still sharded by FSDP2. "
                               f"{_FSDP_HINT}")
        return weight, 0, None
    if (not isinstance(weight, DTensor) or weight.device_mesh != tp_mesh
            or tuple(weight.placements) != (Shard(0),)):
        where = (f"{tuple(weight.placements)} on {weight.device_mesh}" if isinstance(weight, DTensor)
                 else "a plain tensor")
        raise RuntimeError(f"lm_head.weight should be Shard(0) over the tp mesh {tp_mesh}, found "
                           f"{where}. {_FSDP_HINT}")
    local = weight.to_local()
    start, end = vocab_range(weight.shape[0], tp_mesh.size(), tp_mesh.get_local_rank())
    if local.shape[0] != end - start:  # DTensor changed its uneven-sharding rule
        raise RuntimeError(f"lm_head shard has {local.shape[0]} rows, expected {end - start} "
                           f"(rows [{start}, {end}) of {weight.shape[0]})")
    return local, start, tp_mesh.get_group()
