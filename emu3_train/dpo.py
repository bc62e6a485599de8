"""Direct preference optimization (DPO) for visual generation, as Emu3 aligns its generator.

A preference pair is two documents with the same prompt: the *chosen* and the *rejected* image.
A document's log-probability is the sum of ``log p(target)`` over its supervised targets
(``loss_weight > 0``: the vision block when the pair shards carry ``loss_spans`` over it; the
prompt's text is then unsupervised). With the policy's ``pi`` and the frozen reference's ``ref``
log-probabilities (precomputed into the pair shards by default) and ``beta`` (``dpo.beta``),

    z_p    = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    loss   = mean_p  -log sigmoid(z_p)  +  ntp_weight * sum_{chosen} w * CE / sum_{chosen} w

the second term (``dpo.ntp_weight``) is the next-token loss of the chosen documents, which the
paper trains together with DPO. The per-token CE comes from the fused linear + CE kernels'
``reduction='none'`` path (:mod:`emu3_train.kernels.token_ce`): no [N, V] logits.

    out = dpo_terms(hidden, weight, batch, beta=0.1)     # one micro-batch
    loss = out.pair_loss_sum / pairs_total + ntp_weight * out.ntp_sum / chosen_weight_total

The batch carries, beside the packed-batch keys (``data.batch``): ``doc_index`` int64 [B, S], the
batch-local document slot of each label position (-1 on padding), ``pairs`` int64 [P, 2] (chosen,
rejected slots), ``ref_logp`` float [P, 2] (the reference's chosen, rejected log-probs) and
``num_slots`` (int, host: document slots in the batch, > every ``doc_index``).
Under context parallelism a document's log-prob is a sum over cp ranks: pass ``reduce_docs``
(sums a [D] tensor in place over the cp group), see :func:`document_logps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from emu3_train.kernels.token_ce import linear_token_cross_entropy
from emu3_train.vocab import Vocab

METRICS = ("dpo/loss", "dpo/reward_margin", "dpo/accuracy", "dpo/chosen_logp", "dpo/rejected_logp")
# sums over pairs (then divided by the pair count): loss, margin, correct, chosen logp, rejected logp
PAIR_SUMS = 5


class _SumOverGroup(torch.autograd.Function):
    """Forward: ``reduce`` (an in-place sum over ranks); backward: identity. Every rank then computes
    the same loss from the summed values, and each one's gradient reaches its own tokens only."""

    @staticmethod
    def forward(ctx, t, reduce):
        out = t.clone()
        reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def document_logps(ce: torch.Tensor, doc_index: torch.Tensor, supervised: torch.Tensor, num_docs: int,
                   reduce_docs: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """fp32 [num_docs]: ``-sum CE`` over each document's supervised targets.

    ``ce``: fp32 [N] per-token CE; ``doc_index``: int64 [N] document slot (-1: none);
    ``supervised``: bool [N]. ``reduce_docs`` sums the [D] partial sums over the ranks that share
    the documents (context parallel); its backward is the identity.
    """
    keep = supervised & (doc_index >= 0)
    sums = torch.zeros(num_docs, dtype=torch.float32, device=ce.device)
    sums = sums.index_add(0, doc_index[keep], ce[keep])
    if reduce_docs is not None:
        sums = _SumOverGroup.apply(sums, reduce_docs)
    return -sums


def dpo_pair_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [P] and the detached pair sums [PAIR_SUMS] (loss, reward margin,
    correct pairs, chosen logp, rejected logp) of ``policy`` / ``reference`` log-probs [P, 2]
    (column 0 chosen, 1 rejected)."""
    rewards = beta * (policy - reference.to(policy.dtype))  # [P, 2]
    margin = rewards[:, 0] - rewards[:, 1]
    losses = -F.logsigmoid(margin)
    with torch.no_grad():
        sums = torch.stack([losses.sum(), margin.sum(), (margin > 0).float().sum(),
                            policy[:, 0].sum(), policy[:, 1].sum()]).double()
    return losses, sums


@dataclass
class DPOTerms:
    """One micro-batch's differentiable sums and detached statistics.

    pair_loss_sum: fp32 scalar, sum of the pairs' DPO losses (divide by the global pair count).
    ntp_sum: fp32 scalar, ``sum w * CE`` over the chosen documents' targets (divide by their global
        ``loss_weight`` total).
    pair_sums: float64 [PAIR_SUMS] detached (see :func:`dpo_pair_losses`).
    logps: fp32 [P, 2] detached policy log-probs (chosen, rejected).
    """

    pair_loss_sum: torch.Tensor
    ntp_sum: torch.Tensor
    pair_sums: torch.Tensor
    logps: torch.Tensor


def dpo_terms(hidden: torch.Tensor, output_weight: torch.Tensor, batch: dict, *, beta: float,
              impl: str = "auto", chunk_size: int = 1024, vocab_start: int = 0, tp_group=None,
              reduce_docs: Callable[[torch.Tensor], None] | None = None,
              ref_logp: torch.Tensor | None = None) -> DPOTerms:
    """The DPO and chosen-NTP sums of one micro-batch (module docstring).

    Args:
        hidden: [B, S, H] final hidden states; output_weight: [V_local, H] the head (or this tp
            rank's shard from ``vocab_start`` with ``tp_group``).
        batch: ``labels``, ``loss_weight``, ``doc_index`` [B, S]; ``pairs`` [P, 2]; ``ref_logp``
            [P, 2] unless ``ref_logp`` is given (the frozen-copy path computes it live).
    """
    labels, weight = batch["labels"].reshape(-1), batch["loss_weight"].reshape(-1).float()
    doc_index = batch["doc_index"].reshape(-1)
    pairs = batch["pairs"].to(hidden.device)
    ce = linear_token_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), output_weight, labels,
                                    vocab_start=vocab_start, tp_group=tp_group, impl=impl,
                                    chunk_size=chunk_size)
    num_docs = int(batch["num_slots"])
    logps = document_logps(ce, doc_index, weight > 0, num_docs, reduce_docs)
    policy = logps[pairs] if pairs.numel() else logps.new_zeros(0, 2)  # [P, 2]
    reference = batch["ref_logp"] if ref_logp is None else ref_logp
    losses, pair_sums = dpo_pair_losses(policy, reference.to(hidden.device), beta)
    chosen = torch.zeros(max(num_docs, 1), dtype=torch.bool, device=hidden.device)
    chosen[pairs[:, 0]] = True
    in_chosen = (doc_index >= 0) & chosen[doc_index.clamp(min=0)]
    ntp_sum = (ce * weight * in_chosen).sum()
    return DPOTerms(losses.sum(), ntp_sum, pair_sums, policy.detach())


def reference_logps(hidden: torch.Tensor, output_weight: torch.Tensor, batch: dict, **kernel) -> torch.Tensor:
    """fp32 [P, 2] log-probs (chosen, rejected) of the pairs in ``batch`` under the model that gave
    ``hidden`` (the frozen reference); no gradient. ``kernel``: impl, chunk_size, vocab_start,
    tp_group, reduce_docs as for :func:`dpo_terms`."""
    reduce_docs = kernel.pop("reduce_docs", None)
    with torch.no_grad():
        ce = linear_token_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), output_weight,
                                        batch["labels"].reshape(-1), **kernel)
        pairs = batch["pairs"].to(hidden.device)
        logps = document_logps(ce, batch["doc_index"].reshape(-1), batch["loss_weight"].reshape(-1) > 0,
                               int(batch["num_slots"]), reduce_docs)
        return logps[pairs] if pairs.numel() else logps.new_zeros(0, 2)


def pair_means(pair_sums: torch.Tensor, pairs: float) -> dict[str, float]:
    """The ``dpo/*`` metrics (per-pair means) from summed :attr:`DPOTerms.pair_sums` over ``pairs``
    pairs (any number of micro-batches and ranks)."""
    values = [float(v) / pairs if pairs > 0 else float("nan") for v in pair_sums.tolist()]
    return dict(zip(METRICS, values))


def pair_batch(pairs: list[tuple[np.ndarray, np.ndarray]], spans: list[tuple[np.ndarray, np.ndarray]],
               vocab: Vocab, vision_weight: float = 0.5) -> dict:
    """A packed batch (``data.batch`` with the pair keys) of whole pairs, one pair per row: the
    documents' tokens ``pairs[i] = (chosen, rejected)`` and their ``loss_spans``."""
    from emu3_train.data.batch import build_batch
    from emu3_train.data.packing import Piece

    tokens, loss_spans, partner, rows = {}, {}, {}, []
    for i, ((c, r), (sc, sr)) in enumerate(zip(pairs, spans)):
        tokens[2 * i], tokens[2 * i + 1] = np.asarray(c), np.asarray(r)
        loss_spans[2 * i], loss_spans[2 * i + 1] = np.asarray(sc), np.asarray(sr)
        partner[2 * i] = 2 * i + 1
        rows.append([Piece(2 * i, 0, len(c)), Piece(2 * i + 1, 0, len(r))])
    seq_len = max(len(c) + len(r) for c, r in pairs)
    return build_batch(rows, tokens, set(), seq_len, vocab, vision_weight, loss_spans=loss_spans,
                       pairs=partner)


@torch.no_grad()
def pair_reference_logps(model, vocab: Vocab, pairs, spans, *, vision_weight: float = 0.5,
                         batch_pairs: int = 64, device="cpu", impl: str = "auto") -> np.ndarray:
    """float64 [P, 2]: the (chosen, rejected) log-probs of each pair's supervised targets under
    ``model`` (the frozen reference), computed exactly as training computes the policy's
    (:func:`pair_batch`, the model's forward, :func:`reference_logps`); ``make_preferences``
    stores them as each document's ``ref_logp``."""
    out = []
    for start in range(0, len(pairs), batch_pairs):
        end = start + batch_pairs
        b = pair_batch(pairs[start:end], spans[start:end], vocab, vision_weight)
        hidden = model(b["tokens"].to(device), b["position_ids"].to(device), b["cu_seqlens"].to(device))
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        out.append(reference_logps(hidden, model.lm_head.weight, moved, impl=impl).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2))
