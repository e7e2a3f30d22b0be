"""The gated delta rule (Gated DeltaNet's op): chunked torch form, decode step and public API vs
the token-by-token oracle, and the oracle vs transformers' (Qwen3-Next) and fla's torch forms.

Tolerances are fp32 rounding: atol 1e-5 of the largest reference value and rtol 1e-5 for outputs
and states, 1e-4 for gradients (their sums are longer); the largest error measured on these inputs
is 1/20 of its tolerance. The Triton kernels run under the interpreter on a CPU (the conftest sets
TRITON_INTERPRET=1); the `gpu` test reruns them on CUDA in fp32 and bf16.
"""

import importlib.util
import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.memory import LiveBytes
from zoo.kernels import gated_delta as gated_delta_module
from zoo.kernels.gated_delta import (
    gated_delta,
    gated_delta_chunk_torch,
    gated_delta_naive,
    gated_delta_step,
)

B, H, K, V = 2, 3, 8, 6
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def make_inputs(T, batch=B, min_g=-2.0, dtype=torch.float32, seed=0, normalize=True):
    """Gated DeltaNet-like inputs: L2-normalised k (as the layer makes it), β = sigmoid(·) in
    (0, 1), log decays uniform in [min_g, 0] except head 0, which barely decays (long memory)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, T, H, K, generator=gen)  # (B, T, H, K)
    k = torch.randn(batch, T, H, K, generator=gen)  # (B, T, H, K)
    if normalize:
        k = F.normalize(k, dim=-1)
    v = torch.randn(batch, T, H, V, generator=gen)  # (B, T, H, V)
    g = torch.rand(batch, T, H, generator=gen) * min_g  # (B, T, H)
    g[..., 0] = -1e-3 * torch.rand(batch, T, generator=gen)
    beta = torch.sigmoid(torch.randn(batch, T, H, generator=gen))  # (B, T, H)
    s0 = torch.randn(batch, H, K, V, generator=gen)  # (B, H, K, V)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta, s0


def assert_close(actual, expected, tol=1e-5, what=""):
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(
        actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}\n{m}" if what else m
    )


def leaves(tensors):
    return [t.clone().requires_grad_() if t is not None else None for t in tensors]


def loss_and_grads(o, s, inputs, seed=1):
    """Gradients of a random projection of o plus one of the final state, w.r.t. `inputs`."""
    gen = torch.Generator().manual_seed(seed)
    proj_o = torch.randn(o.shape, generator=gen)
    proj_s = torch.randn(s.shape, generator=gen)
    loss = (o.float() * proj_o).sum() + (s * proj_s).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk_size", [5, 16, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 200])
def test_chunk_matches_naive(T, chunk_size, with_init):
    q, k, v, g, beta, s0 = make_inputs(T)
    init = s0 if with_init else None
    o_ref, s_ref = gated_delta_naive(q, k, v, g, beta, None, init, output_final_state=True)
    o, s = gated_delta_chunk_torch(q, k, v, g, beta, None, init, True, chunk_size)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert s.shape == (B, H, K, V) and s.dtype == torch.float32
    assert o_ref.abs().max() > 0.1
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [1, 17, 64, 200])
def test_chunk_gradients_match_naive(T, with_init):
    q, k, v, g, beta, s0 = make_inputs(T)
    ours = leaves([q, k, v, g, beta, s0 if with_init else None])
    ref = leaves([q, k, v, g, beta, s0 if with_init else None])
    wanted = [i for i, t in enumerate(ours) if t is not None]
    o, s = gated_delta_chunk_torch(*ours[:5], 0.4, ours[5], True, chunk_size=16)
    o_ref, s_ref = gated_delta_naive(*ref[:5], 0.4, ref[5], output_final_state=True)
    grads = loss_and_grads(o, s, [ours[i] for i in wanted])
    grads_ref = loss_and_grads(o_ref, s_ref, [ref[i] for i in wanted])
    for i, grad, grad_ref in zip(wanted, grads, grads_ref, strict=True):
        # The first token's decay meets a zero state: its gradient is zero alone.
        assert grad_ref.abs().max() > 0 or (NAMES[i] == "g" and T == 1 and not with_init)
        assert_close(grad, grad_ref, 1e-4, f"gradient of {NAMES[i]}")


@pytest.mark.parametrize("group_tokens", [16, 48])
def test_chunk_groups_chain_state(monkeypatch, group_tokens):
    # Real groups are ~1024 tokens; shrink them so a short sequence spans several groups.
    monkeypatch.setattr(gated_delta_module, "_GROUP_TOKENS", group_tokens)
    q, k, v, g, beta, s0 = make_inputs(101)
    ours, ref = leaves([q, k, v, g, beta, s0]), leaves([q, k, v, g, beta, s0])
    o, s = gated_delta_chunk_torch(*ours[:5], None, ours[5], True, chunk_size=16)
    o_ref, s_ref = gated_delta_naive(*ref[:5], None, ref[5], True)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    grads, grads_ref = loss_and_grads(o, s, ours), loss_and_grads(o_ref, s_ref, ref)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, 1e-4, f"gradient of {name}")


@pytest.mark.parametrize("min_g", [-20.0, -80.0])
def test_strong_decay_stays_finite_and_exact(min_g):
    # In-chunk cumulative decays reach ~-640 (-2500): e^(-b) would overflow, e^b underflows.
    q, k, v, g, beta, s0 = make_inputs(100, min_g=min_g, seed=1)
    ours, ref = leaves([q, k, v, g, beta, s0]), leaves([q, k, v, g, beta, s0])
    o, s = gated_delta_chunk_torch(*ours[:5], None, ours[5], True, chunk_size=64)
    o_ref, s_ref = gated_delta_naive(*ref[:5], None, ref[5], True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    grads, grads_ref = loss_and_grads(o, s, ours), loss_and_grads(o_ref, s_ref, ref)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert torch.isfinite(grad).all(), name
        assert_close(grad, grad_ref, 1e-4, f"gradient of {name}")


# --- the oracle against transformers' and fla's torch forms --------------------------------------


def _transformers_forms():
    """transformers' torch forms themselves: the module-level names dispatch to fla's Triton
    kernels when fla is installed (its hub-kernel fallback), so unwrap them."""
    with warnings.catch_warnings():  # fla, if installed, warns on import that it has no GPU
        warnings.simplefilter("ignore")
        from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

    return (
        inspect.unwrap(qwen3_next.torch_chunk_gated_delta_rule),
        inspect.unwrap(qwen3_next.torch_recurrent_gated_delta_rule),
        qwen3_next.l2norm,
    )


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [17, 200])
def test_matches_transformers_qwen3_next_forms(T, with_init):
    torch_chunk, torch_recurrent, l2norm = _transformers_forms()
    # Raw q, k: transformers normalises them itself under use_qk_l2norm_in_kernel (in fp32, with
    # its eps); we normalise them the same way before the op, as our layer does, so gradients
    # reach the same raw leaves. Scale: K^-1/2 in all three.
    q, k, v, g, beta, s0 = make_inputs(T, normalize=False)
    init = s0 if with_init else None
    ours = leaves([q, k, v, g, beta, init])
    o, s = gated_delta(
        l2norm(ours[0]), l2norm(ours[1]), *ours[2:5], initial_state=ours[5],
        output_final_state=True, chunk_size=16,
    )  # fmt: skip
    wanted = [i for i, t in enumerate(ours) if t is not None]
    grads = loss_and_grads(o, s, [ours[i] for i in wanted])
    for form, extra in ((torch_chunk, {"chunk_size": 64}), (torch_recurrent, {})):
        ref = leaves([q, k, v, g, beta, init])
        o_ref, s_ref = form(
            *ref[:5], initial_state=ref[5], output_final_state=True,
            use_qk_l2norm_in_kernel=True, **extra,
        )  # fmt: skip
        assert_close(o, o_ref, what=form.__name__)
        assert_close(s, s_ref, what=form.__name__)
        grads_ref = loss_and_grads(o_ref, s_ref, [ref[i] for i in wanted])
        for i, grad, grad_ref in zip(wanted, grads, grads_ref, strict=True):
            assert_close(grad, grad_ref, 1e-4, f"{form.__name__}: gradient of {NAMES[i]}")


def test_oracle_matches_transformers_without_l2norm():
    # With use_qk_l2norm_in_kernel=False transformers takes q, k as given, like our op.
    _, torch_recurrent, _ = _transformers_forms()
    q, k, v, g, beta, s0 = make_inputs(40)
    o, s = gated_delta_naive(q, k, v, g, beta, None, s0, True)
    o_ref, s_ref = torch_recurrent(q, k, v, g, beta, s0, True, use_qk_l2norm_in_kernel=False)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_fla_naive_forms(scale):
    with warnings.catch_warnings():  # fla warns that it has no GPU for Triton on import
        warnings.simplefilter("ignore")
        naive = pytest.importorskip("fla.ops.gated_delta_rule.naive", reason="needs fla")
    q, k, v, g, beta, s0 = make_inputs(90)
    o, s = gated_delta(q, k, v, g, beta, scale, s0, True, chunk_size=32)
    # fla's recurrent form takes beta before g.
    o_ref, s_ref = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, s0, True)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    o_ref, s_ref = naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, 64, scale, s0, True)
    assert_close(o, o_ref)
    assert_close(s, s_ref)


# --- public API: packed sequences, decode ------------------------------------------------------


def test_packed_sequences_equal_each_sequence_alone():
    lengths = [17, 0, 64, 49]
    T = sum(lengths)
    q, k, v, g, beta, _ = make_inputs(T, batch=1)
    s0 = torch.randn(len(lengths), H, K, V, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    ours, ref = leaves([q, k, v, g, beta, s0]), leaves([q, k, v, g, beta, s0])
    o, s = gated_delta(*ours[:5], None, ours[5], True, cu_seqlens=cu, chunk_size=16)
    assert o.shape == (1, T, H, V) and s.shape == (len(lengths), H, K, V)
    outs, finals = [], []
    for i, (start, end) in enumerate(itertools.pairwise(cu.tolist())):
        init = ref[5][i : i + 1]
        if start == end:  # an empty sequence passes its state through
            finals.append(init)
            continue
        pieces = [t[:, start:end] for t in ref[:5]]
        o_seq, s_seq = gated_delta(*pieces, None, init, True, chunk_size=16)
        outs.append(o_seq)
        finals.append(s_seq)
    o_ref, s_ref = torch.cat(outs, dim=1), torch.cat(finals)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    for name, grad, grad_ref in zip(
        NAMES, loss_and_grads(o, s, ours), loss_and_grads(o_ref, s_ref, ref), strict=True
    ):
        assert_close(grad, grad_ref, 1e-4, f"gradient of {name}")


def test_step_loop_matches_naive():
    T = 20
    q, k, v, g, beta, s0 = make_inputs(T)
    o_ref, s_ref = gated_delta_naive(q, k, v, g, beta, 0.5, s0, output_final_state=True)
    state, outs = s0, []
    for t in range(T):
        before = state.clone()
        o_t, new_state = gated_delta_step(
            q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, 0.5
        )
        assert torch.equal(state, before), "gated_delta_step must not mutate state"
        outs.append(o_t)
        state = new_state
    assert_close(torch.stack(outs, dim=1), o_ref)
    assert_close(state, s_ref)


def test_step_without_state_starts_from_zeros():
    q, k, v, g, beta, _ = make_inputs(1)
    o, s = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], None)
    o_ref, s_ref = gated_delta_naive(q, k, v, g, beta, output_final_state=True)
    assert_close(o, o_ref[:, 0])
    assert_close(s, s_ref)


@pytest.mark.parametrize("split", [1, 30, 64])
def test_prefill_then_decode_equals_parallel_form(split):
    T = 100
    q, k, v, g, beta, s0 = make_inputs(T)
    o_all, s_all = gated_delta(q, k, v, g, beta, initial_state=s0, output_final_state=True)

    def part(start, end):
        return [t[:, start:end] for t in (q, k, v, g, beta)]

    o1, s1 = gated_delta(*part(0, split), None, s0, True)
    o2, s2 = gated_delta(*part(split, T), None, s1, True)
    assert_close(torch.cat([o1, o2], dim=1), o_all)
    assert_close(s2, s_all)

    state, outs = s1, [o1]
    with torch.no_grad():
        for t in range(split, T):
            o_t, state = gated_delta(*part(t, t + 1), None, state, True)
            outs.append(o_t)
    assert_close(torch.cat(outs, dim=1), o_all)
    assert_close(state, s_all)


def test_single_token_takes_the_step_unless_grad_is_needed(ran):
    calls, spy = ran
    spy(gated_delta_module, "gated_delta_step", "step")
    spy(gated_delta_module, "gated_delta_chunk_torch", "chunk")
    q, k, v, g, beta, s0 = make_inputs(1)
    with torch.no_grad():
        o, s = gated_delta(q, k, v, g, beta, None, s0, True)
    o_ref, s_ref = gated_delta_naive(q, k, v, g, beta, None, s0, True)
    assert calls == ["step"] and o.shape == (B, 1, H, V)
    assert_close(o, o_ref)
    assert_close(s, s_ref)
    calls.clear()
    gated_delta(q.requires_grad_(), k, v, g, beta, None, s0, True)
    assert calls == ["chunk"]


def test_no_final_state_unless_asked():
    q, k, v, g, beta, _ = make_inputs(10)
    assert gated_delta_chunk_torch(q, k, v, g, beta)[1] is None
    assert gated_delta(q, k, v, g, beta)[1] is None
    assert gated_delta(*(t[:, :1] for t in (q, k, v, g, beta)))[1] is None


def test_bf16_inputs_keep_dtype_and_fp32_state():
    q, k, v, g, beta, s0 = make_inputs(70, dtype=torch.bfloat16)
    o, s = gated_delta(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o_ref, s_ref = gated_delta_naive(q.float(), k.float(), v.float(), g, beta, None, s0, True)
    assert_close(o.float(), o_ref, tol=2e-2)
    assert_close(s, s_ref, tol=1e-4)


def test_env_backend_override(monkeypatch, ran):
    """ZOO_KERNEL_BACKEND decides what "auto" runs: each value must reach its own code."""
    calls, spy = ran
    spy(gated_delta_module, "gated_delta_chunk_triton", "triton")
    spy(gated_delta_module, "gated_delta_chunk_torch", "torch")
    q, k, v, g, beta, _ = make_inputs(4)
    envs = ("torch", "triton") if importlib.util.find_spec("triton") else ("torch",)
    for env in envs:  # triton: the interpreter, under the test conftest
        monkeypatch.setenv("ZOO_KERNEL_BACKEND", env)
        calls.clear()
        assert_close(gated_delta(q, k, v, g, beta)[0], gated_delta_naive(q, k, v, g, beta)[0])
        assert calls == [env]
        calls.clear()
        gated_delta(q, k, v, g, beta, backend="torch")  # an explicit backend is not overridden
        assert calls == ["torch"]
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_KERNEL_BACKEND"):
        gated_delta(q, k, v, g, beta)


def test_chunked_temporaries_grow_linearly(monkeypatch):
    # Small groups, so both lengths span several of them as real inputs do.
    monkeypatch.setattr(gated_delta_module, "_GROUP_TOKENS", 64)

    def largest(T):
        inputs = [t.requires_grad_() for t in make_inputs(T, batch=1, seed=4)]
        with LiveBytes() as mode:
            o, s = gated_delta_chunk_torch(*inputs[:5], None, inputs[5], True, chunk_size=16)
            (o.square().sum() + s.sum()).backward()
        return mode.largest

    # 4x the tokens: linear growth gives 4x, a T×T temporary 16x. The largest tensor is a
    # (T, H, K)-sized input or gradient: the C×C blocks (C = 16 > K = 8) exist one group at a time.
    assert largest(1200) == 4 * largest(300) == 1200 * H * K


# --- input validation ---------------------------------------------------------------------------


def test_error_mismatched_shapes():
    q, k, v, g, beta, _ = make_inputs(6)
    with pytest.raises(ValueError, match=r"k has shape \(2, 5, 3, 8\) but q has \(2, 6, 3, 8\)"):
        gated_delta(q, k[:, :5], v, g, beta)
    with pytest.raises(ValueError, match=r"v has shape \(2, 4, 3, 6\).*\(2, 6, 3\)"):
        gated_delta(q, k, v[:, :4], g, beta)
    with pytest.raises(ValueError, match=r"g has shape \(2, 6, 3, 1\) but must be .*\(2, 6, 3\)"):
        gated_delta(q, k, v, g.unsqueeze(-1), beta)
    with pytest.raises(ValueError, match=r"beta has shape \(2, 6\) but must be .*\(2, 6, 3\)"):
        gated_delta(q, k, v, g, beta[..., 0])
    with pytest.raises(ValueError, match=r"q must be \(B, T, H, K\) but has shape \(2, 6, 24\)"):
        gated_delta(q.flatten(2), k, v, g, beta)


def test_error_initial_state_and_packing():
    q, k, v, g, beta, s0 = make_inputs(6)
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 3, 8, 6\).*\(2, 3, 8, 6\)"):
        gated_delta(q, k, v, g, beta, initial_state=s0[:1])
    cu = torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="cu_seqlens needs packed sequences with B=1"):
        gated_delta(q, k, v, g, beta, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_state has shape \(2, 3, 8, 6\).*\(3, 3, 8, 6\)"):
        one = [t[:1] for t in (q, k, v, g, beta)]
        gated_delta(*one, initial_state=s0, cu_seqlens=torch.tensor([0, 1, 2, 6]))


def test_error_dtype_scale_chunk_size_and_backend(monkeypatch):
    q, k, v, g, beta, _ = make_inputs(6)
    with pytest.raises(ValueError, match="beta must be a floating tensor"):
        gated_delta(q, k, v, g, beta.long())
    with pytest.raises(ValueError, match="scale must be a positive finite number or None, got -1"):
        gated_delta(q, k, v, g, beta, scale=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        gated_delta(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        gated_delta(q, k, v, g, beta, backend="cuda")
    empty = make_inputs(0)
    with pytest.raises(ValueError, match="T=0"):
        gated_delta(*empty[:5])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' for gated delta rule needs .* CUDA"):
        gated_delta(q, k, v, g, beta, backend="triton")


# --- Triton kernels, under the interpreter on a CPU ---------------------------------------------

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton (the CPU interpreter)"
)


def check_triton_against_naive(tensors, cu_seqlens=None, chunk_size=16):
    """Outputs, final states and every input gradient of the Triton form vs the oracle (run per
    sequence when packed)."""
    ours, ref = leaves(tensors), leaves(tensors)
    o, s = gated_delta(*ours[:5], None, ours[5], True, cu_seqlens, chunk_size, backend="triton")
    if cu_seqlens is None:
        o_ref, s_ref = gated_delta_naive(*ref[:5], None, ref[5], True)
    else:
        outs, finals = [], []
        for i, (start, end) in enumerate(itertools.pairwise(cu_seqlens.tolist())):
            init = ref[5][i : i + 1]
            if start == end:
                finals.append(init)
                continue
            pieces = [t[:, start:end] for t in ref[:5]]
            o_seq, s_seq = gated_delta_naive(*pieces, None, init, True)
            outs.append(o_seq)
            finals.append(s_seq)
        o_ref, s_ref = torch.cat(outs, dim=1), torch.cat(finals)
    assert_close(o, o_ref, what="output")
    assert_close(s, s_ref, what="final state")
    wanted = [i for i, t in enumerate(ours) if t is not None]
    grads = loss_and_grads(o, s, [ours[i] for i in wanted])
    grads_ref = loss_and_grads(o_ref, s_ref, [ref[i] for i in wanted])
    for i, grad, grad_ref in zip(wanted, grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, 1e-4, f"gradient of {NAMES[i]}")


@needs_triton
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize(("T", "chunk_size"), [(1, 16), (17, 16), (64, 16), (100, 64), (200, 64)])
def test_triton_matches_naive(T, chunk_size, with_init):
    q, k, v, g, beta, s0 = make_inputs(T)
    check_triton_against_naive([q, k, v, g, beta, s0 if with_init else None], None, chunk_size)


@needs_triton
def test_triton_head_dims_off_the_tiles():
    # K = 20 pads to a 32-wide tile, V = 70 takes two 64-wide blocks (and three 32-wide ones).
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 1, 40, 1, 20, generator=gen)
    v = torch.randn(1, 40, 1, 70, generator=gen)
    g = -torch.rand(1, 40, 1, generator=gen)
    beta = torch.rand(1, 40, 1, generator=gen)
    s0 = torch.randn(1, 1, 20, 70, generator=gen)
    check_triton_against_naive([q, F.normalize(k, dim=-1), v, g, beta, s0], chunk_size=32)


@needs_triton
def test_triton_packed_sequences():
    lengths = [5, 40, 0, 17]
    q, k, v, g, beta, _ = make_inputs(sum(lengths), batch=1)
    s0 = torch.randn(len(lengths), H, K, V, generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    check_triton_against_naive([q, k, v, g, beta, s0], cu_seqlens=cu)


@needs_triton
def test_triton_strong_decay_stays_finite_and_exact():
    q, k, v, g, beta, s0 = make_inputs(50, min_g=-80.0, seed=1)
    o, s = gated_delta(q, k, v, g, beta, None, s0, True, chunk_size=64, backend="triton")
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    check_triton_against_naive([q, k, v, g, beta, s0], chunk_size=64)


@needs_triton
def test_triton_prefill_then_fused_decode_steps(ran):
    calls, spy = ran
    spy(gated_delta_module, "gated_delta_step_triton", "fused step")
    q, k, v, g, beta, s0 = make_inputs(30, batch=3)
    o_all, s_all = gated_delta_naive(q, k, v, g, beta, None, s0, True)

    def part(start, end):
        return [t[:, start:end] for t in (q, k, v, g, beta)]

    with torch.no_grad():
        o, state = gated_delta(*part(0, 21), None, s0, True, backend="triton")
        outs = [o]
        for t in range(21, 30):
            before = state.clone()
            o, state_next = gated_delta(*part(t, t + 1), None, state, True, backend="triton")
            assert torch.equal(state, before), "the fused step must not mutate the state"
            outs.append(o)
            state = state_next
    assert calls == ["fused step"] * 9
    assert_close(torch.cat(outs, dim=1), o_all)
    assert_close(state, s_all)


@needs_triton
def test_triton_fused_step_matches_torch_step():
    *per_token, s0 = make_inputs(1)
    q, k, v, g, beta = (t[:, 0] for t in per_token)
    for state in (s0, None):
        o, s = gated_delta_module.gated_delta_step_triton(q, k, v, g, beta, state, 0.7)
        o_ref, s_ref = gated_delta_step(q, k, v, g, beta, state, 0.7)
        assert_close(o, o_ref)
        assert_close(s, s_ref)


@needs_triton
def test_triton_refuses_wide_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 320, generator=gen)
    v, g, beta = torch.randn(1, 4, 1, 8), -torch.rand(1, 4, 1), torch.rand(1, 4, 1)
    with pytest.raises(ValueError, match="K <= 256, got K=320"):
        gated_delta(q, q, v, g, beta, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_fp32_oracle(dtype):
    # The head dims the models use; bf16 activations against the oracle on the same rounded
    # values, so what is measured is the kernels' error (tf32/bf16 products), not the inputs'.
    gen = torch.Generator().manual_seed(0)
    B_, T, H_, D = 2, 300, 4, 128
    q = torch.randn(B_, T, H_, D, generator=gen).to(dtype)
    k = F.normalize(torch.randn(B_, T, H_, D, generator=gen), dim=-1).to(dtype)
    v = torch.randn(B_, T, H_, D, generator=gen).to(dtype)
    g = -torch.rand(B_, T, H_, generator=gen) * 2
    beta = torch.rand(B_, T, H_, generator=gen)
    s0 = torch.randn(B_, H_, D, D, generator=gen) * 0.1
    ours = [t.cuda().requires_grad_() for t in (q, k, v, g, beta, s0)]
    ref = [t.cuda().float().requires_grad_() for t in (q, k, v, g, beta, s0)]
    o, s = gated_delta(*ours[:5], None, ours[5], True, backend="triton")
    o_ref, s_ref = gated_delta_naive(*ref[:5], None, ref[5], True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2

    def relative(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert relative(o, o_ref) < tol and relative(s, s_ref) < tol
    proj_o, proj_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    grads = torch.autograd.grad((o.float() * proj_o).sum() + (s * proj_s).sum(), ours)
    grads_ref = torch.autograd.grad((o_ref * proj_o).sum() + (s_ref * proj_s).sum(), ref)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref, strict=True):
        assert relative(grad, grad_ref) < 10 * tol, name
