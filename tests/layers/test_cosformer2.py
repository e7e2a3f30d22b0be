"""cosFormer2: LRPE features, the no-decay lightning op under them, and the mixer contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.tiny import tiny_config
from zoo.cache import new_cache, recurrent_state
from zoo.kernels.lightning import lightning, lightning_chunk_torch, lightning_naive, lightning_step
from zoo.layers import build_sequence_mixer
from zoo.layers.context import MixerContext
from zoo.layers.cosformer2 import CosFormer2Attention
from zoo.layers.lrpe import lrpe, lrpe_cos_sin, lrpe_theta, shift_origin

B, H, D = 2, 3, 6
NO_DECAY = torch.zeros(H)


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def assert_close(actual, expected, tol=1e-5):
    # Without decay the state is a running sum, so outputs grow with T: scale the tolerance.
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


def op_inputs(T: int, seed: int = 0):
    """Pre-activation q, k and v (B, T, H, D) and a state (B, H, 2D, D), all grad leaves."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    # Small k keeps the undecayed running sum, hence the output, O(1) over ~40 tokens.
    k = torch.randn(B, T, H, D, generator=g) / math.sqrt(D) / 4
    v = torch.randn(B, T, H, D, generator=g)
    s0 = torch.randn(B, H, 2 * D, D, generator=g) * 0.3
    return [t.requires_grad_() for t in (q, k, v, s0)]


def lrpe_at(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) re-weighted at positions (B, T): (B, T, H, 2D)."""
    return lrpe(x, *lrpe_cos_sin(positions, lrpe_theta(x.shape[-1])))


def featurize(q, k):
    """LRPE'd SiLU features at positions 0, 1, ...: (B, T, H, 2D) each."""
    positions = torch.arange(q.shape[1]).expand(B, -1)
    return lrpe_at(F.silu(q), positions), lrpe_at(F.silu(k), positions)


# --- LRPE -----------------------------------------------------------------------------------


def test_theta_is_the_fixed_half_dim_form():
    theta = lrpe_theta(8)
    expected = torch.tensor([10000.0 ** (-2 * j / 8) for j in range(4)] + [0.0] * 4)
    torch.testing.assert_close(theta, expected)
    assert lrpe_theta(7)[3:].eq(0).all() and lrpe_theta(7)[:3].gt(0).all()


def test_lrpe_scores_are_cosines_of_the_position_difference():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 9, 1, D, generator=g), torch.randn(1, 9, 1, D, generator=g)
    theta = lrpe_theta(D)
    for offset in (0, 5, 1000):
        positions = (torch.arange(9) + offset)[None]
        scores = torch.einsum(
            "btd,bsd->bts", lrpe_at(q, positions)[:, :, 0], lrpe_at(k, positions)[:, :, 0]
        )
        diff = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).float()  # (t, s)
        expected = torch.einsum(
            "td,sd,tsd->ts", q[0, :, 0], k[0, :, 0], torch.cos(diff[..., None] * theta)
        )
        torch.testing.assert_close(scores[0], expected, atol=1e-4, rtol=1e-4)


def test_shift_origin_equals_keys_at_shifted_positions():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(B, 11, H, D, generator=g)
    v = torch.randn(B, 11, H, D, generator=g)
    positions = torch.arange(11).expand(B, 11)
    theta = lrpe_theta(D)
    state = torch.einsum("bthk,bthv->bhkv", lrpe_at(k, positions), v)  # (B, H, 2D, D)
    steps = torch.tensor([11, 4])
    shifted = torch.einsum("bthk,bthv->bhkv", lrpe_at(k, positions - steps[:, None]), v)
    torch.testing.assert_close(shift_origin(state, theta, steps), shifted, atol=1e-5, rtol=1e-5)


