"""Hyena operator: FFT/direct forward, naive reference and cached decode agree; padding and the
filter length limit; cache accounting; config checks; init through transformers; the Triton
kernels (the interpreter on CPU) give a mixer and a model equal to the torch forms'."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_config
from zoo.cache import new_cache
from zoo.kernels import long_conv as long_conv_module
from zoo.layers import build_sequence_mixer
from zoo.layers.context import MixerContext
from zoo.layers.hyena import HyenaOperator, _positional_features


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


@pytest.fixture(params=["fft", "direct"])
def conv_path(request, monkeypatch):
    """Run each test once with the FFT everywhere and once with the direct conv everywhere."""
    limit = 0 if request.param == "fft" else 10**9
    monkeypatch.setattr(long_conv_module, "_DIRECT_MAX_NEW_TOKENS", limit)
    return request.param


def _mixer(order: int = 2, layer_idx: int = 0, **overrides) -> tuple[HyenaOperator, object]:
    torch.manual_seed(layer_idx + 10 * order)
    config = tiny_config("hyena", hyena_order=order, **overrides)
    return build_sequence_mixer(config, layer_idx).eval(), config


def _context(x: torch.Tensor, mask: torch.Tensor | None = None, past_len: int = 0) -> MixerContext:
    return MixerContext.build(mask, None, x.shape[0], x.shape[1], past_len, x.device)


def _run(mixer, x, cache, start, mask=None):
    """One forward over x (the tokens from `start` on), with the attention mask seen so far."""
    seen = None if mask is None else mask[:, : start + x.shape[1]]
    return mixer(x, _context(x, seen, start), cache)


def _decode(mixer, config, x, prefill: list[int], mask=None):
    """Chunked prefills of the given lengths, then one token per step, through a real cache."""
    cache = new_cache(config)
    outs, start = [], 0
    for length in prefill:
        outs.append(_run(mixer, x[:, start : start + length], cache, start, mask))
        start += length
    for t in range(start, x.shape[1]):
        outs.append(_run(mixer, x[:, t : t + 1], cache, t, mask))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("seq_len", [1, 8, 13, 37])
def test_forward_matches_reference(conv_path, order, seq_len):
    mixer, config = _mixer(order)
    x = torch.randn(2, seq_len, config.hidden_size)
    reference = mixer.reference_forward(x, _context(x))
    assert reference.abs().max() > 0.05
    torch.testing.assert_close(mixer(x, _context(x)), reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the inference path: cached filters, no autograd
        torch.testing.assert_close(mixer(x, _context(x)), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prefill", [[13], [13, 5], [1], [2, 1, 9]])
def test_cached_decode_matches_full_forward(conv_path, order, prefill):
    mixer, config = _mixer(order)
    x = torch.randn(2, 29, config.hidden_size)
    reference = mixer.reference_forward(x, _context(x))
    full = mixer(x, _context(x))
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    steps, cache = _decode(mixer, config, x, prefill)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].get_seq_length() == 29
    with torch.no_grad():
        steps, _ = _decode(mixer, config, x, prefill)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", [1, 5])
def test_short_filter_window_through_the_cache(kernel):
    # Prefills shorter than the window K−1 leave a partial window that the next call zero-pads.
    mixer, config = _mixer(hyena_short_filter=kernel)
    x = torch.randn(2, 21, config.hidden_size)
    full = mixer(x, _context(x))
    torch.testing.assert_close(full, mixer.reference_forward(x, _context(x)), atol=1e-5, rtol=1e-5)
    steps, _ = _decode(mixer, config, x, [2, 3])
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak(conv_path):
    """A left-padded row gives the same outputs and decode continuation as the row alone."""
    mixer, config = _mixer(order=3)
    d = config.hidden_size
    row = torch.randn(1, 15, d)
    other = torch.randn(1, 19, d)
    padded = torch.cat([torch.randn(1, 4, d) * 5, row], dim=1)  # (1, 19, d): 4 pads, then row
    batch = torch.cat([other, padded])
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :4] = 0

    alone = mixer(row, _context(row))
    full = mixer(batch, _context(batch, mask))
    torch.testing.assert_close(full[1:, 4:], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(full[:1], mixer(other, _context(other)), atol=1e-5, rtol=0)
    reference = mixer.reference_forward(batch, _context(batch, mask))
    torch.testing.assert_close(reference[1:, 4:], alone, atol=1e-5, rtol=0)

    # Prefill 10 tokens of the padded batch (6 real ones in row 1), decode the rest.
    steps, cache = _decode(mixer, config, batch, [10], mask)
    torch.testing.assert_close(steps[1:, 4:], alone, atol=1e-5, rtol=0)
    # Nothing of the padding reached the cache: its rows there are exact zeros.
    assert not cache.layers[0].keys[1, :, :4].any()
    assert not cache.layers[0].values[1, :, :4].any()


def test_state_size_counts_cache_elements():
    for order in (2, 3):
        mixer, config = _mixer(order)
        d = config.hidden_size
        # Per token: (N−1)·d long-conv inputs + (N+1)·d projections.
        assert mixer.state_size(3, 11) == 3 * 11 * ((order - 1) * d + (order + 1) * d)
        cache = new_cache(config)
        x = torch.randn(3, 11, d)
        mixer(x, _context(x), cache)
        layer = cache.layers[0]
        assert layer.keys.shape == (3, 1, 11, (order - 1) * d)
        assert layer.values.shape == (3, 1, 11, (order + 1) * d)
        assert layer.keys.numel() + layer.values.numel() == mixer.state_size(3, 11)
        mixer(x[:, :1], _context(x[:, :1], past_len=11), cache)
        assert layer.keys.numel() + layer.values.numel() == mixer.state_size(3, 12)


def test_model_state_size_grows_linearly():
    model = AutoModelForCausalLM.from_config(tiny_config("hyena"))
    assert model.state_size(1, 1024) == 64 * model.state_size(1, 16)


def _max_saved_numel(mixer, config, seq_len):
    x = torch.randn(1, seq_len, config.hidden_size)
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mixer(x, _context(x))
    y.sum().backward()
    return biggest


def test_memory_grows_linearly():
    """The largest tensor kept for backward grows like T (x4 for 4x the length), not like T²."""
    mixer, config = _mixer(order=3, max_position_embeddings=1024)
    small = _max_saved_numel(mixer, config, 256)
    large = _max_saved_numel(mixer, config, 1024)
    assert 3.5 <= large / small <= 5, (small, large)


def test_longer_than_max_position_embeddings_raises():
    mixer, config = _mixer(max_position_embeddings=32)
    x = torch.randn(1, 33, config.hidden_size)
    with pytest.raises(ValueError, match=r"33 tokens.*max_position_embeddings=32"):
        mixer(x, _context(x))
    cache = new_cache(config)
    mixer(x[:, :30], _context(x[:, :30]), cache)
    mixer(x[:, 30:32], _context(x[:, 30:32], past_len=30), cache)  # exactly 32: fine
    with pytest.raises(ValueError, match=r"33 tokens \(cache \+ current\).*=32"):
        mixer(x[:, 32:], _context(x[:, 32:], past_len=32), cache)


def test_filters_are_relative_and_length_independent():
    mixer, _ = _mixer()
    with torch.no_grad():
        short, skips = mixer.filter_fn._compute(20, torch.device("cpu"))
        long, _ = mixer.filter_fn._compute(200, torch.device("cpu"))
    assert short.shape == (1, 48, 20) and skips.shape == (1, 48)
    torch.testing.assert_close(long[..., :20], short)


def test_positional_features_match_safari():
    # safari PositionalEmbedding: z = [t, Re, Im] of exp(-1j f w) over L_max positions.
    z, t = _positional_features(64, 7)
    L, bands = 64, 3
    t_ref = torch.linspace(0, 1, L)[None, :, None]
    w = 2 * math.pi * torch.linspace(0, L - 1, L)[None, :, None] / L
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]
    zc = torch.exp(-1j * f * w)
    z_ref = torch.cat([t_ref, zc.real, zc.imag], dim=-1)[0]
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(t, t_ref[0])


def test_modulation_window():
    """Modulated filters are the unmodulated ones times exp(−t·|δ|), fastest decay last."""
    on, _ = _mixer(hyena_modulate=True)
    off, _ = _mixer(hyena_modulate=False)
    off.load_state_dict(on.state_dict())
    with torch.no_grad():
        h_on, _ = on.filter_fn._compute(256, torch.device("cpu"))
        h_off, _ = off.filter_fn._compute(256, torch.device("cpu"))
    window = h_on / h_off  # (1, d, L)
    torch.testing.assert_close(window[..., 0], torch.ones(1, 48))
    # At t = 1 the slowest channel has decayed to 1e-2^(1/1.5), the fastest to 1e-2^(1/0.3).
    torch.testing.assert_close(window[0, 0, -1], torch.tensor(1e-2 ** (1 / 1.5)))
    torch.testing.assert_close(window[0, -1, -1], torch.tensor(1e-2 ** (1 / 0.3)))


def test_inference_filter_cache_follows_the_weights():
    mixer, _ = _mixer()
    x = torch.randn(1, 9, 48)
    with torch.no_grad():
        before = mixer(x, _context(x))
        mixer.filter_fn.ffn[0].weight.mul_(3.0)  # an in-place update, like an optimizer step
        after = mixer(x, _context(x))
    torch.testing.assert_close(after, mixer.reference_forward(x, _context(x)))
    assert not torch.allclose(before, after)


def _hand_count(config) -> int:
    d, N, K = config.hidden_size, config.hyena_order, config.hyena_short_filter
    E, F, inner = config.hyena_emb_dim, config.hyena_filter_order, config.hyena_num_inner_mlps
    in_proj = (N + 1) * d * d + (N + 1) * d
    short = (N + 1) * d * K + (N + 1) * d
    ffn = E * F + F + inner * (F * F + F) + F * d * (N - 1)
    freq, skips = F, d * (N - 1)
    out_proj = d * d + d
    return in_proj + short + ffn + freq + skips + out_proj


@pytest.mark.parametrize("order", [2, 3])
def test_parameter_count(order):
    mixer, config = _mixer(order)
    assert sum(p.numel() for p in mixer.parameters()) == _hand_count(config)


def test_init_through_transformers():
    """The model's init reaches the short conv (PyTorch's Conv1d init), ω and the skips."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hyena"))
    for block in model.model.layers:
        mixer = block.mixer
        bound = 1 / math.sqrt(3)
        short = mixer.short_filter
        assert short.weight.abs().max() <= bound and short.weight.std() > 0.25
        assert short.bias.abs().max() <= bound and short.bias.std() > 0.25
        assert bool((mixer.filter_fn.freq == 14.0).all())
        assert 0.7 < mixer.filter_fn.bias.std() < 1.3
        assert mixer.in_proj.weight.std() < 0.03 and not mixer.in_proj.bias.any()


