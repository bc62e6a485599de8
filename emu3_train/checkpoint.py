"""Checkpoints in the layout of DESIGN.md §4, written atomically, optionally in the background.

    ckpt/step_000300/  .metadata + *.distcp   torch.distributed.checkpoint (model, optimizer)
                       scheduler.json         LR scheduler state
                       loader.json            the data stream's global cursor
                       rng/rank_NNNNN.pt      each rank's RNG states (tensors only: weights_only=True)
                       meta.json              resolved config, step, tokens seen, git sha, versions
    ckpt/latest        the name of the newest complete checkpoint (written last)

A checkpoint is written into ``.tmp_step_N`` and renamed into place only when every shard is on
disk, so a crash (even ``kill -9``) mid-save never leaves a directory that ``latest`` or a reader
could take for complete. With ``async_save`` the shards are written by a background thread from a
staged copy while training goes on, and the checkpoint is published (renamed, ``latest`` updated)
the moment it is complete: DCP's coordinator (rank 0 of the writer group) writes ``.metadata``
only after every rank's shards are written, so rank 0's upload future completing means the whole
checkpoint is on disk, and a callback on that future publishes it from the writer thread. A crash
at any point after that resumes from it; a crash during the write resumes from the previous one.
The next save (or :meth:`CheckpointManager.wait`) still waits for a pending one first. Retention
keeps the newest ``keep_last`` plus every ``keep_every``-th step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from emu3_train.weights import check_fit, dcp_tensor_shapes, state_shapes

SIDE_FILES = ("scheduler.json", "loader.json", "meta.json")
JSON_PARTS = {"scheduler": "scheduler.json", "loader": "loader.json"}  # the state's host-side parts
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt; the message names the file."""


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    """Versions of the libraries that shape a checkpoint's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("emu3-train", "torch", "triton", "numpy", "transformers", "webdataset", "deepspeed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # one process without a process group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return fn(*args, **kwargs)


@dataclass
class TrainState:
    """What the loop itself has done: optimizer steps and tokens of the whole global batch."""

    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens_seen"])


class ModelOptimizer:
    """The model's and optimizer's tensors as one Stateful part, sharded as the model is (DCP)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class JsonState:
    """A plain JSON-able dict as a Stateful part (a loader cursor held by a tool or a test)."""

    def __init__(self, value: dict | None = None):
        self.value = dict(value or {})

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, sd: dict) -> None:
        self.value = dict(sd)


def training_state(model, optimizer, scheduler, loader, train: TrainState | None = None) -> dict:
    """The checkpointed state of a run as Stateful parts: ``model`` (model + optimizer tensors, DCP),
    ``scheduler`` and ``loader`` (JSON side files; ``loader`` may be a plain dict), ``train``
    (:class:`TrainState`, in ``meta.json``)."""
    return {"model": ModelOptimizer(model, optimizer), "scheduler": scheduler,
            "loader": JsonState(loader) if isinstance(loader, dict) else loader,
            "train": train if train is not None else TrainState()}


