"""Gated linear attention (HGRN2's op): chunked torch form, decode step and public API vs the
oracle, and the old `zoo.kernels.hgrn2` names."""

import pytest
import torch

from tests.kernels.memory import LiveBytes
from zoo.kernels import gla as gla_module
from zoo.kernels.gla import gla, gla_chunk_torch, gla_naive, gla_step

B, H, K, V = 2, 3, 8, 6


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def make_inputs(T, batch=B, min_log_f=-3.0, dtype=torch.float32, seed=0):
    """HGRN2-like inputs: k = 1 − f, so the state stays a bounded running average.

    Key channel 0 barely decays (log f ≈ −1e-3: a long memory), the others draw log f uniformly
    from [min_log_f, 0].
    """
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, H, K, generator=g)  # (B, T, H, K)
    log_f = torch.rand(batch, T, H, K, generator=g) * min_log_f  # (B, T, H, K)
    log_f[..., 0] = -1e-3 * torch.rand(batch, T, H, generator=g)
    k = -torch.expm1(log_f)
    v = torch.randn(batch, T, H, V, generator=g)  # (B, T, H, V)
    s0 = torch.randn(batch, H, K, V, generator=g)  # (B, H, K, V)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_f, s0


def assert_close(actual, expected, tol=1e-5):
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 20, 64])
@pytest.mark.parametrize("T", [1, 7, 17, 20, 63, 64, 130, 200])
def test_chunk_matches_naive(T, chunk_size, with_init):
    q, k, v, log_f, s0 = make_inputs(T)
    init = s0 if with_init else None
    o_ref, s_ref = gla_naive(q, k, v, log_f, init, output_final_state=True)
    o, s = gla_chunk_torch(q, k, v, log_f, init, output_final_state=True, chunk_size=chunk_size)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert s.shape == (B, H, K, V) and s.dtype == torch.float32
    assert o_ref.abs().max() > 0.1
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("min_log_f", [-10.0, -80.0])
def test_strong_decay_stays_finite_and_exact(min_log_f):
    # In-chunk cumulative decays reach -640 (or -5000): exp(-b) would overflow, exp(b) underflows.
    T = 100
    q, k, v, log_f, s0 = make_inputs(T, min_log_f=min_log_f, seed=1)
    k = torch.randn(k.shape, generator=torch.Generator().manual_seed(2))  # any k, not only 1 - f
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f, s0)]
    o, s = gla_chunk_torch(*leaves[:4], leaves[4], output_final_state=True, chunk_size=64)
    o_ref, s_ref = gla_naive(*leaves[:4], leaves[4], output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, o_ref, tol=1e-4)
    assert_close(s, s_ref, tol=1e-4)
    proj = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((o * proj).sum() + s.sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * proj).sum() + s_ref.sum(), leaves)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(g).all()
        assert_close(g, g_ref, tol=1e-4)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [1, 17, 37, 64, 200])
def test_chunk_gradients_match_naive(T, with_init):
    q, k, v, log_f, s0 = make_inputs(T)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f, s0)]
    init = leaves[4] if with_init else None
    proj_o = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(1))
    proj_s = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(2))

    def grads(fn, **kw):
        o, s = fn(*leaves[:4], init, output_final_state=True, **kw)
        loss = (o * proj_o).sum() + (s * proj_s).sum()
        return torch.autograd.grad(loss, leaves[:4] + ([init] if with_init else []))

    pairs = zip(grads(gla_chunk_torch, chunk_size=20), grads(gla_naive), strict=True)
    for i, (g, g_ref) in enumerate(pairs):
        # The decay's gradient is zero only where it decays nothing: one token from zeros.
        assert g_ref.abs().max() > 0 or (i == 3 and T == 1 and not with_init)
        assert_close(g, g_ref, tol=1e-4)