def test_wrong_cache_layer_type_is_refused():
    mixer, config = _mixer()
    x = torch.randn(1, 5, config.hidden_size)
    # A TNL config's cache holds fixed-size recurrent layers, which cannot keep a history.
    with pytest.raises(TypeError, match=r"LinearAttentionLayer.*DynamicLayer"):
        mixer(x, _context(x), new_cache(tiny_config("tnl")))


def test_triton_mixer_matches_torch_mixer():
    """Order 3 (two long convs, strided skip weights): forward, every gradient and a cached
    decode with backend "triton" (the interpreter on CPU) equal the torch forms'."""
    torch.manual_seed(0)
    torch_mixer, config = _mixer(order=3)
    triton_mixer, _ = _mixer(order=3, kernel_backend="triton")
    triton_mixer.load_state_dict(torch_mixer.state_dict())
    x = torch.randn(2, 21, config.hidden_size)
    results = {}
    for name, mixer in (("torch", torch_mixer), ("triton", triton_mixer)):
        xi = x.clone().requires_grad_()
        y = mixer(xi, _context(xi))
        grads = torch.autograd.grad(y.square().sum(), [xi, *mixer.parameters()])
        with torch.no_grad():
            steps, _ = _decode(mixer, config, x, [13, 2])
        results[name] = (y.detach(), grads, steps)
    (y, grads, steps), (y_t, grads_t, steps_t) = results["torch"], results["triton"]
    torch.testing.assert_close(y_t, y, atol=1e-5, rtol=1e-5)
    names = ["input", *(n for n, _ in torch_mixer.named_parameters())]
    for name, g, g_t in zip(names, grads, grads_t, strict=True):
        # The filter MLP's first-layer gradients reach ~800: a sum's rounding scales with its
        # largest terms (1e-6 of them), not with each element.
        atol = max(1e-5, 1e-6 * g.abs().max().item())
        torch.testing.assert_close(g_t, g, atol=atol, rtol=1e-4, msg=name)
    torch.testing.assert_close(steps_t, steps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps_t, y, atol=1e-5, rtol=1e-5)


