"""GLA (`zoo.layers.gla`, on the `zoo.kernels.gla` op): the op equals fla's naive GLA reference,
and the layer equals fla's own `GatedLinearAttention` holding the same weights, name for name.

fla's layer runs its Triton kernels (fused recurrent GLA, fused RMSNorm-gate) under Triton's
interpreter on a CPU (tests/conftest.py), with one autotune config each, as
tests/test_convert_fla_hgrn2.py explains; inputs stay at or under 64 tokens, the length up to
which fla's layer takes its fused recurrent kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.fla_support import one_autotune_config
from tests.tiny import tiny_mixer_config
from zoo.kernels.gla import gla
from zoo.layers.context import MixerContext
from zoo.layers.gla import GatedLinearAttention

fla_naive = pytest.importorskip("fla.ops.gla.naive", reason="needs flash-linear-attention")


@pytest.mark.parametrize("T", [1, 17, 64])
def test_the_op_equals_fla_naive_gla(T):
    torch.manual_seed(T)
    B, H, K, V = 2, 3, 16, 8
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H, K)) / 4
    state = torch.randn(B, H, K, V)
    ref, ref_state = fla_naive.naive_recurrent_gla(q, k, v, g, state, output_final_state=True)
    # fla scales q by K^-1/2 inside; the zoo op takes q as it is (the layer scales it).
    ours, our_state = gla(q * K**-0.5, k, v, g, state, output_final_state=True, chunk_size=8)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(our_state, ref_state, atol=2e-5, rtol=1e-5)


@pytest.fixture
def fla_kernels_here():
    with one_autotune_config():
        yield


def test_the_layer_equals_fla_gated_linear_attention(fla_kernels_here):
    fla_layers = pytest.importorskip("fla.layers", reason="needs flash-linear-attention")
    config = tiny_mixer_config("gla", gla_norm_eps=1e-5)
    torch.manual_seed(0)
    ours = GatedLinearAttention(config, 0).eval()
    with torch.no_grad():  # every weight matters: gains and the gate's bias off their init
        for param in ours.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    theirs = fla_layers.GatedLinearAttention(
        mode="fused_recurrent",
        hidden_size=config.hidden_size,
        expand_k=config.gla_expand_k,
        expand_v=config.gla_expand_v,
        num_heads=config.num_attention_heads,
        gate_low_rank_dim=config.gla_gate_low_rank_dim,
        gate_logit_normalizer=config.gla_gate_logit_normalizer,
        norm_eps=1e-5,
        layer_idx=0,
    ).eval()
    theirs.load_state_dict(ours.state_dict())  # the same names and shapes, strict
    x = torch.randn(2, 20, config.hidden_size)
    context = MixerContext.build(None, None, 2, 20, 0, x.device)
    with torch.no_grad():
        expected = theirs(x)[0]
        torch.testing.assert_close(ours(x, context), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ours.reference_forward(x, context), expected, atol=1e-5, rtol=1e-5
        )
