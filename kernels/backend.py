"""Which implementation an op runs: the `backend=` argument every op in zoo.kernels takes.

"auto" picks an op's Triton kernel for CUDA tensors and the torch form otherwise; the environment
variable ZOO_KERNEL_BACKEND overrides "auto". "triton" also runs on CPU tensors under
TRITON_INTERPRET=1 (the interpreter the tests use: a correctness tool, far too slow to pick by
default). For an op without a Triton kernel yet (their own issues) every accepted backend runs
the torch form and "triton" is refused with an error naming the op.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def _triton_can_run(x: torch.Tensor | None) -> bool:
    if x is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU deps
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _on_cuda(x: torch.Tensor | None) -> bool:
    return x is not None and x.is_cuda


def resolve_backend(
    backend: str, op: str, x: torch.Tensor | None = None, has_triton: bool = False
) -> str:
    """ "torch" or "triton" for `op` on input `x`; `has_triton` says whether the op has a Triton
    kernel. Errors name the value or the op."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("ZOO_KERNEL_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"ZOO_KERNEL_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "triton":
        if not has_triton:
            raise NotImplementedError(
                f"the Triton {op} kernel is not built yet (it comes in its own issue); "
                "use backend='torch'"
            )
        if not _triton_can_run(x):
            raise RuntimeError(
                f"backend='triton' for {op} needs triton and a CUDA tensor (or "
                "TRITON_INTERPRET=1 for the CPU interpreter)"
            )
        return "triton"
    if backend == "auto" and has_triton and _on_cuda(x) and _triton_can_run(x):
        return "triton"
    return "torch"
