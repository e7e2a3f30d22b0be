"""Sequence-mixer ops (imported as ``zoo.kernels``): naive reference, torch chunked form, Triton.

Each op module exposes a public function with ``backend="auto" | "triton" | "torch"``; ``auto``
picks Triton for CUDA tensors and the torch form otherwise (``ZOO_KERNEL_BACKEND`` overrides).
"""
