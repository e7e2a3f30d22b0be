"""The multi-process harness itself: results come back by rank, a failing rank is reported."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.parallel.harness import run_ranks


def _sum_of_ranks(rank, world):
    x = torch.tensor([float(rank)])
    dist.all_reduce(x)
    return rank, x


def _rank_one_fails(rank, world):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def test_results_by_rank():
    results = run_ranks(_sum_of_ranks, 2)
    assert [r for r, _ in results] == [0, 1]
    assert all(x.item() == 1.0 for _, x in results)


def test_a_failing_rank_is_reported():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*rank one says no"):
        run_ranks(_rank_one_fails, 2, timeout=60)