# --- the op: lightning with log λ = 0 on LRPE'd features ---------------------------------------


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [1, 5, 13, 37])
def test_op_chunk_matches_naive(T, with_init):
    q, k, v, s0 = op_inputs(T)
    init = s0 if with_init else None
    o, s = lightning_chunk_torch(*featurize(q, k), v, NO_DECAY, 1.0, init, True, chunk_size=8)
    o_ref, s_ref = lightning_naive(*featurize(q, k), v, NO_DECAY, 1.0, init, True)
    assert o.shape == (B, T, H, D) and s.shape == (B, H, 2 * D, D) and s.dtype == torch.float32
    assert o_ref.abs().max() > 0.1
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    leaves = [q, k, v] + ([s0] if with_init else [])
    proj = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((o * proj).sum() + s.sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * proj).sum() + s_ref.sum(), leaves)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, tol=1e-4)


def test_op_step_loop_matches_naive():
    q, k, v, s0 = op_inputs(13)
    qh, kh = featurize(q, k)
    o_ref, s_ref = lightning_naive(qh, kh, v, NO_DECAY, 1.0, s0, True)
    state, outs = s0, []
    for t in range(13):
        o, state = lightning_step(qh[:, t], kh[:, t], v[:, t], NO_DECAY, state)
        outs.append(o)
    assert_close(torch.stack(outs, dim=1), o_ref)
    assert_close(state, s_ref)


@pytest.mark.parametrize("split", [1, 8, 13])
def test_op_prefill_then_continue_matches_whole(split):
    q, k, v, _ = op_inputs(29)
    qh, kh = featurize(q, k)
    whole, s_whole = lightning(qh, kh, v, NO_DECAY, output_final_state=True, chunk_size=8)
    first, state = lightning(
        qh[:, :split], kh[:, :split], v[:, :split], NO_DECAY, output_final_state=True, chunk_size=8
    )
    rest, s_rest = lightning(
        qh[:, split:],
        kh[:, split:],
        v[:, split:],
        NO_DECAY,
        initial_state=state,
        output_final_state=True,
        chunk_size=8,
        backend="torch",
    )
    assert_close(torch.cat([first, rest], dim=1), whole)
    assert_close(s_rest, s_whole)


# --- the layer -------------------------------------------------------------------------------


def _mixer(layer_idx: int = 0, **overrides) -> tuple[CosFormer2Attention, zoo.ZooConfig]:
    torch.manual_seed(layer_idx)
    config = tiny_config("cosformer2", **overrides)
    return build_sequence_mixer(config, layer_idx).eval(), config


def _context(x, mask=None, past_len=0, position_ids=None) -> MixerContext:
    return MixerContext.build(mask, position_ids, x.shape[0], x.shape[1], past_len, x.device)


def test_registered_under_its_mixer_name():
    mixer, _ = _mixer()
    assert type(mixer) is CosFormer2Attention


@pytest.mark.parametrize("seq_len", [1, 8, 13, 37])
def test_forward_matches_reference(seq_len):
    mixer, config = _mixer()
    x = torch.randn(2, seq_len, config.hidden_size)
    assert_close(mixer(x, _context(x)), mixer.reference_forward(x, _context(x)))


def test_gradients_match_reference():
    mixer, config = _mixer(norm_type="rmsnorm")
    x = torch.randn(2, 21, config.hidden_size, requires_grad=True)
    proj = torch.randn(2, 21, config.hidden_size)
    leaves = [x, *mixer.parameters()]
    grads = torch.autograd.grad((mixer(x, _context(x)) * proj).sum(), leaves)
    ref = torch.autograd.grad((mixer.reference_forward(x, _context(x)) * proj).sum(), leaves)
    for grad, grad_ref in zip(grads, ref, strict=True):
        assert_close(grad, grad_ref, tol=1e-4)


