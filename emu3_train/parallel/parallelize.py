"""Apply the parallelism passes to a plain model, in one place and one order (torchtitan style):

    tensor + sequence parallel (mesh["tp"])  ->  context parallel (mesh["cp"])
    ->  activation recompute  ->  torch.compile per block (trainer.compile)  ->  FSDP2 (mesh["dp_cp"])

The model is built plain on every rank with the same seed, so the passes only re-lay out
identical weights. Parameter names never change (HF names), so DCP checkpoints reshard across
any (dp, cp, tp).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

from emu3_train.config import TrainConfig
from emu3_train.model.decoder import apply_compile, apply_recompute
from emu3_train.parallel.data_parallel import apply_fsdp
from emu3_train.parallel.dims import ParallelDims


def parallelize(model, dims: ParallelDims, mesh: DeviceMesh | None, cfg: TrainConfig) -> None:
    """Apply every pass the layout needs, in order, in place."""
    if dims.tp > 1:
        from emu3_train.parallel.tensor_parallel import apply_tp

        apply_tp(model, mesh["tp"], sequence_parallel=True)
    if dims.cp > 1:
        from emu3_train.parallel.context_parallel import apply_cp

        apply_cp(model, mesh["cp"], cfg.parallel.cp_impl)
    apply_recompute(model, cfg.model.recompute)
    if cfg.trainer.compile:
        apply_compile(model)
    if dims.dp * dims.cp > 1:
        apply_fsdp(model, mesh["dp_cp"], bf16=cfg.trainer.precision == "bf16")
