"""Softmax attention of LLaMA (Touvron et al., arXiv 2302.13971): RoPE, grouped-query heads, SDPA.

    o = softmax(q kᵀ / √d + causal/padding mask) v,   q, k rotated by RoPE at their positions

Three forms of the same weights: the parallel form (`forward` without a cache, through
`torch.nn.functional.scaled_dot_product_attention`), the recurrent step (`forward` with a cache:
keys and values of past tokens are kept in a transformers `DynamicLayer`), and the naive reference
(`reference_forward`: explicit softmax in fp32). Weight names follow transformers' LlamaAttention.

Settings for transformers' Llama variants (defaults give the original LLaMA layer): `rotary_scaling`
(RoPE "linear", "yarn" or "llama3", tables from transformers' `ROPE_INIT_FUNCTIONS`, see
`zoo.layers.rotary`), `attention_bias` (biases on q, k, v and o) and `attention_head_dim` (the
head size, so q/k/v/o are heads × head_dim wide whatever hidden_size is).

Cross-layer K/V sharing (`ZooConfig.kv_source`; Brandon et al., arXiv 2405.12981, and STAR's
feature-group sharing): a reading layer has no k/v projections and no cache of its own; it attends
with its own queries over the keys and values its source layer computed (and cached) in the same
forward, which the source leaves in `MixerContext.shared_kv`. Its decode cache is empty.

Context parallelism (`MixerContext.cp`: this rank holds the span [offset, offset + T) of a
sequence of P·T tokens): the span's keys and values, rotated at their global positions, are
all-gathered over the group (`zoo.parallel.context.gather_sequence`, differentiable: the gradient
of every gathered key goes back to the rank that owns it). The span's queries attend to the keys
[0, offset + T), the later ones being masked for all of them anyway, with the causal mask offset
by the span's start (query at global position offset + i sees keys j ≤ offset + i): on CUDA
SDPA with torch's lower-right causal bias (flash attention, no mask held; K/V heads repeated for
grouped queries, since that path takes no GQA flag; not yet run on a GPU), on the CPU an
explicit bool mask, which SDPA's CPU path turns into a (T, offset + T) score matrix kept for the
backward (benchmarks/parallel.py: at 2 ranks an attention layer keeps 0.93 of one process's
activations, where one process's causal flash kernel keeps none of them). Grouped-query heads
work as without it; a K/V-sharing layer leaves the gathered K/V in `shared_kv`, so its readers
gather nothing. Exact, forward and backward.
Costs per rank: memory for the keys and values of the whole sequence (2 · B · Hkv · P·T · d_h
per layer that computes them, the all-gather's result, kept for the backward, plus the sliced
(offset + T) copy SDPA reads), one all-gather of the span's K/V forward and a reduce-scatter of
their gradients backward. The causal work is not balanced: rank r computes (r + 1)·T² scores, so
the last rank does about 2P/(P + 1) times the mean and sets the step time (a zig-zag split of
the sequence would even it out; not done).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers.cache_utils import Cache

from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.matvec import materialize, vecmat
from zoo.layers.context import MixerContext
from zoo.layers.rotary import apply_rotary
from zoo.parallel.context import gather_sequence


def attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """softmax(q kᵀ/√d + bias) v in fp32; q (B, H, T, D), k/v (B, H, S, D), bias (B, 1, T, S)."""
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores + bias.float(), dim=-1) @ v.float()).to(q.dtype)


def step_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of one query per sequence written as two reductions, the form the compiled CPU decode
    step uses: inductor compiles q·Kᵀ and the weighted sum of V into loops over the cache, fused
    with the mask and the softmax, in the same C++ as the rest of the step (no extern call), the
    rotated query and the softmax weights stored once (`zoo.kernels.matvec.materialize`), V read
    in one pass (`zoo.kernels.matvec.vecmat`).
    q: (B, H, 1, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv (grouped queries); mask: None,
    bool (True = attend) or additive, broadcastable to (B, 1, 1, S). Scores and softmax in fp32;
    returns (B, H, 1, D)."""
    batch, heads, _, dim = q.shape
    groups = k.shape[1]
    q = materialize(q.float().reshape(batch, groups, heads // groups, 1, dim))
    # The scale on the scores, in the loop over the cache: on the query it was a pass of its own.
    scores = (q * k.float().unsqueeze(2)).sum(-1) * dim**-0.5  # (B, Hkv, H/Hkv, S)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.float()
    o = vecmat(scores.softmax(-1), v.float().unsqueeze(2))  # (B, Hkv, H/Hkv, D)
    return o.reshape(batch, heads, 1, dim).to(v.dtype)


def attention_head_dim(config: ZooConfig) -> int:
    """The attention's head size: `attention_head_dim` when set, else hidden_size / heads."""
    explicit = getattr(config, "attention_head_dim", None)
    return explicit if explicit is not None else config.head_dim


class Attention(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kv_source = (config.kv_source or [None] * config.num_hidden_layers)[layer_idx]
        self.shares_kv = layer_idx in (config.kv_source or [])
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attention_head_dim(config)
        self.rotary_base = config.rotary_base
        self.rotary_scaling = getattr(config, "rotary_scaling", None)
        self.max_position_embeddings = getattr(config, "max_position_embeddings", None)
        bias = bool(getattr(config, "attention_bias", False))
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        if self.kv_source is None:
            self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)

    def _rotary(
        self, context: MixerContext, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of this layer's RoPE, made once per forward and shared by the layers."""
        scaling = self.rotary_scaling or None
        return context.rotary(
            self.head_dim, self.rotary_base, dtype, scaling, self.max_position_embeddings
        )

    def _qkv(
        self, x: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """q, k, v with RoPE applied; k and v are None in a layer that reads another's."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        cos, sin = self._rotary(context, q.dtype)
        if self.kv_source is not None:
            return apply_rotary(q, cos, sin), None, None
        k = self.k_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _source_kv(self, context: MixerContext) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_source not in context.shared_kv:
            raise RuntimeError(
                f"attention layer {self.layer_idx} reads K/V of layer {self.kv_source}, which has "
                "not run in this forward (reentrant gradient checkpointing loses it; use "
                "use_reentrant=False)"
            )
        return context.shared_kv[self.kv_source]

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, context)
        if self.kv_source is not None:
            k, v = self._source_kv(context)  # (B, Hkv, S, D): the source's cache + current
        elif context.cp is not None:
            if cache is not None:
                raise ValueError("context parallelism runs without a cache")
            k, v = gather_sequence(k, context.cp, dim=2), gather_sequence(v, context.cp, dim=2)
        elif cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.shares_kv:
            context.shared_kv[self.layer_idx] = (k, v)
        if context.cp is not None:
            # The whole sequence's K/V: keep the keys up to the span's end, offset-causal mask.
            end = context.offset + seq_len
            k, v = k[:, :, :end], v[:, :, :end]
            if q.device.type == "cuda":
                # Lower-right causal: flash attention with no (T, offset + T) mask to hold. Its
                # flash path takes no GQA flag, so the K/V heads are repeated first.
                repeat = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=causal_lower_right(seq_len, end)
                )
            else:  # the CPU has no lower-right causal kernel: the bool mask, materialised
                o = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=context.span_mask(q.device),
                    enable_gqa=self.num_kv_heads != self.num_heads,
                )  # fmt: skip
            return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, -1))
        kv_len = k.shape[2]
        past_len = kv_len - seq_len
        mask, is_causal = None, False
        if context.prepared_mask is not None:
            mask = context.prepared_mask  # a static cache's (B, 1, T, slots), made by the model
        elif context.key_mask is not None:
            mask = context.attention_bias(past_len, kv_len, q.dtype)
        elif seq_len == kv_len:
            is_causal = seq_len > 1
        elif seq_len > 1:
            # Several new tokens after a cached prefix: causal with an offset.
            q_pos = torch.arange(past_len, kv_len, device=q.device)[:, None]
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos  # (T, S)
        if seq_len == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
            o = step_attention(q, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (B, H, T, D)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, -1))

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence (no cache): explicit softmax in fp32. Under
        context parallelism, the span's queries over the gathered keys, as `forward`."""
        batch, seq_len, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, context)
        if self.kv_source is not None:
            k, v = self._source_kv(context)
        elif context.cp is not None:
            k, v = gather_sequence(k, context.cp, dim=2), gather_sequence(v, context.cp, dim=2)
        if self.shares_kv:
            context.shared_kv[self.layer_idx] = (k, v)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if context.cp is not None:
            end = context.offset + seq_len
            k, v = k[:, :, :end], v[:, :, :end]
            allowed = context.span_mask(q.device)
            bias = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, -math.inf)
            bias = bias.expand(batch, 1, *allowed.shape)
        elif context.key_mask is not None:
            bias = context.attention_bias(0, seq_len, torch.float32)
        else:
            causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
            bias = torch.zeros(seq_len, seq_len, device=q.device).masked_fill(~causal, -math.inf)
            bias = bias.expand(batch, 1, seq_len, seq_len)
        o = attention_naive(q, k, v, bias)
        return self.o_proj(o.transpose(1, 2).reshape(batch, seq_len, -1))

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, then scores and values over the full context: 2 · 2 · T · h · d_h."""
        return linear_flops(self) + 4 * seq_len * self.num_heads * self.head_dim

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements after `seq_len` tokens: keys and values of every kv head (none in a
        layer that reads another layer's)."""
        if self.kv_source is not None:
            return 0
        return 2 * batch * self.num_kv_heads * seq_len * self.head_dim
