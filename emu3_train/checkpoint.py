"""Checkpoints in the layout of DESIGN.md §4, written atomically.

    ckpt/step_000300/  .metadata + *.distcp   torch.distributed.checkpoint (model, optimizer)
                       scheduler.json         LR scheduler state
                       loader.json            the data stream's global cursor
                       rng.pt                 RNG states (tensors only: loads with weights_only=True)
                       meta.json              resolved config, step, tokens seen, git sha, versions
    ckpt/latest        the name of the newest complete checkpoint (written last)

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash
mid-save never leaves a directory that ``latest`` (or a reader) could take for complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, loader_state: dict,
                    config: dict, tokens_seen: int, is_rank0: bool = True) -> Path:
    """Write ``ckpt_dir/step_{step:06d}`` atomically and point ``latest`` at it. Returns its path."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp_step_{step:06d}"
    if is_rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, tmp)
    if is_rank0:
        _write_json(tmp / "scheduler.json", scheduler.state_dict())
        _write_json(tmp / "loader.json", loader_state)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.is_available()
                    else torch.empty(0, dtype=torch.uint8)}, tmp / "rng.pt")
        _write_json(tmp / "meta.json", {
            "step": step, "tokens_seen": tokens_seen, "config": config, "git_sha": _git_sha(),
            "versions": {"torch": torch.__version__},
        })
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = ckpt_dir / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, ckpt_dir / "latest")
    return final


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory from ``path``: a ``step_*`` dir, a ``latest`` file, or a ckpt dir."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        path = path.parent / path.read_text().strip()
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no .metadata)")
    return path


def _check_shapes(path: Path, state: dict) -> None:
    """Fail naming the first tensor whose shape differs from (or is missing in) the checkpoint."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for prefix, sub in state.items():
        for key, value in sub.items():
            if not isinstance(value, torch.Tensor):
                continue
            name = f"{prefix}.{key}"
            if name not in saved:
                raise ValueError(f"{path}: checkpoint has no tensor {name!r}")
            shape = tuple(getattr(saved[name], "size", ()))
            if shape != tuple(value.shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {list(shape)} in the checkpoint "
                                 f"but {list(value.shape)} in this model")


def _dcp(fn, state: dict, path: Path) -> None:
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, checkpoint_id=str(path))


def load_weights(path: str | os.PathLike, model) -> Path:
    """Load model weights only (``checkpoint.init_from``): new optimizer, schedule and data stream."""
    path = resolve_checkpoint(path)
    model_sd, _ = get_state_dict(model, [])
    state = {"model": model_sd}
    _check_shapes(path, state)
    _dcp(dcp.load, state, path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    return path


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and RNG; returns ``meta.json`` plus ``loader`` state."""
    path = resolve_checkpoint(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    _check_shapes(path, {"model": model_sd})
    _dcp(dcp.load, state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"].numel():
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    meta = json.loads((path / "meta.json").read_text())
    meta["loader"] = json.loads((path / "loader.json").read_text())
    meta["path"] = str(path)
    return meta