class CheckpointManager:
    """Saves checkpoints of one run into ``ckpt_dir``; every rank calls :meth:`save` together.

    ``on_durable(path, seconds)`` is called on rank 0 once a checkpoint is published (from the
    background writer thread for async saves): ``seconds`` from the start of the save.
    ``after_launch(step)`` is called once an async save is writing (the fault tests' hook).
    """

    def __init__(self, ckpt_dir: str | os.PathLike, *, async_save: bool = False, keep_last: int = 0,
                 keep_every: int = 0, is_rank0: bool = True,
                 on_durable: Callable[[Path, float], None] | None = None,
                 after_launch: Callable[[int], None] | None = None):
        self.dir = Path(ckpt_dir)
        self.async_save, self.keep_last, self.keep_every = async_save, keep_last, keep_every
        self.is_rank0 = is_rank0
        self.on_durable, self.after_launch = on_durable, after_launch
        self._pending = None  # (future, published event, holder of the publishing error)
        # background writes must not share a process group with the training collectives
        self._group = dist.new_group(backend="gloo") if _world() > 1 else None

    def save(self, state: dict, config: dict) -> Path:
        """Start writing ``state`` (:func:`training_state`'s parts) as ``step_{step:06d}`` of its
        ``train`` part; returns the final path (complete after :meth:`wait`)."""
        self.wait()
        step = state["train"].step
        t0 = time.perf_counter()
        final, tmp = self.dir / f"step_{step:06d}", self.dir / f".tmp_step_{step:06d}"
        if self.is_rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        _barrier()  # the temp dir exists before any rank writes into it
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.is_available()
                    else torch.empty(0, dtype=torch.uint8)}, tmp / "rng" / f"rank_{_rank():05d}.pt")
        if self.is_rank0:
            for part, name in JSON_PARTS.items():
                _write_json(tmp / name, state[part].state_dict())
            _write_json(tmp / "meta.json", {
                **state["train"].state_dict(), "config": config, "git_sha": _git_sha(),
                "versions": _versions(), "world_size": _world(),
            })
        tensors = state["model"].state_dict()
        if self.async_save:
            # Each rank wrote its side files above before its shards: rank 0's future completes
            # after DCP's coordinator gathered every rank's write and wrote .metadata, so by then
            # nothing of this checkpoint is left to write.
            future = _quiet(dcp.async_save, tensors, checkpoint_id=str(tmp), process_group=self._group)
            published, error = threading.Event(), []
            self._pending = (future, published, error)
            if self.is_rank0:
                future.add_done_callback(lambda f: self._publish_when_done(f, tmp, final, t0, published,
                                                                           error))
            else:
                published.set()
            if self.after_launch is not None:
                self.after_launch(step)
        else:
            _quiet(dcp.save, tensors, checkpoint_id=str(tmp), process_group=self._group)
            _barrier()
            if self.is_rank0:
                self._publish(tmp, final, t0)
            _barrier()  # no rank reads `latest` before it is written
        return final

    def _publish_when_done(self, future, tmp: Path, final: Path, t0: float, published: threading.Event,
                           error: list) -> None:
        """Done-callback of rank 0's async save (writer thread): publish unless the write failed."""
        try:
            if future.exception() is None:
                self._publish(tmp, final, t0)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() on the training thread
            error.append(e)
        finally:
            published.set()

    def wait(self) -> None:
        """Block until the pending background save is on disk and published (on every rank)."""
        if self._pending is not None:
            future, published, error = self._pending
            self._pending = None
            future.result()  # re-raises a failed write
            published.wait()
            if error:
                raise error[0]
            _barrier()  # every rank sees the published checkpoint before going on

    def _publish(self, tmp: Path, final: Path, t0: float) -> None:
        """Rank 0: rename the complete ``tmp`` into place, then point ``latest`` at it, then prune."""
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = self.dir / ".latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, self.dir / "latest")
        self._prune()
        if self.on_durable is not None:
            self.on_durable(final, time.perf_counter() - t0)

    def _prune(self) -> None:
        steps = sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)))
        keep = set(steps[-self.keep_last:]) if self.keep_last else set(steps)
        keep |= {s for s in steps if self.keep_every and s % self.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.dir / f"step_{s:06d}", ignore_errors=True)


