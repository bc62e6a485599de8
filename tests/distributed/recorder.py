"""Record every collective a block of code issues, and every host sync, on this process.

    with CollectiveRecorder() as rec, HostSyncCounter() as syncs:
        trainer.step_once()
    rec.calls  -> [Collective(name="all_reduce", group_size=2, devices=("cpu",), ...), ...]
    syncs.count -> number of tensor-to-host reads (``.item()``, ``float()``, ``.tolist()``)

``CollectiveRecorder`` wraps the c10d functions of ``torch.distributed`` (FSDP2 and our code call
them through the module, so the wrapper sees them) and the functional collectives DTensor's
redistributions call (``torch.distributed._functional_collectives``, through the module too).
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils._python_dispatch import TorchDispatchMode

FUNCTIONAL = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_gather_tensor",
              "all_gather_tensor_autograd", "reduce_scatter_tensor", "reduce_scatter_tensor_autograd",
              "all_to_all_single", "all_to_all_single_autograd", "broadcast", "permute_tensor")
C10D = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
        "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "all_to_all", "all_to_all_single",
        "barrier", "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list")


@dataclass(frozen=True)
class Collective:
    name: str
    group_size: int
    devices: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [x for x in a if isinstance(x, torch.Tensor)]
    return out


class CollectiveRecorder:
    """Context manager: :attr:`calls` lists the collectives issued inside it, in order."""

    def __init__(self):
        self.calls: list[Collective] = []
        self._saved: list = []

    def _wrap(self, name, fn):
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            size = dist.get_world_size(group) if dist.is_initialized() and not name.startswith("f.") else -1
            ts = _tensors(args, kwargs)
            self.calls.append(Collective(name, size, tuple(t.device.type for t in ts),
                                         tuple(tuple(t.shape) for t in ts)))
            return fn(*args, **kwargs)
        return recorded

    def __enter__(self) -> CollectiveRecorder:
        for module, names, prefix in ((dist, C10D, ""), (funcol, FUNCTIONAL, "f.")):
            for name in names:
                if hasattr(module, name):
                    fn = getattr(module, name)
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(prefix + name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)

    def names(self) -> list[str]:
        return [c.name for c in self.calls]


class HostSyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``aten._local_scalar_dense``: ``.item()``,
    ``float(t)``, ``bool(t)``), the operations that make the host wait for a GPU; :attr:`where`
    holds the code location of each."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []

    @property
    def count(self) -> int:
        return len(self.where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.where.append("".join(traceback.format_stack(limit=8)[:-1]))
        return func(*args, **(kwargs or {}))