@pytest.mark.parametrize("positions", ["continuing", "restarting"])
def test_cached_prefill_continuation_and_decode_match_forward(positions):
    """Chunked prefill (13), chunked continuation (6) and single steps through a real cache.

    "restarting" is what ZooModel passes when every cache layer is linear: no past length, so
    each call's positions start at 0 again; the origin-relative state must not care.
    """
    mixer, config = _mixer()
    x = torch.randn(2, 27, config.hidden_size)
    full = mixer(x, _context(x))
    cache = new_cache(config)
    outs = []
    for start, end in itertools.pairwise([0, 13, 19, *range(20, 28)]):
        past = start if positions == "continuing" else 0
        outs.append(mixer(x[:, start:end], _context(x[:, start:end], past_len=past), cache))
    assert_close(torch.cat(outs, dim=1), full)
    assert_close(mixer.reference_forward(x, _context(x)), full)


def test_long_decode_does_not_drift():
    """One state rotation per decoded token: 1500 of them stay as exact as the chunked form."""
    mixer, config = _mixer()
    x = torch.randn(1, 1508, config.hidden_size)
    with torch.no_grad():
        full = mixer(x, _context(x))
        cache = new_cache(config)
        mixer(x[:, :8], _context(x[:, :8]), cache)
        for t in range(8, 1508):
            last = mixer(x[:, t : t + 1], _context(x[:, t : t + 1]), cache)
    # Rotating in fp32 drifted to 3.5e-6 here; in fp64 the gap stays at 8e-7.
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=2e-6, rtol=0)


def test_padding_does_not_leak_into_outputs_or_decode():
    """A left-padded row gives the outputs and the decode continuation of the row alone."""
    mixer, config = _mixer(layer_idx=1)
    d = config.hidden_size
    long, short, steps = torch.randn(1, 13, d), torch.randn(1, 9, d), torch.randn(2, 5, d)
    batch = torch.cat([long, torch.cat([torch.randn(1, 4, d) * 50, short], dim=1)])
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    assert_close(mixer(batch, _context(batch, mask))[1, 4:], mixer(short, _context(short))[0])
    assert_close(
        mixer.reference_forward(batch, _context(batch, mask))[1, 4:],
        mixer.reference_forward(short, _context(short))[0],
    )

    cache = new_cache(config)
    outs = [mixer(batch, _context(batch, mask), cache)]
    for t in range(5):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        outs.append(mixer(steps[:, t : t + 1], _context(steps[:, t : t + 1], mask), cache))
    padded = torch.cat(outs, dim=1)
    for row, alone in ((0, long), (1, short)):
        seq = torch.cat([alone, steps[row : row + 1]], dim=1)
        assert_close(padded[row, -seq.shape[1] :], mixer(seq, _context(seq))[0])


@pytest.mark.parametrize("pad_position", [0, 1, 97])
def test_positions_at_padding_do_not_matter(pad_position):
    """Any value at padded positions (HF models use 1, generate() uses 0) gives the same state."""
    mixer, config = _mixer()
    x = torch.randn(2, 10, config.hidden_size)
    nxt = torch.randn(2, 1, config.hidden_size)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, pad_position)
    outs = []
    for pos in (None, position_ids):
        cache = new_cache(config)
        first = mixer(x, _context(x, mask, position_ids=pos), cache)
        mask_next = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        outs.append((first * mask[..., None], mixer(nxt, _context(nxt, mask_next), cache)))
    for a, b in zip(*outs, strict=True):
        assert_close(a, b)


def test_shared_unpadded_position_ids_serve_a_padded_batch():
    """position_ids (1, T) = 0..T-1 for every row: only differences from a row's first real token
    count, so a left-padded row still gets its own positions."""
    mixer, config = _mixer()
    x = torch.randn(2, 10, config.hidden_size)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    shared = mixer(x, _context(x, mask, position_ids=torch.arange(10)[None]))
    assert_close(shared * mask[..., None], mixer(x, _context(x, mask)) * mask[..., None])


def test_state_size_counts_cache_elements():
    mixer, config = _mixer()
    hand = 3 * config.num_attention_heads * 2 * config.head_dim * config.head_dim
    for seq_len in (1, 11, 40):
        cache = new_cache(config)
        x = torch.randn(3, seq_len, config.hidden_size)
        mixer(x, _context(x), cache)
        layer = cache.layers[0]
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(layer.recurrent_states.values()) + list(layer.conv_states.values())
        held = sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
        assert held == mixer.state_size(3, seq_len) == hand
        assert layer.recurrent_states[0].dtype == torch.float32


