"""The default process group: gloo on CPU; on CUDA both backends, so the step's collectives run on
the GPU through NCCL and host-side bookkeeping through gloo stays legal."""

from __future__ import annotations

import torch
import torch.distributed as dist

from emu3_train.parallel import mesh


def _init(monkeypatch, device_type: str, world: int = 2, rank: int = 1) -> dict:
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    assert mesh.init_distributed(device_type, timeout_s=60) == (rank, world)
    return calls


def test_cuda_process_group_has_gloo_for_cpu_and_nccl_for_cuda(monkeypatch):
    calls = _init(monkeypatch, "cuda")
    assert calls["backend"] == "cpu:gloo,cuda:nccl"
    assert calls["set_device"] == 1 and calls["device_id"] == torch.device("cuda", 1)
    assert calls["timeout"].total_seconds() == 60


def test_cpu_process_group_is_gloo(monkeypatch):
    calls = _init(monkeypatch, "cpu")
    assert calls["backend"] == "gloo" and "device_id" not in calls and "set_device" not in calls


def test_single_process_creates_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: (_ for _ in ()).throw(AssertionError(kw)))
    assert mesh.init_distributed("cuda", timeout_s=60) == (0, 1)


def test_torchrun_with_one_process_still_creates_a_group(monkeypatch):
    """So one GPU under torchrun exercises a real NCCL group (benchmarks/gpu_check.sh)."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "smoke")
    calls = _init(monkeypatch, "cuda", world=1, rank=0)
    assert calls["backend"] == "cpu:gloo,cuda:nccl"
