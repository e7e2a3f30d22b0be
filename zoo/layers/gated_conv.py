"""Double-gated short convolution: STAR's GConv-1 class (a gated conv with an explicit kernel).

"STAR: Synthesis of Tailored Architectures" (Thomas et al., arXiv 2411.17800) lists it as the
LIV most often kept by its searches; the same operator is the convolution block of Liquid's LFM2
and, with a short kernel in place of H3's shift SSM, of H3 (arXiv 2212.14052):

    [b | c | x̃] = in_proj(x)                 d → 3d
    y = c ⊙ conv_K(b ⊙ x̃)                   causal depthwise conv, kernel K, no bias
    out = out_proj(y)                        d → d

As an LIV its matrix is T_ij = c_i K_{i−j} b_j (scaled Toeplitz, band K). Our choices where the
sources are silent: K = `gated_conv_kernel` (3, STAR's GConv-1), no conv bias (so a padded
token's zero input stays zero), projections without bias.

Decode state per layer: the last K values of b ⊙ x̃ (B, d, K), in transformers' conv-state layout,
a fixed size whatever the context length.

Context parallelism (`MixerContext.cp`, this rank holding one span of the sequence): the conv's
left context is the previous rank's last K−1 gated inputs (`zoo.parallel.context.halo`, zeros on
rank 0), exchanged forward and their gradient backward: (K−1)·d values per row, no more memory.
Every span must hold at least K−1 tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.long_conv import short_conv, short_conv_naive
from zoo.layers.context import MixerContext
from zoo.parallel.context import halo


class GatedShortConv(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kernel_size = config.gated_conv_kernel
        self.backend = config.kernel_backend
        d = config.hidden_size
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(d, self.kernel_size))  # (d, K) depthwise
        self.out_proj = nn.Linear(d, d, bias=False)
        self.init_zoo_weights()

    @torch.no_grad()
    def init_zoo_weights(self) -> None:
        """PyTorch's Conv1d default for the depthwise kernel (fan-in K), as Mamba's conv."""
        init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))

    def _gated_input(
        self, hidden_states: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, x = self.in_proj(hidden_states).chunk(3, dim=-1)  # (B, T, d) each
        u = b * x
        if context.token_mask is not None:
            u = u * context.token_mask.unsqueeze(-1).to(u.dtype)
        return u, c

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        u, c = self._gated_input(hidden_states, context)
        left = None
        if context.cp is not None:
            if cache is not None:
                raise ValueError("context parallelism runs without a cache")
            left = halo(u, self.kernel_size - 1, context.cp)  # (B, K−1, d): the previous span's
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx)  # (B, d, K) or None
            if conv_state is not None:
                left = conv_state[:, :, 1:].transpose(1, 2)  # (B, K−1, d), a view of the cache
        y, _ = short_conv(u, self.conv_weight, None, left, backend=self.backend)
        if cache is not None:
            # After the conv: the update overwrites the cached tensor `left` views in place.
            cache.update_conv_state(
                u.transpose(1, 2), self.layer_idx, conv_kernel_size=self.kernel_size
            )
        return self.out_proj(c * y)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence (or, under context parallelism, a span after
        its halo): the conv as a sum over its taps, in fp32."""
        u, c = self._gated_input(hidden_states, context)
        left = None if context.cp is None else halo(u, self.kernel_size - 1, context.cp)
        y, _ = short_conv_naive(u, self.conv_weight, None, left)
        return self.out_proj(c * y)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the gate products (2 · d) and the depthwise conv (2 · d · K)."""
        d = self.out_proj.in_features
        return linear_flops(self) + 2 * d + 2 * d * self.kernel_size

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: the last K gated inputs per channel, whatever the length."""
        return batch * self.out_proj.in_features * self.kernel_size
