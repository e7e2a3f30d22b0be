"""RMSNorm (LLaMA), SRMSNorm (TNL: RMSNorm without the gain, arXiv 2405.17381 Eq. 14) and
LayerNorm with gain and bias (GPT-2's, which safari's Hyena LMs use: `nn.LayerNorm` in
HazyResearch/safari src/models/sequence/long_conv_lm.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) · g, computed in fp32. With `elementwise_affine=False` it is TNL's SRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)  # one fused kernel
        # Same order as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.
        y = F.rms_norm(x.float(), x.shape[-1:], None, self.eps).to(x.dtype)
        return y if self.weight is None else self.weight * y


class LayerNorm(nn.LayerNorm):
    """(x − mean(x)) / std(x) · g + b, computed in fp32 whatever the input's dtype (as flash_attn's
    fused dropout-add-LayerNorm, which safari's LMs run, does) and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """The block/final norm named by `ZooConfig.norm_type`."""
    if norm_type == "layernorm":
        return LayerNorm(dim, eps)
    return RMSNorm(dim, eps, elementwise_affine=norm_type == "rmsnorm")
