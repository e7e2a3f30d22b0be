"""Rotary position embedding (Su et al., arXiv 2104.09864), in transformers' rotate-half layout.

The half-split layout (not interleaved pairs) is what transformers' Llama uses, so weights convert
between the two without permuting q/k projections.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _inv_freq(head_dim: int, base: float) -> torch.Tensor:
    # Computed on the CPU once and moved per call: a buffer would be lost when transformers
    # builds the model on the meta device before loading weights.
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, T, head_dim) for integer positions (B, T)."""
    inv_freq = _inv_freq(head_dim, base).to(position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the angles of cos/sin (B, T, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin
