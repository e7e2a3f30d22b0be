"""Gated linear units: LLaMA's SwiGLU and TNL's activation-free GLU (SGLU).

y = W_down (act(W_gate x) ⊙ W_up x). SwiGLU uses SiLU (Shazeer, arXiv 2002.05202); TNL's "simple
GLU" uses no activation at all (arXiv 2405.17381 Eq. 12; Table 9: no activation 2.248 vs Swish
2.254 loss). The weight names follow transformers' LlamaMLP so checkpoints convert by renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops


class GLU(nn.Module):
    """TNL's activation-free GLU; `activation="silu"` (or `SwiGLU`) makes it LLaMA's SwiGLU."""

    def __init__(
        self,
        config: ZooConfig,
        activation: str = "identity",
        intermediate_size: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        d, g = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(d, g, bias=bias)
        self.up_proj = nn.Linear(d, g, bias=bias)
        self.down_proj = nn.Linear(g, d, bias=bias)
        self.activation = activation

    def flops_per_token(self, seq_len: int) -> int:
        """Three projections: 2 · 3 · d · g."""
        return linear_flops(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.activation == "silu":
            gate = F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class SwiGLU(GLU):
    """LLaMA's SwiGLU: the GLU with SiLU on the gate; biases on its three projections when
    `config.mlp_bias` (transformers' LlamaMLP with `mlp_bias=True`)."""

    def __init__(self, config: ZooConfig, intermediate_size: int | None = None) -> None:
        super().__init__(
            config, "silu", intermediate_size, bool(getattr(config, "mlp_bias", False))
        )
