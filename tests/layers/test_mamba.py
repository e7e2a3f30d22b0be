"""Mamba mixer: chunked forward, naive reference and cached decode agree; init; padding; state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import zoo
from tests.tiny import tiny_config
from zoo.cache import new_cache
from zoo.layers.context import MixerContext
from zoo.layers.mamba import MambaMixer, dt_rank


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def _mixer(layer_idx: int = 1, **overrides) -> tuple[MambaMixer, zoo.ZooConfig]:
    """A mixer with Mamba's init plus weights large enough that outputs are O(1).

    The model's N(0, 0.02) projections would make every output ~1e-3, too small for a tolerance
    to mean much; the Δ bias is raised so exp(Δ A) spans strong and weak forgetting.
    """
    torch.manual_seed(layer_idx)
    config = tiny_config("mamba", **overrides)
    mixer = MambaMixer(config, layer_idx).eval()
    mixer.init_zoo_weights()
    with torch.no_grad():
        for module, gain in ((mixer.in_proj, 3.0), (mixer.x_proj, 1.0), (mixer.out_proj, 10.0)):
            module.reset_parameters()  # PyTorch's default, as in mamba_ssm, then scaled up
            module.weight.mul_(gain)
        mixer.dt_proj.bias.add_(torch.linspace(0.0, 6.0, mixer.d_inner))
        mixer.A_log.add_(0.5 * torch.randn(mixer.A_log.shape))
    return mixer, config


def _context(x: torch.Tensor, mask: torch.Tensor | None = None, past_len: int = 0) -> MixerContext:
    return MixerContext.build(mask, None, x.shape[0], x.shape[1], past_len, x.device)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("seq_len", [1, 3, 8, 13, 37])
def test_forward_matches_reference(seq_len):
    mixer, config = _mixer()
    x = torch.randn(2, seq_len, config.hidden_size)
    with torch.no_grad():
        out = mixer(x, _context(x))
        ref = mixer.reference_forward(x, _context(x))
    assert out.shape == x.shape
    assert ref.abs().max() > 0.1
    _assert_close(out, ref)


def test_chunked_prefill_and_decode_match_forward():
    """Prefill 13 tokens, continue with a 7-token chunk, then decode one token a step."""
    mixer, config = _mixer(layer_idx=0)
    x = torch.randn(2, 29, config.hidden_size)
    cache = new_cache(config)
    with torch.no_grad():
        full = mixer(x, _context(x))
        reference = mixer.reference_forward(x, _context(x))
        outs = [mixer(x[:, :13], _context(x[:, :13]), cache)]
        outs.append(mixer(x[:, 13:20], _context(x[:, 13:20], past_len=13), cache))
        for t in range(20, 29):
            outs.append(mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache))
    _assert_close(full, reference)
    _assert_close(torch.cat(outs, dim=1), full)


def test_decode_step_reads_derived_constants_and_falls_back_while_recording():
    """A decode step reading `decode_constants()` as its `step_constants` (what a compiled step
    gets) gives the general step's outputs; a cache recording its past for `crop` takes the
    general path (its conv state grows a column per token, through transformers' update)."""
    mixer, config = _mixer(layer_idx=0)
    x = torch.randn(2, 12, config.hidden_size)
    with torch.no_grad():
        full = mixer(x, _context(x))
        for derived, recording in ((True, False), (False, True)):
            cache = new_cache(config)
            outs = [mixer(x[:, :8], _context(x[:, :8]), cache)]
            if recording:
                cache.layers[0].activate_past_recording()
            mixer.step_constants = mixer.decode_constants() if derived else None
            try:
                for t in range(8, 12):
                    outs.append(
                        mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache)
                    )
            finally:
                del mixer.step_constants
            _assert_close(torch.cat(outs, dim=1), full)
            window = cache.layers[0].conv_states[0]
            assert window.shape[-1] == config.mamba_d_conv + (4 if recording else 0)
            torch.testing.assert_close(window[..., -1], mixer.in_proj(x[:, -1]).chunk(2, -1)[0])


