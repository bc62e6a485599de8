"""This rank's model: built on the meta device, parallelized, then only its shards allocated.

Every rank used to build the whole fp32 model on its device before FSDP2 sharded it; now nothing
of the model exists until the passes have decided what this rank holds (torchtitan's order):

    Emu3CausalLM on meta -> parallelize (TP, CP, recompute, compile, FSDP2) -> to_empty(device)
    -> the eager init's values (model/init.py), or the weights of a checkpoint or an HF folder
       loaded into the shards (checkpoint.load_weights)

    model, plan = build_model(cfg, vocab_size, dims, mesh, device, rank)
"""

from __future__ import annotations

import os

import torch
from torch.distributed.device_mesh import DeviceMesh

from emu3_train.checkpoint import load_weights
from emu3_train.config import TrainConfig
from emu3_train.model.decoder import Emu3CausalLM
from emu3_train.model.init import materialize
from emu3_train.parallel.dims import ParallelDims
from emu3_train.parallel.parallelize import parallelize
from emu3_train.parallel.step_plan import StepPlan


def build_model(cfg: TrainConfig, vocab_size: int, dims: ParallelDims, mesh: DeviceMesh | None,
                device: torch.device, rank: int = 0, weights: str | os.PathLike | None = None,
                init: bool = True) -> tuple[Emu3CausalLM, StepPlan]:
    """(model, step plan) of global rank ``rank``. The shards are initialized as the eager
    ``torch.manual_seed(cfg.trainer.seed); Emu3CausalLM(cfg.model, vocab_size)`` would be, or
    filled from ``weights`` (``checkpoint.init_from``: a checkpoint or an HF folder, checked to
    hold exactly this model's tensors and shapes), or left uninitialized with
    ``init=False`` (a full resume overwrites every tensor)."""
    with torch.device("meta"):
        model = Emu3CausalLM(cfg.model, vocab_size)
    plan = parallelize(model, dims, mesh, cfg, device, rank)
    materialize(model, device, seed=cfg.trainer.seed if init and weights is None else None)
    if weights is not None:
        load_weights(weights, model)  # reads only this rank's shards (DCP; safetensors rows)
    return model, plan
