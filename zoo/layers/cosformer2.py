"""cosFormer2's sequence mixer: linear attention without decay, re-weighted by LRPE.

cosFormer2 as the linear-complexity scaling-law paper defines it (Shen et al., "Scaling Laws for
Linear Complexity Language Models", arXiv 2406.16690, §2.2 and App. A.1.4), the successor of
cosFormer (Qin et al., "cosFormer: Rethinking Softmax in Attention", arXiv 2202.08791). Per head
(dim d_h), for a token at position t:

    q = SiLU(x W_q),  k = SiLU(x W_k),  v = x W_v
    q̂_t = [cos(θ t) ⊙ q_t, sin(θ t) ⊙ q_t]   (LRPE, likewise k̂: key dim 2 d_h)
          so that q̂_t · k̂_s = Σ_j q_tj k_sj cos(θ_j (t − s))
    S_t = S_{t-1} + k̂_t v_tᵀ,  o_t = q̂_tᵀ S_t      (λ = 1: no decay, no 1/√d, no denominator)
    y = W_o (Norm(concat_h o) ⊙ σ(x W_down W_up))    (gate rank output_gate_rank or d_h)

It runs on the lightning-attention op (`zoo.kernels.lightning`) without a decay (log λ = 0).

Choices where the sources differ (shared/papers/linear-families.md §3):
- θ is fixed, not learned: θ_j = 10000^(−2j/d_h) on the first ⌊d_h/2⌋ channels and 0 on the
  rest, the same for every head. This is lrpe_type 6 of the first author's later library
  (Doraemonzzz/xmixers, `xmixers/modules/pes/lrpe.py`, used by its cosformer2 config). The paper
  calls θ a parameter, and TNL's released LRPE learns θ over all channels.
- No TPE. The paper also applies LightNet's positional encoding (arXiv 2405.21022) once to the
  embeddings. We leave it out: its exact form is unverified (the LightNet paper was not read), it
  would need a model-level state of its own in the cache, and its d²/h parameters are < 1% of the
  model. Our parameter counts are therefore d²/h below the paper's cos2 column.
- The output norm spans the full width (`config.norm_type`, SRMSNorm in the preset) and the gate
  is TNL's low-rank sigmoid gate, as for TNL in zoo/layers/lightning.py.

Positions come from `context.position_ids`, but only their differences within one call matter.
The cached state is kept in a frame whose origin is the row's next token: S = Σ_s k̂(s − n) v_sᵀ
after n real tokens. A call places its first real token at 0, and afterwards the key rows of the
state are rotated back by the positions it covered (`_shift_origin`). So decoding never needs an
absolute position: ZooModel passes no past length when every cache layer is linear, and large
positions never cost fp32 precision in cos/sin. Decode state: H × 2d_h × d_h fp32 per layer.

Padding never enters the state: k and v of padded tokens are zeroed (their LRPE is then moot) and
a padded token neither sets a row's origin nor advances it.

Under context parallelism (`zoo.parallel.scan.recurrent_group`; never with a cache) each rank runs
its span with `zoo.parallel.scan.lightning_cp` (no decay): the op from a zero state, one all-gather
of the spans' final states, their sum read out into this span's outputs; exact in forward and
backward. There the positions are `context.position_ids` as given, not rebased on the call's first
real token (which is on another rank): they must be the whole sequence's positions of this span, so
that every span's keys are in one frame (only differences matter, as in `reference_forward`).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers.cache_utils import Cache

from zoo.cache import recurrent_state
from zoo.flops import linear_flops
from zoo.kernels.lightning import lightning, lightning_naive
from zoo.layers.context import MixerContext
from zoo.layers.lightning import LightningAttention
from zoo.parallel.scan import lightning_cp, recurrent_group

LRPE_BASE = 10000.0


@lru_cache(maxsize=16)
def _theta(head_dim: int) -> torch.Tensor:
    # A plain tensor rebuilt on demand rather than a buffer: transformers creates models on the
    # meta device before loading weights, and non-persistent buffers would come back empty.
    j = torch.arange(head_dim, dtype=torch.float64)
    theta = LRPE_BASE ** (-2.0 * j / head_dim) * (j < head_dim // 2)  # (D,)
    return theta.to(torch.float32)


def lrpe_theta(head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """LRPE frequencies θ (head_dim,) fp32: 10000^(−2j/d_h) on the first half, 0 on the rest."""
    return _theta(head_dim).to(device)


def lrpe_cos_sin(positions: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(θ t) and sin(θ t), each (B, T, 1, D) fp32, for positions (B, T) and θ (D,)."""
    angle = (positions.float()[..., None] * theta)[:, :, None, :]  # (B, T, 1, D)
    return angle.cos(), angle.sin()


