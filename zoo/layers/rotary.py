"""Rotary position embedding (Su et al., arXiv 2104.09864), in transformers' rotate-half layout.

The half-split layout (not interleaved pairs) is what transformers' Llama uses, so weights convert
between the two without permuting q/k projections.

RoPE scaling (the attention mixer's `rotary_scaling` setting: None for plain RoPE, or a dict
with a "rope_type" of `SCALED_ROPE_TYPES` and that type's keys, as transformers'
`rope_parameters` minus "rope_theta", which is `rotary_base`): the inverse frequencies and the
attention factor come from transformers' own `ROPE_INIT_FUNCTIONS`, so they are the
ecosystem's numbers, and cos/sin are multiplied by the factor as transformers' Llama does.
"longrope" picks its long factors when the largest position of the forward call reaches past
`original_max_position_embeddings` and its short ones otherwise, per call, as transformers'
`dynamic_rope_update` does. "dynamic" is not supported: transformers' tables for it depend on
the lengths of the earlier calls on the same module (they grow and are kept), not on the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from zoo.kernels.layout import constant_cache
from zoo.kernels.matvec import materialize

SCALED_ROPE_TYPES = ("linear", "yarn", "llama3", "longrope")
"""The `rotary_scaling["rope_type"]` values zoo's attention implements (exactly as transformers)."""


@constant_cache(maxsize=16)
def _inv_freq(head_dim: int, base: float) -> torch.Tensor:
    # Computed on the CPU once and moved per call: a buffer would be lost when transformers
    # builds the model on the meta device before loading weights.
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _freeze(scaling: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))


@constant_cache(maxsize=16)
def _scaled_tables(
    device: torch.device,
    head_dim: int,
    base: float,
    scaling: tuple[tuple[str, Any], ...],
    max_position_embeddings: int | None,
    long: bool = False,
) -> tuple[torch.Tensor, float]:
    """(inv_freq on `device`, attention factor) of a scaled RoPE, from transformers' functions
    (`long`: longrope's long-context table)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {k: list(v) if isinstance(v, tuple) else v for k, v in scaling}
    rope_type = params.get("rope_type")
    if rope_type not in SCALED_ROPE_TYPES:
        raise ValueError(
            f"rotary_scaling['rope_type']={rope_type!r} is not supported; zoo's attention "
            f"implements {list(SCALED_ROPE_TYPES)} (or rotary_scaling=None for plain RoPE)"
        )
    extra = (
        {}
        if max_position_embeddings is None
        else {"max_position_embeddings": max_position_embeddings}
    )
    config = transformers.LlamaConfig(
        hidden_size=head_dim,
        num_attention_heads=1,
        head_dim=head_dim,
        rope_parameters={**params, "rope_theta": float(base)},
        **extra,
    )
    # transformers asks longrope for its long table with seq_len = original + 1.
    seq_len = params["original_max_position_embeddings"] + 1 if long else None
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](
        config, device=None, seq_len=seq_len
    )
    return inv_freq.to(device), float(attention_factor)


def rope_tables(
    head_dim: int,
    base: float,
    scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
    device: torch.device | str = "cpu",
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (head_dim / 2,) fp32 on `device` and the factor cos/sin are
    scaled by; cached per (device, settings). `scaling` None (or rope_type "default") is plain
    RoPE with factor 1. `seq_len` (largest position + 1 of the call) matters for "longrope"."""
    if not scaling or scaling.get("rope_type", "default") == "default":
        return _inv_freq(head_dim, base).to(device), 1.0
    long = (
        scaling.get("rope_type") == "longrope"
        and seq_len is not None
        and seq_len > scaling["original_max_position_embeddings"]
    )
    return _scaled_tables(
        torch.device(device),
        head_dim,
        float(base),
        _freeze(scaling),
        max_position_embeddings,
        long,
    )


def rotary_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    base: float,
    dtype: torch.dtype,
    scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, T, head_dim) for integer positions (B, T)."""
    seq_len = None
    if scaling and scaling.get("rope_type") == "longrope" and position_ids.numel():
        seq_len = int(position_ids.max()) + 1  # transformers: max over the call's positions
    inv_freq, factor = rope_tables(
        head_dim, base, scaling, max_position_embeddings, position_ids.device, seq_len
    )
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, head_dim)
    cos, sin = emb.cos(), emb.sin()
    if factor != 1.0:  # transformers scales cos/sin by the RoPE type's attention factor
        cos, sin = cos * factor, sin * factor
    # Stored once: a compiled step would otherwise recompute them in every layer that reads them.
    return materialize(cos.to(dtype)), materialize(sin.to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, head_dim) by the angles of cos/sin (B, T, head_dim): transformers'
    x·cos + rotate_half(x)·sin, written per half and stacked, which a compiled decode step runs
    as one loop (a rotated half concatenated as transformers does was copied in three)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.unflatten(-1, (2, -1)).unbind(-2)
    c1, c2 = cos.unflatten(-1, (2, -1)).unbind(-2)
    s1, s2 = sin.unflatten(-1, (2, -1)).unbind(-2)
    return torch.stack((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-2).flatten(-2)
