"""`step_attention`, one query per sequence as reductions (the compiled CPU decode step's form),
equals SDPA: boolean and additive masks, grouped-query heads, eager and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.layers.attention import step_attention


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("dim", [8, 40])  # under one slice of V's sum; two and a short one
def test_step_attention_equals_sdpa(heads, kv_heads, mask_kind, dim):
    torch.manual_seed(0)
    batch, slots = 2, 11
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, slots, dim), torch.randn(batch, kv_heads, slots, dim)
    keep = torch.rand(batch, 1, 1, slots) > 0.3
    keep[..., 0] = True  # every row sees a slot
    mask = {
        "none": None,
        "bool": keep,
        "additive": torch.zeros(keep.shape).masked_fill(~keep, float("-inf")),
    }[mask_kind]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(step_attention(q, k, v, mask), expected, atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()  # one compile per case (dynamo's recompile limit is 8)
    compiled = torch.compile(step_attention, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), expected, atol=1e-5, rtol=1e-5)