def save_checkpoint(ckpt_dir: Path, step: int, model, optimizer, scheduler, loader_state: dict,
                    config: dict, tokens_seen: int, is_rank0: bool = True) -> Path:
    """Write one checkpoint synchronously (keeps all others). Returns its path."""
    manager = CheckpointManager(ckpt_dir, is_rank0=is_rank0)
    return manager.save(training_state(model, optimizer, scheduler, loader_state,
                                       TrainState(step, tokens_seen)), config)


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the first missing or truncated file of ``path``."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no .metadata)")
    for name in SIDE_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a torn .metadata fails to unpickle in many ways
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({e})") from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size < size:
            raise CheckpointError(f"{file}: truncated ({file.stat().st_size} of {size} bytes)")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint to load for ``path``: a ``step_*`` dir (verified), or a ``latest`` file / ckpt
    dir, in which case an incomplete newest checkpoint falls back to the previous complete one
    with a warning."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        path = path.parent
    if not (path / "latest").is_file() and not any(_STEP_DIR.match(p.name) for p in path.glob("step_*")):
        verify_checkpoint(path)
        return path
    latest = (path / "latest").read_text().strip() if (path / "latest").is_file() else None
    candidates = sorted((p for p in path.iterdir() if _STEP_DIR.match(p.name)), reverse=True)
    if latest:
        candidates.sort(key=lambda p: p.name != latest)  # the one `latest` names first
    errors = []
    for candidate in candidates:
        try:
            verify_checkpoint(candidate)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for e in errors:
            warnings.warn(f"skipping incomplete checkpoint: {e}; using {candidate}", stacklevel=2)
        return candidate
    raise CheckpointError(f"{path}: no complete checkpoint" + (f" ({'; '.join(errors)})" if errors else ""))


def _check_fit(path: Path, model_sd: dict, optim_sd: dict | None = None) -> None:
    """Fail unless the checkpoint holds exactly this model's tensors (with ``optim_sd``, also its
    optimizer's per-parameter state), shapes included: DCP alone ignores the extras."""
    found = dcp_tensor_shapes(path, ("model.", "optim.state."))
    ours = state_shapes(model_sd, optim_sd)
    parts = [("model.", "this model")] + ([] if optim_sd is None else [("optim.state.", "this optimizer")])
    for prefix, target in parts:  # the model first: its mismatch explains the optimizer's
        check_fit(path, {k: v for k, v in ours.items() if k.startswith(prefix)},
                  {k: v for k, v in found.items() if k.startswith(prefix)}, target=target)


def load_weights(path: str | os.PathLike, model) -> Path:
    """Load model weights only (``checkpoint.init_from``: new optimizer, schedule, data stream) from a
    checkpoint or an HF folder (``interop.hf_load``) into plain or DTensor-sharded parameters."""
    if is_hf_folder(path):
        from emu3_train.interop.hf_load import load_hf_weights  # transformers: only for HF folders

        load_hf_weights(path, model)
        return Path(path)
    path = resolve_checkpoint(path)
    model_sd, _ = get_state_dict(model, [])
    _check_fit(path, model_sd)
    state = {"model": model_sd}
    _quiet(dcp.load, state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    return path


def restore(path: str | os.PathLike, state: dict) -> dict:
    """Load every part of ``state`` (:func:`training_state`) and this rank's RNG from ``path``
    (checked against the model and optimizer first); returns ``meta.json`` plus its ``path``."""
    path = resolve_checkpoint(path)
    part = state["model"]
    tensors = part.state_dict()
    _check_fit(path, tensors["model"], tensors["optim"])
    _quiet(dcp.load, tensors, checkpoint_id=str(path))
    part.load_state_dict(tensors)
    for name, file in JSON_PARTS.items():
        state[name].load_state_dict(json.loads((path / file).read_text()))
    meta = json.loads((path / "meta.json").read_text())
    state["train"].load_state_dict(meta)
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: keep the seeded streams
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and rng["cuda"].numel():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
    meta["path"] = str(path)
    return meta


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler) -> dict:
    """:func:`restore` for tools holding no loader: returns ``meta.json`` plus ``loader`` state."""
    state = training_state(model, optimizer, scheduler, {})
    meta = restore(path, state)
    meta["loader"] = state["loader"].value
    return meta


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A Hugging Face model folder: ``config.json`` + ``*.safetensors`` (as ``interop.hf export``
    writes), not a training checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))