@pytest.mark.parametrize(
    "overrides, extra",
    [({}, 0), ({"norm_type": "rmsnorm"}, 48), ({"output_gate_rank": 5}, None)],
)
def test_parameter_count(overrides, extra):
    mixer, config = _mixer(**overrides)
    d, rank = config.hidden_size, config.output_gate_rank or config.head_dim
    # 4d² for W_q, W_k, W_v, W_o; 2dt for the gate; θ is not a parameter (fixed, like RoPE).
    expected = 4 * d * d + 2 * d * rank + (extra or 0)
    assert sum(p.numel() for p in mixer.parameters()) == expected


@pytest.mark.parametrize("size", ["70m", "410m", "7b"])
def test_parameter_count_at_named_sizes(size):
    config = zoo.CosFormer2Config.from_size(size)
    with torch.device("meta"):
        mixer = CosFormer2Attention(config, 0)
    d = config.hidden_size
    assert config.head_dim == 128
    assert sum(p.numel() for p in mixer.parameters()) == 4 * d * d + 2 * d * 128


def test_chunked_form_memory_is_linear_in_length():
    """Tensors saved for backward grow like T, not T², through the whole layer."""
    mixer, config = _mixer()

    def saved(seq_len: int) -> tuple[int, int]:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        x = torch.randn(1, seq_len, config.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mixer(x, _context(x))
        return max(sizes), sum(sizes)

    (max_short, sum_short), (max_long, sum_long) = saved(256), saved(1024)
    # 4× the tokens: linear growth is ~4×, quadratic would be 16×.
    assert 3 < max_long / max_short < 4.5
    assert 3 < sum_long / sum_short < 4.5


@pytest.mark.parametrize(
    "field, value",
    [
        ("output_gate_rank", 0),
        ("output_gate_rank", -2),
        ("num_attention_heads", 5),
        ("lightning_chunk_size", 0),
        ("kernel_backend", "cuda"),
        ("norm_type", "groupnorm"),
        ("hidden_size", 0),
    ],
)
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config("cosformer2", **{field: value})


def test_triton_backend_matches_torch_with_cache():
    # Prefill then two decode steps through the Triton kernels (interpreter on CPU), against the
    # torch form: outputs, the cached (origin-shifted) state and the parameter gradients.
    results = []
    for backend in ("torch", "triton"):
        mixer, config = _mixer(kernel_backend=backend)
        mixer.train()
        x = torch.randn(2, 21, config.hidden_size, generator=torch.Generator().manual_seed(0))
        cache = new_cache(config)
        out = mixer(x[:, :19], _context(x[:, :19]), cache)
        with torch.no_grad():
            steps = [mixer(x[:, t : t + 1], _context(x[:, t : t + 1], past_len=t), cache)
                     for t in (19, 20)]  # fmt: skip
        out.square().mean().backward()
        grads = [p.grad for p in mixer.parameters()]
        results.append((out, steps, recurrent_state(cache, 0), grads))
    (out, steps, state, grads), (out_t, steps_t, state_t, grads_t) = results
    assert_close(out_t, out)
    for a, b in zip(steps_t, steps, strict=True):
        assert_close(a, b)
    assert_close(state_t, state)
    for a, b in zip(grads_t, grads, strict=True):
        assert_close(a, b)


def test_bad_inputs_raise():
    mixer, config = _mixer()
    x = torch.randn(1, 5, config.hidden_size + 1)
    with pytest.raises(ValueError, match=r"hidden_states has width 49 .* hidden_size is 48"):
        mixer(x, _context(x))
    x = torch.randn(1, 5, config.hidden_size)
    with pytest.raises(ValueError, match=r"position_ids covers 4 tokens .* has 5"):
        mixer(x, _context(x, position_ids=torch.arange(4)[None]))
