"""Where the Hydra recipes live, how to compose them outside ``@hydra.main`` (tests, tools), and
the check that every override and composed key is one the schema defines (also ``+key=``, which
Hydra would add past the schema).

    >>> from emu3_train.recipes import compose
    >>> cfg = compose(["experiment=stage1", "model=emu3_8b", "data=shards", "data.path=/shards"])
"""

from __future__ import annotations

import difflib
import os
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from emu3_train.config import ConfigError, TrainConfig, register_configs


def recipes_dir() -> Path:
    """The ``recipes/`` folder of this checkout (or ``$EMU3_RECIPES``)."""
    env = os.environ.get("EMU3_RECIPES")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "recipes"
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"no train.yaml in {path}; set EMU3_RECIPES to the recipes folder")
    return path


def _schema_fields(cls: type | None = None) -> dict[str, Any]:
    """Field name -> its type (a schema dataclass for a section) of one schema dataclass."""
    hints = typing.get_type_hints(cls or TrainConfig)
    return {f.name: hints[f.name] for f in fields(cls or TrainConfig)}


def _all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    out = []
    for name, hint in _schema_fields(cls).items():
        out.append(prefix + name)
        if is_dataclass(hint):
            out += _all_keys(hint, f"{prefix}{name}.")
    return out


def unknown_key(dotted: str) -> str | None:
    """None if the schema defines ``dotted`` (a field or a section), else a one-line error naming it
    and, when there is one, the closest defined key."""
    parts, i, cls = dotted.split("."), 0, TrainConfig
    while True:
        defined = _schema_fields(cls)
        if parts[i] not in defined:
            break
        if not is_dataclass(defined[parts[i]]) or i == len(parts) - 1:
            return None  # a section, a leaf, or inside a list/Any field (the value's type decides)
        cls, i = defined[parts[i]], i + 1
    guess = None
    near = difflib.get_close_matches(parts[i], list(defined), n=1, cutoff=0.6)
    if near:  # a typo in this part: trainer.max_stepz -> trainer.max_steps, modle.x -> model.x
        candidate = ".".join([*parts[:i], near[0], *parts[i + 1:]])
        guess = candidate if unknown_key(candidate) is None else None
    if guess is None:  # the same name in another section: trainer.lr -> optim.lr
        rest = ".".join(parts[i:])
        guess = next((k for k in _all_keys() if k.endswith(f".{rest}")), None)
    hint = f"; did you mean {guess}?" if guess else ""
    return f"unknown key {dotted} (the schema, emu3_train/config.py, has no such field){hint}"


def _default_groups() -> set[str]:
    """The config groups ``train.yaml`` selects in its defaults list (model, data, parallel, ...)."""
    defaults = OmegaConf.load(recipes_dir() / "train.yaml").get("defaults", [])
    return {str(k).removeprefix("override ").strip() for d in defaults if isinstance(d, DictConfig)
            for k in d}


def _scan_overrides(overrides: list[str]) -> tuple[list[str], tuple[bool, str, str] | None]:
    """``(overrides with +GROUP= as GROUP=, None)``, or ``(overrides, (added, key, message))`` for
    the first one naming a key the schema does not define (``added``: written with ``+``/``++``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return list(overrides), None  # Hydra reports its own syntax errors
    groups = _default_groups()
    out = []
    for line, o in zip(overrides, parsed):
        key = o.key_or_group
        is_group = o.package is not None or "/" in key or (recipes_dir() / key).is_dir()
        if key == "hydra" or key.startswith("hydra.") or is_group:
            out.append(line[1:] if o.is_add() and key in groups and o.package is None else line)
            continue
        message = unknown_key(key)
        if message:
            return list(overrides), (o.is_add() or o.is_force_add(), key, message)
        out.append(line)
    return out, None


def check_overrides(overrides: list[str]) -> list[str]:
    """Reject (:class:`ConfigError`, one line) an override of a key the schema does not define, also
    one added with ``+``/``++``; ``hydra.*`` keys and group selections pass. Returns the overrides with
    ``+GROUP=NAME`` for a group of train.yaml's defaults written as ``GROUP=NAME`` (the same choice;
    Hydra itself would refuse a second value for the group). Unparsable overrides are left to Hydra.
    """
    out, bad = _scan_overrides(overrides)
    if bad:
        raise ConfigError(bad[2])
    return out


def _check_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Reject a key of the composed config that the schema does not define (``+key=`` adds keys
    past the schema's struct flag)."""
    for key in cfg:
        name = f"{prefix}{key}"
        message = unknown_key(name)
        if message:
            raise ConfigError(message)
        if is_dataclass(OmegaConf.get_type(cfg, key)):  # a schema section (other values are leaves)
            _check_keys(cfg[key], f"{name}.")


def to_config(cfg: DictConfig) -> TrainConfig:
    """A composed DictConfig -> the typed :class:`TrainConfig` (hydra keys dropped).

    Raises :class:`ConfigError` naming the first key the schema does not define, or the first
    mandatory field left unset (``???``).
    """
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    _check_keys(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: set {missing[0]}=... on the command line")
    return OmegaConf.to_object(cfg)


def _hydra_compose(overrides: list[str] | None, return_hydra_config: bool = False) -> DictConfig:
    """Hydra's compose of ``train.yaml``, after :func:`check_overrides`. A plain override of an unknown
    key raises Hydra's ConfigCompositionException, worded without Hydra's advice to add it with ``+``
    (the schema would reject it); an added one raises :class:`ConfigError`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import ConfigCompositionException

    overrides, bad = _scan_overrides(list(overrides or []))
    if bad:
        added, key, message = bad
        if added:
            raise ConfigError(message)
        raise ConfigCompositionException(f"Could not override '{key}': {message}")
    register_configs()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides,
                             return_hydra_config=return_hydra_config)


def compose(overrides: list[str] | None = None) -> TrainConfig:
    """Compose ``train.yaml`` with Hydra overrides, as ``python -m emu3_train.train`` would."""
    return to_config(_hydra_compose(overrides))


def run_dir(overrides: list[str] | None = None, suffix: str = "") -> tuple[str, str]:
    """``(run_name, run_dir)`` that ``python -m emu3_train.train`` would use for these overrides.

    ``suffix`` is appended to the composed ``run_name`` (launch scripts add the slurm job id).
    Only ``run_name``, ``out_dir`` and ``hydra.run.dir`` are read: mandatory fields (``data.path``)
    may be left unset, but unknown keys fail as they would in training.
    """
    cfg = _hydra_compose(overrides, return_hydra_config=True)
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
