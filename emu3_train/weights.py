"""Does a checkpoint fit this model? Every load compares the full key set and shapes both ways.

DCP's ``load`` reads only the keys the target state dict asks for, so a checkpoint with more layers
than the model loads silently and partially; ``set_model_state_dict(strict=True)`` cannot see the
surplus either. Every loader (``checkpoint.init_from``, ``checkpoint.resume``, the HF folder
loader) therefore compares ``{name: shape}`` of what the model holds against what the source holds
before reading any tensor, and fails with one line naming the first missing, the first unexpected
and the first mismatched tensor and how many of each:

    check_fit("ckpt/step_000300", expected=model_shapes, found=dcp_tensor_shapes(path, "model."))
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from emu3_train.config import ConfigError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class WeightsMismatchError(ConfigError):
    """A checkpoint or HF folder holds other tensors than this model: a config problem (rc 2)."""


def _natural(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _layers(names: Iterable[str]) -> int:
    """Number of decoder layers the names imply (largest ``layers.N`` index + 1)."""
    return max((int(m.group(1)) + 1 for n in names if (m := _LAYER.search(n))), default=0)


def _shape(shape) -> list[int]:
    return [int(s) for s in shape]


def check_fit(source: str | os.PathLike, expected: Mapping[str, Iterable[int]],
              found: Mapping[str, Iterable[int]], what: str = "the checkpoint",
              target: str = "this model") -> None:
    """Raise :class:`WeightsMismatchError` unless ``found`` (the source's ``{name: shape}``) has
    exactly the names of ``expected`` (``target``'s) with the same shapes.

    The message is one line starting with ``source``: how many tensors are missing, unexpected and
    of another shape, the first of each (missing and mismatched in the model's order, unexpected
    in layer order), and both layer counts when they differ (with ``model.num_layers=N`` to set
    when ``target`` is this model).
    """
    expected = {k: _shape(v) for k, v in expected.items()}
    found = {k: _shape(v) for k, v in found.items()}
    missing = [k for k in expected if k not in found]
    unexpected = sorted((k for k in found if k not in expected), key=_natural)
    mismatched = [k for k in expected if k in found and found[k] != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{what} has no tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        parts.append(f"{what} has tensor {unexpected[0]!r} that {target} lacks "
                     f"({len(unexpected)} unexpected)")
    if mismatched:
        k = mismatched[0]
        parts.append(f"tensor {k!r} has shape {found[k]} in {what} but {expected[k]} in {target} "
                     f"({len(mismatched)} of another shape)")
    ours, theirs = _layers(expected), _layers(found)
    if ours != theirs:
        fix = f": set model.num_layers={theirs}" if target == "this model" else ""
        parts.append(f"{what} has {theirs} layers, {target} {ours}{fix}")
    raise WeightsMismatchError(f"{source}: does not fit {target}: " + "; ".join(parts))


def dcp_tensor_shapes(path: str | os.PathLike, prefixes: tuple[str, ...]) -> dict[str, list[int]]:
    """``{flattened key: shape}`` of the tensors a DCP checkpoint holds under ``prefixes``
    (from ``.metadata`` alone: no shard is read)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: _shape(v.size) for k, v in saved.items()
            if isinstance(v, TensorStorageMetadata) and k.startswith(prefixes)}


def state_shapes(model_sd: Mapping[str, torch.Tensor],
                 optim_sd: Mapping | None = None) -> dict[str, list[int]]:
    """``{flattened key: global shape}`` of the tensors a load into these state dicts needs, keyed
    as DCP flattens ``{"model": model_sd, "optim": optim_sd}``: ``model.<fqn>`` and, for the
    optimizer, its per-parameter state ``optim.state.<fqn>.<name>`` (``param_groups`` hold no
    tensors). A DTensor's shape is its global shape, so any layout compares equal."""
    out = {f"model.{k}": _shape(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    for fqn, stats in ((optim_sd or {}).get("state") or {}).items():
        for name, v in stats.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.state.{fqn}.{name}"] = _shape(v.shape)
    return out
