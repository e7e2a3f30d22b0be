"""HGRN2's mixer: chunked, recurrent and naive forms agree; padding, bounds, cache and sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_config
from zoo.cache import new_cache
from zoo.layers.context import MixerContext
from zoo.layers.hgrn2 import HGRN2Attention, hgrn2_lower_bounds

# tiny: d = 48, e = 16 -> 3 heads of a 16 × 16 state, 3 layers.
CONFIG = tiny_config("hgrn2")
D, E, L = CONFIG.hidden_size, CONFIG.hgrn2_expand_ratio, CONFIG.num_hidden_layers


def _bounds(seed: int = 0, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A random Γ (L, d) and the lower bounds β (L, d) the model derives from it."""
    gamma = torch.randn(L, D, generator=torch.Generator().manual_seed(seed))
    gamma.requires_grad_(requires_grad)
    return gamma, hgrn2_lower_bounds(gamma)


def _mixer(layer_idx: int = 1, chunk_size: int = 8) -> HGRN2Attention:
    torch.manual_seed(layer_idx)
    mixer = HGRN2Attention(CONFIG, layer_idx).eval()
    # The default chunk (64) exceeds the test lengths; 8 makes them span several chunks.
    mixer.chunk_size = chunk_size
    return mixer


def _context(x, mask=None, past_len=0, gamma=None) -> MixerContext:
    context = MixerContext.build(mask, None, x.shape[0], x.shape[1], past_len, x.device)
    context.parameters["hgrn2_lower_bounds"] = _bounds()[0] if gamma is None else gamma
    return context


