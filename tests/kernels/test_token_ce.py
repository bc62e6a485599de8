"""Per-token fused linear + CE (``reduction='none'``) against an inline full-logits PyTorch reference.

The Triton cases run in a child pytest with ``TRITON_INTERPRET=1`` (as in test_triton_ce.py):

    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_token_ce.py -q
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

from emu3_train.kernels.token_ce import linear_token_cross_entropy

IGNORE = -100
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 child")
DRIVER = "test_triton_cases_under_the_interpreter"
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)]


def make_inputs(n=37, v=301, h=48, dtype=torch.float32, seed=0):
    """Odd sizes (no multiple of a chunk or tile), ~20% ignored, an upstream gradient per token."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.2] = IGNORE
    upstream = torch.randn(n, generator=gen)  # signs differ, as DPO's chosen vs rejected do
    return hidden, weight, labels, upstream


def inline_reference(hidden, weight, labels):
    logits = hidden.float() @ weight.float().t()
    ce = torch.logsumexp(logits, -1) - logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(labels != IGNORE, ce, 0.0)


def ce_and_grads(fn, hidden, weight, labels, upstream, **kw):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    ce = fn(hidden, weight, labels, **kw)
    (ce * upstream).sum().backward()
    return ce.detach(), hidden.grad, weight.grad


def rel_err(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def check(impl, dtype, tol, **kw):
    inputs = make_inputs(dtype=dtype, **kw)
    ce, gh, gw = ce_and_grads(linear_token_cross_entropy, *inputs, impl=impl, chunk_size=8)
    ref_ce, ref_gh, ref_gw = ce_and_grads(inline_reference, *inputs)
    assert ce.dtype == torch.float32 and ce.shape == inputs[2].shape
    assert gh.dtype == dtype and gw.dtype == dtype
    assert rel_err(ce, ref_ce) <= tol and rel_err(gh, ref_gh) <= tol and rel_err(gw, ref_gw) <= tol
    ignored = inputs[2] == IGNORE
    assert torch.all(ce[ignored] == 0) and torch.all(gh[ignored] == 0)


@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_reference_matches_inline_pytorch(dtype, tol):
    check("reference", dtype, tol)


def test_no_grad_and_frozen_head():
    hidden, weight, labels, upstream = make_inputs(n=19, v=53, h=16, seed=4)
    with torch.no_grad():
        ce = linear_token_cross_entropy(hidden, weight, labels)
    torch.testing.assert_close(ce, inline_reference(hidden, weight, labels))
    h = hidden.clone().requires_grad_()
    (linear_token_cross_entropy(h, weight, labels) * upstream).sum().backward()
    _, ref_gh, _ = ce_and_grads(inline_reference, hidden, weight, labels, upstream)
    torch.testing.assert_close(h.grad, ref_gh, atol=1e-6, rtol=1e-5)


def test_triton_cases_under_the_interpreter():
    if INTERPRETED:
        pytest.skip("already the interpreter run")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
           "-k", f"not {DRIVER} and triton"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert "skipped" not in summary and "passed" in summary, summary


@interpreted
@pytest.mark.parametrize(("dtype", "tol"), TOLERANCES)
def test_triton_matches_inline_pytorch(dtype, tol):
    check("triton", dtype, tol, seed=1)


def _tp_worker(rank, world, init_file, impl):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        hidden, weight, labels, upstream = make_inputs(n=29, seed=3)
        full = ce_and_grads(inline_reference, hidden, weight, labels, upstream)
        start, stop = (0, 173) if rank == 0 else (173, 301)  # uneven, no multiple of a tile
        ce, gh, gw = ce_and_grads(linear_token_cross_entropy, hidden, weight[start:stop], labels, upstream,
                                  vocab_start=start, tp_group=dist.group.WORLD, impl=impl, chunk_size=8)
        torch.testing.assert_close(ce, full[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gh, full[1], atol=1e-6, rtol=1e-5)  # the full grad on every rank
        torch.testing.assert_close(gw, full[2][start:stop], atol=1e-6, rtol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=interpreted)])
def test_vocab_parallel_tp2_matches_single_process(impl):
    if INTERPRETED and impl == "reference":
        pytest.skip("covered by the parent run")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "store"), impl), nprocs=2, join=True)
