"""The GELU MLP of GPT-2-style blocks: y = fc2(GELU(fc1(x))), both projections with biases.

It is the channel mixer of safari's Hyena LMs (HazyResearch/safari
src/models/sequence/long_conv_lm.py `create_mlp_cls`: flash_attn's `Mlp` with
`F.gelu(approximate="tanh")`, or its `FusedMLP`, whose fused GELU is the same tanh form), of
width `intermediate_size` (safari's d_inner). The names fc1 and fc2 are flash_attn's, so safari
checkpoints convert by renaming the block prefix only. Init: transformers' N(0, 0.02) weights
and zero biases (safari's LM init, without its 1/√(2·layers) rescale of fc2: zoo convention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops


class GeluMLP(nn.Module):
    def __init__(self, config: ZooConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        d, g = config.hidden_size, intermediate_size or config.intermediate_size
        self.fc1 = nn.Linear(d, g)
        self.fc2 = nn.Linear(g, d)
        self.approximate = config.gelu_mlp_approximate  # "tanh" (safari) or "none" (exact erf)

    def flops_per_token(self, seq_len: int) -> int:
        """Two projections: 2 · 2 · d · g."""
        return linear_flops(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))
