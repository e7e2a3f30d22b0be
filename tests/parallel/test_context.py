"""The context-parallel exchanges: a span's view of the whole sequence, its halo, and their
gradients, on 2 and 4 gloo processes against one process."""

from __future__ import annotations

import pytest
import torch

from tests.parallel.harness import run_ranks
from zoo.parallel.context import context_parallel, gather_sequence, halo, shard_sequence


def _whole(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 3, generator=g)


def _exchanges(rank, world):
    import torch.distributed as dist

    x, w = _whole()
    with context_parallel(dist.group.WORLD) as cp:
        span = shard_sequence(x, cp).clone().requires_grad_()
        gathered = gather_sequence(span, cp)
        before = halo(span, 1, cp)
        loss = (gathered * w).sum() * (rank + 1) + (before * shard_sequence(w, cp)[:, :1]).sum()
        loss.backward()
    return gathered.detach(), before.detach(), span.grad


@pytest.mark.parametrize("world", [2, 4])
def test_gather_and_halo_match_one_process_with_gradients(world):
    x, w = _whole()
    results = run_ranks(_exchanges, world)
    L = 8 // world
    ranks_weight = sum(r + 1 for r in range(world))
    for rank, (gathered, before, grad) in enumerate(results):
        assert torch.equal(gathered, x)
        expected = x[:, rank * L - 1 : rank * L] if rank else torch.zeros(2, 1, 3)
        assert torch.equal(before, expected)
        # d/dspan: every rank's gathered term, plus the next rank's halo read of our last token.
        want = w[:, rank * L : (rank + 1) * L] * ranks_weight
        if rank + 1 < world:
            want = want.clone()
            want[:, -1] += w[:, (rank + 1) * L]
        torch.testing.assert_close(grad, want)


def test_an_uneven_split_is_refused():
    import types

    cp = types.SimpleNamespace(size=3, rank=0)
    with pytest.raises(ValueError, match=r"8 tokens .* 3 context-parallel ranks"):
        shard_sequence(torch.zeros(1, 8), cp)