@pytest.mark.parametrize("group_tokens", [8, 48])
def test_chunk_groups_chain_state(monkeypatch, group_tokens):
    # Real groups are ~1024 tokens; shrink them so a short sequence spans several groups.
    monkeypatch.setattr(gla_module, "_GROUP_TOKENS", group_tokens)
    q, k, v, log_f, s0 = make_inputs(101)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f, s0)]
    o, s = gla_chunk_torch(*leaves[:4], leaves[4], True, chunk_size=16)
    o_ref, s_ref = gla_naive(*leaves[:4], leaves[4], True)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    proj = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((o * proj).sum() + s.sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * proj).sum() + s_ref.sum(), leaves)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, tol=1e-4)


def test_no_final_state_unless_asked():
    q, k, v, log_f, _ = make_inputs(10)
    assert gla_chunk_torch(q, k, v, log_f)[1] is None
    assert gla(q, k, v, log_f)[1] is None
    assert gla(q[:, :1], k[:, :1], v[:, :1], log_f[:, :1])[1] is None


def test_step_loop_matches_naive():
    T = 20
    q, k, v, log_f, s0 = make_inputs(T)
    o_ref, s_ref = gla_naive(q, k, v, log_f, s0, output_final_state=True)
    state, outs = s0, []
    for t in range(T):
        before = state.clone()
        o_t, new_state = gla_step(q[:, t], k[:, t], v[:, t], log_f[:, t], state)
        assert torch.equal(state, before), "gla_step must not mutate state"
        outs.append(o_t)
        state = new_state
    assert_close(torch.stack(outs, dim=1), o_ref)
    assert_close(state, s_ref)


def test_step_without_state_starts_from_zeros():
    q, k, v, log_f, _ = make_inputs(1)
    o, s = gla_step(q[:, 0], k[:, 0], v[:, 0], log_f[:, 0], None)
    o_ref, s_ref = gla_naive(q, k, v, log_f, output_final_state=True)
    assert_close(o, o_ref[:, 0])
    assert_close(s, s_ref)


@pytest.mark.parametrize("split", [1, 30, 64])
def test_prefill_then_continue(split):
    T = 100
    q, k, v, log_f, s0 = make_inputs(T)
    o_all, s_all = gla(q, k, v, log_f, initial_state=s0, output_final_state=True)

    head, rest = slice(0, split), slice(split, T)
    o1, s1 = gla(q[:, head], k[:, head], v[:, head], log_f[:, head], s0, True)
    o2, s2 = gla(q[:, rest], k[:, rest], v[:, rest], log_f[:, rest], s1, True)
    assert_close(torch.cat([o1, o2], dim=1), o_all)
    assert_close(s2, s_all)

    state, outs = s1, [o1]
    for t in range(split, T):
        o_t, state = gla(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], log_f[:, t : t + 1], state, True
        )
        outs.append(o_t)
    assert_close(torch.cat(outs, dim=1), o_all)
    assert_close(state, s_all)


