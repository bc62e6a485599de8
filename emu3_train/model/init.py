"""Build the model on the meta device and materialize only this rank's shards (torchtitan style).

Every rank used to build the whole fp32 model on its device before FSDP2 sharded it (~34 GB per
rank for emu3_8b). Now the trainer builds it under ``torch.device("meta")`` (no memory), applies
the parallelism passes, then :func:`materialize` allocates the local shards (``to_empty``) and
fills them with exactly the values of the eager init: each parameter's full value is drawn on the
CPU from the seeded generator in the order ``Emu3CausalLM(cfg, V)`` draws them (including the
default ``nn.Linear``/``nn.Embedding`` inits its constructor runs and ``init_weights`` overwrites),
one parameter at a time, and only this rank's slice of it is kept. One process therefore gets a
bitwise copy of ``torch.manual_seed(seed); Emu3CausalLM(cfg, V)``, and the shards of any layout
gather to it. Peak host memory is the local shards plus one full parameter.

    with torch.device("meta"):
        model = Emu3CausalLM(cfg.model, vocab_size)
    plan = parallelize(model, dims, mesh, cfg, device, rank)
    materialize(model, device, seed=cfg.trainer.seed)       # or seed=None, then load a checkpoint
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from emu3_train.model.decoder import Emu3CausalLM, RMSNorm


def _default_init(module: nn.Module, g: torch.Generator) -> None:
    """Draw (and drop) what ``nn.Linear``/``nn.Embedding``'s constructors draw (``reset_parameters``)."""
    if isinstance(module, nn.Linear):
        nn.init.kaiming_uniform_(torch.empty(module.weight.shape), a=math.sqrt(5), generator=g)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(torch.empty(module.weight.shape), generator=g)


def init_values(model: Emu3CausalLM, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, full fp32 CPU value) of the eager init, in the order it draws them."""
    g = torch.Generator().manual_seed(seed)
    decoder, std = model.model, model.model.init_std
    for module in decoder.modules():  # Decoder.__init__ builds its modules in registration order
        _default_init(module, g)
    for name, module in decoder.named_modules():  # Decoder.init_weights
        prefix = f"model.{name}." if name else "model."
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield prefix + "weight", nn.init.normal_(torch.empty(module.weight.shape), 0.0, std, generator=g)
        elif isinstance(module, RMSNorm):
            yield prefix + "weight", torch.ones(module.weight.shape)
    _default_init(model.lm_head, g)  # Emu3CausalLM.__init__: the head, then its normal_ init
    yield "lm_head.weight", nn.init.normal_(torch.empty(model.lm_head.weight.shape), 0.0, std, generator=g)


@torch.no_grad()
def copy_full_value(param: torch.Tensor, full: torch.Tensor) -> None:
    """Fill ``param`` (plain, or a DTensor shard of any layout) with its slice of ``full``."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank slices its own shard of ``full``, no communication
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


@torch.no_grad()
def materialize(model: Emu3CausalLM, device: torch.device, seed: int | None) -> None:
    """Allocate the (local shards of the) parameters on ``device``; with ``seed``, initialize them
    to the eager init's values (None: leave them uninitialized, for a checkpoint load)."""
    model.to_empty(device=device)
    if seed is None:
        return
    params = dict(model.named_parameters())
    for name, full in init_values(model, seed):
        copy_full_value(params.pop(name), full.to(device))
    if params:
        raise RuntimeError(f"materialize: no init for {sorted(params)}: add them to model/init.py")
