"""The chunked fused linear + weighted CE against a naive full-logits PyTorch computation."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ce_oracle import IGNORE, loss_and_grads, make_inputs, naive  # noqa: E402,F401

from emu3_train.kernels.fused_linear_ce import fused_linear_cross_entropy
from emu3_train.kernels.reference import chunked_linear_cross_entropy


def rel_err(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]  # relative


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_naive_loss_grads_and_stats(dtype, tol, z_loss):
    inputs = make_inputs(dtype=dtype)
    kw = dict(vision_start=40, z_loss=z_loss)
    loss, gh, gw, stats = loss_and_grads(fused_linear_cross_entropy, *inputs, upstream=0.37,
                                         impl="reference", chunk_size=8, **kw)
    ref_loss, ref_gh, ref_gw, ref_stats = loss_and_grads(naive, *inputs, upstream=0.37, **kw)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert rel_err(loss, ref_loss) <= tol
    assert rel_err(gh, ref_gh) <= tol and rel_err(gw, ref_gw) <= tol
    for key, expected in ref_stats.items():
        assert not stats[key].requires_grad
        if key.startswith("tokens"):
            assert stats[key].item() == expected.item(), key
        else:
            torch.testing.assert_close(stats[key].float(), expected.float(), atol=tol, rtol=tol, msg=key)
    assert stats["tokens_text"] > 0 and stats["tokens_vision"] > 0
    counted = (inputs[2] != IGNORE) & (inputs[3] > 0)
    assert torch.all(gh[~counted] == 0)  # ignored and zero-weight tokens get no gradient


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES[:2])
def test_large_logits_are_shifted_before_exp_and_still_match(dtype, tol):
    # row maxima from ~5 to ~300: chunks of 8 rows with small maxima, mixed, and large ones
    # (exp(300) overflows unshifted)
    hidden, weight, labels, loss_weight = make_inputs(dtype=dtype)
    hidden = (hidden.float() * torch.linspace(1, 60, hidden.shape[0])[:, None]).to(dtype)
    kw = dict(vision_start=40, z_loss=1e-4)
    got = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, loss_weight, upstream=0.37,
                         impl="reference", chunk_size=8, **kw)
    expected = loss_and_grads(naive, hidden, weight, labels, loss_weight, upstream=0.37, **kw)
    assert all(torch.isfinite(t).all() for t in got[:3])
    for g, e in zip(got[:3], expected[:3]):
        assert rel_err(g, e) <= tol


def test_all_tokens_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, labels, loss_weight = make_inputs()
    labels[::2] = IGNORE
    loss_weight[1::2] = 0.0
    loss, gh, gw, stats = loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, loss_weight)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert all(torch.isfinite(t).all() for t in (loss, gh, gw))
    assert stats["tokens_text"] == 0 and stats["tokens_vision"] == 0


def test_chunk_size_changes_nothing():
    inputs = make_inputs(n=45, v=31)
    results = [loss_and_grads(chunked_linear_cross_entropy, *inputs, chunk_size=c, vision_start=20)
               for c in (1, 7, 16, 4096)]
    for loss, gh, gw, stats in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gh, results[0][1], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(gw, results[0][2], atol=1e-6, rtol=1e-6)
        assert stats["tokens_vision"] == results[0][3]["tokens_vision"]


def test_autocast_does_not_change_the_kernel_dtype():
    inputs = make_inputs()
    expected = loss_and_grads(fused_linear_cross_entropy, *inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(fused_linear_cross_entropy, *inputs)
    for g, e in zip(got[:3], expected[:3]):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e)


def test_no_grad_and_all_text_when_vision_start_is_none():
    inputs = make_inputs()
    with torch.no_grad():
        loss, stats = fused_linear_cross_entropy(*inputs)
    ref_loss, ref_stats = naive(*inputs)
    torch.testing.assert_close(loss, ref_loss)
    assert stats["tokens_vision"] == 0 and stats["tokens_text"] == ref_stats["tokens_text"]


def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels, loss_weight = make_inputs()
    with pytest.raises(NotImplementedError, match="Triton"):
        fused_linear_cross_entropy(hidden, weight, labels, loss_weight, impl="triton")
    with pytest.raises(ValueError, match="loss.impl"):
        fused_linear_cross_entropy(hidden, weight, labels, loss_weight, impl="cuda")
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_cross_entropy(hidden, weight[:, :8], labels, loss_weight)
    with pytest.raises(TypeError, match="dtype"):
        fused_linear_cross_entropy(hidden, weight.double(), labels, loss_weight)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:5], loss_weight)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 53\)"):
        fused_linear_cross_entropy(hidden, weight, labels.clamp(min=0) + 10, loss_weight)
    with pytest.raises(ValueError, match="loss.chunk_size"):
        fused_linear_cross_entropy(hidden, weight, labels, loss_weight, chunk_size=0)


def _tp_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        hidden, weight, labels, loss_weight = make_inputs(n=29, v=37)
        kw = dict(vision_start=25, z_loss=1e-2, chunk_size=8)
        full = loss_and_grads(chunked_linear_cross_entropy, hidden, weight, labels, loss_weight, **kw)
        start, stop = (0, 19) if rank == 0 else (19, 37)  # uneven shards
        loss, gh, gw, stats = loss_and_grads(chunked_linear_cross_entropy, hidden, weight[start:stop],
                                             labels, loss_weight, vocab_start=start,
                                             tp_group=dist.group.WORLD, **kw)
        torch.testing.assert_close(loss, full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, full[1], atol=1e-6, rtol=1e-5)  # full grad on every rank
        torch.testing.assert_close(gw, full[2][start:stop], atol=1e-6, rtol=1e-5)
        for key, value in full[3].items():
            torch.testing.assert_close(stats[key], value, atol=1e-5, rtol=1e-5, msg=key)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_tp2_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
