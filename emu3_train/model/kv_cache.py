"""KV cache for incremental decoding: per layer, the keys and values of the KV heads only (GQA),
preallocated for the longest sequence of the batch.

A batch of B sequences is left-padded to a common start: sequence b's first ``pad[b]`` slots are
padding (its own document, never attended by the sequence), its tokens follow, and every step
writes the same slots for every sequence, so a write is one slice assignment. The decoder runs a
*prefill* over the prompts (slots [0, P)), then *decode* steps of one token (or a few, see
``length_multiple`` in ``emu3_train/generation.py``) per sequence; positions count from each
sequence's first token, so logits equal those of the unpadded sequence recomputed in full.

Attention over the cache is plain SDPA: the query heads of one KV head are folded into the query
length ([B, Hkv, g * n, D] against [B, Hkv, S, D]), so no K/V is repeated and no kernel needs GQA
support; the mask is the :class:`~emu3_train.model.documents.Documents` of the step (none at all
for a one-token step without padding). Under tensor parallelism each rank caches its own heads:
the buffers take the head count of the first K/V they receive.

    cache = KVCache(model.model.num_layers, pad=torch.tensor([2, 0]), capacity=64)
    hidden = model(prompt_tokens, None, None, cache=cache)      # prefill: [B, P, H]; cache.length = P
    hidden = model(next_tokens[:, None], None, None, cache=cache)  # one step: [B, 1, H]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emu3_train.model.documents import Documents


class LayerCache:
    """The K/V buffers [B, Hkv, capacity, D] of one decoder layer (allocated on first use)."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents) -> torch.Tensor:
        """Store k/v [B, n, Hkv, D] at slots [length, length + n), attend q [B, n, Hq, D] to slots
        [0, length + n) under ``docs``' mask -> [B, n, Hq, D]."""
        start, (b, n, hq, d) = self.owner.length, q.shape
        end = start + n
        if end > self.owner.capacity:
            raise ValueError(f"KV cache of {self.owner.capacity} slots cannot take {n} more tokens "
                             f"after {start}; allocate it for the longest sequence")
        if self.k is None:
            shape = (b, k.shape[2], self.owner.capacity, d)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        hkv = self.k.shape[1]
        groups = hq // hkv
        # query head h reads KV head h // groups: [B, Hq, n, D] -> [B, Hkv, groups * n, D]
        qg = q.transpose(1, 2).reshape(b, hkv, groups * n, d)
        mask = docs.causal_mask()  # [B, 1, n, end] or None
        if mask is not None and groups > 1 and n > 1:
            mask = mask[:, :, None].expand(b, 1, groups, n, end).reshape(b, 1, groups * n, end)
        out = F.scaled_dot_product_attention(qg, self.k[:, :, :end], self.v[:, :, :end], attn_mask=mask)
        return out.view(b, hq, n, d).transpose(1, 2)


class KVCache:
    """The cache of a whole decoder for one batch of left-padded sequences.

    Args:
        num_layers: decoder layers (one :class:`LayerCache` each).
        pad: int64 [B] on the model's device, left-padding slots of each sequence.
        capacity: slots per sequence (the longest prompt, padded, plus every token to come).
        no_padding: every ``pad`` is 0 (known on the host: one-token steps then need no mask).

    ``length`` is the number of filled slots; the decoder advances it by the tokens of each
    forward, :meth:`truncate` moves it back (slots beyond are overwritten by the next forward).
    """

    def __init__(self, num_layers: int, pad: torch.Tensor, capacity: int, no_padding: bool = False):
        if pad.dim() != 1 or pad.dtype != torch.int64:
            raise ValueError(f"pad must be int64 [B], got {pad.dtype} of shape {tuple(pad.shape)}")
        self.pad, self.capacity, self.no_padding = pad, int(capacity), bool(no_padding)
        self.length = 0
        self.layers = [LayerCache(self) for _ in range(num_layers)]

    @property
    def batch_size(self) -> int:
        return len(self.pad)

    def documents(self, n: int) -> Documents:
        """The layout of the next forward: ``n`` new tokens per sequence after ``length`` slots."""
        if n < 1:
            raise ValueError(f"a cached forward needs at least one token per sequence, got {n}")
        return Documents.cached(self.pad, self.length, n, self.no_padding)

    def advance(self, n: int) -> None:
        """Count ``n`` more slots as filled (the decoder calls this after each forward)."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget the slots from ``length`` on (scratch tokens of a padded step)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} filled slots to {length}")
        self.length = length
