"""Preference pairs in shards (DPO): matching the two documents of a pair, and packing them as one.

A pair is two samples of one shard whose json has the same ``"pair"`` id, one with ``"role":
"chosen"``, the other ``"rejected"`` (``data.format``). The index stores per sample
``pair_role`` (0 none, 1 chosen, 2 rejected) and ``pair_partner`` (the other sample's position in
the shard, -1 none): :func:`match_pairs` builds them and names the shard and key of a pair with a
missing or doubled partner, a member without a vision block, or a ``ref_logp`` on one member only.

**Packing.** The stream (:class:`PairUnits`, used by ``plan.RowStream``) draws a pair once, as
its chosen document, with the length of both documents together and one rigid "block" over all
of it, so packing places it whole in one row (never cut, never split across rows, micro-batches,
ranks or steps); the rejected document is never drawn on its own. When a batch is read, the
pair's piece becomes two pieces, the chosen document then the rejected one (:meth:`PairUnits.expand`).
The row plan, the global cursor and the resume state are those of any other stream: a pair is a
document of the plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emu3_train.data.format import PAIR_ROLES


def match_pairs(where: Sequence[str], metas: Sequence[dict], has_block: Sequence[bool],
                error: type[Exception] = ValueError) -> tuple[np.ndarray, np.ndarray]:
    """``(pair_role int8 [N], pair_partner int64 [N])`` of one shard's samples (module docstring).

    ``where[i]``: "shard: sample 'key'" for errors; ``metas[i]``: the checked json; ``has_block[i]``:
    whether the document has a vision block. Raises ``error`` naming the first bad sample.
    """
    n = len(metas)
    role, partner = np.zeros(n, np.int8), np.full(n, -1, np.int64)
    by_pair: dict[str, dict[str, int]] = {}
    for i, meta in enumerate(metas):
        if "pair" not in meta:
            if "ref_logp" in meta:
                raise error(f"{where[i]}: field 'ref_logp' without a 'pair' (only pair documents have one)")
            continue
        members = by_pair.setdefault(meta["pair"], {})
        if meta["role"] in members:
            raise error(f"{where[i]}: pair {meta['pair']!r} has a second {meta['role']!r} document "
                        f"(the first is {where[members[meta['role']]]})")
        if not has_block[i]:
            raise error(f"{where[i]}: the {meta['role']} document of pair {meta['pair']!r} has no vision "
                        "block (a preference pair compares two images)")
        members[meta["role"]] = i
    for pair, members in by_pair.items():
        if len(members) != 2:
            (present, i), = members.items()
            missing = PAIR_ROLES[1 - PAIR_ROLES.index(present)]
            raise error(f"{where[i]}: pair {pair!r} has no {missing!r} partner in this shard (both documents "
                        "of a pair must lie in one shard)")
        c, r = members["chosen"], members["rejected"]
        if ("ref_logp" in metas[c]) != ("ref_logp" in metas[r]):
            i = c if "ref_logp" not in metas[c] else r
            raise error(f"{where[i]}: pair {pair!r} has a reference log-prob ('ref_logp') on one document "
                        "only; rerun make_preferences --reference on the shard")
        role[c], role[r] = 1, 2
        partner[c], partner[r] = r, c
    return role, partner


class PairUnits:
    """The pairs of a stream's documents (global ids), as ``plan.RowStream`` packs them.

    ``partner``: int64 [D] the rejected document of each chosen one (-1 elsewhere);
    ``rejected``: bool [D] the documents drawn only with their chosen partner;
    ``doc_lengths``: int64 [D] the documents' own lengths.
    """

    def __init__(self, sources: Sequence, offsets: np.ndarray, lengths: np.ndarray):
        parts_role, parts_partner = [], []
        for src, off in zip(sources, offsets[:-1]):
            n = len(src.lengths)
            role = getattr(src, "pair_role", None)
            parts_role.append(np.zeros(n, np.int8) if role is None else role)
            partner = getattr(src, "pair_partner", None)
            parts_partner.append(np.full(n, -1, np.int64) if partner is None
                                 else np.where(partner >= 0, partner + off, -1))
        role = np.concatenate(parts_role) if parts_role else np.zeros(0, np.int8)
        partner = np.concatenate(parts_partner) if parts_partner else np.zeros(0, np.int64)
        self.partner = np.where(role == 1, partner, -1)
        self.rejected = role == 2
        self.doc_lengths = np.asarray(lengths, np.int64).copy()

    @property
    def any(self) -> bool:
        return bool((self.partner >= 0).any())

    def unit_lengths(self) -> np.ndarray:
        """int64 [D]: a chosen document's length is the pair's (both documents together)."""
        chosen = self.partner >= 0
        out = self.doc_lengths.copy()
        out[chosen] += self.doc_lengths[self.partner[chosen]]
        return out

    def is_unit(self, doc_id: int) -> bool:
        return bool(self.partner[doc_id] >= 0)

    def expand(self, row: Sequence) -> list:
        """``row`` (``packing.Piece`` list) with each pair's piece as its two documents (chosen,
        then rejected)."""
        from emu3_train.data.packing import Piece  # packing imports the index, which imports this

        out, n = [], self.doc_lengths
        for p in row:
            r = int(self.partner[p.doc_id])
            if r < 0:
                out.append(p)
                continue
            if (p.start, p.end) != (0, int(n[p.doc_id] + n[r])):
                raise ValueError(f"pair piece {tuple(p)} is not the whole pair (packing never cuts one)")
            out += [Piece(p.doc_id, 0, int(n[p.doc_id])), Piece(r, 0, int(n[r]))]
        return out
