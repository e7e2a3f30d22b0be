"""TNL's sequence mixer: lightning attention with per-head decay and a low-rank output gate.

TransNormerLLM (Qin et al., arXiv 2307.14995; revised as arXiv 2405.17381), sized as in the
linear-complexity scaling-law paper (Shen et al., arXiv 2406.16690, App. A.1.2):

    q = SiLU(x W_q),  k = SiLU(x W_k),  v = x W_v                     (per head, dim d_h)
    S_t = λ_h S_{t-1} + k_t v_tᵀ,  o_t = q_tᵀ S_t                      (no 1/√d, no denominator)
    y = W_o (SRMSNorm(concat_h o) ⊙ σ(x W_down W_up))                   (gate rank t = d_h)

λ_h is fixed, not learned (learnable λ diverged in the paper), and depends on the head and the
layer depth; `lightning_decay` picks the released code's ALiBi-slope form ("alibi", default) or the
paper's Eq. 10 ("paper"), see `zoo.kernels.lightning.tnl_log_decay`.

Choices where the sources differ (shared/papers/linear-families.md §1): we use the output-gate
variant B of arXiv 2406.16690 (sigmoid, rank t = d_h), since only it reproduces that paper's
parameter counts; no LRPE (the scaling-law paper shows none for TNL); no SiLU on v.

Padding never enters the state: k and v of padded tokens are zeroed, so a left-padded row
decodes exactly like the same row unpadded.

Under context parallelism (`zoo.parallel.scan.recurrent_group`; never with a cache) each rank runs
its span with `zoo.parallel.scan.lightning_cp`: the op from a zero state, one all-gather of the
spans' final states, and the earlier spans' state read out into this span's outputs (one more
product (L×d_h)·(d_h×d_h) per head, the op's inter-chunk read-out again); exact in forward and
backward.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from zoo.cache import recurrent_state
from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.lightning import lightning, lightning_naive, tnl_log_decay
from zoo.layers.context import MixerContext
from zoo.layers.norm import build_norm
from zoo.parallel.scan import lightning_cp, recurrent_group


@lru_cache(maxsize=256)
def _log_decay(
    num_heads: int, layer_idx: int, num_layers: int, form: str, device: torch.device
) -> torch.Tensor:
    # A plain tensor rebuilt on demand rather than a buffer: transformers creates models on the
    # meta device before loading weights, and non-persistent buffers would come back empty.
    # Cached per device, so decoding does not copy it to the GPU once per layer and token.
    return tnl_log_decay(num_heads, layer_idx, num_layers, form).to(device)


class LightningAttention(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.decay_form = config.lightning_decay
        self.chunk_size = config.lightning_chunk_size
        self.backend = config.kernel_backend
        d = config.hidden_size
        rank = config.output_gate_rank or self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.gate_down = nn.Linear(d, rank, bias=False)
        self.gate_up = nn.Linear(rank, d, bias=False)
        self.norm = build_norm(config.norm_type, d, config.rms_norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def log_decay(self, device: torch.device) -> torch.Tensor:
        """log λ per head (H,), ≤ 0."""
        return _log_decay(self.num_heads, self.layer_idx, self.num_layers, self.decay_form, device)

    def _qkv(
        self, x: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq_len, width = x.shape
        if width != self.hidden_size:
            raise ValueError(
                f"hidden_states has width {width} but the layer's hidden_size is {self.hidden_size}"
            )
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        q = F.silu(self.q_proj(x)).view(shape)  # (B, T, H, D)
        k = F.silu(self.k_proj(x)).view(shape)
        v = self.v_proj(x).view(shape)
        if context.token_mask is not None:
            keep = context.token_mask[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        return q, k, v

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        o = self.norm(o.reshape(x.shape))
        gate = torch.sigmoid(self.gate_up(self.gate_down(x)))
        return self.o_proj(o * gate)

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        q, k, v = self._qkv(hidden_states, context)
        cp = recurrent_group(cache, context)
        if cp is not None:
            o = lightning_cp(
                q, k, v, self.log_decay(q.device), cp,
                chunk_size=self.chunk_size, backend=self.backend,
            )  # fmt: skip
            return self._output(o, hidden_states)
        state = recurrent_state(cache, self.layer_idx) if cache is not None else None
        o, final_state = lightning(
            q,
            k,
            v,
            self.log_decay(q.device),
            initial_state=state,
            output_final_state=cache is not None,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        if cache is not None:
            cache.update_recurrent_state(final_state, self.layer_idx)
        return self._output(o, hidden_states)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: the token-by-token recurrence in fp32."""
        q, k, v = self._qkv(hidden_states, context)
        o, _ = lightning_naive(q, k, v, self.log_decay(q.device))
        return self._output(o, hidden_states)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections and output gate, then per head the state update k vᵀ and the read-out
        q S: 2 · 2 · d_h² each, 4 · d · d_h per token."""
        return linear_flops(self) + 4 * self.num_heads * self.head_dim * self.head_dim

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: one d_h × d_h state per head, whatever the length."""
        return batch * self.num_heads * self.head_dim * self.head_dim
