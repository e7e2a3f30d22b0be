"""Products of one token written as reductions, the form a compiled CPU decode step runs fastest.

At batch 1 a decode step is matrix-vector products: every weight, and for softmax attention
every cached key and value, is read once. The BLAS multiplies a single row through its GEMV
(several times below this CPU's memory bandwidth with MKL on the project's AMD machine, the
"products" and "gemv" figures of benchmarks/results/cpu_decode_generate.json); written as an
elementwise product summed over the shared axis, inductor compiles it into one vectorized,
threaded loop over the matrix that also fuses what comes before and after (norms, gates, RoPE).

One trap: inductor inlines a single-use elementwise producer into the loop that consumes it, so a
vector that is broadcast against a matrix (the normed input of a projection, a rotated query, the
softmax weights) would be recomputed for every row the loop visits: an RMSNorm's rsqrt or a
SiLU's exp hundreds of times per element. `materialize` stores it once first.
"""

from __future__ import annotations

import torch


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