def _model(backend: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hyena", kernel_backend=backend))
    model.generation_config.eos_token_id = None
    return model


def test_triton_model_loss_gradients_and_generate_match_torch():
    input_ids = torch.randint(3, 200, (2, 37), generator=torch.Generator().manual_seed(1))
    prompt = input_ids[:, :13]
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :4] = 0
    results = {}
    for backend in ("torch", "triton"):
        model = _model(backend)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        with torch.no_grad():
            # Prefill through the direct kernels, decode through the step kernel.
            out = model.eval().generate(
                prompt, attention_mask=attention_mask, max_new_tokens=6, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        results[backend] = (loss.detach(), grads, out)
    (loss, grads, out), (loss_t, grads_t, out_t) = results["torch"], results["triton"]
    torch.testing.assert_close(loss_t, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_t.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_t[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert torch.equal(out_t.sequences, out.sequences)
    for a, b in zip(out_t.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hyena_order", 1),
        ("hyena_order", 2.0),
        ("hyena_emb_dim", 4),
        ("hyena_emb_dim", 1),
        ("hyena_filter_order", 0),
        ("hyena_short_filter", 0),
        ("hyena_num_inner_mlps", -1),
        ("max_position_embeddings", 0),
    ],
)
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config("hyena", **{field: value})
