"""Which implementation an op runs: the `backend=` argument every op in zoo.kernels takes.

"auto" picks an op's Triton kernel for CUDA tensors and its torch form otherwise; the environment
variable ZOO_KERNEL_BACKEND overrides "auto". "triton" also runs on CPU tensors under
TRITON_INTERPRET=1 (the interpreter the tests use: a correctness tool, far too slow to pick by
default). Every op has both forms; without the triton package only the torch form can run.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def _triton_can_run(x: torch.Tensor | None) -> bool:
    if x is None or importlib.util.find_spec("triton") is None:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, op: str, x: torch.Tensor | None = None) -> str:
    """ "torch" or "triton" for `op` on input `x`. Errors name the value or the op."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("ZOO_KERNEL_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"ZOO_KERNEL_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "triton":
        if not _triton_can_run(x):
            raise RuntimeError(
                f"backend='triton' for {op} needs the triton package and a CUDA tensor (or "
                "TRITON_INTERPRET=1 for the CPU interpreter)"
            )
        return "triton"
    if backend == "auto" and x is not None and x.is_cuda and _triton_can_run(x):
        return "triton"
    return "torch"
