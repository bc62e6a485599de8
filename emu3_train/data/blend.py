"""Several shard directories mixed by weight (``data.path`` + ``data.blend``).

``data.blend`` is a list of ``"WEIGHT:DIR"`` strings; DIR is relative to ``data.path`` (or
absolute); an empty list means ``data.path`` alone. A weight is the source's share of the
*tokens* drawn into the row stream (weights need not sum to 1; they are normalized):

    data.path=/shards data.blend='["0.6:pairs-512", "0.4:/text/shards"]'

Blending happens at document level, before packing, so text from one source fills the rows
around the vision blocks of another: documents are drawn one at a time from the source whose
token share lags its weight the most (:class:`TokenBlend`, exact integer arithmetic), which keeps
every source within one document of its weight at every point of the stream.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from functools import reduce
from pathlib import Path

from emu3_train.data.stream import ShardSet
from emu3_train.vocab import Vocab


def parse_blend(path: str | os.PathLike, blend) -> list[tuple[Path, float]]:
    """``[(directory, weight)]`` of ``data.path`` and ``data.blend``; ``ValueError`` naming the entry."""
    if not blend:
        return [(Path(path), 1.0)]
    if isinstance(blend, str):
        raise ValueError(f"data.blend={blend!r}: expected a list of 'WEIGHT:DIR' strings")
    out: list[tuple[Path, float]] = []
    for i, entry in enumerate(blend):
        weight, sep, where = str(entry).partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = float("nan")
        if not sep or not where or not (math.isfinite(w) and w > 0):
            raise ValueError(f"data.blend[{i}]={entry!r}: expected 'WEIGHT:DIR' with a positive weight, "
                             "e.g. '0.7:pairs' (DIR relative to data.path, or absolute)")
        out.append((Path(path) / where, w))
    dirs = [d for d, _ in out]
    if len(set(dirs)) != len(dirs):
        raise ValueError(f"data.blend names a directory twice: {[str(d) for d in dirs]}")
    return out


def open_blend(path: str | os.PathLike, blend, vocab: Vocab,
               on_bad_sample: str = "error") -> tuple[list[ShardSet], list[float]]:
    """The ShardSets and weights of ``data.path`` + ``data.blend`` (:func:`parse_blend`)."""
    pairs = parse_blend(path, blend)
    return [ShardSet(d, vocab, on_bad_sample) for d, _ in pairs], [w for _, w in pairs]


class TokenBlend:
    """Which source gives the next document, given the tokens each has given so far.

    Weights become exact integer quotas (``Fraction`` of their decimal repr), so the choice is
    the same on every machine: ``argmax_s quota_s * total - sum(quotas) * tokens_s`` (the most
    lagging source; ties go to the lower index).
    """

    def __init__(self, weights):
        weights = [float(w) for w in weights]
        if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive numbers, got {weights}")
        fractions = [Fraction(repr(w)) for w in weights]
        denominator = reduce(math.lcm, (f.denominator for f in fractions), 1)
        quotas = [int(f * denominator) for f in fractions]
        g = reduce(math.gcd, quotas)
        self.weights = weights
        self.quotas = [q // g for q in quotas]
        self.total_quota = sum(self.quotas)

    def pick(self, tokens: list[int]) -> int:
        """Index of the source to draw from, ``tokens[s]``: tokens drawn from source s so far."""
        if len(self.quotas) == 1:
            return 0
        total = sum(tokens)
        lag = [q * total - self.total_quota * t for q, t in zip(self.quotas, tokens)]
        return lag.index(max(lag))
