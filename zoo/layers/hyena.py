"""Hyena's sequence mixer: gated long convolutions with implicitly parametrised filters.

"Hyena Hierarchy: Towards Larger Convolutional Language Models" (Poli et al., arXiv 2302.10866),
in the form of its reference code, HazyResearch/safari `HyenaOperator` / `HyenaFilter`
(src/models/sequence/hyena.py), for order N = `hyena_order`:

    x_0, …, x_{N−1}, v = split(ShortConv(in_proj(u)))          ((N+1)·d channels, causal, kernel K)
    for o = 0 … N−2:  v ← v ⊙ x_{N−1−o};  v ← h_o ∗ v + b_o ⊙ v    (∗ causal long convolution)
    y = out_proj(v ⊙ x_0)

    h_i = FFN(PosEnc(t_i)) ⊙ (exp(−t_i·|δ|) + s),  t = linspace(0, 1, L_max),  i = 0 … L_max−1
    PosEnc(t_i) = [t_i, cos(f·w_i), −sin(f·w_i)],  w_i = 2π·i / L_max,  f = linspace(1e-4, B−1, B)
    FFN = Linear(E, F) → Sin → [Linear(F, F) → Sin] × num_inner_mlps → Linear(F, d·(N−1), no bias)
    Sin(x) = sin(ω ⊙ x), ω learnable; δ = linspace(ln(τ)/p_slow, ln(τ)/p_fast, d·(N−1)), fixed

with E = `hyena_emb_dim` (B = (E−1)/2 bands), F = `hyena_filter_order`, L_max =
`max_position_embeddings`, τ, p_fast, p_slow, s = `hyena_decay_target` (1e-2),
`hyena_fast_decay_pct` (0.3), `hyena_slow_decay_pct` (1.5), `hyena_modulation_shift` (0); a
length-T input uses the filters' first T positions. safari's other filter options are settings
too: `hyena_modulate=False` drops the window, `hyena_normalized` divides each position's
d·(N−1) filter values by their L1 norm (after the window), `hyena_filter_bias=False` drops the
skip terms b_o (no parameter), as `zoo.convert.safari_hyena` needs to load safari checkpoints.

Choices where the sources disagree (shared/papers/mamba-hyena.md §2):

* safari, not the paper's Def. 3.1: N−1 long filters, each conv preceded by its gate (H3 style);
  Def. 3.1 has N filters and gates after each conv. safari's form is what released checkpoints
  and MAD use.
* ω is initialised to 14, safari's LM config (`configs/experiment/pile/hyena.yaml`), not the
  layer default 1: with the N(0, 0.02) Linear init (transformers' and safari's LM init alike)
  ω = 1 keeps every Sin near its linear range and the filters smooth. On the model tests' copy
  task (d = 64, E = 33, 150 steps) the final loss averaged 1.0 nats over 4 seeds with ω = 14 and
  2.3 over 3 seeds with ω = 1 (chance 2.77). One ω (F,) is shared by every Sin, as safari
  builds a single `Sin` module and reuses it.
* The positional features are fixed and recomputed each forward (the default). safari trains
  them (`lr_pos_emb`: 1e-5 by default, the full learning rate in its Pile LM config), so with
  `hyena_learned_pos_emb` they are a parameter, `filter_fn.pos_emb` (L_max, E), initialised to
  the fixed features: safari checkpoints convert with it and keep their trained copy. δ is fixed
  as in safari's code (a buffer there, learnable in the paper), and so is t.
* The filters, the long convolutions and their skip terms run in fp32 whatever the weights'
  dtype (bf16 FFTs are not supported, and sin(14·x) in bf16 is coarse); learned positional
  features are stored in the weights' dtype like every parameter, so keep such a model in fp32
  where the filters must match safari's to the last bit.
* A sequence longer than L_max raises instead of safari's silent truncation of the filter.
* Init (`init_zoo_weights`): the short conv keeps PyTorch's Conv1d init, as in safari (the
  N(0, 0.02) of transformers would all but zero the gates); the skip weights b are N(0, 1)
  (safari's randn); out_proj is not rescaled by 1/√(2·layers) (zoo convention: one init for all).
  The hooks sit on `ShortConv` and `HyenaFilter`, which own those parameters: for custom code,
  transformers never calls `_init_weights` on a module without parameters of its own, such as
  `HyenaOperator`.

Parameter names follow safari (in_proj, short_filter, filter_fn, out_proj) except the filter FFN:
safari's `implicit_filter.{0,2,4,6}` Linears are `filter_fn.ffn.{0,1,2,3}` here, its shared
`implicit_filter.1.freq` (1, F) is `filter_fn.freq` (F,) and its `pos_emb.z` (1, L_max, E) is
`filter_fn.pos_emb` (L_max, E).

Decoding: a long convolution has no finite state, so the cache keeps the history. The layer's
cache entry is a growing `DynamicLayer`:

    keys   (B, 1, S, (N−1)·d): the inputs of the N−1 long convs, conv o in channels o·d … (o+1)·d
    values (B, 1, S, (N+1)·d): in_proj's outputs, whose last K−1 rows are the short conv's window

so the state grows by 2·N·d elements per token (`state_size`), and each new token costs one dot
product of every history with its flipped filter, O(S·d). Over a transformers `StaticLayer`
(`generate(cache_implementation="static")`) the same two streams sit in L = max_cache_len fixed
slots and a decode step has fixed shapes, for a compiled step: the filled length is the layer's
counter tensor, not a host int; the short conv's window is gathered from the slots before it,
and each long conv is one product of all L slots with its taps gathered by lag t − s (zero at
slots not yet written), O(L·d) per token at any length.

Padding never leaks: the projections and every long-conv input are zeroed at padded positions.
The filters are relative (a convolution), so a left-padded row equals the row alone.

Context parallelism (`MixerContext.cp`: this rank holds the span [offset, offset + T) of a
sequence of P·T tokens), exact forward and backward:

* the short conv reads the previous rank's last K−1 projections (`zoo.parallel.context.halo`);
* each of the N−1 long convolutions all-gathers its input over the group
  (`gather_sequence`) and convolves this span after the history [0, offset), the way a cached
  prefill continues after its history: `long_conv(gathered[:, offset:offset + T], h, b,
  initial_state=gathered[:, :offset])` with the first offset + T filter taps, so only this
  span's outputs are computed. The gradient of every gathered input goes back to its owner (a
  reduce-scatter in the backward).

Memory per rank and layer: the whole sequence's long-conv inputs, (N−1) · B · P·T · d (the
all-gather's result, which the convolution keeps for its backward), plus the FFT's buffers over
offset + T positions. Compute: rank r convolves (r + 1)·T positions (FFT, O((r+1)T log)), so the
last rank does the most; one all-gather of B · T · d per long conv forward, one reduce-scatter
backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.layout import constant_cache
from zoo.kernels.long_conv import long_conv, long_conv_naive, short_conv, short_conv_naive
from zoo.layers.context import MixerContext
from zoo.parallel.context import gather_sequence, halo

# Initial Sin frequency ω: safari's LM config (w: 14), see the module docstring.
_SIN_FREQ_INIT = 14.0


@constant_cache(maxsize=16)
def _positional_features(max_len: int, emb_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """safari's `PositionalEmbedding` over L_max positions: z (L_max, E) and t (L_max, 1), fp32.

    Plain tensors rebuilt on demand rather than buffers: transformers creates models on the meta
    device before loading weights, and non-persistent buffers would come back empty.
    """
    t = torch.linspace(0, 1, max_len)[:, None]  # (L_max, 1)
    bands = (emb_dim - 1) // 2
    w = 2 * math.pi * torch.linspace(0, max_len - 1, max_len)[:, None] / max_len  # (L_max, 1)
    f = torch.linspace(1e-4, bands - 1, bands)[None, :]  # (1, bands)
    # Real and imaginary parts of exp(−i·f·w), as safari builds them.
    z = torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)  # (L_max, E)
    return z, t


@constant_cache(maxsize=16)
def decay_rates(channels: int, target: float, fast_pct: float, slow_pct: float) -> torch.Tensor:
    """|δ| per filter channel (channels,), fp32: safari's fixed modulation rates, with which
    channel c's window exp(−t·|δ_c|) reaches `target` at t = slow_pct (c = 0) … fast_pct (last)."""
    slow = math.log(target) / slow_pct
    fast = math.log(target) / fast_pct
    return torch.linspace(slow, fast, channels).abs()


