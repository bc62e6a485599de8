"""The training loss wrapper: [B, S] batches in, Emu3's weighted mean and per-class means out."""

import math

import pytest
import torch
import torch.nn.functional as F

from emu3_train.loss import class_means, weighted_ce

VOCAB, VISION_START, HIDDEN = 29, 20, 8


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, HIDDEN, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9), generator=gen)
    labels[1, 6:] = -100  # padding
    loss_weight = torch.where(labels >= VISION_START, 0.5, 1.0)
    loss_weight[1, 6:] = 0.0
    return hidden, weight, labels, loss_weight


def test_weighted_sum_over_weight_sum_is_emu3_weighted_mean_with_grads():
    hidden, weight, labels, loss_weight = batch()
    loss_sum, _ = weighted_ce(hidden, weight, labels, loss_weight, vision_start=VISION_START, chunk_size=5)
    loss = loss_sum / loss_weight.sum()
    ce = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten(), reduction="none")
    expected = (ce * loss_weight.flatten()).sum() / loss_weight.sum()
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_class_means_give_unweighted_per_class_ce():
    hidden, weight, labels, loss_weight = batch()
    with torch.no_grad():
        _, stats = weighted_ce(hidden, weight, labels, loss_weight, vision_start=VISION_START)
        ce = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), labels.flatten(), reduction="none")
    flat = labels.flatten()
    vision, text = flat >= VISION_START, (flat >= 0) & (flat < VISION_START)
    means = class_means(stats)
    assert means["loss_text"] == pytest.approx(ce[text].mean().item(), rel=1e-5)
    assert means["loss_vision"] == pytest.approx(ce[vision].mean().item(), rel=1e-5)


def test_class_means_are_nan_not_an_error_for_a_class_without_tokens():
    stats = {"loss_text_sum": torch.tensor(6.0), "tokens_text": torch.tensor(3),
             "loss_vision_sum": torch.tensor(0.0), "tokens_vision": torch.tensor(0)}
    means = class_means(stats)
    assert means["loss_text"] == 2.0
    assert math.isnan(means["loss_vision"])


def test_shape_mismatch_is_rejected():
    hidden, weight, labels, loss_weight = batch()
    with pytest.raises(ValueError, match=r"\[B, S, H\]"):
        weighted_ce(hidden, weight, labels[:, :5], loss_weight, vision_start=VISION_START)
