"""One optimizer step's forward/backward of the DPO objective, on any (dp, cp, tp) layout.

The counterpart of :func:`emu3_train.step.forward_backward` for ``loss.objective=dpo``
(``emu3_train/dpo.py`` has the loss). The step's loss is

    mean over the global batch's pairs of -log sigmoid(z_p)  +  dpo.ntp_weight * NTP(chosen documents)

with both normalizers (the pair count and the chosen documents' loss-weight total) known from the
batches before any forward and summed over the world in one all-reduce that also carries the stop
flag. Each rank back-propagates its part times ``|dp_cp|`` (FSDP2 averages over ``dp_cp``). Under
context parallelism a document's log-prob is the sum of its cp ranks' parts (all-reduced over
``cp``, identity backward: each rank's gradient reaches its own tokens); under tensor parallelism
the per-token CE is the vocab-parallel one. Pairs never straddle rows, so never ranks or steps.

    out = dpo_forward_backward(model, batches, ctx, plan, DPOSettings(beta=0.1, ntp_weight=0.2))
    out["loss"], out["dpo/accuracy"], ...                     # device tensors, no host sync

``reference``: the frozen reference model (``dpo.reference=frozen``, parallelized like the
policy); None = the pairs' precomputed ``ref_logp`` (``make_preferences``; the default).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from emu3_train.dpo import METRICS, dpo_terms, reference_logps
from emu3_train.parallel.step_plan import StepPlan
from emu3_train.step import StepContext

PAIR_KEYS = ("pairs", "ref_logp", "num_slots")


@dataclass(frozen=True)
class DPOSettings:
    beta: float = 0.1
    ntp_weight: float = 0.0


def _prepared(batch: dict, plan: StepPlan) -> dict:
    b = plan.prepare(batch)
    b.update({k: batch[k] for k in PAIR_KEYS})
    return b


def dpo_forward_backward(model, batches: list[dict], ctx: StepContext, plan: StepPlan, dpo: DPOSettings,
                         stop: int = 0, poison: bool = False, reference=None) -> dict[str, torch.Tensor]:
    """Accumulate the step's DPO gradients; returns device tensors ``loss`` (the objective),
    ``dpo/loss``, ``dpo/reward_margin``, ``dpo/accuracy``, ``dpo/chosen_logp``, ``dpo/rejected_logp``
    (per-pair means), ``dpo/ntp_loss`` (the chosen documents' NTP loss), ``weight`` (global pairs)
    and ``stop`` (as ``forward_backward``)."""
    own = plan.owns_rows
    head = torch.tensor([sum(b["num_pairs"] for b in batches) if own else 0.0,
                         sum(b["chosen_weight"] for b in batches) if own else 0.0, float(stop)],
                        dtype=torch.float64, device=plan.device)
    plan.all_reduce(head, None, "dpo pairs + chosen weight + stop flag")
    pairs_total, chosen_total = head[0].clamp_min(1), head[1].clamp_min(1e-12)
    reduce_docs = (lambda t: plan.all_reduce(t, "cp", "document log-probs")) if plan.cp > 1 else None
    autocast = (lambda: torch.autocast(plan.device.type, dtype=torch.bfloat16)) if ctx.bf16 else nullcontext
    kernel = dict(impl=ctx.impl, chunk_size=ctx.chunk_size)
    sums = torch.zeros(len(METRICS) + 1, dtype=torch.float64, device=plan.device)
    for batch in batches:
        b = _prepared(batch, plan)
        ref = None
        if reference is not None:
            with torch.no_grad(), autocast():
                ref_hidden = reference(**plan.model_inputs(b))
            weight, vocab_start, tp_group = plan.head(reference)
            ref = reference_logps(ref_hidden, weight, b, vocab_start=vocab_start, tp_group=tp_group,
                                  reduce_docs=reduce_docs, **kernel)
        with autocast():
            hidden = model(**plan.model_inputs(b))
        weight, vocab_start, tp_group = plan.head(model)
        t = dpo_terms(hidden, weight, b, beta=dpo.beta, vocab_start=vocab_start, tp_group=tp_group,
                      reduce_docs=reduce_docs, ref_logp=ref, **kernel)
        loss = t.pair_loss_sum / pairs_total + dpo.ntp_weight * t.ntp_sum / chosen_total
        if poison:
            loss = loss * float("nan")
        (loss * plan.loss_scale).backward()
        # a cp group's ranks hold the same pair sums (log-probs are summed over cp) and parts of the NTP sum
        sums += torch.cat([t.pair_sums.to(sums.device) / plan.cp, t.ntp_sum.detach().double().reshape(1)])
    plan.all_reduce(sums, "dp_cp", "dpo sums")
    out = {name: sums[i] / pairs_total for i, name in enumerate(METRICS)}
    out["dpo/ntp_loss"] = sums[-1] / chosen_total
    out["loss"] = out["dpo/loss"] + dpo.ntp_weight * out["dpo/ntp_loss"]
    out["weight"], out["stop"] = head[0], head[2]
    return out
