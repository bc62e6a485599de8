"""The DPO loss on a tiny decoder against a naive full-logits, per-pair implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from emu3_train.config import ModelConfig
from emu3_train.dpo import dpo_terms, pair_means, reference_logps
from emu3_train.model.decoder import Emu3CausalLM

VOCAB, S = 67, 23
# two rows; documents (slot, row, start, length); pairs (chosen, rejected) share a row
DOCS = [(0, 0, 0, 9), (1, 0, 9, 10), (2, 1, 0, 7), (3, 1, 7, 8), (4, 1, 15, 5)]  # slot 4: unpaired
PAIRS = [[0, 1], [3, 2]]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return Emu3CausalLM(cfg, vocab_size=VOCAB)


def make_batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, S), generator=gen)
    labels = torch.full((2, S), -100)
    pos = torch.zeros(2, S, dtype=torch.long)
    doc_index = torch.full((2, S), -1)
    weight = torch.zeros(2, S)
    bounds = []
    for slot, r, start, n in DOCS:
        labels[r, start:start + n - 1] = tokens[r, start + 1:start + n]
        pos[r, start:start + n] = torch.arange(n)
        doc_index[r, start:start + n] = slot
        weight[r, start + 3:start + n - 1] = 0.5  # the "vision block": the prompt's 3 targets unsupervised
        bounds.append(r * S + start)
    for r, used in ((0, 19), (1, 20)):  # the padding tails
        pos[r, used:] = torch.arange(S - used)
        bounds.append(r * S + used)
    bounds = sorted(bounds) + [2 * S]
    ref = torch.randn(2, 2, generator=gen) * 3 - 20
    return {"tokens": tokens, "labels": labels, "loss_weight": weight, "position_ids": pos,
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32), "doc_index": doc_index,
            "pairs": torch.tensor(PAIRS), "ref_logp": ref, "num_slots": 5}


def naive(model, batch, beta, ntp_weight):
    """Full logits, log_softmax, a loop over pairs."""
    hidden = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"])
    logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
    target = logp.gather(-1, batch["labels"].clamp(min=0)[..., None])[..., 0]

    def doc_logp(slot):
        m = (batch["doc_index"] == slot) & (batch["loss_weight"] > 0)
        return target[m].sum()

    losses, ntp, chosen_w = [], 0.0, 0.0
    for (c, r), ref in zip(PAIRS, batch["ref_logp"]):
        z = beta * ((doc_logp(c) - ref[0]) - (doc_logp(r) - ref[1]))
        losses.append(-F.logsigmoid(z))
        m = batch["doc_index"] == c
        ntp = ntp - (target[m] * batch["loss_weight"][m]).sum()
        chosen_w += batch["loss_weight"][m].sum()
    return sum(losses) / len(losses) + ntp_weight * ntp / chosen_w


@pytest.mark.parametrize("ntp_weight", [0.0, 0.2])
def test_loss_and_grads_equal_the_naive_per_pair_implementation(ntp_weight):
    batch, beta = make_batch(), 0.3
    model = tiny_model()
    expected = naive(model, batch, beta, ntp_weight)
    want = torch.autograd.grad(expected, list(model.parameters()))
    hidden = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"])
    out = dpo_terms(hidden, model.lm_head.weight, batch, beta=beta, chunk_size=5)
    chosen_w = float(sum(batch["loss_weight"][batch["doc_index"] == c].sum() for c, _ in PAIRS))
    loss = out.pair_loss_sum / len(PAIRS) + ntp_weight * out.ntp_sum / chosen_w
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    got = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5, msg=name)


def test_metrics_and_reference_logps():
    batch, beta = make_batch(), 0.3
    model = tiny_model()
    hidden = model(batch["tokens"], batch["position_ids"], batch["cu_seqlens"])
    ref = reference_logps(hidden, model.lm_head.weight, batch, chunk_size=7)
    assert not ref.requires_grad and ref.shape == (2, 2)
    # against itself as the reference the policy's rewards are 0: loss log 2, margin 0, accuracy 0
    out = dpo_terms(hidden, model.lm_head.weight, batch, beta=beta, ref_logp=ref)
    m = pair_means(out.pair_sums, 2)
    assert m["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["dpo/reward_margin"] == pytest.approx(0, abs=1e-6) and m["dpo/accuracy"] == 0
    torch.testing.assert_close(out.logps, ref)
    assert m["dpo/chosen_logp"] == pytest.approx(float(ref[:, 0].mean()), rel=1e-6)
    assert m["dpo/rejected_logp"] == pytest.approx(float(ref[:, 1].mean()), rel=1e-6)
    assert ref.max() < 0  # log-probs of several supervised targets
    # a reference that makes the chosen more likely under the policy: accuracy 1, margin > 0
    shifted = ref + torch.tensor([[-1.0, 1.0]])
    m = pair_means(dpo_terms(hidden, model.lm_head.weight, batch, beta=beta, ref_logp=shifted).pair_sums, 2)
    assert m["dpo/accuracy"] == 1 and m["dpo/reward_margin"] == pytest.approx(2 * beta, rel=1e-5)
    assert m["dpo/loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-2 * beta))), rel=1e-5)
