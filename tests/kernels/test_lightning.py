"""Lightning attention: chunked torch form, decode step and public API against the fp32 oracle."""

import math

import pytest
import torch

from zoo.kernels import lightning as lightning_module
from zoo.kernels.lightning import (
    lightning,
    lightning_chunk_torch,
    lightning_naive,
    lightning_step,
    tnl_log_decay,
)

B, H, K, V = 2, 3, 8, 12
# One undecayed head (cosFormer2-style), one mild and one strong decay.
LOG_DECAY = torch.tensor([0.0, -0.05, -2.0])


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def make_inputs(T, batch=B, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Small k keeps the undecayed head's running sum, hence the output, O(1) over ~100 tokens.
    q = torch.randn(batch, T, H, K, generator=g)  # (B, T, H, K)
    k = torch.randn(batch, T, H, K, generator=g) / math.sqrt(K) / 4  # (B, T, H, K)
    v = torch.randn(batch, T, H, V, generator=g)  # (B, T, H, V)
    s0 = torch.randn(batch, H, K, V, generator=g) * 0.3  # (B, H, K, V)
    return q.to(dtype), k.to(dtype), v.to(dtype), s0


def assert_close(actual, expected, tol=1e-5):
    # Tolerance relative to the output's scale, since the undecayed head's sums grow with T.
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 5, 16, 63, 64, 65, 130])
def test_chunk_matches_naive(T, chunk_size, with_init):
    q, k, v, s0 = make_inputs(T)
    init = s0 if with_init else None
    o_ref, s_ref = lightning_naive(q, k, v, LOG_DECAY, 0.7, init, output_final_state=True)
    o, s = lightning_chunk_torch(
        q, k, v, LOG_DECAY, 0.7, init, output_final_state=True, chunk_size=chunk_size
    )
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert s.shape == (B, H, K, V) and s.dtype == torch.float32
    assert o_ref.abs().max() > 0.1
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("group_tokens", [8, 48])
def test_chunk_groups_chain_state(monkeypatch, group_tokens):
    # Real groups are ~1024 tokens; shrink them so a short sequence spans several groups.
    monkeypatch.setattr(lightning_module, "_GROUP_TOKENS", group_tokens)
    q, k, v, s0 = make_inputs(130)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    o, s = lightning_chunk_torch(*leaves[:3], LOG_DECAY, 0.7, leaves[3], True, chunk_size=16)
    o_ref, s_ref = lightning_naive(*leaves[:3], LOG_DECAY, 0.7, leaves[3], True)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    proj = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((o * proj).sum() + s.sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * proj).sum() + s_ref.sum(), leaves)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, tol=1e-4)


def test_no_final_state_unless_asked():
    q, k, v, _ = make_inputs(10)
    assert lightning_chunk_torch(q, k, v, LOG_DECAY)[1] is None
    assert lightning(q, k, v, LOG_DECAY)[1] is None


@pytest.mark.parametrize("T", [37, 64])
def test_chunk_gradients_match_naive(T):
    q, k, v, s0 = make_inputs(T)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0)]
    proj_o = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(1))
    proj_s = torch.randn(B, H, K, V, generator=torch.Generator().manual_seed(2))

    def grads(fn, **kw):
        o, s = fn(*leaves[:3], LOG_DECAY, 0.5, leaves[3], output_final_state=True, **kw)
        loss = (o * proj_o).sum() + (s * proj_s).sum()
        return torch.autograd.grad(loss, leaves)

    for g, g_ref in zip(
        grads(lightning_chunk_torch, chunk_size=16), grads(lightning_naive), strict=True
    ):
        assert g_ref.abs().max() > 0
        assert_close(g, g_ref, tol=1e-4)


def test_step_loop_matches_naive():
    T = 20
    q, k, v, s0 = make_inputs(T)
    o_ref, s_ref = lightning_naive(q, k, v, LOG_DECAY, 0.7, s0, output_final_state=True)
    state, outs = s0, []
    for t in range(T):
        before = state.clone()
        o_t, new_state = lightning_step(q[:, t], k[:, t], v[:, t], LOG_DECAY, state, 0.7)
        assert torch.equal(state, before), "lightning_step must not mutate state"
        outs.append(o_t)
        state = new_state
    assert_close(torch.stack(outs, dim=1), o_ref)
    assert_close(state, s_ref)


def test_step_without_state_starts_from_zeros():
    q, k, v, _ = make_inputs(1)
    o, s = lightning_step(q[:, 0], k[:, 0], v[:, 0], LOG_DECAY, None)
    o_ref, s_ref = lightning_naive(q, k, v, LOG_DECAY, output_final_state=True)
    assert_close(o, o_ref[:, 0])
    assert_close(s, s_ref)


