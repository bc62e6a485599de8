"""Before allocating, the trainer refuses a model whose weights, gradients and AdamW states cannot
fit on this rank, with one line naming the planner command; a run that fits passes silently."""

from __future__ import annotations

import pytest
import torch

from emu3_train import memory_check
from emu3_train.config import ConfigError
from emu3_train.memory_check import check_fits
from emu3_train.parallel.dims import ParallelDims
from emu3_train.planner import plan
from emu3_train.planner_memory import GIB, estimate_memory
from emu3_train.recipes import compose

OVERRIDES = ["experiment=demo", "model=emu3_8b", "data.path=/data/demo/train"]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def big():
    return compose(OVERRIDES)


def state_bytes(cfg, dims, on_gpu=False) -> int:
    return estimate_memory(cfg, dims, cfg.model.vocab_size, on_gpu).state


@pytest.fixture
def meminfo(tmp_path, monkeypatch):
    """Set this host's MemAvailable (bytes) as /proc/meminfo would report it."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def set_available(n: int) -> None:
        path = tmp_path / "meminfo"
        kib = -(-n // 1024)  # rounded up: "exactly enough" stays enough
        path.write_text(f"MemTotal:  99999999 kB\nMemFree:  1000 kB\nMemAvailable:  {kib} kB\n")
        monkeypatch.setattr(memory_check, "MEMINFO", path)

    return set_available


def test_the_refusal_counts_parameters_gradients_and_optimizer_like_the_planner(big):
    dims = ParallelDims(1, 1, 1)
    mem = estimate_memory(big, dims, big.model.vocab_size, on_gpu=False)
    assert mem.state == 16 * mem.params_per_gpu  # fp32 weights + grads + two Adam moments
    assert mem.state < mem.total  # activations are left out: never refuse a run that could fit
    assert plan(big, 1, "cpu", big.model.vocab_size)["memory_bytes"]["state"] == mem.state


def test_a_model_that_fits_passes_silently(big, meminfo, capsys):
    dims = ParallelDims(1, 1, 1)
    meminfo(state_bytes(big, dims))  # just enough (to the KiB): "clearly cannot fit" has no margin
    check_fits(big, dims, big.model.vocab_size, CPU, 1, OVERRIDES)
    assert capsys.readouterr() == ("", "")
    meminfo(state_bytes(big, dims) - 1024)
    with pytest.raises(ConfigError):
        check_fits(big, dims, big.model.vocab_size, CPU, 1, OVERRIDES)


def test_a_model_that_cannot_fit_is_one_line_naming_the_planner(big, meminfo):
    dims = ParallelDims(1, 1, 1)
    meminfo(24 * GIB)
    with pytest.raises(ConfigError) as e:
        check_fits(big, dims, big.model.vocab_size, CPU, 1, OVERRIDES)
    message = str(e.value)
    assert "\n" not in message and "emu3_8b" in message and "126.5 GiB" in message and "24.0 GiB" in message
    assert message.endswith("python -m emu3_train.planner experiment=demo model=emu3_8b "
                            "data.path=/data/demo/train --gpus 1 --gpu cpu"), message


def test_ranks_on_one_host_share_its_memory(big, meminfo, monkeypatch):
    dims = ParallelDims(2, 1, 1)  # FSDP over 2 ranks: each holds half the state
    per_rank = state_bytes(big, dims)
    meminfo(3 * per_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    check_fits(big, dims, big.model.vocab_size, CPU, 2, OVERRIDES)  # 1.5 x per rank each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"MemAvailable / 4 ranks on this host.*--gpus 2 --gpu cpu"):
        check_fits(big, dims, big.model.vocab_size, CPU, 2, OVERRIDES)


def test_no_meminfo_no_check(big, monkeypatch, tmp_path):
    monkeypatch.setattr(memory_check, "MEMINFO", tmp_path / "absent")
    check_fits(big, ParallelDims(1, 1, 1), big.model.vocab_size, CPU, 1, OVERRIDES)


def test_cuda_compares_against_the_device_total(big, monkeypatch):
    total = int(79.1 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * GIB, total))  # 1 GiB free
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    eight = ParallelDims(8, 1, 1)
    assert state_bytes(big, eight, on_gpu=True) < total
    check_fits(big, eight, big.model.vocab_size, CUDA, 8, OVERRIDES)  # the total counts, not what is free
    with pytest.raises(ConfigError) as e:
        check_fits(big, ParallelDims(1, 1, 1), big.model.vocab_size, CUDA, 1, OVERRIDES)
    message = str(e.value)
    assert "79.1 GiB of NVIDIA H100 80GB HBM3 total memory" in message and "\n" not in message
    assert message.endswith("data.path=/data/demo/train --gpus 1 --gpu 'NVIDIA H100 80GB HBM3'"), message


def test_cuda_gpu_the_planner_does_not_know_gets_its_numbers(big, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GIB, 48 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fancy GPU 9000")
    with pytest.raises(ConfigError, match=r"--gpu 'Fancy GPU 9000' --peak-tflops PEAK --gpu-mem-gib 48.0$"):
        check_fits(big, ParallelDims(1, 1, 1), big.model.vocab_size, CUDA, 1, OVERRIDES)


def test_without_hydra_the_command_names_the_model(big, meminfo):
    meminfo(GIB)
    with pytest.raises(ConfigError, match=r"planner model=emu3_8b <your overrides> --gpus 1 --gpu cpu$"):
        check_fits(big, ParallelDims(1, 1, 1), big.model.vocab_size, CPU, 1)
