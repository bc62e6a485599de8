"""The Triton fused linear + weighted CE (run by the CPU interpreter) against naive full logits.

``triton.jit`` chooses compiled or interpreted kernels when the kernel module is imported, so the
Triton cases run in a child pytest with ``TRITON_INTERPRET=1`` (``test_triton_cases_under_the_
interpreter``); in this process they are skipped, and the rest of the suite never sees the
variable. Run them directly with

    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_triton_ce.py -q
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ce_oracle import IGNORE, loss_and_grads, naive  # noqa: E402,F401
from ce_oracle import make_inputs as _make_inputs  # noqa: E402

from emu3_train.kernels.fused_linear_ce import fused_linear_cross_entropy, resolve_impl


def make_inputs(n=37, v=301, h=48, dtype=torch.float32, seed=0):
    """Odd sizes (no multiple of any tile), ~20% ignored, weights in {0, 0.5, 1}."""
    return _make_inputs(n=n, v=v, h=h, dtype=dtype, seed=seed)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="Triton cases run in the TRITON_INTERPRET=1 "
                                 "child of test_triton_cases_under_the_interpreter")
DRIVER = "test_triton_cases_under_the_interpreter"








def rel_err(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def assert_matches(got, expected, tol):
    loss, gh, gw, stats = got
    ref_loss, ref_gh, ref_gw, ref_stats = expected
    assert rel_err(loss, ref_loss) <= tol
    assert rel_err(gh, ref_gh) <= tol and rel_err(gw, ref_gw) <= tol
    for key, value in ref_stats.items():
        if key.startswith("tokens"):
            assert stats[key].item() == value.item(), key
        else:
            torch.testing.assert_close(stats[key].float(), value.float(), atol=tol, rtol=tol, msg=key)


def triton_ce(*args, **kwargs):
    return fused_linear_cross_entropy(*args, impl="triton", **kwargs)


def test_triton_cases_under_the_interpreter():
    """Runs every case below in a child pytest with TRITON_INTERPRET=1; its output on failure."""
    if INTERPRETED:
        pytest.skip("already the interpreter run")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
           "-k", f"not {DRIVER}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert "skipped" not in summary and "passed" in summary, summary


def test_impl_resolution(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu")) == "reference"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"
    assert resolve_impl("reference", torch.device("cuda")) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="CUDA device or TRITON_INTERPRET=1"):
        resolve_impl("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="loss.impl"):
        resolve_impl("tritn", torch.device("cpu"))


@interpreted
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2),
                                            (torch.float16, 5e-3)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_matches_naive_loss_grads_and_stats(dtype, tol, z_loss):
    inputs = make_inputs(dtype=dtype)
    kw = dict(vision_start=200, z_loss=z_loss)
    got = loss_and_grads(triton_ce, *inputs, upstream=0.37, **kw)
    assert_matches(got, loss_and_grads(naive, *inputs, upstream=0.37, **kw), tol)
    loss, gh, gw, stats = got
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
    assert stats["tokens_text"] > 0 and stats["tokens_vision"] > 0
    counted = (inputs[2] != IGNORE) & (inputs[3] > 0)
    assert torch.all(gh[~counted] == 0)  # ignored and zero-weight tokens get no gradient


@interpreted
def test_small_tiles_split_vocabulary_and_group_order():
    """Several row blocks, hidden slices, vocabulary splits and a partial row-block group."""
    from emu3_train.kernels.triton_ce import TritonCEConfig, triton_linear_cross_entropy

    cfg = TritonCEConfig(block_n=16, block_v=32, block_h=16, group_n=2, v_splits=3, num_stages=1)
    inputs = make_inputs(n=53, v=301, h=40, seed=1)
    kw = dict(vision_start=150, z_loss=1e-3)
    got = loss_and_grads(triton_linear_cross_entropy, *inputs, config=cfg, **kw)
    assert_matches(got, loss_and_grads(naive, *inputs, **kw), 1e-5)


@interpreted
def test_matches_the_reference_implementation():
    inputs = make_inputs(n=45, v=131, seed=2)
    kw = dict(vision_start=100, z_loss=1e-2)
    got = loss_and_grads(triton_ce, *inputs, **kw)
    expected = loss_and_grads(fused_linear_cross_entropy, *inputs, impl="reference", chunk_size=8, **kw)
    assert_matches(got, expected, 1e-5)


@interpreted
def test_all_tokens_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, labels, loss_weight = make_inputs()
    labels[::2] = IGNORE
    loss_weight[1::2] = 0.0
    loss, gh, gw, stats = loss_and_grads(triton_ce, hidden, weight, labels, loss_weight)
    assert loss.item() == 0.0
    assert torch.all(gh == 0) and torch.all(gw == 0)
    assert stats["tokens_text"] == 0 and stats["tokens_vision"] == 0


@interpreted
def test_frozen_weight_no_grad_and_autocast():
    hidden, weight, labels, loss_weight = make_inputs()
    _, ref_gh, _, _ = loss_and_grads(naive, hidden, weight, labels, loss_weight)
    h = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the kernel runs in the inputs' dtype
        loss, _ = triton_ce(h, weight, labels, loss_weight)
    loss.backward()
    assert h.grad.dtype == torch.float32 and rel_err(h.grad, ref_gh) <= 1e-5
    with torch.no_grad():
        loss, stats = triton_ce(hidden, weight, labels, loss_weight)
    ref_loss, ref_stats = naive(hidden, weight, labels, loss_weight)
    assert not loss.requires_grad and rel_err(loss, ref_loss) <= 1e-5
    assert stats["tokens_vision"] == 0 and stats["tokens_text"] == ref_stats["tokens_text"]


def _tp_worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        hidden, weight, labels, loss_weight = make_inputs(n=29, v=301, seed=3)
        kw = dict(vision_start=250, z_loss=1e-2)
        full = loss_and_grads(triton_ce, hidden, weight, labels, loss_weight, **kw)
        start, stop = (0, 173) if rank == 0 else (173, 301)  # uneven, no multiple of a tile
        loss, gh, gw, stats = loss_and_grads(triton_ce, hidden, weight[start:stop], labels, loss_weight,
                                             vocab_start=start, tp_group=dist.group.WORLD, **kw)
        torch.testing.assert_close(loss, full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, full[1], atol=1e-6, rtol=1e-5)  # full grad on every rank
        torch.testing.assert_close(gw, full[2][start:stop], atol=1e-6, rtol=1e-5)
        for key, value in full[3].items():
            torch.testing.assert_close(stats[key], value, atol=1e-5, rtol=1e-5, msg=key)
    finally:
        dist.destroy_process_group()


@interpreted
def test_vocab_parallel_tp2_matches_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
