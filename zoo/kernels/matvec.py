"""Products of one token written as reductions, the form a compiled CPU decode step runs fastest.

At batch 1 a decode step is matrix-vector products: every weight, and for softmax attention
every cached key and value, is read once. The BLAS multiplies a single row through its GEMV
(with MKL on the project's AMD machine several times below the memory bandwidth and 2-3× below
the reduction below, the "products" and "gemv" figures of
benchmarks/results/cpu_decode_generate_epyc.json; on an Intel Xeon 8-16% faster than it when
the products run alone, cpu_decode_generate.json); written as an elementwise product summed
over the shared axis, inductor compiles it into one vectorized, threaded loop over the matrix
that also fuses what comes before and after (norms, gates, RoPE), with no external call
splitting the step's loops.

One trap: inductor inlines a single-use elementwise producer into the loop that consumes it, so a
vector that is broadcast against a matrix (the normed input of a projection, a rotated query, the
softmax weights) would be recomputed for every row the loop visits: an RMSNorm's rsqrt or a
SiLU's exp hundreds of times per element. `materialize` stores it once first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def materialize(x: torch.Tensor) -> torch.Tensor:
    """`x` itself (a view with the same values), computed into memory once under inductor instead
    of being inlined into, and recomputed by, every loop iteration of its consumer (inductor
    realizes what `as_strided` reads; the eager call is a free view of a contiguous tensor)."""
    x = x.contiguous()
    return x.as_strided(x.shape, x.stride())


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as a reduction over `in`: x (..., in), weight (out, in) or a
    batch of matrices (..., out, in) broadcast against x's leading dimensions (a decode step's
    state read by its query). For one vector per matrix: inductor streams the matrix's rows once,
    x read from cache."""
    y = (materialize(x).unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


# Floats of one AVX-512 vector: the width of the slices `vecmat` sums a matrix's rows in.
_SLICE = 16


def vecmat(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """x (..., K) times matrix (..., K, N) → (..., N), broadcast over the leading dimensions: a
    query's read of attention's cached values or of a linear mixer's state, as a reduction over
    K written one slice of N at a time. Inductor fuses the slices' sums into one pass over the
    matrix with an accumulator per slice; summed over all of N at once, it passes over the
    matrix once per slice (a row's N values are contiguous, its K rows are not)."""
    x = materialize(x).unsqueeze(-1)
    return torch.cat([(x * part).sum(-2) for part in matrix.split(_SLICE, -1)], -1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, except for one row on a CPU under compilation, where it is `matvec`: for a
    product a layer computes itself (Mamba's Δ projection, whose bias is added in fp32 after it),
    the choice `zoo.decode.decode_linears` makes for every `nn.Linear` of a decode step. Left to
    the BLAS, such a product is an external call that also splits the step's fused loops."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        return matvec(x, weight, bias)
    return F.linear(x, weight, bias)
