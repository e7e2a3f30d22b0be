"""Mamba2's sequence mixer: the SSD layer ("Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", Dao & Gu, arXiv 2405.21060, §7 Fig. 6), with
transformers' `Mamba2Mixer` as the reference code:

    [z | xBC | δ] = in_proj(h)                       d → D_in + (D_in + 2·G·N) + H
    [x | B | C] = SiLU(causal depthwise conv1d(xBC))  kernel K over D_in + 2·G·N channels
    Δ = clamp(softplus(δ + dt_bias), dt_limit),  A = −exp(A_log)          one scalar per head
    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_tᵀ,  y_t = C_tᵀ h_t + D x_t       per head: N × P state
    out = out_proj(RMSNorm_G(y ⊙ SiLU(z)))           the gated RMSNorm, per group of D_in / G

with D_in = `mamba2_expand` · d split into H = D_in / P heads of `mamba2_head_dim` P, and B, C
shared by the H / G heads of each of `mamba2_n_groups` G groups. Parameter names and shapes are
transformers' (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj), so a transformers
`Mamba2ForCausalLM` checkpoint converts by renaming (`zoo.convert`). The recurrence is
`zoo.kernels.ssd.ssd` (chunked torch form, Triton kernels, decode step), under context
parallelism the `gla` op's span form with the decay on every key channel.

Padding never enters the state: at padded tokens xBC is zeroed before the conv and Δ is 0, so the
state neither decays nor takes input there, and a left-padded row gives the outputs and the
continuation of the same row alone. (transformers zeroes the block input and the conv output
there but keeps Δ = softplus(dt_bias) > 0, so across padding that follows real tokens its state
decays; for left padding both agree.)

Decode state per layer: the last K conv inputs (B, D_in + 2·G·N, K), transformers' layout, and
the SSD state (B, H, N, P) in fp32 (transformers keeps (B, H, P, N)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from zoo.cache import conv_window, recurrent_state
from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.long_conv import short_conv, short_conv_naive
from zoo.kernels.ssd import ssd, ssd_naive
from zoo.layers.context import MixerContext
from zoo.layers.mamba import init_conv_like_pytorch, init_dt_bias
from zoo.parallel.context import ContextParallel, halo
from zoo.parallel.scan import gla_cp, recurrent_group


class GatedRMSNorm(nn.Module):
    """RMSNorm(y ⊙ SiLU(z)) over groups of `group_size` channels, in fp32, one gain for all:
    transformers' `MambaRMSNormGated` (norm_before_gate=False)."""

    def __init__(self, width: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = y.float() * F.silu(z.float())
        groups = x.view(*x.shape[:-1], -1, self.group_size)  # (..., G, D_in / G)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.view(x.shape).to(y.dtype)


class Mamba2Mixer(nn.Module):
    # As Mamba: A and D (and the Δ bias, as mamba_ssm's Mamba2) take no weight decay.
    no_weight_decay_params: tuple[str, ...] = ("A_log", "D", "dt_bias")

    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.d_inner = config.mamba2_expand * d
        self.head_dim = config.mamba2_head_dim
        self.num_heads = self.d_inner // self.head_dim
        self.n_groups = config.mamba2_n_groups
        self.d_state = config.mamba2_d_state
        self.d_conv = config.mamba2_d_conv
        limit = config.mamba2_dt_limit
        self.dt_limit = (0.0, math.inf) if limit is None else (float(limit[0]), float(limit[1]))
        self.dt_init = (config.mamba2_dt_min, config.mamba2_dt_max, config.mamba2_dt_init_floor)
        self.chunk_size = config.mamba2_chunk_size
        self.backend = config.kernel_backend
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        bias = config.mamba2_proj_bias
        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.num_heads, bias=bias)
        # transformers' names and shapes (C, 1, K); the causal conv itself runs in short_conv.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=self.d_conv, groups=self.conv_dim,
            padding=self.d_conv - 1, bias=config.mamba2_conv_bias,
        )  # fmt: skip
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        for name in self.no_weight_decay_params:
            getattr(self, name)._no_weight_decay = True
        eps = config.mamba2_norm_eps if config.mamba2_norm_eps is not None else config.rms_norm_eps
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps)
        self.out_proj = nn.Linear(self.d_inner, d, bias=bias)
        self.init_zoo_weights()

    @torch.no_grad()
    def init_zoo_weights(self) -> None:
        """transformers' (and mamba_ssm's) init: A_h = −h for head h = 1 … H, D = 1, Δ bias =
        softplus⁻¹ of a log-uniform draw from [dt_min, dt_max] floored at dt_init_floor; the conv
        keeps PyTorch's Conv1d default, the norm gain 1."""
        heads = torch.arange(1, self.num_heads + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(heads))
        init.ones_(self.D)
        init_dt_bias(self.dt_bias, *self.dt_init)
        init_conv_like_pytorch(self.conv1d)
        init.ones_(self.norm.weight)

    def _project(
        self, hidden_states: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, T, D_in), xBC (B, T, conv_dim) zeroed at padding, Δ (B, T, H) fp32 (0 there)."""
        z, xbc, dt = self.in_proj(hidden_states).split(
            [self.d_inner, self.conv_dim, self.num_heads], dim=-1
        )
        delta = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
        if context.token_mask is not None:
            keep = context.token_mask.unsqueeze(-1)  # (B, T, 1)
            xbc = xbc * keep.to(xbc.dtype)
            delta = delta * keep
        return z, xbc, delta

    def _ssm_inputs(
        self, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H, P), A (H,) fp32, B and C (B, T, G, N) from the conv output u."""
        batch, seq_len, _ = u.shape
        width = self.n_groups * self.d_state
        x, B, C = u.split([self.d_inner, width, width], dim=-1)
        groups = (batch, seq_len, self.n_groups, self.d_state)
        x = x.reshape(batch, seq_len, self.num_heads, self.head_dim)
        return x, -torch.exp(self.A_log.float()), B.reshape(groups), C.reshape(groups)

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*z.shape[:2], self.d_inner)
        return self.out_proj(self.norm(y, z))

    def _context_parallel(
        self,
        x: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        cp: ContextParallel,
    ) -> torch.Tensor:
        """SSD over the ranks' spans as the `gla` op with the decay on every key channel:
        q = C and k = Δ·B per head (their groups repeated), v = x; D·x added after."""
        per_head = self.num_heads // self.n_groups
        q = C.repeat_interleave(per_head, dim=2).to(x.dtype)  # (B, T, H, N)
        k = (B.repeat_interleave(per_head, dim=2).float() * delta.unsqueeze(-1)).to(x.dtype)
        g = (delta * A).unsqueeze(-1).expand(q.shape).contiguous()  # (B, T, H, N)
        y = gla_cp(q, k, x, g, cp, chunk_size=self.chunk_size, backend=self.backend)
        return y + x * self.D.to(x.dtype)[:, None]

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        z, xbc, delta = self._project(hidden_states, context)
        weight = self.conv1d.weight[:, 0, :]  # (C, K)
        cp = recurrent_group(cache, context)
        if cp is not None:
            left = halo(xbc, self.d_conv - 1, cp)  # the previous span's last K − 1 inputs
            u = F.silu(short_conv(xbc, weight, self.conv1d.bias, left, backend=self.backend)[0])
            x, A, B, C = self._ssm_inputs(u)
            return self._output(self._context_parallel(x, delta, A, B, C, cp), z)
        left = state = None
        if cache is not None:
            left = conv_window(cache, self.layer_idx, self.d_conv)  # (B, K − 1, C) or None
            state = recurrent_state(cache, self.layer_idx)
        u = F.silu(short_conv(xbc, weight, self.conv1d.bias, left, backend=self.backend)[0])
        if cache is not None:
            # Stores the last K inputs (transformers' layout); `left` was read before this.
            cache.update_conv_state(
                xbc.transpose(1, 2), self.layer_idx, conv_kernel_size=self.d_conv
            )
        x, A, B, C = self._ssm_inputs(u)
        y, final_state = ssd(
            x, delta, A, B, C, self.D, initial_state=state, output_final_state=cache is not None,
            chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
        return self._output(y, z)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: tap-by-tap conv, token-by-token fp32 SSD."""
        z, xbc, delta = self._project(hidden_states, context)
        weight = self.conv1d.weight[:, 0, :]
        u = F.silu(short_conv_naive(xbc, weight, self.conv1d.bias)[0])
        x, A, B, C = self._ssm_inputs(u)
        y, _ = ssd_naive(x, delta, A, B, C, self.D)
        return self._output(y, z)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the depthwise conv (2 · C · K) and the recurrence per head: the state
        update and read-out, 2 · N · P each, plus the skip and the gated norm (~ 6 · D_in)."""
        conv = 2 * self.conv_dim * self.d_conv
        ssd_flops = 4 * self.num_heads * self.d_state * self.head_dim
        return linear_flops(self) + conv + ssd_flops + 6 * self.d_inner

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: K conv inputs per conv channel and an N × P state per head."""
        return batch * (self.conv_dim * self.d_conv + self.num_heads * self.d_state * self.head_dim)