def test_bf16_inputs_keep_dtype_and_fp32_state():
    T = 70
    q, k, v, log_f, s0 = make_inputs(T, dtype=torch.bfloat16)
    o, s = gla(q, k, v, log_f, initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = gla_naive(q.float(), k.float(), v.float(), log_f, s0, True)
    assert_close(o.float(), o_ref, tol=2e-2)
    assert_close(s, s_ref, tol=1e-4)


def test_single_token_matches_chunked_path():
    q, k, v, log_f, s0 = make_inputs(1)
    o, s = gla(q, k, v, log_f, s0, output_final_state=True)
    o_ref, s_ref = gla_chunk_torch(q, k, v, log_f, s0, output_final_state=True)
    assert o.shape == (B, 1, H, V)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


def test_env_backend_override(monkeypatch, ran):
    """ZOO_KERNEL_BACKEND decides what "auto" runs: each value must reach its own code."""
    import zoo.kernels.linear_attention as triton_forms

    calls, spy = ran
    spy(triton_forms, "chunk_linear_attention", "triton")
    spy(gla_module, "gla_chunk_torch", "torch")
    q, k, v, log_f, _ = make_inputs(4)
    for env in ("torch", "triton"):  # triton: the interpreter, under the test conftest
        monkeypatch.setenv("ZOO_KERNEL_BACKEND", env)
        calls.clear()
        assert_close(gla(q, k, v, log_f)[0], gla_naive(q, k, v, log_f)[0])
        assert calls == [env]
        calls.clear()
        gla(q, k, v, log_f, backend="torch")  # an explicit backend is not overridden
        assert calls == ["torch"]
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_KERNEL_BACKEND"):
        gla(q, k, v, log_f)


# --- O(T) memory --------------------------------------------------------------------------------


def _forward_backward_memory(T: int) -> tuple[int, int]:
    q, k, v, log_f, _ = make_inputs(T, batch=1, seed=4)
    leaves = [t.requires_grad_() for t in (q, k, v, log_f)]
    mode = LiveBytes()
    with mode:
        o, _ = gla_chunk_torch(*leaves, chunk_size=16)
        o.square().sum().backward()
    return mode.peak, mode.largest


def test_chunked_memory_grows_linearly(monkeypatch):
    # Small groups, so both lengths span several of them as real inputs do.
    monkeypatch.setattr(gla_module, "_GROUP_TOKENS", 64)
    peak_1, largest_1 = _forward_backward_memory(300)
    peak_4, largest_4 = _forward_backward_memory(1200)
    # 4x the tokens: linear growth gives ~4x, a T×T (or T×T×K) temporary would give 16x (64x).
    assert peak_4 < 4.4 * peak_1, (peak_1, peak_4)
    assert largest_4 <= 4 * largest_1, (largest_1, largest_4)
    # The largest tensor is a (T, H, K)-sized input, output or gradient, never a T×C×K block.
    assert largest_4 == 1200 * H * max(K, V)
    assert peak_1 > 0


# --- input validation ---------------------------------------------------------------------------


def test_error_mismatched_shapes():
    q, k, v, log_f, _ = make_inputs(6)
    with pytest.raises(ValueError, match=r"k has shape \(2, 5, 3, 8\) but q has \(2, 6, 3, 8\)"):
        gla(q, k[:, :5], v, log_f)
    with pytest.raises(ValueError, match=r"g has shape \(2, 6, 3, 4\) but q has \(2, 6, 3, 8\)"):
        gla(q, k, v, log_f[..., :4])
    with pytest.raises(ValueError, match=r"v has shape \(2, 4, 3, 6\).*\(2, 6, 3\)"):
        gla(q, k, v[:, :4], log_f)
    with pytest.raises(ValueError, match=r"q must be \(B, T, H, K\) but has shape \(2, 6, 24\)"):
        gla(q.flatten(2), k, v, log_f)


def test_error_initial_state_shape():
    q, k, v, log_f, s0 = make_inputs(6)
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 3, 8, 6\).*\(2, 3, 8, 6\)"):
        gla(q, k, v, log_f, initial_state=s0[:1])


def test_error_dtype_and_empty_sequence():
    q, k, v, log_f, _ = make_inputs(6)
    with pytest.raises(ValueError, match="g must be a floating tensor"):
        gla(q, k, v, log_f.long())
    q, k, v, log_f, _ = make_inputs(0)
    with pytest.raises(ValueError, match="T=0"):
        gla(q, k, v, log_f)
    with pytest.raises(ValueError, match="T=0"):
        gla_chunk_torch(q, k, v, log_f)


def test_error_chunk_size_and_backend(monkeypatch):
    q, k, v, log_f, _ = make_inputs(4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        gla(q, k, v, log_f, chunk_size=0)
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        gla(q, k, v, log_f, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        RuntimeError, match=r"backend='triton' for gated linear attention needs .* CUDA tensor"
    ):
        gla(q, k, v, log_f, backend="triton")


def test_the_old_hgrn2_names_are_the_gla_functions():
    from zoo.kernels import hgrn2 as old

    assert (old.hgrn2, old.hgrn2_naive, old.hgrn2_step, old.hgrn2_chunk_torch) == (
        gla,
        gla_naive,
        gla_step,
        gla_chunk_torch,
    )