def _x(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, seq_len, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layer_idx", [0, 2])
@pytest.mark.parametrize("seq_len", [1, 13, 37])
def test_forward_matches_reference(layer_idx, seq_len):
    mixer = _mixer(layer_idx)
    x = _x(2, seq_len)
    context = _context(x)
    out = mixer(x, context)
    assert out.shape == x.shape
    torch.testing.assert_close(out, mixer.reference_forward(x, context), atol=1e-5, rtol=1e-5)


def test_without_lower_bounds_layer_forgets_freely():
    # A context without Γ (the mixer outside the model) means β = 0, as at layer 0 for any Γ.
    mixer = _mixer(layer_idx=0)
    x = _x(2, 13)
    free = MixerContext.build(None, None, 2, 13, 0, x.device)
    torch.testing.assert_close(mixer(x, free), mixer(x, _context(x)), atol=1e-6, rtol=0)
    torch.testing.assert_close(mixer(x, free), mixer.reference_forward(x, free))
    # ... while deeper layers do see their bound.
    deeper = _mixer(layer_idx=2)
    assert not torch.allclose(deeper(x, free), deeper(x, _context(x)), atol=1e-3)


@pytest.mark.parametrize("layer_idx", [0, 2])
def test_chunked_prefill_then_decode_matches_forward(layer_idx):
    mixer = _mixer(layer_idx)
    x = _x(2, 29)
    full = mixer(x, _context(x))
    cache = new_cache(CONFIG)
    # A chunked prefill of 13 tokens (not a multiple of the chunk size 8), then one a step.
    steps = [mixer(x[:, :13], _context(x[:, :13]), cache)]
    for t in range(13, 29):
        steps.append(mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full, mixer.reference_forward(x, _context(x)), atol=1e-5, rtol=1e-5)


def test_two_chunked_calls_chain_through_the_cache():
    mixer = _mixer(layer_idx=1)
    x = _x(2, 37)
    cache = new_cache(CONFIG)
    parts = [mixer(x[:, :19], _context(x[:, :19]), cache)]
    parts.append(mixer(x[:, 19:], _context(x[:, 19:], past_len=19), cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), mixer(x, _context(x)), atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak():
    """A left-padded row gives the same outputs and decode continuation as the row alone."""
    mixer = _mixer(layer_idx=2)
    row = _x(1, 9, seed=1)
    other = _x(1, 13, seed=2)
    padded = torch.cat([torch.cat([_x(1, 4, seed=3), row], dim=1), other])  # (2, 13, d)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[0, :4] = 0
    alone = mixer(row, _context(row))
    torch.testing.assert_close(
        mixer(padded, _context(padded, mask))[:1, 4:], alone, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        mixer.reference_forward(padded, _context(padded, mask))[:1, 4:],
        mixer.reference_forward(row, _context(row)),
        atol=1e-5,
        rtol=0,
    )
    # Decode: the padded batch and the row alone continue with the same tokens.
    cache_batch, cache_row = new_cache(CONFIG), new_cache(CONFIG)
    mixer(padded, _context(padded, mask), cache_batch)
    mixer(row, _context(row), cache_row)
    for t in range(5):
        step = _x(2, 1, seed=10 + t)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        batch_out = mixer(step, _context(step, mask, past_len=13 + t), cache_batch)
        row_out = mixer(step[:1], _context(step[:1], past_len=9 + t), cache_row)
        torch.testing.assert_close(batch_out[:1], row_out, atol=1e-5, rtol=0)


def test_log_forget_gate_matches_the_paper_and_respects_the_bound():
    mixer = _mixer(layer_idx=2)
    gamma, beta = _bounds()
    x = _x(2, 7) * 30  # large logits: σ saturates at 0 and 1
    _, k, _, log_f = mixer._gates(x, _context(x, gamma=gamma))
    assert log_f.dtype == torch.float32 and torch.isfinite(log_f).all()
    b = beta[2].view(1, 1, D // E, E).double()
    f = b + (1 - b) * torch.sigmoid(mixer.f_proj(x).double().view(log_f.shape))
    torch.testing.assert_close(log_f.double().exp(), f, atol=1e-6, rtol=1e-5)
    assert (log_f.exp() >= b.float() * (1 - 1e-6)).all()
    torch.testing.assert_close(k, 1 - log_f.exp(), atol=1e-6, rtol=0)


def test_padded_tokens_neither_decay_nor_write():
    mixer = _mixer(layer_idx=1)
    x = _x(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    _, k, i, log_f = mixer._gates(x, _context(x, mask))
    for t in (k, i, log_f):
        assert (t[0, :2] == 0).all() and (t[1] != 0).any()


def test_gradients_reach_gamma_and_stay_finite_at_layer_zero():
    # β_0 = 0 exactly: a plain log β would put 0 · inf = NaN into Γ's gradient.
    gamma, beta = _bounds(requires_grad=True)
    assert (beta[0] == 0).all()
    x = _x(2, 13).requires_grad_()
    loss = sum(_mixer(layer)(x, _context(x, gamma=gamma)).square().sum() for layer in range(L))
    loss.backward()
    assert torch.isfinite(gamma.grad).all() and gamma.grad.abs().max() > 0
    assert torch.isfinite(x.grad).all()


def test_state_size_counts_cache_elements():
    mixer = _mixer(layer_idx=0)
    # Hand count: H = d / e heads of an e × e fp32 state per sequence.
    assert mixer.state_size(3, 11) == 3 * (D // E) * E * E == 3 * D * E
    assert mixer.state_size(3, 11) == mixer.state_size(3, 5000)
    cache = new_cache(CONFIG)
    x = _x(3, 11)
    mixer(x, _context(x), cache)
    layer = cache.layers[0]
    held = list(layer.recurrent_states.values()) + list(layer.conv_states.values())
    held = sum(t.numel() for t in held if isinstance(t, torch.Tensor))
    assert held == mixer.state_size(3, 11)


@pytest.mark.parametrize("norm_type", ["srmsnorm", "rmsnorm"])
def test_parameter_count(norm_type):
    config = tiny_config("hgrn2", norm_type=norm_type)
    mixer = HGRN2Attention(config, 0)
    norm_gain = D if norm_type == "rmsnorm" else 0
    assert sum(p.numel() for p in mixer.parameters()) == 4 * D * D + norm_gain
    # The model adds Γ (L × d) once, beside the per-layer weights.
    model = AutoModelForCausalLM.from_config(config)
    assert model.model.hgrn2_lower_bounds.shape == (L, D)


def test_model_bounds_start_at_l_over_L_and_learn():
    model = AutoModelForCausalLM.from_config(CONFIG)
    torch.testing.assert_close(
        hgrn2_lower_bounds(model.model.hgrn2_lower_bounds),
        (torch.arange(L, dtype=torch.float32) / L)[:, None].expand(L, D),
    )
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids, use_cache=False).loss.backward()
    grad = model.model.hgrn2_lower_bounds.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


@pytest.mark.parametrize(
    ("field", "value"),
    [("hgrn2_expand_ratio", 0), ("hgrn2_expand_ratio", 5), ("norm_type", "groupnorm")],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config("hgrn2", **{field: value})


def test_bf16_forward_close_to_fp32():
    mixer = _mixer(layer_idx=2)
    x = _x(2, 21)
    context = _context(x)
    reference = mixer(x, context)
    out = mixer.to(torch.bfloat16)(x.bfloat16(), context)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_silu_query_and_identity_input():
    mixer = _mixer(layer_idx=1)
    x = _x(1, 4)
    q, _, i, _ = mixer._gates(x, _context(x))
    torch.testing.assert_close(q, F.silu(mixer.q_proj(x)).view(q.shape))
    torch.testing.assert_close(i, mixer.i_proj(x).view(i.shape))
