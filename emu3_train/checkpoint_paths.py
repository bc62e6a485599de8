"""What a path given to ``checkpoint.init_from`` or ``checkpoint.resume`` is, checked before any
model is built: one line that says what the path is (missing, an HF folder, a partial save) and
what to do, raised as a :class:`~emu3_train.config.ConfigError` (exit 2).

    check_checkpoint_path("runs/demo-stage1/ckpt/latest", "checkpoint.init_from")
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from emu3_train.checkpoint import (
    _STEP_DIR,
    SIDE_FILES,
    CheckpointError,
    is_hf_folder,
    resolve_checkpoint,
    verify_checkpoint,
)


def _newest_complete(ckpt_dir: Path) -> Path | None:
    """The checkpoint :func:`resolve_checkpoint` would load from ``ckpt_dir``, or None."""
    try:
        with warnings.catch_warnings():  # the fallback warning is for the load, not for this check
            warnings.simplefilter("ignore")
            return resolve_checkpoint(ckpt_dir)
    except (CheckpointError, OSError):
        return None


def check_checkpoint_path(path: str | os.PathLike, field: str) -> None:
    """Fail early, before any model is built, when ``path`` (the value of config ``field``,
    ``checkpoint.init_from`` or ``checkpoint.resume``) is not a checkpoint the loaders can read.

    Raises ``ConfigError`` with one line saying what the path is and what to do: it does not exist,
    is a Hugging Face folder our decoder cannot load (any, for ``resume``), an unfinished
    (``.tmp_step_*``) or incomplete save, a ckpt folder without a complete checkpoint, or (for
    ``resume``) a weights-only checkpoint.
    """
    from emu3_train.config import ConfigError

    path, shown = Path(path), f"{field}={path}"
    resume = field.endswith("resume")
    usage = "a run's ckpt folder, its ckpt/latest or a ckpt/step_N folder"
    if not path.exists():
        if resume:
            raise ConfigError(f"{shown}: does not exist; pass {usage}, or checkpoint.resume=latest to "
                              "continue this run from its own checkpoints")
        raise ConfigError(f"{shown}: does not exist (no run has saved a checkpoint there); run `make "
                          "pretrain-stage1` first or pass INIT=... (checkpoint.init_from=RUN/ckpt/latest, "
                          "a ckpt/step_N folder or a Hugging Face model folder)")
    if is_hf_folder(path):
        if resume:
            raise ConfigError(f"{shown}: a Hugging Face model folder (config.json + *.safetensors) has no "
                              f"optimizer or data state to resume; start from its weights with "
                              f"checkpoint.init_from={path}")
        from emu3_train.interop.hf import InteropError  # transformers: only for HF folders
        from emu3_train.interop.hf_load import check_hf_folder

        try:
            check_hf_folder(path)
        except InteropError as e:
            raise ConfigError(f"{shown}: a Hugging Face model folder this decoder cannot load: {e}") from e
        return
    if path.is_file() and path.name != "latest":
        raise ConfigError(f"{shown}: a file, not a checkpoint; pass {usage}")
    if re.match(r"^\.tmp_step_\d+$", path.name):
        found = _newest_complete(path.parent)
        todo = (f"pass {path.parent} to load its newest complete checkpoint ({found.name})" if found
                else f"{path.parent} has no complete checkpoint: pass another one or start without {field}")
        raise ConfigError(f"{shown}: an unfinished save (the run stopped while writing it; it is never "
                          f"loaded); {todo}")
    found = _newest_complete(path)
    if found is None:
        ckpt_dir = path.parent if path.is_file() else path
        is_ckpt_dir = (ckpt_dir / "latest").is_file() or any(_STEP_DIR.match(p.name)
                                                            for p in ckpt_dir.glob("step_*"))
        if is_ckpt_dir:
            raise ConfigError(f"{shown}: no complete checkpoint in {ckpt_dir} (every save there is "
                              f"unfinished or damaged); pass another checkpoint or start without {field}")
        if not (path / ".metadata").is_file() and not _STEP_DIR.match(path.name) and not any(
                (path / name).is_file() for name in SIDE_FILES):
            raise ConfigError(f"{shown}: not a checkpoint (no .metadata, no step_* folders, no latest); "
                              f"pass {usage}")
        try:
            verify_checkpoint(path)
            why = "unreadable"
        except CheckpointError as e:
            why = ("no .metadata: its save did not finish" if not (path / ".metadata").is_file()
                   else str(e).splitlines()[0])
        other = _newest_complete(path.parent)
        todo = (f"pass {path.parent} to load its newest complete checkpoint ({other.name})" if other
                else f"no complete checkpoint is in {path.parent}: pass another one or start without {field}")
        raise ConfigError(f"{shown}: an incomplete checkpoint ({why}); {todo}")
    if resume:
        try:
            weights_only = json.loads((found / "meta.json").read_text()).get("weights_only", False)
        except (OSError, ValueError, AttributeError):
            weights_only = False
        if weights_only:
            raise ConfigError(f"{shown}: a weights-only checkpoint ({found}, e.g. imported from HF) has no "
                              "optimizer or data state to resume; start from it with "
                              f"checkpoint.init_from={path}")
