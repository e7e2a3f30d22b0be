"""Long convolution: FFT, direct and step forms and the public API against the definition; the
Triton kernels (direct conv, decode step, short conv) against the torch forms.

On CPU the Triton kernels run in the interpreter (the conftest sets TRITON_INTERPRET=1), so shapes
are small; lengths and channel counts (5, 13, 70) leave ragged 64-row and 64-channel tiles. The
`gpu` tests rerun them in bf16 on CUDA at larger shapes.
"""

import pytest
import torch

from zoo.kernels import long_conv as long_conv_module
from zoo.kernels.long_conv import (
    long_conv,
    long_conv_direct,
    long_conv_fft,
    long_conv_naive,
    long_conv_step,
    long_conv_step_triton,
    long_conv_triton,
    short_conv,
    short_conv_naive,
    short_conv_triton,
)

B, D = 2, 6


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def make_inputs(T, S=0, batch=B, seed=0, dtype=torch.float32, channels=D, device="cpu"):
    """u (B, T, D), filters k (D, S+T+3) decaying like Hyena's, bias (D,), history (B, S, D)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, T, channels, generator=g)
    L = S + T + 3  # longer than needed: only the first S+T taps may be read
    k = torch.randn(channels, L, generator=g) * torch.exp(-torch.arange(L) / 40.0)
    bias = torch.randn(channels, generator=g)
    history = torch.randn(batch, S, channels, generator=g)
    u, k, bias, history = (t.to(device) for t in (u, k, bias, history))
    return u.to(dtype), k, bias, history.to(dtype)


def assert_close(actual, expected, tol=1e-5):
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


FORMS = {"fft": long_conv_fft, "direct": long_conv_direct, "public": long_conv}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("T", "S"), [(1, 0), (5, 0), (37, 0), (130, 0), (1, 9), (13, 21)])
def test_forms_match_naive(form, T, S, with_bias):
    u, k, bias, history = make_inputs(T, S)
    bias = bias if with_bias else None
    init = history if S else None
    y_ref, h_ref = long_conv_naive(u, k, bias, init, output_final_state=True)
    y, h = FORMS[form](u, k, bias, init, output_final_state=True)
    assert y.shape == (B, T, D) and y.dtype == torch.float32
    assert y_ref.abs().max() > 0.5
    assert_close(y, y_ref)
    assert torch.equal(h, torch.cat([history, u], dim=1))
    assert torch.equal(h_ref, h)


def test_naive_is_the_definition():
    # y_t = Σ_{s ≤ t} k_{t−s} u_s + bias u_t, written out for one channel of a short sequence.
    u, k, bias, _ = make_inputs(4, batch=1)
    y, _ = long_conv_naive(u, k, bias)
    c = 2
    for t in range(4):
        expected = sum(k[c, t - s] * u[0, s, c] for s in range(t + 1)) + bias[c] * u[0, t, c]
        torch.testing.assert_close(y[0, t, c], expected)


@pytest.mark.parametrize("form", ["fft", "direct"])
@pytest.mark.parametrize(("T", "S"), [(37, 0), (11, 17)])
def test_gradients_match_naive(form, T, S):
    u, k, bias, history = make_inputs(T, S)
    # An empty history takes no part in the graph, so it is passed as None and not differentiated.
    leaves = [t.clone().requires_grad_() for t in (u, k, bias, history)][: 4 if S else 3]
    init = leaves[3] if S else None
    proj = torch.randn(B, T, D, generator=torch.Generator().manual_seed(5))

    def grads(fn):
        y, h = fn(*leaves[:3], init, output_final_state=True)
        return torch.autograd.grad((y * proj).sum() + h.square().sum(), leaves)

    for g, g_ref in zip(grads(FORMS[form]), grads(long_conv_naive), strict=True):
        assert g_ref.abs().max() > 0
        assert_close(g, g_ref, tol=1e-4)


def test_step_loop_matches_naive():
    T, S = 20, 7
    u, k, bias, history = make_inputs(T, S)
    y_ref, h_ref = long_conv_naive(u, k, bias, history, output_final_state=True)
    state, outs = history, []
    for t in range(T):
        before = state.clone()
        y_t, new_state = long_conv_step(u[:, t], k, bias, state, output_final_state=True)
        assert torch.equal(state, before), "long_conv_step must not mutate the history"
        outs.append(y_t)
        state = new_state
    assert_close(torch.stack(outs, dim=1), y_ref)
    assert torch.equal(state, h_ref)


def test_step_without_history_is_the_first_output():
    u, k, bias, _ = make_inputs(1)
    y, h = long_conv_step(u[:, 0], k, bias)
    assert h is None
    assert_close(y, long_conv_naive(u, k, bias)[0][:, 0])


@pytest.mark.parametrize("split", [1, 30, 64])
def test_prefill_then_continue(split):
    T = 100
    u, k, bias, _ = make_inputs(T)
    y_all, h_all = long_conv(u, k, bias, output_final_state=True)
    y1, h1 = long_conv(u[:, :split], k, bias, output_final_state=True)
    y2, h2 = long_conv(u[:, split:], k, bias, h1, output_final_state=True)
    assert_close(torch.cat([y1, y2], dim=1), y_all)
    assert torch.equal(h2, h_all)

    state, outs = h1, [y1]
    for t in range(split, T):
        y_t, state = long_conv(u[:, t : t + 1], k, bias, state, output_final_state=True)
        outs.append(y_t)
    assert_close(torch.cat(outs, dim=1), y_all)


def test_no_final_state_unless_asked():
    u, k, bias, history = make_inputs(5, 3)
    for fn in (long_conv, long_conv_fft, long_conv_direct, long_conv_naive):
        assert fn(u, k, bias, history)[1] is None
    assert long_conv(u[:, :1], k, bias, history)[1] is None


def test_filter_taps_beyond_the_sequence_are_ignored():
    u, k, bias, _ = make_inputs(9)
    longer = torch.cat([k, torch.randn(D, 50)], dim=1)
    assert torch.equal(long_conv(u, longer, bias)[0], long_conv(u, k, bias)[0])


def test_bf16_inputs_keep_dtype():
    u, k, bias, history = make_inputs(40, 8, dtype=torch.bfloat16)
    y_ref, _ = long_conv_naive(u.float(), k, bias, history.float())
    for fn in (long_conv, long_conv_fft, long_conv_direct):
        y, h = fn(u, k, bias, history, output_final_state=True)
        assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
        assert_close(y.float(), y_ref, tol=2e-2)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(long_conv_module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(long_conv_module, name, spy)
    return calls


def test_dispatch(monkeypatch):
    calls = []
    for name in ("long_conv_step", "long_conv_direct", "long_conv_fft"):
        calls.append(_spy(monkeypatch, name))
    step, direct, fft = calls
    u, k, bias, _ = make_inputs(200)
    with torch.no_grad():
        long_conv(u[:, :1], k, bias)
        long_conv(u[:, :128], k, bias)
        long_conv(u, k, bias)  # T = 200 > _DIRECT_MAX_NEW_TOKENS
    assert (len(step), len(direct), len(fft)) == (1, 1, 1)
    # Under autograd the direct conv's slow backward is avoided even for short inputs.
    long_conv(u[:, :8], k.requires_grad_(), bias)
    assert (len(direct), len(fft)) == (1, 2)


def test_fft_size_is_the_smallest_smooth_size():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 700):
        size = long_conv_module._fft_size(n)
        assert size >= n and smooth(size)
        assert not any(smooth(m) for m in range(n, size)), n


def _max_saved_numel(fn, T):
    u, k, bias, _ = make_inputs(T)
    leaves = [t.requires_grad_() for t in (u, k, bias)]
    biggest = 0

    def pack(t):
        nonlocal biggest
        biggest = max(biggest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = fn(*leaves)
    y.sum().backward()
    return biggest


@pytest.mark.parametrize("form", ["fft", "direct"])
def test_memory_grows_linearly(form):
    """The largest tensor kept for backward grows like T (x4 for 4x the length), not like T²."""
    small, large = _max_saved_numel(FORMS[form], 256), _max_saved_numel(FORMS[form], 1024)
    assert 3.5 <= large / small <= 5, (small, large)


def test_backend_choice(monkeypatch):
    u, k, bias, _ = make_inputs(6)
    expected = long_conv_naive(u, k, bias)[0]
    assert_close(long_conv(u, k, bias, backend="torch")[0], expected)
    assert_close(long_conv(u, k, bias, backend="triton")[0], expected)
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        long_conv(u, k, bias, backend="cuda")
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "torch")
    assert_close(long_conv(u, k, bias)[0], expected)
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_KERNEL_BACKEND"):
        long_conv(u, k, bias)
    calls = _spy(monkeypatch, "long_conv_triton")
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "triton")
    assert_close(long_conv(u, k, bias)[0], expected)
    assert calls == ["long_conv_triton"]


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    u, k, bias, _ = make_inputs(6)
    with pytest.raises(RuntimeError, match=r"backend='triton' for long-convolution needs.*CUDA"):
        long_conv(u, k, bias, backend="triton")
    # "auto" on a CPU tensor never asks for Triton.
    assert_close(long_conv(u, k, bias)[0], long_conv_naive(u, k, bias)[0])
    u, weight, bias, _ = make_short(6)
    with pytest.raises(RuntimeError, match=r"backend='triton' for short-convolution needs.*CUDA"):
        short_conv(u, weight, bias, backend="triton")


def test_input_errors():
    u, k, bias, history = make_inputs(6, 4)
    with pytest.raises(ValueError, match=r"u must be \(B, T, D\) but has shape \(6, 6\)"):
        long_conv(u[0], k)
    with pytest.raises(ValueError, match="T=0"):
        long_conv(u[:, :0], k)
    with pytest.raises(ValueError, match=r"k has shape \(5, 13\) .* D=6"):
        long_conv(u, k[:5])
    with pytest.raises(ValueError, match=r"k has 9 taps but the convolution needs 10 .*S=4.*T=6"):
        long_conv(u, k[:, :9], bias, history)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\) but must be \(D,\) = \(6,\)"):
        long_conv(u, k, bias[:5])
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 4, 6\).*B=2"):
        long_conv(u, k, bias, history[:1])
    with pytest.raises(ValueError, match="k must be a floating tensor"):
        long_conv(u, k.long())


# --- short causal depthwise conv ----------------------------------------------------------------


def make_short(T, K=4, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, T, C, generator=g)
    weight = torch.randn(C, K, generator=g)
    bias = torch.randn(C, generator=g)
    state = torch.randn(B, K - 1, C, generator=g)
    return u, weight, bias, state


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 2, 13])
def test_short_conv_matches_naive(T, with_state):
    u, weight, bias, state = make_short(T)
    init = state if with_state else None
    y_ref, s_ref = short_conv_naive(u, weight, bias, init, output_final_state=True)
    y, s = short_conv(u, weight, bias, init, output_final_state=True)
    assert_close(y, y_ref)
    assert torch.equal(s, s_ref)
    # The last K−1 inputs of history + u (zeros standing in for a missing history).
    history = state if with_state else torch.zeros_like(state)
    assert torch.equal(s, torch.cat([history, u], dim=1)[:, -3:])


def test_short_conv_is_pytorch_conv1d_truncated():
    # safari: Conv1d(padding=K−1, groups=C)(u)[..., :T].
    u, weight, bias, _ = make_short(11)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    with torch.no_grad():
        conv.weight.copy_(weight.unsqueeze(1))
        conv.bias.copy_(bias)
        expected = conv(u.transpose(1, 2))[..., :11].transpose(1, 2)
    assert_close(short_conv(u, weight, bias)[0], expected)


def test_short_conv_chunks_and_steps_chain():
    u, weight, bias, _ = make_short(15)
    whole, _ = short_conv(u, weight, bias)
    y1, state = short_conv(u[:, :6], weight, bias, output_final_state=True)
    outs = [y1]
    for t in range(6, 15):
        y_t, state = short_conv(u[:, t : t + 1], weight, bias, state, output_final_state=True)
        outs.append(y_t)
    assert_close(torch.cat(outs, dim=1), whole)


def test_short_conv_kernel_one_and_gradients():
    u, weight, bias, _ = make_short(7, K=1)
    y, s = short_conv(u, weight, bias, output_final_state=True)
    assert_close(y, u * weight[:, 0] + bias)
    assert s.shape == (B, 0, 5)
    u, weight, bias, state = make_short(9)
    leaves = [t.clone().requires_grad_() for t in (u, weight, bias, state)]
    g = torch.autograd.grad(short_conv(*leaves)[0].square().sum(), leaves)
    g_ref = torch.autograd.grad(short_conv_naive(*leaves)[0].square().sum(), leaves)
    for a, b in zip(g, g_ref, strict=True):
        assert_close(a, b, tol=1e-4)


def test_short_conv_errors():
    u, weight, bias, state = make_short(5)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 4\) .* C=5"):
        short_conv(u, weight[:4])
    with pytest.raises(ValueError, match=r"bias has shape \(3,\) .* \(5,\)"):
        short_conv(u, weight, bias[:3])
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 2, 5\) .*\(2, 3, 5\)"):
        short_conv(u, weight, bias, state[:, :2])


# --- Triton kernels (the interpreter on CPU) ----------------------------------------------------


def _grads(fn, leaves, args, proj, final_weight):
    """y, final state and the gradients of every leaf of L = Σ y·proj + Σ final·final_weight."""
    y, final = fn(*args, output_final_state=True)
    loss = (y.float() * proj).sum() + (final.float() * final_weight).sum()
    return y, final, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    ("T", "S", "channels", "with_bias", "history_grad"),
    [
        (1, 0, D, True, False),  # one token (what long_conv runs for it under autograd)
        (5, 0, D, True, False),
        (70, 0, 70, True, False),  # two ragged row tiles and two ragged channel tiles
        (13, 21, D, True, True),  # a history that is differentiated
        (13, 21, D, False, False),  # a fixed history (only u's rows of dx), no skip weight
        (3, 80, 70, True, True),  # the history spans two tiles of dx and of the tap gradient
    ],
)
def test_triton_direct_matches_naive(T, S, channels, with_bias, history_grad):
    u, k, bias, history = make_inputs(T, S, channels=channels)
    inputs = [u, k, bias if with_bias else None, history if S else None]
    wants_grad = [True, True, True, history_grad]

    def copies():
        return [
            t.clone().requires_grad_(grad) if t is not None else None
            for t, grad in zip(inputs, wants_grad, strict=True)
        ]

    ours, ref = copies(), copies()
    leaves = [i for i, t in enumerate(ours) if t is not None and t.requires_grad]
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(B, T, channels, generator=g)
    final_weight = torch.randn(B, S + T, channels, generator=g)
    y, final, grads = _grads(long_conv_triton, [ours[i] for i in leaves], ours, proj, final_weight)
    y_ref, final_ref, grads_ref = _grads(
        long_conv_naive, [ref[i] for i in leaves], ref, proj, final_weight
    )
    assert y.shape == (B, T, channels) and y.dtype == torch.float32
    assert_close(y, y_ref)
    assert torch.equal(final, final_ref)
    names = ["u", "k", "bias", "initial_state"]
    for i, grad, grad_ref in zip(leaves, grads, grads_ref, strict=True):
        assert grad_ref.abs().max() > 0
        assert grad.shape == ours[i].shape, names[i]
        assert_close(grad, grad_ref, tol=1e-4)


def test_triton_step_matches_torch_step():
    # The history and filter as the Hyena layer hands them over: a slice of a wider cache row and
    # a strided view of the filters; the skip weight strided too.
    T, S = 1, 11
    u, k, bias, history = make_inputs(T, S, batch=3, channels=40)
    cache = torch.randn(3, S, 2 * 40)
    cache[..., 40:] = history
    history = cache[..., 40:]  # (3, S, 40), row stride 80
    k = torch.stack([k, -k], dim=-1)[..., 0]  # (40, L), strides (2L, 2)
    bias = torch.stack([bias, bias], dim=-1)[:, 1]  # (40,), stride 2
    before = history.clone()
    for hist, b in ((history, bias), (None, bias), (history, None)):
        y, full = long_conv_step_triton(u[:, 0], k, b, hist, output_final_state=True)
        y_ref, full_ref = long_conv_step(u[:, 0], k, b, hist, output_final_state=True)
        assert y.shape == (3, 40)
        assert_close(y, y_ref)
        assert torch.equal(full, full_ref)
    assert torch.equal(history, before), "the step must not write into the cache"
    assert long_conv_step_triton(u[:, 0], k, bias, history)[1] is None


def test_triton_prefill_then_decode_steps():
    T, split = 40, 27
    u, k, bias, _ = make_inputs(T, channels=70)
    y_all, h_all = long_conv_naive(u, k, bias, output_final_state=True)
    with torch.no_grad():
        y, state = long_conv(u[:, :split], k, bias, output_final_state=True, backend="triton")
        outs = [y]
        for t in range(split, T):
            y, state = long_conv(
                u[:, t : t + 1], k, bias, state, output_final_state=True, backend="triton"
            )
            outs.append(y)
    assert_close(torch.cat(outs, dim=1), y_all)
    assert torch.equal(state, h_all)


def test_triton_dispatch(monkeypatch):
    names = ("long_conv_step_triton", "long_conv_triton", "long_conv_fft", "long_conv_step")
    step, direct, fft, torch_step = (_spy(monkeypatch, name) for name in names)
    monkeypatch.setattr(long_conv_module, "_TRITON_DIRECT_MAX_NEW_TOKENS", 8)
    u, k, bias, _ = make_inputs(9)
    with torch.no_grad():
        long_conv(u[:, :1], k, bias, backend="triton")
        long_conv(u[:, :8], k, bias, backend="triton")
        long_conv(u, k, bias, backend="triton")  # T = 9 > the threshold
    assert (len(step), len(direct), len(fft), len(torch_step)) == (1, 1, 1, 0)
    # Under autograd one token takes the differentiable direct kernel, and short inputs too.
    k.requires_grad_()
    long_conv(u[:, :1], k, bias, backend="triton")
    long_conv(u[:, :8], k, bias, backend="triton")
    long_conv(u, k, bias, backend="triton")
    assert (len(step), len(direct), len(fft)) == (1, 3, 2)
    # backend="torch" never reaches a Triton kernel.
    with torch.no_grad():
        for length in (1, 8, 9):
            long_conv(u[:, :length], k, bias, backend="torch")
    assert (len(step), len(direct), len(torch_step)) == (1, 3, 1)


def test_triton_bf16_keeps_dtype():
    u, k, bias, history = make_inputs(20, 5, dtype=torch.bfloat16)
    y_ref, _ = long_conv_naive(u.float(), k, bias, history.float())
    y, h = long_conv(u, k, bias, history, output_final_state=True, backend="triton")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    assert _relative_error(y, y_ref) < 1e-2
    y, _ = long_conv(u[:, :1], k, bias, history, backend="triton")
    assert y.dtype == torch.bfloat16
    assert _relative_error(y, long_conv_naive(u[:, :1].float(), k, bias, history.float())[0]) < 1e-2


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(
    ("T", "K", "C"), [(1, 4, 5), (13, 4, 5), (70, 3, 70), (2, 5, 5), (9, 1, 5)]
)
def test_short_conv_triton_matches_naive(T, K, C, with_state, with_bias):
    u, weight, bias, state = make_short(T, K=K, C=C)
    inputs = [u, weight, bias if with_bias else None, state if with_state else None]
    ours = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    ref = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    leaves = [i for i, t in enumerate(ours) if t is not None]
    g = torch.Generator().manual_seed(4)
    proj, final_weight = torch.randn(B, T, C, generator=g), torch.randn(B, K - 1, C, generator=g)
    y, final, grads = _grads(short_conv_triton, [ours[i] for i in leaves], ours, proj, final_weight)
    y_ref, final_ref, grads_ref = _grads(
        short_conv_naive, [ref[i] for i in leaves], ref, proj, final_weight
    )
    assert_close(y, y_ref)
    assert torch.equal(final, final_ref)
    assert torch.equal(short_conv(*inputs, output_final_state=True, backend="torch")[1], final)
    for i, grad, grad_ref in zip(leaves, grads, grads_ref, strict=True):
        assert grad.shape == inputs[i].shape
        if grad.numel():  # K = 1 has an empty state
            assert_close(grad, grad_ref, tol=1e-4)


def test_short_conv_backend_choice(monkeypatch):
    u, weight, bias, state = make_short(9)
    calls = _spy(monkeypatch, "short_conv_triton")
    expected = short_conv_naive(u, weight, bias, state)[0]
    assert_close(short_conv(u, weight, bias, state, backend="triton")[0], expected)
    assert_close(short_conv(u, weight, bias, state, backend="torch")[0], expected)
    assert_close(short_conv(u, weight, bias, state)[0], expected)  # "auto" on a CPU tensor
    assert calls == ["short_conv_triton"]
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        short_conv(u, weight, bias, backend="cuda")


def test_short_conv_triton_chunks_and_steps_chain():
    u, weight, bias, _ = make_short(15, C=40)
    whole, _ = short_conv_naive(u, weight, bias)
    with torch.no_grad():
        y, state = short_conv(u[:, :6], weight, bias, output_final_state=True, backend="triton")
        outs = [y]
        for t in range(6, 15):
            y, state = short_conv(
                u[:, t : t + 1], weight, bias, state, output_final_state=True, backend="triton"
            )
            outs.append(y)
    assert_close(torch.cat(outs, dim=1), whole)


# --- CUDA, bf16 -------------------------------------------------------------------------------


def _relative_error(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


def _bf16_against_fp32(fn, oracle, inputs, to_bf16):
    """fn with the inputs flagged `to_bf16` in bf16 vs the fp32 oracle: y and every gradient
    within 1e-2 relative error."""
    low = [
        t.to(torch.bfloat16) if t is not None and low_precision else t
        for t, low_precision in zip(inputs, to_bf16, strict=True)
    ]
    ours = [t.clone().requires_grad_() if t is not None else None for t in low]
    ref = [t.float().clone().requires_grad_() if t is not None else None for t in low]
    y = fn(*ours)[0]
    y_ref = oracle(*ref)[0]
    assert y.dtype == torch.bfloat16
    assert _relative_error(y, y_ref) < 1e-2
    proj = torch.randn_like(y_ref)
    leaves = [i for i, t in enumerate(ours) if t is not None]
    grads = torch.autograd.grad((y.float() * proj).sum(), [ours[i] for i in leaves])
    grads_ref = torch.autograd.grad((y_ref * proj).sum(), [ref[i] for i in leaves])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert _relative_error(grad, grad_ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "S"), [(200, 0), (100, 300), (1000, 0)])
def test_cuda_bf16_long_conv_within_1e2_of_fp32(T, S):
    # T = 1000 is past the direct-kernel threshold: the FFT form, on the same dispatch.
    u, k, bias, history = make_inputs(T, S, batch=2, channels=256, device="cuda")
    inputs = [u, k, bias, history if S else None]
    _bf16_against_fp32(
        lambda *x: long_conv(*x, backend="triton"),
        long_conv_fft,
        inputs,
        [True, False, False, True],
    )


@pytest.mark.gpu
def test_cuda_bf16_short_conv_within_1e2_of_fp32():
    u, weight, bias, state = make_short(500, K=4, C=384)
    inputs = [t.cuda() for t in (u, weight, bias, state)]
    _bf16_against_fp32(
        lambda *x: short_conv(*x, backend="triton"), short_conv_naive, inputs, [True] * 4
    )


@pytest.mark.gpu
def test_cuda_auto_backend_picks_triton(monkeypatch):
    direct, step, short = (
        _spy(monkeypatch, name)
        for name in ("long_conv_triton", "long_conv_step_triton", "short_conv_triton")
    )
    u, k, bias, history = make_inputs(64, 32, channels=128, device="cuda")
    y, _ = long_conv(u, k, bias, history)
    assert _relative_error(y, long_conv_fft(u, k, bias, history)[0]) < 1e-5
    with torch.no_grad():
        y, _ = long_conv(u[:, :1], k, bias, history)
    assert _relative_error(y, long_conv_step(u[:, 0], k, bias, history)[0].unsqueeze(1)) < 1e-5
    short_conv(u, k[:, :4], bias)
    assert (len(direct), len(step), len(short)) == (1, 1, 1)
