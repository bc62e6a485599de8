"""Who does which input: worker identity from the launcher, input lists, and the bad-item policy.

Every offline tool runs as N independent workers that never talk to each other: worker ``i`` of
``N`` takes input shards ``i, i+N, i+2N, ...`` of the sorted input list, writes one output shard
set per input (``shard_output``), and skips inputs whose output is already complete. So any
number of workers can start, die and rerun in any order.

Worker identity (first match wins): ``--rank/--world-size``; torchrun's ``RANK``/``WORLD_SIZE``;
a slurm array job (``SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``,
times ``SLURM_NTASKS`` when each array task also runs ``srun`` tasks); a plain slurm step
(``SLURM_PROCID``/``SLURM_NTASKS``); else worker 0 of 1. The device of ``--device auto`` is
``cuda:LOCAL_RANK`` (``SLURM_LOCALID`` under srun) when CUDA is present, else the CPU.

    torchrun --nproc-per-node 8 -m emu3_train.data_pipelines.tokenize_images --input 'tars/{000..999}.tar' ...
    sbatch --array=0-63 launch/tokenize.sbatch ...        # 64 array tasks x (srun over its GPUs)
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ON_ERROR = ("skip", "error")
MAX_LISTED = 100  # bad items named one by one in a summary / stats file


@dataclass(frozen=True)
class Worker:
    rank: int
    world_size: int
    source: str  # where the identity came from: "args", "torchrun", "slurm-array", "slurm", "single"

    def __str__(self) -> str:
        return f"worker {self.rank}/{self.world_size} ({self.source})"


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def add_worker_args(parser, bad: str = "bad items") -> None:
    """The flags every offline tool shares: ``--on-error`` (what to do with ``bad``), ``--rank`` and
    ``--world-size`` (default: torchrun's or slurm's environment, see :func:`worker_identity`)."""
    parser.add_argument("--on-error", choices=ON_ERROR, default="skip",
                        help=f"{bad}: skip and count them (default), or stop with one error line")
    parser.add_argument("--rank", type=int, default=None,
                        help="this worker (default: torchrun/slurm env, else 0)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="number of workers (default: torchrun/slurm env, else 1)")


def worker_identity(rank: int | None = None, world_size: int | None = None,
                    env: Mapping[str, str] | None = None) -> Worker:
    """This process's :class:`Worker` (module docstring); ``ValueError`` on an impossible pair."""
    env = os.environ if env is None else env
    if rank is not None or world_size is not None:
        worker = Worker(0 if rank is None else rank, 1 if world_size is None else world_size, "args")
    elif _env_int(env, "WORLD_SIZE") is not None:
        worker = Worker(_env_int(env, "RANK") or 0, _env_int(env, "WORLD_SIZE"), "torchrun")
    elif _env_int(env, "SLURM_ARRAY_TASK_COUNT") is not None:
        task = (_env_int(env, "SLURM_ARRAY_TASK_ID") or 0) - (_env_int(env, "SLURM_ARRAY_TASK_MIN") or 0)
        ntasks, procid = _env_int(env, "SLURM_NTASKS") or 1, _env_int(env, "SLURM_PROCID") or 0
        worker = Worker(task * ntasks + procid, _env_int(env, "SLURM_ARRAY_TASK_COUNT") * ntasks,
                        "slurm-array")
    elif _env_int(env, "SLURM_NTASKS") is not None:
        worker = Worker(_env_int(env, "SLURM_PROCID") or 0, _env_int(env, "SLURM_NTASKS"), "slurm")
    else:
        worker = Worker(0, 1, "single")
    if worker.world_size < 1 or not 0 <= worker.rank < worker.world_size:
        raise ValueError(f"rank {worker.rank} is not in [0, world size {worker.world_size}) "
                         f"(from {worker.source})")
    return worker