def test_prefill_shorter_than_conv_kernel():
    mixer, config = _mixer(layer_idx=0)
    assert config.mamba_d_conv == 4
    x = torch.randn(2, 9, config.hidden_size)
    cache = new_cache(config)
    with torch.no_grad():
        full = mixer(x, _context(x))
        outs = [mixer(x[:, :2], _context(x[:, :2]), cache)]
        for t in range(2, 9):
            outs.append(mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache))
    _assert_close(torch.cat(outs, dim=1), full)


def test_padding_does_not_leak():
    """A left-padded row gives the outputs and the decode continuation of the row alone."""
    mixer, config = _mixer()
    d = config.hidden_size
    row, steps = torch.randn(1, 9, d), torch.randn(1, 5, d)
    padded = torch.cat([torch.randn(1, 4, d), row], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    with torch.no_grad():
        _assert_close(mixer(padded, _context(padded, mask))[:, 4:], mixer(row, _context(row)))
        _assert_close(
            mixer.reference_forward(padded, _context(padded, mask))[:, 4:],
            mixer.reference_forward(row, _context(row)),
        )
        cache_padded, cache_alone = new_cache(config), new_cache(config)
        mixer(padded, _context(padded, mask), cache_padded)
        mixer(row, _context(row), cache_alone)
        for t in range(steps.shape[1]):
            step = steps[:, t : t + 1]
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            _assert_close(
                mixer(step, _context(step, mask, past_len=13 + t), cache_padded),
                mixer(step, _context(step, past_len=9 + t), cache_alone),
            )


def test_state_size_counts_cache_elements():
    mixer, config = _mixer(layer_idx=0)
    # Hand count: the last K conv inputs plus an N-wide SSM state, per inner channel.
    d_inner = config.mamba_expand * config.hidden_size
    assert mixer.state_size(3, 11) == 3 * d_inner * (config.mamba_d_conv + config.mamba_d_state)
    assert mixer.state_size(3, 11) == mixer.state_size(3, 10_000)
    for seq_len in (2, 11):
        cache = new_cache(config)
        x = torch.randn(3, seq_len, config.hidden_size)
        with torch.no_grad():
            mixer(x, _context(x), cache)
        layer = cache.layers[0]
        held = [*layer.conv_states.values(), *layer.recurrent_states.values()]
        assert sum(t.numel() for t in held if t is not None) == mixer.state_size(3, seq_len)
        assert layer.recurrent_states[0].dtype == torch.float32


def test_init_follows_mamba():
    config = tiny_config("mamba")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    mixer = model.model.layers[1].mixer
    n, k, rank = config.mamba_d_state, config.mamba_d_conv, dt_rank(config)
    expected = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(mixer.d_inner, n)
    torch.testing.assert_close(mixer.A_log.detach(), expected)
    assert torch.equal(mixer.D.detach(), torch.ones(mixer.d_inner))
    dt = nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert dt.min() >= config.mamba_dt_min * (1 - 1e-4)
    assert dt.max() <= config.mamba_dt_max * (1 + 1e-4)
    assert dt.std() > 0  # a log-uniform draw, not a constant
    assert mixer.dt_proj.weight.abs().max() <= rank**-0.5
    assert mixer.dt_proj.weight.std() > 0.5 * rank**-0.5 / math.sqrt(3)
    # The conv keeps PyTorch's default init: U(±1/√K) bias, not the model's N(0, 0.02) + zeros.
    assert 0 < mixer.conv1d.bias.abs().max() <= 1 / math.sqrt(k)
    assert mixer.conv1d.weight.std() > 0.1
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay
    assert not hasattr(mixer.in_proj.weight, "_no_weight_decay")


def test_loading_keeps_checkpoint_weights(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mamba"))
    with torch.no_grad():
        model.model.layers[0].mixer.A_log.add_(1.0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    # The per-parameter flag does not survive loading; the mixer's list of names does.
    mixer = reloaded.model.layers[0].mixer
    assert mixer.no_weight_decay_params == ("A_log", "D")
    assert set(mixer.no_weight_decay_params) <= dict(mixer.named_parameters(recurse=False)).keys()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mamba_d_state", 0),
        ("mamba_d_conv", 0),
        ("mamba_expand", 0),
        ("mamba_dt_rank", 0),
        ("mamba_chunk_size", -8),
        ("mamba_dt_min", 0.0),
        ("mamba_dt_max", 1e-4),
    ],
)
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config("mamba", **{field: value})
