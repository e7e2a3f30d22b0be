"""Gated linear attention (GLA; Yang et al., arXiv 2312.06635), as fla's `GatedLinearAttention`:

    q = x W_q,  k = x W_k,  v = x W_v                                (per head: d_k, d_v)
    log α = logsigmoid(x W_α↓ W_α↑ + b) / τ                           (per head and key channel)
    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ,  o_t = (q_t / √d_k)ᵀ S_t       (no denominator)
    y = W_o (RMSNorm(o) ⊙ SiLU(x W_g))                  (RMSNorm per head, one gain for all)

d_k = `gla_expand_k` · d and d_v = `gla_expand_v` · d over `num_attention_heads` heads (fla's
defaults 0.5 and 1), the forget gate's low rank `gla_gate_low_rank_dim` (16) and its normaliser
τ = `gla_gate_logit_normalizer` (16), which keeps α close to 1. Parameter names are fla's
(`q_proj`, `k_proj`, `v_proj`, `g_proj`, `gk_proj.0`, `gk_proj.1`, `o_proj`; the per-head norm's
gain `g_norm_swish_gate.weight`), so an fla GLA layer maps onto this one name for name. fla's
options left out: short convolutions, feature maps, grouped K/V heads and a clamped gate (all off
by default there).

The recurrence is the op HGRN2 runs, `zoo.kernels.gla.gla` (chunked torch form, Triton kernels,
fused decode step), and under context parallelism `zoo.parallel.scan.gla_cp`.

Padding never enters the state: at padded tokens k and v are zeroed and log α is 0 (no decay), so
a left-padded row gives the outputs and the continuation of the same row alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from zoo.cache import recurrent_state
from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.gla import gla, gla_naive
from zoo.layers.context import MixerContext
from zoo.layers.norm import RMSNorm
from zoo.parallel.scan import gla_cp, recurrent_group


def gla_dims(config: ZooConfig) -> tuple[int, int]:
    """(d_k, d_v): the key and value widths over all heads."""
    return (
        round(config.hidden_size * config.gla_expand_k),
        round(config.hidden_size * config.gla_expand_v),
    )


def gated_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    context: MixerContext,
    cache: Cache | None,
    layer_idx: int,
    chunk_size: int,
    backend: str,
) -> torch.Tensor:
    """The `gla` recurrence of one call, (B, T, H, V): under context parallelism its span form,
    else the op from the layer's cached state (zeros without one), the final state written
    back. GLA and HGRN2 both run it."""
    cp = recurrent_group(cache, context)
    if cp is not None:
        return gla_cp(q, k, v, log_decay, cp, chunk_size=chunk_size, backend=backend)
    state = recurrent_state(cache, layer_idx) if cache is not None else None
    o, final_state = gla(
        q, k, v, log_decay, initial_state=state, output_final_state=cache is not None,
        chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    if cache is not None:
        cache.update_recurrent_state(final_state, layer_idx)
    return o


class GatedLinearAttention(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        key_dim, value_dim = gla_dims(config)
        self.head_k_dim = key_dim // self.num_heads
        self.head_v_dim = value_dim // self.num_heads
        self.scale = self.head_k_dim**-0.5
        self.normalizer = config.gla_gate_logit_normalizer
        self.chunk_size = config.gla_chunk_size
        self.backend = config.kernel_backend
        d = config.hidden_size
        self.q_proj = nn.Linear(d, key_dim, bias=False)
        self.k_proj = nn.Linear(d, key_dim, bias=False)
        self.v_proj = nn.Linear(d, value_dim, bias=False)
        self.g_proj = nn.Linear(d, value_dim, bias=False)
        rank = config.gla_gate_low_rank_dim
        self.gk_proj = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, key_dim))
        eps = config.gla_norm_eps if config.gla_norm_eps is not None else config.rms_norm_eps
        self.g_norm_swish_gate = RMSNorm(self.head_v_dim, eps)
        self.o_proj = nn.Linear(value_dim, d, bias=False)

    def _gates(
        self, x: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (scaled), k, v and log α, (B, T, H, ·); log α in fp32."""
        batch, seq_len, _ = x.shape
        keys = (batch, seq_len, self.num_heads, self.head_k_dim)
        values = (batch, seq_len, self.num_heads, self.head_v_dim)
        q = self.q_proj(x).view(keys) * self.scale
        k = self.k_proj(x).view(keys)
        v = self.v_proj(x).view(values)
        log_alpha = F.logsigmoid(self.gk_proj(x).float()).view(keys) / self.normalizer
        if context.token_mask is not None:
            pad = ~context.token_mask[:, :, None, None]  # (B, T, 1, 1)
            k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
            log_alpha = log_alpha.masked_fill(pad, 0.0)
        return q, k, v, log_alpha

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate = self.g_proj(x).view(o.shape)  # (B, T, H, d_v / H)
        y = self.g_norm_swish_gate(o) * F.silu(gate)
        return self.o_proj(y.reshape(*x.shape[:2], -1))

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        q, k, v, log_alpha = self._gates(hidden_states, context)
        o = gated_recurrence(
            q, k, v, log_alpha, context, cache, self.layer_idx, self.chunk_size, self.backend
        )
        return self._output(o, hidden_states)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: the token-by-token recurrence in fp32."""
        q, k, v, log_alpha = self._gates(hidden_states, context)
        o, _ = gla_naive(q, k, v, log_alpha)
        return self._output(o, hidden_states)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections, then per head the gated state update and the read-out: 4 · d_k · d_v / H."""
        return linear_flops(self) + 4 * self.num_heads * self.head_k_dim * self.head_v_dim

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: one (d_k / H) × (d_v / H) state per head, whatever the length."""
        return batch * self.num_heads * self.head_k_dim * self.head_v_dim
