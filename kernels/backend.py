"""Which implementation an op runs: the `backend=` argument every op in zoo.kernels takes.

"auto" picks Triton for CUDA tensors once an op's Triton kernel exists and the torch form
otherwise; the environment variable ZOO_KERNEL_BACKEND overrides "auto". Until the Triton kernels
land (their own issues), every accepted backend runs the torch form and "triton" is refused with
an error naming the op.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, op: str) -> str:
    """The backend `op` runs for `backend` (always "torch" for now); errors name the value."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("ZOO_KERNEL_BACKEND", "").strip()
        if env:
            if env not in BACKENDS:
                raise ValueError(f"ZOO_KERNEL_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
    if backend == "triton":
        raise NotImplementedError(
            f"the Triton {op} kernel is not built yet (it comes in its own issue); "
            "use backend='torch'"
        )
    return "torch"
