"""LRPE, linearized relative positional encoding (Qin et al., TMLR 2023): the features
[cos(θ t) ⊙ x, sin(θ t) ⊙ x] of a query or key at position t, so that q̂_t · k̂_s =
Σ_j q_tj k_sj cos(θ_j (t − s)) depends on t − s only. Shared by cosFormer2 (fixed θ, one per
channel) and TNL's released first layer (θ learned per head and channel).

θ is (D,), the same for every head, or (H, D), one row per head.
"""

from __future__ import annotations

import torch

from zoo.kernels.layout import constant_cache
from zoo.layers.context import MixerContext

LRPE_BASE = 10000.0


@constant_cache(maxsize=16)
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
    """cos(θ t) and sin(θ t) fp32 for positions (B, T): (B, T, 1, D) for θ (D,), (B, T, H, D)
    for θ (H, D)."""
    angle = positions.float()[..., None, None] * theta.float()
    return angle.cos(), angle.sin()


def lrpe(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[cos(θ t) ⊙ x, sin(θ t) ⊙ x] for x (B, T, H, D): (B, T, H, 2D) in x's dtype.

    Computed in fp32 and cast back, as xmixers' `lrpe_cosine` (xopes) does.
    """
    xf = x.float()
    return torch.cat([xf * cos, xf * sin], dim=-1).to(x.dtype)


def shift_origin(state: torch.Tensor, theta: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Move the origin of an LRPE'd state (B, H, 2D, V) forward by steps (B,) positions.

    The key rows hold Σ cos(θ x_s) k_s v_sᵀ and Σ sin(θ x_s) k_s v_sᵀ; with x → x − n the
    angle-difference identities turn them into a per-channel 2×2 rotation by θ n. The rotation
    runs in fp64 because decode applies one per token: in fp32 its rounding is biased and the
    error grew linearly (9e-6 after 3000 steps of a tiny layer, against 7e-7 for the chunked
    form); in fp64 only the unbiased rounding of the stored fp32 state remains.
    """
    angle = steps.double().view(-1, *(1,) * theta.dim()) * theta.double()  # (B, [H,] D)
    if theta.dim() == 1:
        angle = angle[:, None]  # (B, 1, D): every head alike
    cos = angle.cos()[..., None]  # (B, 1 or H, D, 1)
    sin = angle.sin()[..., None]
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