@pytest.mark.parametrize("split", [1, 30, 64])
def test_prefill_then_continue(split):
    T = 100
    q, k, v, s0 = make_inputs(T)
    o_all, s_all = lightning(q, k, v, LOG_DECAY, initial_state=s0, output_final_state=True)

    head = slice(0, split)
    rest = slice(split, T)
    o1, s1 = lightning(q[:, head], k[:, head], v[:, head], LOG_DECAY, 1.0, s0, True)
    o2, s2 = lightning(q[:, rest], k[:, rest], v[:, rest], LOG_DECAY, 1.0, s1, True)
    assert_close(torch.cat([o1, o2], dim=1), o_all)
    assert_close(s2, s_all)

    state, outs = s1, [o1]
    for t in range(split, T):
        o_t, state = lightning_step(q[:, t], k[:, t], v[:, t], LOG_DECAY, state)
        outs.append(o_t.unsqueeze(1))
    assert_close(torch.cat(outs, dim=1), o_all)
    assert_close(state, s_all)


@pytest.mark.parametrize("with_init", [False, True])
def test_varlen_matches_separate_calls(with_init):
    lengths = [5, 70, 1, 33]
    T = sum(lengths)
    q, k, v, _ = make_inputs(T, batch=1)
    init = torch.randn(len(lengths), H, K, V) * 0.3 if with_init else None  # (N, H, K, V)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    o, s = lightning(
        q, k, v, LOG_DECAY, 0.7, init, output_final_state=True, cu_seqlens=cu, chunk_size=16
    )
    assert o.shape == (1, T, H, V) and s.shape == (len(lengths), H, K, V)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        seg_init = None if init is None else init[i : i + 1]
        o_ref, s_ref = lightning_naive(
            q[:, a:b], k[:, a:b], v[:, a:b], LOG_DECAY, 0.7, seg_init, output_final_state=True
        )
        assert_close(o[:, a:b], o_ref)
        assert_close(s[i : i + 1], s_ref)


def test_varlen_empty_segment_passes_state_through():
    q, k, v, _ = make_inputs(7, batch=1)
    init = torch.randn(3, H, K, V) * 0.3  # (N, H, K, V)
    cu = torch.tensor([0, 3, 3, 7])
    o, s = lightning(q, k, v, LOG_DECAY, initial_state=init, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, 7, H, V)
    torch.testing.assert_close(s[1], init[1])
    o_ref, s_ref = lightning_naive(q[:, 3:], k[:, 3:], v[:, 3:], LOG_DECAY, 1.0, init[2:], True)
    assert_close(o[:, 3:], o_ref)
    assert_close(s[2:], s_ref)


