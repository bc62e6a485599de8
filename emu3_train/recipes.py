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