class HyenaFilter(nn.Module):
    """The implicit long filters h_o and skip weights b_o of one Hyena layer."""

    def __init__(self, config: ZooConfig, width: int, num_filters: int) -> None:
        super().__init__()
        self.width = width
        self.num_filters = num_filters
        self.max_len = config.max_position_embeddings
        self.emb_dim = config.hyena_emb_dim
        self.modulate = config.hyena_modulate
        self.shift = config.hyena_modulation_shift
        self.decay = (
            config.hyena_decay_target,
            config.hyena_fast_decay_pct,
            config.hyena_slow_decay_pct,
        )
        self.normalized = config.hyena_normalized
        hidden = config.hyena_filter_order
        channels = width * num_filters
        self.ffn = nn.ModuleList(
            [nn.Linear(self.emb_dim, hidden)]
            + [nn.Linear(hidden, hidden) for _ in range(config.hyena_num_inner_mlps)]
            + [nn.Linear(hidden, channels, bias=False)]
        )
        self.freq = nn.Parameter(torch.empty(hidden))
        # Channel c = i·num_filters + o is channel i of filter o (safari's '(v o)' layout).
        self.bias = nn.Parameter(torch.empty(channels)) if config.hyena_filter_bias else None
        self.pos_emb = None
        if config.hyena_learned_pos_emb:
            self.pos_emb = nn.Parameter(torch.empty(self.max_len, self.emb_dim))  # (L_max, E)
        # (key, filters, skips) kept between calls without autograd, see `forward`.
        self._memo: tuple | None = None
        self.init_zoo_weights()

    def init_zoo_weights(self) -> None:
        """ω = 14, N(0, 1) skip weights (safari's randn) and learned positional features at the
        fixed ones; the FFN keeps the N(0, 0.02) Linear init, which is also what safari's LM init
        gives it."""
        init.constant_(self.freq, _SIN_FREQ_INIT)
        if self.bias is not None:
            init.normal_(self.bias)
        if self.pos_emb is not None:
            init.copy_(self.pos_emb, _positional_features(self.max_len, self.emb_dim)[0])

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Filters (num_filters, width, seq_len) and skip weights (num_filters, width), fp32."""
        if seq_len > self.max_len:
            raise ValueError(
                f"the sequence has {seq_len} tokens (cache + current) but the Hyena filters are "
                f"defined for max_position_embeddings={self.max_len}"
            )
        if torch.is_grad_enabled():
            return self._compute(seq_len, device)
        # Decoding needs the same taps every step, one more each time: recomputing the FFN over
        # all S positions doubled the time per token (d = 864, F = 64, S = 1024, one CPU thread:
        # 16.9 vs 8.0 ms per layer). Without autograd we keep the filters, for a power-of-two
        # length so that they are recomputed O(log S) times per sequence, and drop them once any
        # parameter moves (in-place updates bump `_version`, a new tensor has a new `data_ptr`)
        # or the device changes.
        key = (device, tuple((p.data_ptr(), p._version) for p in self.parameters()))
        if self._memo is None or self._memo[0] != key or self._memo[1].shape[-1] < seq_len:
            length = min(self.max_len, 1 << (seq_len - 1).bit_length())
            self._memo = (key, *self._compute(length, device))
        _, filters, skips = self._memo
        return filters[..., :seq_len], skips

    def taps(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` for a static decode step: under torch.compile the filters kept by the eager
        prefill before it (which checked them against the parameters) are read as they are, so
        the compiled step holds no host-side check; a longer prefix may come back."""
        if torch.compiler.is_compiling() and self._memo is not None:
            _, filters, skips = self._memo
            if filters.shape[-1] >= seq_len:
                return filters, skips
        return self(seq_len, device)

    def _compute(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        z, t = _positional_features(self.max_len, self.emb_dim)
        if self.pos_emb is not None:
            z = self.pos_emb.float()
        h = z[:seq_len].to(device)  # (T, E)
        freq = self.freq.float()
        for i, linear in enumerate(self.ffn):
            bias = None if linear.bias is None else linear.bias.float()
            h = F.linear(h, linear.weight.float(), bias)  # (T, F), the last (T, channels)
            if i < len(self.ffn) - 1:
                h = torch.sin(freq * h)
        if self.modulate:
            rates = decay_rates(h.shape[-1], *self.decay).to(device)  # (channels,)
            window = torch.exp(-t[:seq_len].to(device) * rates)  # (T, channels)
            h = h * (window + self.shift if self.shift else window)
        if self.normalized:
            h = h / torch.linalg.vector_norm(h, ord=1, dim=-1, keepdim=True)
        filters = h.view(seq_len, self.width, self.num_filters).permute(2, 1, 0)  # (O, d, T)
        if self.bias is None:
            skips = filters.new_zeros(self.num_filters, self.width)  # (O, d)
        else:
            skips = self.bias.float().view(self.width, self.num_filters).t()  # (O, d)
        return filters, skips


class ShortConv(nn.Module):
    """The causal depthwise conv on the projections: weight (C, 1, K) and bias (C,), the shapes
    and names of safari's `short_filter` Conv1d; the conv runs in zoo.kernels.long_conv."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        self.init_zoo_weights()

    def init_zoo_weights(self) -> None:
        """PyTorch's Conv1d init (fan_in = K for a depthwise conv), which safari keeps."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.kernel_size)
        init.uniform_(self.bias, -bound, bound)

    def forward(
        self,
        u: torch.Tensor,
        window: torch.Tensor | None,
        naive: bool = False,
        backend: str = "auto",
    ) -> torch.Tensor:
        """u (B, T, C) after the K−1 inputs `window` (B, K−1, C) or zeros (None)."""
        if naive:
            return short_conv_naive(u, self.weight[:, 0], self.bias, window)[0]
        return short_conv(u, self.weight[:, 0], self.bias, window, backend=backend)[0]


class HyenaOperator(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.order = config.hyena_order
        self.backend = config.kernel_backend
        d = config.hidden_size
        width = (self.order + 1) * d
        self.in_proj = nn.Linear(d, width)
        self.short_filter = ShortConv(width, config.hyena_short_filter)
        self.filter_fn = HyenaFilter(config, d, self.order - 1)
        self.out_proj = nn.Linear(d, d)

    @staticmethod
    def _mask(x: torch.Tensor, context: MixerContext) -> torch.Tensor:
        if context.token_mask is None:
            return x
        return x * context.token_mask[:, :, None].to(x.dtype)

    def _mix(
        self,
        hidden_states: torch.Tensor,
        context: MixerContext,
        history: tuple[torch.Tensor, torch.Tensor] | None,
        naive: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The operator over the new tokens, after `history` = (keys, values) of the cache.

        Returns y (B, T, d), the long-conv inputs (B, T, (N−1)·d) and the projections
        (B, T, (N+1)·d): the two streams the cache appends.
        """
        _, seq_len, d = hidden_states.shape
        cp = context.cp
        if cp is not None and history is not None:
            raise ValueError("context parallelism runs without a cache")
        past = context.offset if cp is not None else 0 if history is None else history[0].shape[-2]
        proj = self._mask(self.in_proj(hidden_states), context)  # (B, T, (N+1)·d)

        kernel = self.short_filter.kernel_size
        window = None
        if cp is not None:
            window = halo(proj, kernel - 1, cp)  # (B, K−1, (N+1)·d): the previous span's last
        if history is not None:
            # The short conv's state: the last K−1 projections, zero-padded if fewer were seen.
            window = history[1][:, 0, max(0, past - kernel + 1) :]  # (B, ≤ K−1, (N+1)·d)
            window = F.pad(window, (0, 0, kernel - 1 - window.shape[1], 0))  # (B, K−1, (N+1)·d)
        mixed = self.short_filter(proj, window, naive, self.backend)  # (B, T, (N+1)·d)
        *gates, v = mixed.split(d, dim=-1)  # N gates x_0 … x_{N−1} and v, each (B, T, d)

        filters, skips = self.filter_fn(past + seq_len, hidden_states.device)
        conv_inputs = []
        for o in range(self.order - 1):
            # Padded positions are zeroed again: the short conv's bias makes them non-zero.
            v = self._mask(v * gates[self.order - 1 - o], context)
            conv_inputs.append(v)
            past_inputs = None if history is None else history[0][:, 0, :, o * d : (o + 1) * d]
            if cp is not None:
                # The earlier spans' inputs are the history; this span's own are read back out
                # of the gathered tensor too, so that rank 0 (no history) has the gather in its
                # graph and runs its backward collective like every other rank.
                whole = gather_sequence(v, cp)  # (B, P·T, d)
                past_inputs, v = whole[:, :past], whole[:, past : past + seq_len]
            if naive:
                v, _ = long_conv_naive(v, filters[o], skips[o], past_inputs)
            else:
                v, _ = long_conv(v, filters[o], skips[o], past_inputs, backend=self.backend)
        y = self.out_proj(v * gates[0])
        return y, torch.cat(conv_inputs, dim=-1), proj

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        history = None
        if cache is not None:
            layer = cache.layers[self.layer_idx]
            if isinstance(layer, StaticLayer) and not layer.is_sliding:
                return self._static_forward(hidden_states, context, cache, layer)
            if not isinstance(layer, DynamicLayer) or layer.is_sliding:
                raise TypeError(
                    f"cache layer {self.layer_idx} is {type(layer).__name__}, but Hyena keeps its "
                    "whole input history in a growing DynamicLayer or in a StaticLayer's slots "
                    "('full_attention' layer type)"
                )
            if layer.get_seq_length() > 0:
                history = (layer.keys, layer.values)
        y, conv_inputs, proj = self._mix(hidden_states, context, history, naive=False)
        if cache is not None:
            cache.update(conv_inputs.unsqueeze(1), proj.unsqueeze(1), self.layer_idx)
        return y

    def _static_forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache, layer: StaticLayer
    ) -> torch.Tensor:
        """Over a StaticLayer: a prefill (several tokens, run eagerly by generate) reads the
        filled length on the host and runs the dynamic form on the filled slots; a decode step
        runs `_static_step`, whose shapes never change."""
        slots = layer.max_cache_len
        if slots > self.filter_fn.max_len:
            raise ValueError(
                f"the static cache has max_cache_len={slots} slots but the Hyena filters are "
                f"defined for max_position_embeddings={self.filter_fn.max_len}"
            )
        if hidden_states.shape[1] == 1 and layer.is_initialized:
            return self._static_step(hidden_states, context, cache, layer)
        past = int(layer.get_seq_length())
        if past + hidden_states.shape[1] > slots:
            raise ValueError(
                f"{hidden_states.shape[1]} new tokens after {past} do not fit the static cache's "
                f"max_cache_len={slots}"
            )
        history = (layer.keys[:, :, :past], layer.values[:, :, :past]) if past else None
        self.filter_fn(slots, hidden_states.device)  # the steps' taps, kept without autograd
        y, conv_inputs, proj = self._mix(hidden_states, context, history, naive=False)
        cache.update(conv_inputs.unsqueeze(1), proj.unsqueeze(1), self.layer_idx)
        return y

    def _static_step(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache, layer: StaticLayer
    ) -> torch.Tensor:
        """One token over L fixed slots, of which the first t (a device tensor) are filled."""
        d = hidden_states.shape[-1]
        slots = layer.max_cache_len
        t = layer.cumulative_length
        proj = self._mask(self.in_proj(hidden_states), context)  # (B, 1, (N+1)·d)
        kernel = self.short_filter.kernel_size
        rows = t - (kernel - 1) + torch.arange(kernel - 1, device=t.device)  # (K−1,) slots
        window = layer.values[:, 0].index_select(1, rows.clamp(min=0))  # (B, K−1, (N+1)·d)
        window = window * (rows >= 0)[None, :, None].to(window.dtype)
        mixed = self.short_filter(proj, window, False, self.backend)  # (B, 1, (N+1)·d)
        *gates, v = mixed.split(d, dim=-1)

        filters, skips = self.filter_fn.taps(slots, hidden_states.device)  # (N−1, d, ≥ L)
        slot = torch.arange(slots, device=t.device)  # (L,)
        lag = (t - slot).clamp(min=0)  # t − s, the tap slot s meets
        filled = (slot < t).to(filters.dtype)  # (L,)
        conv_inputs = []
        for o in range(self.order - 1):
            v = self._mask(v * gates[self.order - 1 - o], context)  # (B, 1, d)
            conv_inputs.append(v)
            past_inputs = layer.keys[:, 0, :, o * d : (o + 1) * d]  # (B, L, d)
            taps = filters[o].index_select(1, lag) * filled  # (d, L)
            current = v[:, 0].float() * (filters[o][:, 0] + skips[o])  # (B, d)
            mixed_past = torch.einsum("bld,dl->bd", past_inputs.float(), taps)
            v = (current + mixed_past).to(v.dtype).unsqueeze(1)  # (B, 1, d)
        y = self.out_proj(v * gates[0])
        cache.update(torch.cat(conv_inputs, dim=-1).unsqueeze(1), proj.unsqueeze(1), self.layer_idx)
        return y

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: tap-by-tap short conv, the long convolution's
        definition position by position, both in fp32."""
        return self._mix(hidden_states, context, None, naive=True)[0]

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, the short conv and N − 1 FFT long convolutions of d channels. An FFT
        convolution of length T (padded to 2T: three transforms of ~5 · 2T · log2(2T) real
        FLOPs, a pointwise product) costs ~15 · 2 · log2(2T) per channel per token. The implicit
        filters depend on positions only (computed once per forward, not per token): left out."""
        d = self.out_proj.in_features
        width = self.in_proj.out_features
        short = 2 * width * self.short_filter.kernel_size
        fft = (self.order - 1) * d * (30 * max(1, (2 * seq_len - 1).bit_length()) + 6)
        return linear_flops(self.in_proj, self.out_proj) + short + fft

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements after `seq_len` tokens: (N−1)·d long-conv inputs and (N+1)·d
        projections per token, so it grows linearly with the length, like a KV cache."""
        d = self.out_proj.in_features
        return batch * seq_len * 2 * self.order * d
