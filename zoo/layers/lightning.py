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

The released TransNormerLLM checkpoints (OpenNLPLab, `modeling_transnormer.py`) are the same
recurrence with two other choices, both settings (`TNLConfig.from_size("385m-released")`):
`output_gate="linear"`, a full-rank gate without activation, y = W_o (SRMSNorm(o) ⊙ x W_u); and
`lightning_lrpe=True` in the first layer only (`layer_overrides`), LRPE with θ learned per head
and channel (`lrpe_theta`, (H, d_h), init 10000^(−2i/d) over the flattened H·d_h channels), which
doubles the key width as in cosFormer2 (`zoo.layers.lrpe`). With LRPE the cached state is kept in
the frame of the row's next token, as cosFormer2's is; the decay and the rotation commute.

Padding never enters the state: k and v of padded tokens are zeroed, so a left-padded row
decodes exactly like the same row unpadded.

Under context parallelism (`zoo.parallel.scan.recurrent_group`; never with a cache) each rank runs
its span with `zoo.parallel.scan.lightning_cp`: the op from a zero state, one all-gather of the
spans' final states, and the earlier spans' state read out into this span's outputs (one more
product (L×d_h)·(d_h×d_h) per head, the op's inter-chunk read-out again); exact in forward and
backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache

from zoo.cache import recurrent_state
from zoo.configuration import ZooConfig
from zoo.flops import linear_flops
from zoo.kernels.layout import constant_cache
from zoo.kernels.lightning import lightning, lightning_naive, tnl_log_decay
from zoo.layers.context import MixerContext
from zoo.layers.lrpe import call_positions, lrpe, lrpe_cos_sin, shift_origin
from zoo.layers.norm import build_norm
from zoo.parallel.scan import lightning_cp, recurrent_group


@constant_cache(maxsize=256)
def _log_decay(
    num_heads: int, layer_idx: int, num_layers: int, form: str, device: torch.device
) -> torch.Tensor:
    # A plain tensor rebuilt on demand rather than a buffer: transformers creates models on the
    # meta device before loading weights, and non-persistent buffers would come back empty.
    # Cached per device, so decoding does not copy it to the GPU once per layer and token.
    return tnl_log_decay(num_heads, layer_idx, num_layers, form).to(device)


class LightningAttention(nn.Module):
    learns_lrpe = True  # `lightning_lrpe` adds a learned θ (cosFormer2's θ is fixed)

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
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.output_gate = config.output_gate
        if self.output_gate == "linear":
            self.gate_proj = nn.Linear(d, d, bias=False)
        else:
            rank = config.output_gate_rank or self.head_dim
            self.gate_down = nn.Linear(d, rank, bias=False)
            self.gate_up = nn.Linear(rank, d, bias=False)
        self.norm = build_norm(config.norm_type, d, config.rms_norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)
        if self.learns_lrpe and config.lightning_lrpe:
            self.lrpe_theta = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
            self.init_zoo_weights()

    @torch.no_grad()
    def init_zoo_weights(self) -> None:
        """LRPE's θ as the released code starts it: 10000^(−2i/d), i over the H·d_h channels."""
        theta = getattr(self, "lrpe_theta", None)
        if theta is not None:
            i = torch.arange(theta.numel(), dtype=torch.float64, device=theta.device)
            init.copy_(theta, (10000.0 ** (-2.0 * i / theta.numel())).view_as(theta))

    def log_decay(self, device: torch.device) -> torch.Tensor | None:
        """log λ per head (H,), ≤ 0; None for no decay."""
        return _log_decay(self.num_heads, self.layer_idx, self.num_layers, self.decay_form, device)

    def theta(self, device: torch.device) -> torch.Tensor | None:
        """LRPE's θ, (D,) or (H, D); None without LRPE."""
        theta = getattr(self, "lrpe_theta", None)
        return None if theta is None else theta.to(device)

    @property
    def key_dim(self) -> int:
        """Width of a key after the feature map: 2 d_h with LRPE's cos and sin halves."""
        return 2 * self.head_dim if hasattr(self, "lrpe_theta") else self.head_dim

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
        if self.output_gate == "linear":
            gate = self.gate_proj(x)
        else:
            gate = torch.sigmoid(self.gate_up(self.gate_down(x)))
        return self.o_proj(o * gate)

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        q, k, v = self._qkv(hidden_states, context)
        log_decay, theta = self.log_decay(q.device), self.theta(q.device)
        cp = recurrent_group(cache, context)
        if cp is not None:
            if theta is not None:  # the whole sequence's positions: every span in one frame
                cos, sin = lrpe_cos_sin(context.position_ids, theta)
                q, k = lrpe(q, cos, sin), lrpe(k, cos, sin)
            o = lightning_cp(
                q, k, v, log_decay, cp, chunk_size=self.chunk_size, backend=self.backend
            )
            return self._output(o, hidden_states)
        if theta is not None:
            positions, steps = call_positions(context)
            cos, sin = lrpe_cos_sin(positions, theta)  # shared by q and k
            q, k = lrpe(q, cos, sin), lrpe(k, cos, sin)  # (B, T, H, 2D)
        state = recurrent_state(cache, self.layer_idx) if cache is not None else None
        o, final_state = lightning(
            q,
            k,
            v,
            log_decay,
            initial_state=state,
            output_final_state=cache is not None,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        if cache is not None:
            if theta is not None:
                final_state = shift_origin(final_state, theta, steps)
            cache.update_recurrent_state(final_state, self.layer_idx)
        return self._output(o, hidden_states)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: the token-by-token recurrence in fp32.

        LRPE uses `context.position_ids` as they are, not rebased, so agreeing with `forward`
        also checks that only position differences matter.
        """
        q, k, v = self._qkv(hidden_states, context)
        log_decay, theta = self.log_decay(q.device), self.theta(q.device)
        if theta is not None:
            cos, sin = lrpe_cos_sin(context.position_ids, theta)
            q, k = lrpe(q, cos, sin), lrpe(k, cos, sin)
        if log_decay is None:
            log_decay = q.new_zeros(self.num_heads, dtype=torch.float32)
        o, _ = lightning_naive(q, k, v, log_decay)
        return self._output(o, hidden_states)

    def flops_per_token(self, seq_len: int) -> int:
        """Projections and output gate, then per head the state update k vᵀ and the read-out
        q S: 2 · d_k · d_h each (d_k = 2 d_h with LRPE), 4 · H · d_k · d_h per token."""
        return linear_flops(self) + 4 * self.num_heads * self.key_dim * self.head_dim

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: one d_k × d_h state per head, whatever the length."""
        return batch * self.num_heads * self.key_dim * self.head_dim
