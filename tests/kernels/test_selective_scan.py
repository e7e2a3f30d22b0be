"""Selective scan: chunked torch form, decode step and public API against the fp32 oracle."""

import itertools

import pytest
import torch

from tests.kernels.memory import LiveBytes
from zoo.kernels import selective_scan as scan_module
from zoo.kernels.selective_scan import (
    selective_scan,
    selective_scan_chunk_torch,
    selective_scan_naive,
    selective_scan_step,
)

B, D_IN, N = 2, 6, 4


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def make_inputs(T, batch=B, dtype=torch.float32, seed=0, step_scale=1.0):
    """u, delta, A, B, C, D and an initial state, with Mamba-like ranges.

    delta = softplus(·) spans ~0.05 to ~3 and A spans −0.3 to −16, so exp(Δ A) covers weak and
    near-total forgetting; ``step_scale`` stretches delta further.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, T, D_IN, generator=g)  # (B, T, D_in)
    delta = torch.nn.functional.softplus(torch.randn(batch, T, D_IN, generator=g) - 1.0)
    delta = delta * step_scale  # (B, T, D_in), > 0
    n = torch.arange(1, N + 1, dtype=torch.float32)
    A = -n * torch.exp(0.8 * torch.randn(D_IN, N, generator=g))  # (D_in, N), < 0
    Bm = torch.randn(batch, T, N, generator=g)  # (B, T, N)
    Cm = torch.randn(batch, T, N, generator=g)  # (B, T, N)
    D = torch.randn(D_IN, generator=g)  # (D_in,)
    s0 = torch.randn(batch, D_IN, N, generator=g)  # (B, D_in, N)
    return u.to(dtype), delta.to(dtype), A, Bm.to(dtype), Cm.to(dtype), D, s0


def assert_close(actual, expected, tol=1e-5):
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk_size", [8, 64])
@pytest.mark.parametrize("T", [1, 5, 8, 37, 64, 65, 130])
def test_chunk_matches_naive(T, chunk_size, with_init):
    u, delta, A, Bm, Cm, D, s0 = make_inputs(T)
    init = s0 if with_init else None
    y_ref, s_ref = selective_scan_naive(u, delta, A, Bm, Cm, D, init, output_final_state=True)
    y, s = selective_scan_chunk_torch(
        u, delta, A, Bm, Cm, D, init, output_final_state=True, chunk_size=chunk_size
    )
    assert y.shape == (B, T, D_IN) and y.dtype == torch.float32
    assert s.shape == (B, D_IN, N) and s.dtype == torch.float32
    assert y_ref.abs().max() > 0.1
    assert_close(y, y_ref)
    assert_close(s, s_ref)


def test_no_skip_without_D():
    u, delta, A, Bm, Cm, D, _ = make_inputs(21)
    y, _ = selective_scan(u, delta, A, Bm, Cm, chunk_size=8)
    y_skip, _ = selective_scan(u, delta, A, Bm, Cm, D, chunk_size=8)
    assert_close(y_skip - y, u * D)
    assert_close(y, selective_scan_naive(u, delta, A, Bm, Cm)[0])


def test_huge_steps_stay_finite():
    # Δ up to ~150 and A down to −50: exp(±cumsum(Δ A)) factorisations overflow here; every
    # exponent of the chunked form is ≤ 0, so it underflows to exact forgetting instead.
    u, delta, A, Bm, Cm, D, s0 = make_inputs(70, step_scale=50.0)
    y_ref, s_ref = selective_scan_naive(u, delta, A, Bm, Cm, D, s0, output_final_state=True)
    y, s = selective_scan_chunk_torch(u, delta, A, Bm, Cm, D, s0, True, chunk_size=32)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert_close(y, y_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("group_elements", [1, 400])
def test_chunk_groups_chain_state(monkeypatch, group_elements):
    # Real groups hold ~2^20 state elements; shrink them so a short input spans many groups
    # (1: one chunk per group; 400: a few chunks per group).
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", group_elements)
    u, delta, A, Bm, Cm, D, s0 = make_inputs(75)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, Bm, Cm, D, s0)]
    y, s = selective_scan_chunk_torch(*leaves, output_final_state=True, chunk_size=8)
    y_ref, s_ref = selective_scan_naive(*leaves, output_final_state=True)
    assert_close(y, y_ref)
    assert_close(s, s_ref)
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((y * proj).sum() + s.sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * proj).sum() + s_ref.sum(), leaves)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, tol=1e-4)


def test_no_final_state_unless_asked():
    u, delta, A, Bm, Cm, D, _ = make_inputs(10)
    assert selective_scan_chunk_torch(u, delta, A, Bm, Cm, D)[1] is None
    assert selective_scan(u, delta, A, Bm, Cm, D)[1] is None
    assert selective_scan(u[:, :1], delta[:, :1], A, Bm[:, :1], Cm[:, :1], D)[1] is None


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [37, 64])
def test_chunk_gradients_match_naive(T, with_init):
    u, delta, A, Bm, Cm, D, s0 = make_inputs(T)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, Bm, Cm, D, s0)]
    init = leaves[6] if with_init else None
    proj_y = torch.randn(B, T, D_IN, generator=torch.Generator().manual_seed(1))
    proj_s = torch.randn(B, D_IN, N, generator=torch.Generator().manual_seed(2))

    def grads(fn, **kw):
        y, s = fn(*leaves[:6], init, output_final_state=True, **kw)
        loss = (y * proj_y).sum() + (s * proj_s).sum()
        return torch.autograd.grad(loss, leaves[:6] + ([init] if with_init else []))

    for g, g_ref in zip(
        grads(selective_scan_chunk_torch, chunk_size=16),
        grads(selective_scan_naive),
        strict=True,
    ):
        assert g_ref.abs().max() > 0
        assert_close(g, g_ref, tol=1e-4)


def test_step_loop_matches_naive():
    T = 20
    u, delta, A, Bm, Cm, D, s0 = make_inputs(T)
    y_ref, s_ref = selective_scan_naive(u, delta, A, Bm, Cm, D, s0, output_final_state=True)
    state, ys = s0, []
    for t in range(T):
        before = state.clone()
        y_t, new_state = selective_scan_step(u[:, t], delta[:, t], A, Bm[:, t], Cm[:, t], D, state)
        assert torch.equal(state, before), "selective_scan_step must not mutate state"
        ys.append(y_t)
        state = new_state
    assert_close(torch.stack(ys, dim=1), y_ref)
    assert_close(state, s_ref)


def test_step_without_state_starts_from_zeros():
    u, delta, A, Bm, Cm, D, _ = make_inputs(1)
    y, s = selective_scan_step(u[:, 0], delta[:, 0], A, Bm[:, 0], Cm[:, 0], D, None)
    y_ref, s_ref = selective_scan_naive(u, delta, A, Bm, Cm, D, output_final_state=True)
    assert_close(y, y_ref[:, 0])
    assert_close(s, s_ref)


@pytest.mark.parametrize("split", [1, 30, 64])
def test_prefill_then_continue(split):
    T = 100
    u, delta, A, Bm, Cm, D, s0 = make_inputs(T)
    y_all, s_all = selective_scan(u, delta, A, Bm, Cm, D, s0, True, chunk_size=16)

    head, rest = slice(0, split), slice(split, T)
    y1, s1 = selective_scan(
        u[:, head], delta[:, head], A, Bm[:, head], Cm[:, head], D, s0, True, chunk_size=16
    )
    y2, s2 = selective_scan(
        u[:, rest], delta[:, rest], A, Bm[:, rest], Cm[:, rest], D, s1, True, chunk_size=16
    )
    assert_close(torch.cat([y1, y2], dim=1), y_all)
    assert_close(s2, s_all)

    state, ys = s1, [y1]
    for t in range(split, T):
        y_t, state = selective_scan_step(u[:, t], delta[:, t], A, Bm[:, t], Cm[:, t], D, state)
        ys.append(y_t.unsqueeze(1))
    assert_close(torch.cat(ys, dim=1), y_all)
    assert_close(state, s_all)


def test_bf16_inputs_keep_dtype_and_fp32_state():
    u, delta, A, Bm, Cm, D, s0 = make_inputs(70, dtype=torch.bfloat16)
    y, s = selective_scan(u, delta, A, Bm, Cm, D, s0, output_final_state=True, chunk_size=16)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = selective_scan_naive(
        u.float(), delta.float(), A, Bm.float(), Cm.float(), D, s0, output_final_state=True
    )
    assert_close(y.float(), y_ref, tol=2e-2)
    assert_close(s, s_ref, tol=1e-4)


def test_single_token_matches_chunked_path():
    u, delta, A, Bm, Cm, D, s0 = make_inputs(1)
    y, s = selective_scan(u, delta, A, Bm, Cm, D, s0, output_final_state=True)
    y_ref, s_ref = selective_scan_chunk_torch(u, delta, A, Bm, Cm, D, s0, output_final_state=True)
    assert y.shape == (B, 1, D_IN)
    assert_close(y, y_ref)
    assert_close(s, s_ref)


def _memory_at(T):
    """(largest intermediate in a no-grad forward, bytes saved for backward) at length T."""
    u, delta, A, Bm, Cm, D, s0 = make_inputs(T, seed=T)
    with torch.no_grad(), LiveBytes() as mode:
        selective_scan_chunk_torch(u, delta, A, Bm, Cm, D, s0, True, chunk_size=8)
    saved: dict[int, int] = {}

    def pack(t):
        # Views of one buffer count once: key the storage, not the view.
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    leaves = [t.clone().requires_grad_() for t in (u, delta, A, Bm, Cm, D, s0)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        selective_scan_chunk_torch(*leaves, output_final_state=True, chunk_size=8)
    return mode.largest, sum(saved.values())


def test_memory_is_linear_in_length(monkeypatch):
    # Groups of 4 chunks of 8 tokens: a group's (B, 32, D_in, N) state tensors stay smaller than
    # the (B, T, D_in) output, so the output is the largest tensor ever made (a (B, T, D_in, N)
    # one would be N times larger), and what backward keeps grows like T, not T².
    monkeypatch.setattr(scan_module, "_GROUP_ELEMENTS", B * 32 * D_IN * N)
    short, long = 256, 1024
    largest_short, saved_short = _memory_at(short)
    largest_long, saved_long = _memory_at(long)
    assert largest_short == B * short * D_IN
    assert largest_long == B * long * D_IN
    ratio = saved_long / saved_short
    assert 3.5 < ratio < 4.5, ratio  # linear: 4; quadratic would be 16


def test_env_backend_override(monkeypatch, ran):
    """ZOO_KERNEL_BACKEND decides what "auto" runs: each value must reach its own code."""
    calls, spy = ran
    spy(scan_module, "_scan_forward", "triton")
    spy(scan_module, "selective_scan_chunk_torch", "torch")
    u, delta, A, Bm, Cm, D, _ = make_inputs(4)
    reference = selective_scan_naive(u, delta, A, Bm, Cm, D)[0]
    for env in ("torch", "triton"):  # triton: the interpreter, under the test conftest
        monkeypatch.setenv("ZOO_KERNEL_BACKEND", env)
        calls.clear()
        assert_close(selective_scan(u, delta, A, Bm, Cm, D)[0], reference)
        assert calls == [env]
        calls.clear()
        selective_scan(u, delta, A, Bm, Cm, D, backend="torch")  # an explicit one stays
        assert calls == ["torch"]
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_KERNEL_BACKEND must be one of"):
        selective_scan(u, delta, A, Bm, Cm, D)


def test_error_backend(monkeypatch):
    u, delta, A, Bm, Cm, D, _ = make_inputs(4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' for selective-scan .* CUDA tensor"):
        selective_scan(u, delta, A, Bm, Cm, D, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(u, delta, A, Bm, Cm, D, backend="cuda")


@pytest.mark.parametrize(
    ("index", "bad", "message"),
    [
        (0, torch.randn(2, 4), r"u must be \(B, T, D_in\) but has shape \(2, 4\)"),
        (1, torch.rand(2, 4, 5), r"delta has shape \(2, 4, 5\) but u has \(2, 4, 6\)"),
        (2, -torch.rand(5, 4), r"A has shape \(5, 4\) but must be \(D_in, N\) with D_in = 6"),
        (3, torch.randn(2, 4, 3), r"B has shape \(2, 4, 3\) but must be \(B, T, N\) = \(2, 4, 4\)"),
        (4, torch.randn(2, 3, 4), r"C has shape \(2, 3, 4\) but must be \(B, T, N\) = \(2, 4, 4\)"),
        (5, torch.randn(5), r"D has shape \(5,\) but must be \(D_in,\) = \(6,\)"),
        (
            6,
            torch.randn(2, 6, 3),
            r"initial_state has shape \(2, 6, 3\) but must be .* \(2, 6, 4\)",
        ),
        (2, torch.rand(6, 4), r"A must be <= 0 .* but its max is 0\.\d+"),
        (1, -torch.rand(2, 4, 6), r"delta must be >= 0 .* but its min is -0\.\d+"),
        (0, torch.ones(2, 4, 6, dtype=torch.long), r"u must be a floating tensor, got dtype"),
    ],
)
def test_error_bad_inputs(index, bad, message):
    args = list(make_inputs(4))
    args[index] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(*args)


def test_error_empty_sequence_and_chunk_size():
    u, delta, A, Bm, Cm, D, _ = make_inputs(4)
    with pytest.raises(ValueError, match="T=0 tokens"):
        selective_scan(u[:, :0], delta[:, :0], A, Bm[:, :0], Cm[:, :0], D)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"chunk_size must be a positive int, got {bad!r}"):
            selective_scan(u, delta, A, Bm, Cm, D, chunk_size=bad)


# --- Triton (the interpreter on CPU; slow, so few and small cases) -----------------------------


def _leaves(tensors):
    return [t.clone().requires_grad_() if t is not None else None for t in tensors]


def _check_triton(inputs, tol=1e-5, cu_seqlens=None):
    """Triton vs the naive scan: y, final state and the gradients of every input."""
    ours, ref = _leaves(inputs), _leaves(inputs)
    y, s = selective_scan(*ours[:6], ours[6], True, cu_seqlens, backend="triton")
    if cu_seqlens is None:
        y_ref, s_ref = selective_scan_naive(*ref[:6], ref[6], output_final_state=True)
    else:
        ys, finals = [], []
        bounds = cu_seqlens.tolist()
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            init = ref[6][i : i + 1]
            if a == b:
                finals.append(init)
                continue
            seg = [ref[0][:, a:b], ref[1][:, a:b], ref[2], ref[3][:, a:b], ref[4][:, a:b], ref[5]]
            y_i, s_i = selective_scan_naive(*seg, init, output_final_state=True)
            ys.append(y_i)
            finals.append(s_i)
        y_ref, s_ref = torch.cat(ys, dim=1), torch.cat(finals)
    assert_close(y, y_ref, tol)
    assert_close(s, s_ref, tol)
    g = torch.Generator().manual_seed(5)
    dy, ds = torch.randn(y.shape, generator=g), torch.randn(s.shape, generator=g)
    present = [i for i, t in enumerate(ours) if t is not None]  # D and s0 may be absent
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), [ours[i] for i in present])
    grads_ref = torch.autograd.grad(
        (y_ref * dy).sum() + (s_ref * ds).sum(), [ref[i] for i in present]
    )
    for a, b in zip(grads, grads_ref, strict=True):
        assert_close(a, b, tol * 10)


@pytest.mark.parametrize(("T", "with_init"), [(1, True), (16, False), (37, True)])
def test_triton_matches_naive_with_gradients(T, with_init):
    # 37 = two full blocks of 16 tokens and a ragged one; D_in = 6 and N = 4 are ragged tiles.
    u, delta, A, Bm, Cm, D, s0 = make_inputs(T)
    _check_triton((u, delta, A, Bm, Cm, D, s0 if with_init else None))


def test_triton_fused_gate_matches_gated_oracle():
    u, delta, A, Bm, Cm, D, s0 = make_inputs(21)
    z = torch.randn(u.shape, generator=torch.Generator().manual_seed(9))
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, Bm, Cm, D, s0, z)]
    refs = [t.clone().requires_grad_() for t in (u, delta, A, Bm, Cm, D, s0, z)]
    y, s = selective_scan(*leaves[:7], True, backend="triton", z=leaves[7])
    y_ref, s_ref = selective_scan_naive(*refs[:7], output_final_state=True)
    y_ref = y_ref * torch.nn.functional.silu(refs[7])
    assert_close(y, y_ref)
    assert_close(s, s_ref)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((y * dy).sum() + s.sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + s_ref.sum(), refs)
    for a, b in zip(grads, grads_ref, strict=True):
        assert_close(a, b, 1e-4)
    # The torch backend gates the same way.
    assert_close(selective_scan(u, delta, A, Bm, Cm, D, s0, z=z)[0], y_ref.detach())


def test_triton_strong_decay_and_no_skip():
    u, delta, A, Bm, Cm, _, s0 = make_inputs(20, step_scale=30.0)  # exp(ΔA) down to e^-1000
    _check_triton((u, delta, A, Bm, Cm, None, s0))


def test_triton_packed_varlen_sequences():
    lengths = [5, 20, 0, 9]
    u, delta, A, Bm, Cm, D, _ = make_inputs(sum(lengths), batch=1)
    s0 = torch.randn(len(lengths), D_IN, N)  # (N_seq, D_in, N)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    _check_triton((u, delta, A, Bm, Cm, D, s0), cu_seqlens=cu)


def test_triton_prefill_then_fused_decode_steps():
    u, delta, A, Bm, Cm, D, s0 = make_inputs(12, batch=3)
    y_all, s_all = selective_scan_naive(u, delta, A, Bm, Cm, D, s0, output_final_state=True)
    with torch.no_grad():
        y, state = selective_scan(
            u[:, :9], delta[:, :9], A, Bm[:, :9], Cm[:, :9], D, s0, True, backend="triton"
        )
        ys = [y]
        for t in range(9, 12):
            step = (u[:, t : t + 1], delta[:, t : t + 1], A, Bm[:, t : t + 1], Cm[:, t : t + 1])
            y, state = selective_scan(*step, D, state, True, backend="triton")
            ys.append(y)
    assert_close(torch.cat(ys, dim=1), y_all)
    assert_close(state, s_all)


def test_triton_varlen_initial_state_shape_is_named():
    u, delta, A, Bm, Cm, D, _ = make_inputs(6, batch=1)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=r"initial_state .*\(N_seq, D_in, N\)"):
        selective_scan(u, delta, A, Bm, Cm, D, torch.zeros(1, D_IN, N), cu_seqlens=cu)


@pytest.mark.gpu
def test_cuda_bf16_within_1e2_of_fp32_oracle():
    inputs = [t.cuda() for t in make_inputs(300, batch=2)]
    u, delta, A, Bm, Cm, D, s0 = inputs
    half = [u.bfloat16(), delta, A, Bm.bfloat16(), Cm.bfloat16(), D, s0]
    ours, ref = _leaves(half), _leaves(inputs)
    y, s = selective_scan(*ours[:6], ours[6], True)  # auto: Triton on CUDA
    y_ref, s_ref = selective_scan_naive(*ref[:6], ref[6], output_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert rel(y, y_ref) < 1e-2 and rel(s, s_ref) < 1e-2
    dy = torch.randn_like(y_ref)
    grads = torch.autograd.grad((y.float() * dy).sum() + s.sum(), ours)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + s_ref.sum(), ref)
    for a, b in zip(grads, grads_ref, strict=True):
        assert rel(a, b) < 1e-2