def lrpe(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[cos(θ t) ⊙ x, sin(θ t) ⊙ x] for x (B, T, H, D): (B, T, H, 2D) in x's dtype.

    Computed in fp32 and cast back, as xmixers' `lrpe_cosine` (xopes) does.
    """
    xf = x.float()
    return torch.cat([xf * cos, xf * sin], dim=-1).to(x.dtype)


def _shift_origin(state: torch.Tensor, theta: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Move the origin of an LRPE'd state (B, H, 2D, V) forward by steps (B,) positions.

    The key rows hold Σ cos(θ x_s) k_s v_sᵀ and Σ sin(θ x_s) k_s v_sᵀ; with x → x − n the
    angle-difference identities turn them into a per-channel 2×2 rotation by θ n. The rotation
    runs in fp64 because decode applies one per token: in fp32 its rounding is biased and the
    error grew linearly (9e-6 after 3000 steps of a tiny layer, against 7e-7 for the chunked
    form); in fp64 only the unbiased rounding of the stored fp32 state remains.
    """
    angle = steps.double()[:, None] * theta.double()  # (B, D)
    cos = angle.cos()[:, None, :, None]  # (B, 1, D, 1)
    sin = angle.sin()[:, None, :, None]
    cos_rows, sin_rows = state.double().chunk(2, dim=2)  # (B, H, D, V) each
    rotated = torch.cat([cos * cos_rows + sin * sin_rows, cos * sin_rows - sin * cos_rows], dim=2)
    return rotated.to(state.dtype)


def call_positions(context: MixerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of a call relative to its first real token (B, T), and how far it moves (B,).

    The step count is one past the last real token's relative position, 0 for a row with no real
    token; the positions that padded tokens carry (0, 1, anything) never matter.
    """
    pos = context.position_ids  # (B, T)
    mask = context.token_mask
    if mask is None:
        rel = pos - pos[:, :1]
        return rel, rel.amax(dim=1) + 1
    pos = pos.expand(mask.shape)  # position_ids given as (1, T) serve the whole batch
    # argmax returns the first maximum, i.e. the first real token of each row.
    first = pos.gather(1, mask.long().argmax(dim=1, keepdim=True))  # (B, 1)
    rel = pos - first
    return rel, rel.masked_fill(~mask, -1).amax(dim=1) + 1


class CosFormer2Attention(LightningAttention):
    """TNL's projections, feature map, output norm and gate (inherited), with LRPE and no decay."""

    def _qkv(
        self, x: torch.Tensor, context: MixerContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SiLU features before LRPE: q, k, v (B, T, H, D), with k and v zero at padding."""
        if context.position_ids.shape[-1] != x.shape[1]:
            raise ValueError(
                f"context.position_ids covers {context.position_ids.shape[-1]} tokens but "
                f"hidden_states has {x.shape[1]}"
            )
        return super()._qkv(x, context)

    def forward(
        self, hidden_states: torch.Tensor, context: MixerContext, cache: Cache | None = None
    ) -> torch.Tensor:
        q, k, v = self._qkv(hidden_states, context)
        theta = lrpe_theta(self.head_dim, q.device)
        cp = recurrent_group(cache, context)
        if cp is not None:
            # The whole sequence's positions: every span's keys in the same frame.
            cos, sin = lrpe_cos_sin(context.position_ids, theta)
            o = lightning_cp(
                lrpe(q, cos, sin), lrpe(k, cos, sin), v, None, cp,
                chunk_size=self.chunk_size, backend=self.backend,
            )  # fmt: skip
            return self._output(o, hidden_states)
        positions, steps = call_positions(context)
        cos, sin = lrpe_cos_sin(positions, theta)  # shared by q and k
        state = recurrent_state(cache, self.layer_idx) if cache is not None else None
        o, final_state = lightning(
            lrpe(q, cos, sin),  # (B, T, H, 2D)
            lrpe(k, cos, sin),
            v,
            None,  # no decay
            initial_state=state,
            output_final_state=cache is not None,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )
        if cache is not None:
            cache.update_recurrent_state(_shift_origin(final_state, theta, steps), self.layer_idx)
        return self._output(o, hidden_states)

    def reference_forward(self, hidden_states: torch.Tensor, context: MixerContext) -> torch.Tensor:
        """The naive form over a whole sequence: the token-by-token recurrence in fp32.

        It uses `context.position_ids` as they are, not rebased, so agreeing with `forward` also
        checks that only position differences matter.
        """
        q, k, v = self._qkv(hidden_states, context)
        cos, sin = lrpe_cos_sin(context.position_ids, lrpe_theta(self.head_dim, q.device))
        o, _ = lightning_naive(
            lrpe(q, cos, sin),
            lrpe(k, cos, sin),
            v,
            q.new_zeros(self.num_heads, dtype=torch.float32),
        )
        return self._output(o, hidden_states)

    def flops_per_token(self, seq_len: int) -> int:
        """As lightning attention, with LRPE's cos and sin halves doubling the key width."""
        return linear_flops(self) + 8 * self.num_heads * self.head_dim * self.head_dim

    def state_size(self, batch: int, seq_len: int) -> int:
        """Cache elements: one 2d_h × d_h state per head, whatever the length."""
        return batch * self.num_heads * 2 * self.head_dim * self.head_dim
