"""Context parallelism: one sequence split across the ranks of a process group.

Rank r of P holds tokens [r·L, (r+1)·L) of every row, L = T / P, and every layer sees only its
span. Per-token layers (projections, norms, channel mixers) need nothing more; a sequence mixer
needs what earlier spans contribute to its span, which this module moves:

- `gather_sequence(x)`: all spans, in order (attention's keys and values; Hyena's input);
- `halo(x, width)`: the previous rank's last `width` tokens (a short causal convolution);
- `previous_states(...)` in `zoo.parallel.scan`: the recurrent state each span starts from.

Every exchange is differentiable (torch's functional collectives with autograd), so the backward
is exact: the gradient that flows into a gathered tensor goes back to the rank that owns it.
The one rule for a layer: every rank runs the same collectives in the same order, forward and
backward, so no rank may skip an exchange (rank 0 reads zeros out of the exchanged tensor, not
from a fresh one).

A model runs under context parallelism inside `with context_parallel(group):`, on its rank's
span of the inputs (`shard_sequence`); the layers read `current()`. Outside that block
`current()` is None and nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel group of this process and its place in it."""

    group: dist.ProcessGroup
    rank: int
    """This process's rank within `group`: its span is the rank-th of `size`."""
    size: int

    def offset(self, local_len: int) -> int:
        """The position of this span's first token in the whole sequence."""
        return self.rank * local_len


# A module global, not a ContextVar: torch.compile traces a global read (and guards on it) but
# breaks the graph at ContextVar.get(). One forward runs at a time in a training process.
_current: ContextParallel | None = None


def current() -> ContextParallel | None:
    """The context-parallel group the running forward is split over, or None."""
    return _current


@contextlib.contextmanager
def context_parallel(group: dist.ProcessGroup | None) -> Iterator[ContextParallel | None]:
    """Run the model's forward (and backward, which replays the same collectives) on this rank's
    span of the sequence. A group of one process, or None, is no context parallelism."""
    global _current
    outer = _current
    if group is None or dist.get_world_size(group) == 1:
        _current = None
    else:
        _current = ContextParallel(group, dist.get_rank(group), dist.get_world_size(group))
    try:
        yield _current
    finally:
        _current = outer


def shard_sequence(x: torch.Tensor, cp: ContextParallel, dim: int = 1) -> torch.Tensor:
    """This rank's span of `x` along `dim` (the whole sequence, e.g. (B, T) token ids)."""
    length = x.shape[dim]
    if length % cp.size:
        raise ValueError(
            f"a sequence of {length} tokens cannot be split evenly over {cp.size} "
            "context-parallel ranks (parallel.cp_size): make seq_len a multiple of it"
        )
    return x.narrow(dim, cp.rank * (length // cp.size), length // cp.size)


def gather_sequence(x: torch.Tensor, cp: ContextParallel, dim: int = 1) -> torch.Tensor:
    """Every rank's span of `x` concatenated along `dim` in rank order: the whole sequence.
    Backward: each rank receives the sum over ranks of the gradient at its own span."""
    moved = x.movedim(dim, 0).contiguous()  # the span's tokens first
    whole = fc.all_gather_single_autograd(moved, 0, cp.group)
    return _ContiguousGrad.apply(whole).movedim(0, dim)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: the functional collectives'
    backward reads its memory as laid out row-major, and a gradient that comes back through
    `movedim` is a strided view (seen on gloo: the reduce-scatter returned the wrong elements)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.contiguous()


def halo(x: torch.Tensor, width: int, cp: ContextParallel, dim: int = 1) -> torch.Tensor:
    """The previous rank's last `width` tokens of `x` along `dim` (zeros on rank 0): what a
    causal convolution of kernel width + 1 reads before this span. Differentiable."""
    if width == 0:
        return x.narrow(dim, 0, 0)
    if x.shape[dim] < width:
        raise ValueError(
            f"each context-parallel span has {x.shape[dim]} tokens but a causal convolution "
            f"needs the previous {width}: use fewer context-parallel ranks or a longer sequence"
        )
    tails = gather_sequence(x.narrow(dim, x.shape[dim] - width, width), cp, dim)
    # Rank 0 reads zeros from the same graph (not a fresh tensor), so its backward runs the
    # gather's collective too: every rank must run the same collectives in the same order.
    zeros = torch.zeros(x.narrow(dim, 0, width).shape, dtype=x.dtype, device=x.device)
    shifted = torch.cat([zeros, tails], dim)
    return shifted.narrow(dim, cp.rank * width, width)