def local_device(device: str = "auto", env: Mapping[str, str] | None = None) -> str:
    """``device``, with ``auto`` resolved to this worker's GPU (``cuda:LOCAL_RANK``) or ``cpu``."""
    if device != "auto":
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    env = os.environ if env is None else env
    local = _env_int(env, "LOCAL_RANK")
    local = _env_int(env, "SLURM_LOCALID") if local is None else local
    return f"cuda:{(local or 0) % torch.cuda.device_count()}"


def expand_inputs(spec: str | os.PathLike | Sequence, suffixes: Sequence[str]) -> list[Path]:
    """Sorted input files of ``spec``: a directory (its files ending in ``suffixes``, recursively), a
    brace pattern (``tars/{00000..00099}.tar``), a glob, a file, or a list of these.

    ``FileNotFoundError`` naming what matched nothing; ``ValueError`` when two inputs share a
    name (outputs are named after inputs).
    """
    import braceexpand

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    suffixes = tuple(s.lower() for s in suffixes)
    found: list[Path] = []
    for one in specs:
        matched: list[Path] = []
        for pattern in braceexpand.braceexpand(str(one)):
            path = Path(pattern)
            if path.is_dir():
                matched += sorted(p for p in path.rglob("*") if p.is_file()
                                  and p.name.lower().endswith(suffixes) and not p.name.startswith("."))
            elif path.is_file():
                matched.append(path)
            else:
                matched += sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        if not matched:
            raise FileNotFoundError(f"no input files ({', '.join(suffixes)}) match {one}")
        found += matched
    found = sorted(set(found))
    names = Counter(input_name(p) for p in found)
    dup = sorted(n for n, c in names.items() if c > 1)
    if dup:
        same = [str(p) for p in found if input_name(p) == dup[0]]
        raise ValueError(f"{len(dup)} input names occur twice (outputs are named after inputs), e.g. "
                         f"{dup[0]!r}: {same[:2]}; give inputs with distinct file names")
    return found


def input_name(path: str | os.PathLike) -> str:
    """Output name of an input file: its name without suffixes (``00012.tar`` -> ``00012``)."""
    name = Path(path).name
    for suffix in (".gz", ".tar", ".jsonl", ".parquet", ".txt", ".json"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name.replace(".", "_").replace(" ", "_")


def my_share(inputs: Sequence, worker: Worker) -> list:
    """The inputs worker ``rank`` of ``world_size`` handles: ``inputs[rank::world_size]``."""
    return list(inputs[worker.rank::worker.world_size])


@dataclass
class Skips:
    """Bad and filtered items, counted by reason and named (the first :data:`MAX_LISTED`).

    ``on_error="error"`` turns a *bad* item (undecodable, no caption, ...) into a ``ValueError``
    naming it; *filtered* items (:meth:`filtered`: too small, too long, ...) are only counted.
    """

    on_error: str = "skip"
    counts: Counter = field(default_factory=Counter)
    items: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error is {self.on_error!r}; expected one of {list(ON_ERROR)}")

    def bad(self, reason: str, where: str, message: str) -> None:
        """A bad item at ``where`` (input shard and key): raise under ``error``, else count it."""
        if self.on_error == "error":
            raise ValueError(f"{where}: {message} (--on-error skip skips and counts such items)")
        self._add(reason, where, message)

    def filtered(self, reason: str, where: str, message: str = "") -> None:
        """An item a filter dropped (never an error)."""
        self._add(reason, where, message)

    def _add(self, reason: str, where: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.items) < MAX_LISTED:
            self.items.append(f"{where}: {reason}" + (f": {message}" if message else ""))

    def merge(self, other: Skips) -> None:
        self.counts.update(other.counts)
        self.items += other.items[: max(0, MAX_LISTED - len(self.items))]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``"3 skipped (undecodable 2, empty_caption 1)"`` or ``"0 skipped"``."""
        if not self.counts:
            return "0 skipped"
        parts = ", ".join(f"{r} {c}" for r, c in sorted(self.counts.items()))
        return f"{self.total} skipped ({parts})"
