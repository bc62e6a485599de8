"""The gloo harness itself: ranks see one group, and a failing rank is reported by number."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return float(t)


def _fail_on_one(rank, world):
    if rank == 1:
        raise ValueError("boom")
    return rank


def test_all_reduce_on_two_processes():
    assert run_distributed(_sum_ranks, 2) == [1.0, 1.0]


def test_failing_rank_is_named():
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_distributed(_fail_on_one, 2)
