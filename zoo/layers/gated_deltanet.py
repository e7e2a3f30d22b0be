"""Gated DeltaNet ("Gated Delta Networks: Improving Mamba2 with Delta Rule", Yang, Kautz &
Hatamizadeh, arXiv 2412.06464), as fla's `GatedDeltaNet` layer (Qwen3-Next's linear layers are
the same network with fused projections):

    q, k, v = SiLU(short conv(x W_q)), SiLU(short conv(x W_k)), SiLU(short conv(x W_v))
    q, k ← q / √(‖q‖² + ε), k / √(‖k‖² + ε) per head (ε = 1e-6)
    β = σ(x W_b),   g = −exp(A_log) · softplus(x W_a + dt_bias)
    S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k
    y = W_o (RMSNorm(o) ⊙ SiLU(x W_g))                  (RMSNorm per value head, one gain)

over `gdn_num_heads` key heads of `gdn_head_dim` and `gdn_num_v_heads` value heads of
`gdn_expand_v` · `gdn_head_dim` (more value heads than key heads: each key head serves a group
of value heads, fla's GVA and Qwen3-Next's layout). Parameter names are fla's (`q_proj`,
`k_proj`, `v_proj`, `a_proj`, `b_proj`, `A_log`, `dt_bias`, `q_conv1d`, `k_conv1d`, `v_conv1d`,
`g_proj`, `o_norm.weight`, `o_proj`), so an fla layer maps onto this one name for name; the
three depthwise convs run as one over the concatenated projections (one cache tensor of
2·d_k + d_v channels, as Qwen3-Next keeps it). fla's options left out: no short convs, no
output gate, negative eigenvalues (β ∈ (0, 2)) and a sigmoid output gate, all off by default.

The recurrence is `zoo.kernels.gated_delta.gated_delta` (chunked torch form, Triton kernels,
decode step). Padding never enters the state: at padded tokens the conv inputs are zeroed, β = 0
(no write) and g = 0 (no decay), so a left-padded row gives the outputs and the continuation of
the same row alone.

Under context parallelism each rank's span runs three times: from zero for its final state S_r,
with v = 0 from the identity for its transition matrix M_r (S_T = M_r h + S_r for any start h),
and, once the spans' (M, S) are all-gathered and h_r = M_{r−1} h_{r−1} + S_{r−1} is composed,
from h_r for the outputs; exact in forward and backward (every step is differentiable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from zoo.cache import conv_window, recurrent_state
from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.gated_delta import gated_delta, gated_delta_naive
from zoo.kernels.long_conv import short_conv, short_conv_naive
from zoo.layers.context import MixerContext
from zoo.layers.mamba import init_conv_like_pytorch, init_dt_bias
from zoo.layers.norm import RMSNorm
from zoo.parallel.context import ContextParallel, halo
from zoo.parallel.scan import previous_states_matrix, recurrent_group


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(‖x‖² + 1e-6) per head in fp32, as fla's kernels and transformers' Qwen3-Next
    (F.normalize's max(‖x‖, eps) differs visibly for the small q, k of a fresh model)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + 1e-6)).to(x.dtype)


class ShortConv(nn.Conv1d):
    """A depthwise causal conv's weights in fla's `ShortConvolution` layout, (C, 1, K)."""

    def __init__(self, channels: int, kernel_size: int, bias: bool) -> None:
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)


class GatedDeltaNet(nn.Module):
    # As fla: A_log and dt_bias take no weight decay.
    no_weight_decay_params: tuple[str, ...] = ("A_log", "dt_bias")

    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.num_heads = config.gdn_num_heads
        self.num_v_heads = config.gdn_num_v_heads
        self.head_k_dim = config.gdn_head_dim
        self.head_v_dim = round(config.gdn_head_dim * config.gdn_expand_v)
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_size = config.gdn_conv_size
        self.chunk_size = config.gdn_chunk_size
        self.backend = config.kernel_backend
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(d, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_v_heads))
        for name in self.no_weight_decay_params:
            getattr(self, name)._no_weight_decay = True
        bias = config.gdn_conv_bias
        self.q_conv1d = ShortConv(self.key_dim, self.conv_size, bias)
        self.k_conv1d = ShortConv(self.key_dim, self.conv_size, bias)
        self.v_conv1d = ShortConv(self.value_dim, self.conv_size, bias)
        self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        eps = config.gdn_norm_eps if config.gdn_norm_eps is not None else config.rms_norm_eps
        self.o_norm = RMSNorm(self.head_v_dim, eps)
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        self.init_zoo_weights()

    @torch.no_grad()
    def init_zoo_weights(self) -> None:
        """fla's init: A ~ U(0, 16) (A_log = log A), Δ bias = softplus⁻¹ of a log-uniform draw
        from [1e-3, 0.1] floored at 1e-4, the convs PyTorch's Conv1d default; through
        `transformers.initialization`, which leaves weights loaded from a checkpoint alone (the
        norm's gain is the backbone's default init, 1)."""
        A = torch.empty(self.num_v_heads, device=self.A_log.device).uniform_(0, 16)
        init.copy_(self.A_log, A.log())
        init_dt_bias(self.dt_bias, 1e-3, 0.1, 1e-4)
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            init_conv_like_pytorch(conv)

    def _conv_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = torch.cat([conv.weight[:, 0, :] for conv in convs])  # (2·d_k + d_v, K)
        bias = None if convs[0].bias is None else torch.cat([conv.bias for conv in convs])
        return weight, bias

    def _projections(self, x: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """[x W_q | x W_k | x W_v], (B, T, 2·d_k + d_v), zeroed at padded tokens."""
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        if context.token_mask is not None:
            qkv = qkv * context.token_mask.unsqueeze(-1).to(qkv.dtype)
        return qkv

    def _heads(
        self, mixed: torch.Tensor, x: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (B, T, H_v, d_k) L2-normalised and repeated over each key head's value heads,
        v (B, T, H_v, d_v), g and β (B, T, H_v) fp32, from the conv output `mixed`."""
        batch, seq_len, _ = x.shape
        q, k, v = F.silu(mixed).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        group = self.num_v_heads // self.num_heads
        q, k = (_l2_normalize(t.reshape(batch, seq_len, self.num_heads, -1)) for t in (q, k))
        if group > 1:
            q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
        v = v.reshape(batch, seq_len, self.num_v_heads, self.head_v_dim)
        beta = torch.sigmoid(self.b_proj(x).float())
        # softplus as logaddexp(z, 0) (the same values): under AOTAutograd, softplus's backward
        # is traced contiguous but returns the layout of the (transposed) gradient it gets.
        z = self.a_proj(x).float() + self.dt_bias.float()
        g = -self.A_log.float().exp() * torch.logaddexp(z, torch.zeros_like(z))
        if context.token_mask is not None:
            keep = context.token_mask.unsqueeze(-1)  # (B, T, 1)
            beta, g = beta * keep, g * keep
        return q, k, v, g, beta

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = self.g_proj(x).view(o.shape)  # (B, T, H_v, d_v)
        y = self.o_norm(o) * F.silu(gate)
        return self.o_proj(y.reshape(*x.shape[:2], -1))

    def _context_parallel(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        cp: ContextParallel,
    ) -> torch.Tensor:
        """The outputs of this rank's span from the state the earlier spans carry in."""
        options = dict(chunk_size=self.chunk_size, backend=self.backend)
        _, final = gated_delta(q, k, v, g, beta, output_final_state=True, **options)
        eye = torch.eye(self.head_k_dim, device=q.device).expand(*final.shape[:2], -1, -1)
        _, transition = gated_delta(
            q, k, torch.zeros_like(k), g, beta, initial_state=eye, output_final_state=True,
            **options,
        )  # fmt: skip
        carried = previous_states_matrix(final, transition, cp)  # (B, H, K, V)
        o, _ = gated_delta(q, k, v, g, beta, initial_state=carried, **options)
        return o

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        qkv = self._projections(hidden_states, context)
        weight, bias = self._conv_weights()
        cp = recurrent_group(cache, context)
        if cp is not None:
            left = halo(qkv, self.conv_size - 1, cp)  # the previous span's last K − 1 inputs
            mixed, _ = short_conv(qkv, weight, bias, left, backend=self.backend)
            q, k, v, g, beta = self._heads(mixed, hidden_states, context)
            return self._output(self._context_parallel(q, k, v, g, beta, cp), hidden_states)
        left = state = None
        if cache is not None:
            left = conv_window(cache, self.layer_idx, self.conv_size)  # (B, K − 1, C) or None
            state = recurrent_state(cache, self.layer_idx)
        mixed, _ = short_conv(qkv, weight, bias, left, backend=self.backend)
        if cache is not None:
            cache.update_conv_state(
                qkv.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_size
            )
        q, k, v, g, beta = self._heads(mixed, hidden_states, context)
        o, final_state = gated_delta(
            q, k, v, g, beta, initial_state=state, output_final_state=cache is not None,
            chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
        return self._output(o, hidden_states)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: tap-by-tap conv, token-by-token fp32 delta rule."""
        weight, bias = self._conv_weights()
        mixed, _ = short_conv_naive(self._projections(hidden_states, context), weight, bias)
        q, k, v, g, beta = self._heads(mixed, hidden_states, context)
        o, _ = gated_delta_naive(q, k, v, g, beta)
        return self._output(o, hidden_states)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the depthwise convs (2 · C · K) and per value head the delta rule: the
        read of k_tᵀS (2·d_k·d_v), the rank-one write (2·d_k·d_v) and the read-out (2·d_k·d_v)."""
        channels = 2 * self.key_dim + self.value_dim
        recurrence = 6 * self.num_v_heads * self.head_k_dim * self.head_v_dim
        return linear_flops(self) + 2 * channels * self.conv_size + recurrence

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: K conv inputs per channel and a d_k × d_v state per value head."""
        channels = 2 * self.key_dim + self.value_dim
        return batch * (
            channels * self.conv_size + self.num_v_heads * self.head_k_dim * self.head_v_dim
        )
