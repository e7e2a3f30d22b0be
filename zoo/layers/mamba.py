"""Mamba's sequence mixer: gated, causal-conv'd selective SSM (the whole Mamba block).

"Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao, arXiv 2312.00752,
§3.4 Fig. 3, Alg. 2), with mamba_ssm's `Mamba` module as the reference code:

    [x̃ | z] = in_proj(x)                              d → 2·D_in   (D_in = expand · d)
    u = SiLU(causal depthwise conv1d(x̃))              kernel K, one filter per channel
    [δ | B | C] = x_proj(u)                           D_in → R + 2N
    Δ = softplus(dt_proj(δ)),  A = −exp(A_log)         R → D_in with bias; A is D_in × N
    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t,  y_t = h_t C_t + D ⊙ u_t
    out = out_proj(y ⊙ SiLU(z))                       D_in → d

Parameter names and shapes are transformers' `MambaMixer` (in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj), so converting a transformers checkpoint is a renaming (`zoo.convert`).
The selective scan itself is `zoo.kernels.selective_scan`.

Choices where the sources differ (shared/papers/mamba-hyena.md §1): Euler B̄ = Δ B as in the
code, not the paper's ZOH B̄; the conv bias is initialised like PyTorch's Conv1d (as mamba_ssm),
not zeroed (as transformers); Δ's bias add and softplus run in fp32, as in both kernels. The
projections keep the backbone's N(0, initializer_range) init (transformers does the same), not
mamba_ssm's PyTorch default with out_proj scaled by 1/√layers; the residual stream stays in the
model's dtype (no `residual_in_fp32`).

Padding never enters the state: at padded tokens x̃ is zeroed before the conv and Δ is forced to
0, so the state neither decays nor takes input there and a left-padded row gives the outputs
and the decode continuation of the same row alone. (transformers zeroes the block input and u
there but keeps Δ = softplus(bias) > 0, so its state would decay across padding that follows
real tokens; for left padding both agree.)

Under context parallelism (`zoo.parallel.scan.recurrent_group`; never with a cache) each rank runs
its span: the conv reads the previous rank's last K − 1 inputs (`zoo.parallel.context.halo`) as its
left context, and the scan runs with `zoo.parallel.scan.selective_scan_cp`, twice (once from zero
for the span's final state, once from the state the earlier spans carry in) after one all-gather of
the spans' final states and total decays A · Σ_t Δ_t; exact in forward and backward.

Decode state per layer: the last K conv inputs (B, D_in, K), as transformers keeps them, and the
SSM state (B, D_in, N) in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from zoo.cache import conv_state_in_place, conv_window, recurrent_state
from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.backend import resolve_backend
from zoo.kernels.long_conv import short_conv
from zoo.kernels.matvec import linear
from zoo.kernels.selective_scan import selective_scan, selective_scan_naive
from zoo.layers.context import MixerContext
from zoo.parallel.context import halo
from zoo.parallel.scan import recurrent_group, selective_scan_cp


def inner_size(config: ZooConfig) -> int:
    """D_in = mamba_expand · hidden_size."""
    return config.mamba_expand * config.hidden_size


def dt_rank(config: ZooConfig) -> int:
    """R, the rank of the Δ projection: mamba_dt_rank, or ceil(hidden_size / 16)."""
    return config.mamba_dt_rank or math.ceil(config.hidden_size / 16)


@torch.no_grad()
def init_dt_bias(bias: torch.Tensor, dt_min: float, dt_max: float, floor: float) -> None:
    """mamba_ssm's Δ bias: softplus⁻¹ of a log-uniform draw from [dt_min, dt_max], floored at
    `floor`, one per entry of `bias` (Mamba's channels, Mamba2's and Gated DeltaNet's heads)."""
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = torch.rand(bias.shape, device=bias.device) * (log_max - log_min)
    dt = torch.exp(dt + log_min).clamp(min=floor)  # log-uniform
    init.copy_(bias, dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)


@torch.no_grad()
def init_conv_like_pytorch(conv: nn.Conv1d) -> None:
    """PyTorch's own Conv1d init (kaiming-uniform weight, U(±1/√fan_in) bias; fan_in = K for a
    depthwise conv), through `transformers.initialization`, which leaves loaded weights alone."""
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        bound = 1.0 / math.sqrt(conv.weight[0].numel())
        init.uniform_(conv.bias, -bound, bound)


class MambaMixer(nn.Module):
    # Like mamba_ssm, A and D take no weight decay. The `_no_weight_decay` flag set on the
    # parameters below is mamba_ssm's convention but is lost when `from_pretrained` swaps in
    # loaded Parameter objects; these names stay valid.
    no_weight_decay_params: tuple[str, ...] = ("A_log", "D")
    # `decode_constants()` as a compiled decode step reads them; set only while one is traced.
    step_constants: dict[str, torch.Tensor] | None = None

    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner = inner_size(config)
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.dt_rank = dt_rank(config)
        self.dt_min = config.mamba_dt_min
        self.dt_max = config.mamba_dt_max
        self.dt_init_floor = config.mamba_dt_init_floor
        self.chunk_size = config.mamba_chunk_size
        self.backend = config.kernel_backend
        d, d_inner = config.hidden_size, self.d_inner
        self.in_proj = nn.Linear(d, 2 * d_inner, bias=config.mamba_proj_bias)
        # transformers' names and shapes (D_in, 1, K). `forward` runs the causal conv itself, to
        # take the cached left context; `reference_forward` runs this module as is.
        self.conv1d = nn.Conv1d(
            d_inner,
            d_inner,
            kernel_size=self.d_conv,
            groups=d_inner,
            padding=self.d_conv - 1,
            bias=config.mamba_conv_bias,
        )
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        # S4D-real A and D = 1 already here (init_zoo_weights sets them again), so a mixer built
        # outside a model never runs on uninitialised memory.
        n = torch.arange(1.0, self.d_state + 1.0)  # default dtype, like every other parameter
        self.A_log = nn.Parameter(torch.log(n).repeat(d_inner, 1))  # (D_in, N)
        self.D = nn.Parameter(torch.ones(d_inner))
        for name in self.no_weight_decay_params:
            getattr(self, name)._no_weight_decay = True
        self.out_proj = nn.Linear(d_inner, d, bias=config.mamba_proj_bias)
        # A mixer built on its own (outside a model's post_init) must be usable too.
        self.init_zoo_weights()

    @torch.no_grad()
    def init_zoo_weights(self) -> None:
        """mamba_ssm's init (arXiv 2312.00752 §3.6): S4D-real A, D = 1, Δ bias = softplus⁻¹(dt)."""
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        init.copy_(self.A_log, torch.log(n).expand(self.d_inner, -1))  # A_n = −n, every channel
        init.ones_(self.D)
        bound = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -bound, bound)
        init_dt_bias(self.dt_proj.bias, self.dt_min, self.dt_max, self.dt_init_floor)
        init_conv_like_pytorch(self.conv1d)  # mamba_ssm keeps PyTorch's Conv1d default

    def _gated_input(
        self, hidden_states: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, T, D_in) each
        if context.token_mask is not None:
            x = x * context.token_mask.unsqueeze(-1).to(x.dtype)
        return x, z

    def _conv_step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """SiLU(depthwise causal conv) of one token x (B, D_in) against the conv state (B, D_in,
        K) of the K inputs before it, which takes x in place (transformers' layout and update).
        Tap by tap from the state's columns: a compiled step reads the state once, computing the
        output and the shifted window in one pass (the general path's concatenation, left
        window and copy back were three)."""
        taps = self.conv1d.weight[:, 0, :]  # (D_in, K)
        past = state.unbind(-1)[1:]  # the K - 1 inputs the next token still reads
        bias = self.conv1d.bias
        out = x * taps[:, -1] if bias is None else torch.addcmul(bias, x, taps[:, -1])
        for j, column in enumerate(past):
            out = out + column * taps[:, j]
        state.copy_(torch.stack([*past, x], dim=-1))
        return F.silu(out)

    def _causal_conv(self, x: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        """SiLU(depthwise causal conv) in the (B, T, D_in) layout (`zoo.kernels.long_conv`).

        ``left`` (B, K-1, D_in) holds the inputs before x (None: zeros, a sequence start).
        """
        weight = self.conv1d.weight[:, 0, :]  # (D_in, K)
        if resolve_backend(self.backend, "short-convolution", x) == "triton":
            out, _ = short_conv(x, weight, self.conv1d.bias, left, backend="triton")
            return F.silu(out)
        # The torch form of `short_conv`, fused: the bias starts the sum and the K taps accumulate
        # in place, with each tap's weights contiguous (a (D_in,) column of the (D_in, K) weight
        # has stride K, which made each multiply-add ~3x slower). One fresh (B, T, D_in) tensor
        # instead of one per tap: at Mamba's sizes on a CPU this ran ~6x faster than short_conv.
        K, T = self.d_conv, x.shape[1]
        taps = weight.t().contiguous()  # (K, D_in)
        if left is None:
            full = F.pad(x, (0, 0, K - 1, 0))  # (B, K-1+T, D_in)
        else:
            full = torch.cat([left.to(x.dtype), x], dim=1)
        bias = self.conv1d.bias
        if bias is None:
            out = full[:, K - 1 :] * taps[K - 1]
        else:
            out = torch.addcmul(bias, full[:, K - 1 :], taps[K - 1])
        for j in range(K - 1):
            out = out.addcmul_(full[:, j : j + T], taps[j])
        return F.silu(out)

    def _ssm_params(
        self, u: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ (B, T, D_in) fp32, A (D_in, N) fp32, B and C (B, T, N) from the conv output u."""
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        derived = self.step_constants
        if derived is None:
            dt = linear(dt, self.dt_proj.weight)  # (B, T, D_in)
            A = -torch.exp(self.A_log.float())
        else:  # Δ's projection as a sum of rows of its transpose: one pass over the channels
            dt = (dt.unsqueeze(-1) * derived["dt_weight"]).sum(-2)
            A = derived["A"]
        delta = F.softplus(dt.float() + self.dt_proj.bias.float())
        if context.token_mask is not None:
            delta = delta * context.token_mask.unsqueeze(-1)
        return delta, A, B, C

    def decode_constants(self) -> dict[str, torch.Tensor]:
        """Tensors derived from the weights that a compiled decode step reads as constants
        (`zoo.decode` makes them from the current weights each time it binds a step, and hands
        them over as `step_constants` while it traces): A = −exp(A_log) in fp32, otherwise an
        exponential per state element in every step, and Δ's projection transposed, (R, D_in),
        so that Δ is a vectorized pass over the channels instead of a short reduction per
        channel."""
        return {
            "A": -torch.exp(self.A_log.float()),
            "dt_weight": self.dt_proj.weight.t().contiguous(),
        }

    def _output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.out_proj(y * F.silu(z))

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        x, z = self._gated_input(hidden_states, context)
        cp = recurrent_group(cache, context)
        if cp is not None:
            u = self._causal_conv(x, halo(x, self.d_conv - 1, cp))  # the previous span's inputs
            delta, A, B, C = self._ssm_params(u, context)
            y = selective_scan_cp(
                u, delta, A, B, C, self.D, cp, z=z,
                chunk_size=self.chunk_size, backend=self.backend,
            )  # fmt: skip
            return self.out_proj(y)
        left = ssm_state = window = None
        if cache is not None:
            ssm_state = recurrent_state(cache, self.layer_idx)
            if x.shape[1] == 1:
                window = conv_state_in_place(cache, self.layer_idx)  # (B, D_in, K) or None
        if window is not None:  # a decode step
            u = self._conv_step(x[:, 0], window).unsqueeze(1)
        else:
            if cache is not None:
                left = conv_window(cache, self.layer_idx, self.d_conv)  # (B, K-1, D_in) or None
            u = self._causal_conv(x, left)
            if cache is not None:
                # Stores the last K inputs (transformers' layout); `left` was read before this.
                cache.update_conv_state(
                    x.transpose(1, 2), self.layer_idx, conv_kernel_size=self.d_conv
                )
        delta, A, B, C = self._ssm_params(u, context)
        y, final_state = selective_scan(
            u,
            delta,
            A,
            B,
            C,
            self.D,
            initial_state=ssm_state,
            output_final_state=cache is not None,
            chunk_size=self.chunk_size,
            backend=self.backend,
            z=z,  # the gate y ⊙ SiLU(z), fused into the Triton scan
        )
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
        return self.out_proj(y)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: nn.Conv1d's own conv, token-by-token fp32 scan."""
        x, z = self._gated_input(hidden_states, context)
        T = x.shape[1]
        u = F.silu(self.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))  # (B, T, D_in)
        delta, A, B, C = self._ssm_params(u, context)
        y, _ = selective_scan_naive(u, delta, A, B, C, self.D)
        return self._output(y, z)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the depthwise conv (2 · D_in · K) and the selective scan, 9 · D_in · N
        (the Mamba paper's count: discretisation, state update and read-out)."""
        conv = 2 * self.d_inner * self.d_conv
        return linear_flops(self) + conv + 9 * self.d_inner * self.d_state

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: K conv inputs and N SSM states per channel, whatever the length."""
        return batch * self.d_inner * (self.d_conv + self.d_state)
