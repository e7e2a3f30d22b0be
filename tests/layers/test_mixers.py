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


def _mixer(name: str, layer_idx: int = 1):
    torch.manual_seed(layer_idx)
    config = tiny_mixer_config(name)
    return build_sequence_mixer(config, layer_idx).eval(), config


def _context(x: torch.Tensor, mask: torch.Tensor | None = None, past_len: int = 0) -> MixerContext:
    return MixerContext.build(mask, None, x.shape[0], x.shape[1], past_len, x.device)


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("seq_len", [1, 8, 13, 37])
def test_parallel_matches_naive(name, seq_len):
    mixer, config = _mixer(name)
    x = torch.randn(2, seq_len, config.hidden_size)
    context = _context(x)
    torch.testing.assert_close(
        mixer(x, context), mixer.reference_forward(x, context), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", MIXERS)
def test_recurrent_step_matches_parallel(name):
    mixer, config = _mixer(name, layer_idx=0)
    x = torch.randn(2, 21, config.hidden_size)
    full = mixer(x, _context(x))
    cache = new_cache(config)
    # A chunked prefill of 13 tokens (not a multiple of the chunk size), then one token a step.
    steps = [mixer(x[:, :13], _context(x[:, :13]), cache)]
    for t in range(13, 21):
        steps.append(mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MIXERS)
def test_padding_does_not_leak(name):
    """A left-padded row gives the same outputs at its real tokens as the row alone."""
    mixer, config = _mixer(name)
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
    for name in MIXERS:
        mixer, config = _mixer(name, layer_idx=0)
        cache = new_cache(config)
        x = torch.randn(3, 11, config.hidden_size)
        mixer(x, _context(x), cache)
        layer = cache.layers[0]
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "recurrent_states", {}).values())
        tensors += list(getattr(layer, "conv_states", {}).values())
        held = sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
        assert held == mixer.state_size(3, 11), name
