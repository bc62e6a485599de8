"""Where the Hydra recipes live and how to compose them outside ``@hydra.main`` (tests, tools).

    >>> from emu3_train.recipes import compose
    >>> cfg = compose(["experiment=stage1", "model=emu3_8b", "data=shards", "data.path=/shards"])
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from emu3_train.config import ConfigError, TrainConfig, register_configs


def recipes_dir() -> Path:
    """The ``recipes/`` folder of this checkout (or ``$EMU3_RECIPES``)."""
    env = os.environ.get("EMU3_RECIPES")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "recipes"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"no train.yaml in {path}; set EMU3_RECIPES to the recipes folder")
    return path


def to_config(cfg: DictConfig) -> TrainConfig:
    """A composed DictConfig -> the typed :class:`TrainConfig` (hydra keys dropped).

    Raises :class:`ConfigError` naming the first mandatory field left unset (``???``).
    """
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: set {missing[0]}=... on the command line")
    return OmegaConf.to_object(cfg)


def compose(overrides: list[str] | None = None) -> TrainConfig:
    """Compose ``train.yaml`` with Hydra overrides, as ``python -m emu3_train.train`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return to_config(hydra_compose(config_name="train", overrides=list(overrides or [])))


def run_dir(overrides: list[str] | None = None, suffix: str = "") -> tuple[str, str]:
    """``(run_name, run_dir)`` that ``python -m emu3_train.train`` would use for these overrides.

    ``suffix`` is appended to the composed ``run_name`` (launch scripts add the slurm job id).
    Only ``run_name``, ``out_dir`` and ``hydra.run.dir`` are read: mandatory fields (``data.path``)
    may be left unset, but unknown keys fail as they would in training.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides or []), return_hydra_config=True)
    name = f"{cfg.run_name}{suffix}"
    cfg.run_name = name
    return name, str(OmegaConf.select(cfg, "hydra.run.dir", throw_on_missing=True))


def main(argv: list[str] | None = None) -> int:
    """``python -m emu3_train.recipes run-dir [--suffix S] [--] OVERRIDES...``

    Prints the final run name and the run directory on two lines (launch/torchrun.sh uses them
    for per-rank log folders and to pass one ``run_name=`` to every node).
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m emu3_train.recipes", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rd = sub.add_parser("run-dir", help="print the run name and run directory for these overrides")
    rd.add_argument("--suffix", default="", help="appended to run_name (e.g. -$SLURM_JOB_ID)")
    rd.add_argument("overrides", nargs="*", help="Hydra overrides, as given to emu3_train.train")
    args = parser.parse_args(argv)
    try:
        name, path = run_dir(args.overrides, args.suffix)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: one line, like train.py
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(name)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
