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
state are rotated back by the positions it covered (`zoo.layers.lrpe.shift_origin`). So decoding
never needs an absolute position: ZooModel passes no past length when every cache layer is
linear, and large positions never cost fp32 precision in cos/sin. Decode state: H × 2d_h × d_h
fp32 per layer.

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

import torch

from zoo.layers.context import MixerContext
from zoo.layers.lightning import LightningAttention
from zoo.layers.lrpe import lrpe_theta


class CosFormer2Attention(LightningAttention):
    """TNL's projections, feature map, output norm and gate (inherited), with LRPE of fixed θ
    and no decay."""

    learns_lrpe = False

    def log_decay(self, device: torch.device) -> None:
        return None  # λ = 1

    def theta(self, device: torch.device) -> torch.Tensor:
        return lrpe_theta(self.head_dim, device)

    @property
    def key_dim(self) -> int:
        return 2 * self.head_dim

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
