"""RMSNorm (LLaMA) and SRMSNorm (TNL: RMSNorm without the gain, arXiv 2405.17381 Eq. 14)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · g, computed in fp32. With `elementwise_affine=False` it is TNL's SRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            # Same order as transformers' LlamaRMSNorm: cast back, then scale.
            return self.weight * x.to(dtype)
        return x.to(dtype)


def build_norm(norm_type: str, dim: int, eps: float) -> RMSNorm:
    """The block/final norm named by `ZooConfig.norm_type`."""
    return RMSNorm(dim, eps, elementwise_affine=norm_type == "rmsnorm")