def test_bf16_inputs_keep_dtype_and_fp32_state():
    T = 70
    q, k, v, s0 = make_inputs(T, dtype=torch.bfloat16)
    o, s = lightning(q, k, v, LOG_DECAY, initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = lightning_naive(
        q.float(), k.float(), v.float(), LOG_DECAY, 1.0, s0, output_final_state=True
    )
    assert_close(o.float(), o_ref, tol=2e-2)
    assert_close(s, s_ref, tol=1e-4)


def test_single_token_matches_chunked_path():
    q, k, v, s0 = make_inputs(1)
    o, s = lightning(q, k, v, LOG_DECAY, 0.7, s0, output_final_state=True)
    o_ref, s_ref = lightning_chunk_torch(q, k, v, LOG_DECAY, 0.7, s0, output_final_state=True)
    assert o.shape == (B, 1, H, V)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


def test_env_backend_override(monkeypatch, ran):
    """ZOO_KERNEL_BACKEND decides what "auto" runs: each value must reach its own code."""
    import zoo.kernels.linear_attention as triton_forms

    calls, spy = ran
    spy(triton_forms, "chunk_linear_attention", "triton")
    spy(lightning_module, "lightning_chunk_torch", "torch")
    q, k, v, _ = make_inputs(4)
    for env in ("torch", "triton"):  # triton: the interpreter, under the test conftest
        monkeypatch.setenv("ZOO_KERNEL_BACKEND", env)
        calls.clear()
        assert_close(lightning(q, k, v, LOG_DECAY)[0], lightning_naive(q, k, v, LOG_DECAY)[0])
        assert calls == [env]
        calls.clear()
        lightning(q, k, v, LOG_DECAY, backend="torch")  # an explicit backend is not overridden
        assert calls == ["torch"]
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_KERNEL_BACKEND"):
        lightning(q, k, v, LOG_DECAY)


# --- tnl_log_decay ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["alibi", "paper"])
@pytest.mark.parametrize("num_heads", [1, 6, 8])
def test_tnl_log_decay_shape_and_sign(form, num_heads):
    for layer in range(4):
        ld = tnl_log_decay(num_heads, layer, 4, form)
        assert ld.shape == (num_heads,) and ld.dtype == torch.float32
        assert bool((ld <= 0).all())


def test_tnl_log_decay_alibi_power_of_two():
    ld = tnl_log_decay(8, 0, 2)
    expected = torch.tensor([-(2.0 ** -(h + 1)) * (1 + 1e-5) for h in range(8)])
    torch.testing.assert_close(ld, expected)


def test_tnl_log_decay_alibi_interleave_for_six_heads():
    # ALiBi rule: the 4 slopes of n=4, then every other slope of n=8, first 2 of those.
    four = [2.0 ** (-8 * (h + 1) / 4) for h in range(4)]
    eight = [2.0 ** (-8 * (h + 1) / 8) for h in range(8)]
    slopes = four + eight[0::2][:2]
    expected = -torch.tensor(slopes) * (1 + 1e-5)
    torch.testing.assert_close(tnl_log_decay(6, 0, 3), expected)


def test_tnl_log_decay_layer_schedule():
    first = tnl_log_decay(8, 0, 12)
    last = tnl_log_decay(8, 11, 12)
    assert bool((last.abs() < 1e-5).all()), "the last layer barely decays"
    assert bool((first < last).all()), "lower layers decay fastest"
    torch.testing.assert_close(tnl_log_decay(4, 0, 1), tnl_log_decay(4, 0, 2))


def test_tnl_log_decay_paper():
    ld = tnl_log_decay(8, 1, 4, "paper")
    assert ld[0].item() == 0.0
    expected = -torch.tensor([8 * h / 8 * (1 - 1 / 4) for h in range(8)])
    torch.testing.assert_close(ld, expected)


def test_tnl_log_decay_bad_form():
    with pytest.raises(ValueError, match="form"):
        tnl_log_decay(8, 0, 2, "rope")


# --- input validation ---------------------------------------------------------------------------


def test_error_mismatched_k_shape():
    q, k, v, _ = make_inputs(6)
    with pytest.raises(ValueError, match=r"k has shape \(2, 5, 3, 8\) but q has \(2, 6, 3, 8\)"):
        lightning(q, k[:, :5], v, LOG_DECAY)


def test_error_mismatched_v_shape():
    q, k, v, _ = make_inputs(6)
    with pytest.raises(ValueError, match=r"v has shape \(2, 4, 3, 12\)"):
        lightning(q, k, v[:, :4], LOG_DECAY)


def test_error_log_decay_shape_and_values():
    q, k, v, _ = make_inputs(6)
    with pytest.raises(ValueError, match=r"log_decay has shape \(4,\).*\(3,\)"):
        lightning(q, k, v, torch.zeros(4))
    with pytest.raises(ValueError, match="log_decay must be <= 0"):
        lightning(q, k, v, torch.tensor([0.0, 0.1, -1.0]))
    with pytest.raises(ValueError, match="log_decay must be finite"):
        lightning(q, k, v, torch.tensor([0.0, -math.inf, -1.0]))


def test_error_initial_state_shape():
    q, k, v, s0 = make_inputs(6)
    with pytest.raises(
        ValueError, match=r"initial_state has shape \(1, 3, 8, 12\).*\(2, 3, 8, 12\)"
    ):
        lightning(q, k, v, LOG_DECAY, initial_state=s0[:1])


def test_error_cu_seqlens():
    q, k, v, _ = make_inputs(6)
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match=r"cu_seqlens.*B=1.*B=2"):
        lightning(q, k, v, LOG_DECAY, cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end at T=6"):
        lightning(q[:1], k[:1], v[:1], LOG_DECAY, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match=r"initial_state .*\(N, H, K, V\)"):
        lightning(
            q[:1], k[:1], v[:1], LOG_DECAY, initial_state=torch.zeros(1, H, K, V), cu_seqlens=cu
        )


def test_error_empty_sequence():
    q, k, v, _ = make_inputs(0)
    with pytest.raises(ValueError, match="T=0"):
        lightning(q, k, v, LOG_DECAY)
    with pytest.raises(ValueError, match="T=0"):
        lightning_chunk_torch(q, k, v, LOG_DECAY)


def test_error_backend(monkeypatch):
    q, k, v, _ = make_inputs(4)
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        lightning(q, k, v, LOG_DECAY, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' for lightning .* CUDA tensor"):
        lightning(q, k, v, LOG_DECAY, backend="triton")
