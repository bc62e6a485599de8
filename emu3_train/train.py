"""Entry point: ``python -m emu3_train.train [hydra overrides]`` (also under torchrun).

    python -m emu3_train.train experiment=demo
    python -m emu3_train.train experiment=stage1 model=emu3_8b data=shards data.path=/path/to/shards
    python -m emu3_train.train experiment=demo trainer.max_steps=50 wandb.mode=disabled

Configuration and data errors end the run before any tensor is allocated with one line naming the
field or file, and exit code 2.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from emu3_train.config import ConfigError, check_checkpoint_paths, register_configs
from emu3_train.data.index import ShardError
from emu3_train.recipes import check_overrides, recipes_dir, to_config
from emu3_train.trainer import TrainingError, run_training

# Only rank 0 writes Hydra's output files (NOTES.md).
_NON_ZERO_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout",
                            "hydra/hydra_logging=disabled"]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=str(recipes_dir()), config_name="train", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = to_config(dcfg)
        check_checkpoint_paths(cfg, run_dir)  # what init_from / resume would load: before any tensor
    except ConfigError as e:
        _fail(str(e))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    try:
        run_training(cfg, run_dir, rank, world)
    except (ConfigError, ShardError, FileNotFoundError, TrainingError) as e:
        _fail(str(e) if world == 1 else f"rank {rank}: {e}")
    except Exception as e:  # noqa: BLE001 - name the rank, keep the traceback for torchrun's summary
        print(f"rank {rank} failed: {type(e).__name__}: {e}\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        ErrorHandler().record_exception(e)  # torchrun's "Root Cause" then shows this traceback
        sys.exit(1)


def _check_argv() -> None:
    """Reject overrides of keys the schema lacks before Hydra composes (Hydra's own error for a plain
    one would advise adding it with ``+``, which the schema rejects too); ``+GROUP=`` of a default
    group becomes ``GROUP=``."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    overrides = list(args.overrides or [])
    try:
        fixed = dict(zip(overrides, check_overrides(overrides)))
    except ConfigError as e:
        _fail(str(e))
    sys.argv = [sys.argv[0], *(fixed.get(a, a) for a in sys.argv[1:])]


@record
def main() -> None:
    # one process without a process group is intended; DCP's background writer warns regardless
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    register_configs()
    _check_argv()
    if int(os.environ.get("RANK", 0)) != 0:
        sys.argv += _NON_ZERO_RANK_OVERRIDES
    _hydra_main()


if __name__ == "__main__":
    main()
