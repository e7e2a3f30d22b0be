"""Every sequence mixer: parallel, recurrent-step and naive forms of the same weights agree."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import tiny_mixer_config
from zoo import registry
from zoo.cache import new_cache
from zoo.layers import build_sequence_mixer
from zoo.layers.context import MixerContext

MIXERS = sorted(registry.sequence_mixers())
# Settings that change a mixer's computation, checked like the defaults: (mixer, settings).
VARIANTS = [
    # The released TransNormerLLM's layer 0: learned per-head LRPE and the plain linear gate.
    ("lightning", {"lightning_lrpe": True, "output_gate": "linear"}),
    # fla's HGRN2: q / sqrt(e), an output RMSNorm with gain and its own eps.
    ("hgrn2", {"hgrn2_q_scale": "rsqrt_dim", "hgrn2_output_norm": "rmsnorm",
               "hgrn2_output_norm_eps": 1e-5}),
    # safari's options: trained positional features, normalised filters, no skip term, a shift.
    ("hyena", {"hyena_learned_pos_emb": True, "hyena_normalized": True,
               "hyena_filter_bias": False, "hyena_modulation_shift": 0.05}),
]  # fmt: skip
CASES = [pytest.param(name, {}, id=name) for name in MIXERS] + [
    pytest.param(name, settings, id=f"{name}-" + "-".join(f"{k}={v}" for k, v in settings.items()))
    for name, settings in VARIANTS
]


def _mixer(name: str, layer_idx: int = 1, settings: dict | None = None):
    torch.manual_seed(layer_idx)
    config = tiny_mixer_config(name, **(settings or {}))
    mixer = build_sequence_mixer(config, layer_idx).eval()
    with torch.no_grad():  # learned LRPE: θ off its init, so that no channel is special
        for name_, param in mixer.named_parameters():
            if name_.endswith("lrpe_theta"):
                param.mul_(torch.rand_like(param) + 0.5)
    return mixer, config


def _context(x: torch.Tensor, mask: torch.Tensor | None = None, past_len: int = 0) -> MixerContext:
    return MixerContext.build(mask, None, x.shape[0], x.shape[1], past_len, x.device)


@pytest.mark.parametrize(("name", "settings"), CASES)
@pytest.mark.parametrize("seq_len", [1, 8, 13, 37])
def test_parallel_matches_naive(name, settings, seq_len):
    mixer, config = _mixer(name, settings=settings)
    x = torch.randn(2, seq_len, config.hidden_size)
    context = _context(x)
    torch.testing.assert_close(
        mixer(x, context), mixer.reference_forward(x, context), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_recurrent_step_matches_parallel(name, settings):
    mixer, config = _mixer(name, layer_idx=0, settings=settings)
    x = torch.randn(2, 21, config.hidden_size)
    full = mixer(x, _context(x))
    cache = new_cache(config)
    # A chunked prefill of 13 tokens (not a multiple of the chunk size), then one token a step.
    steps = [mixer(x[:, :13], _context(x[:, :13]), cache)]
    for t in range(13, 21):
        steps.append(mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_padding_does_not_leak(name, settings):
    """A left-padded row gives the same outputs at its real tokens as the row alone."""
    mixer, config = _mixer(name, settings=settings)
    row = torch.randn(1, 9, config.hidden_size)
    padded = torch.cat([torch.randn(1, 4, config.hidden_size), row], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    torch.testing.assert_close(
        mixer(padded, _context(padded, mask))[:, 4:], mixer(row, _context(row)), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        mixer.reference_forward(padded, _context(padded, mask))[:, 4:],
        mixer.reference_forward(row, _context(row)),
        atol=1e-5,
        rtol=0,
    )


def test_state_size_counts_cache_elements():
    for name, settings in [(name, {}) for name in MIXERS] + VARIANTS:
        mixer, config = _mixer(name, layer_idx=0, settings=settings)
        cache = new_cache(config)
        x = torch.randn(3, 11, config.hidden_size)
        mixer(x, _context(x), cache)
        layer = cache.layers[0]
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "recurrent_states", {}).values())
        tensors += list(getattr(layer, "conv_states", {}).values())
        held = sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
        assert held == mixer.state_size(3, 11), name
