"""Mamba-2's SSD op: the chunked torch form, the decode step, packed sequences and the Triton path
(the shared linear-attention kernels; the interpreter on CPU) against the token-by-token oracle,
and the oracle and the step against transformers' own Mamba-2 torch code."""

import functools
import inspect
import itertools

import pytest
import torch

from tests.kernels.memory import LiveBytes
from zoo.kernels import linear_attention
from zoo.kernels import ssd as ssd_module
from zoo.kernels.ssd import ssd, ssd_chunk_torch, ssd_naive, ssd_step

B, H, G, P, N = 2, 4, 2, 6, 5
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's exported ZOO_KERNEL_BACKEND must not change what these tests exercise.
    monkeypatch.delenv("ZOO_KERNEL_BACKEND", raising=False)


def make_inputs(T, batch=B, groups=G, min_log_decay=-2.0, seed=0):
    """Mamba-2-like (x, dt, A, B, C, D, initial_state): A = −exp(A_log) < 0, dt ≥ 0, and the
    per-token log decay dt·A drawn from [min_log_decay, 0]. Head 0 barely decays (A = −1e-3,
    dt in [0, 1]): a memory that spans many chunks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, H, P, generator=gen)  # (B, T, H, P)
    A = -torch.exp(torch.rand(H, generator=gen) * 2)  # (H,), in [-e², -1]
    A[0] = -1e-3
    log_decay = torch.rand(batch, T, H, generator=gen) * min_log_decay  # (B, T, H)
    log_decay[..., 0] = -1e-3 * torch.rand(batch, T, generator=gen)
    dt = log_decay / A  # (B, T, H), ≥ 0
    Bm = torch.randn(batch, T, groups, N, generator=gen)  # (B, T, G, N)
    Cm = torch.randn(batch, T, groups, N, generator=gen)  # (B, T, G, N)
    D = torch.randn(H, generator=gen)  # (H,)
    s0 = torch.randn(batch, H, N, P, generator=gen)  # (B, H, N, P)
    return x, dt, A, Bm, Cm, D, s0


def leaves(tensors):
    return [t.clone().requires_grad_() for t in tensors]


def assert_close(actual, expected, tol=1e-5, what=""):
    scale = max(expected.detach().abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=what or None)


def outputs_and_grads(fn, inputs, with_init=True, **kw):
    """y, the final state and the gradients of every input of fn(x, dt, A, B, C, D, init, True)
    under a fixed random projection of y and of the final state."""
    ls = leaves(inputs)
    init = ls[6] if with_init else None
    y, s = fn(*ls[:6], init, True, **kw)
    gen = torch.Generator().manual_seed(123)
    proj_y = torch.randn(y.shape, generator=gen)
    proj_s = torch.randn(s.shape, generator=gen)
    loss = (y.float() * proj_y).sum() + (s * proj_s).sum()
    grads = torch.autograd.grad(loss, ls if with_init else ls[:6])
    return y, s, grads


def assert_all_close(ours, ref, tol=1e-5, may_vanish=()):
    """(y, state, grads) against (y, state, grads): outputs at `tol`, gradients at 10× it.

    A reference gradient of zero would check nothing, so it fails the test unless the input is
    named in `may_vanish` (A, when a single token decays a zero state)."""
    assert_close(ours[0], ref[0], tol, "output")
    assert_close(ours[1], ref[1], tol, "final state")
    for name, g, g_ref in zip(NAMES[: len(ref[2])], ours[2], ref[2], strict=True):
        assert name in may_vanish or g_ref.abs().max() > 0, f"the gradient of {name} is zero"
        assert_close(g, g_ref, tol * 10, f"gradient of {name}")


# --- chunked torch form -------------------------------------------------------------------------


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 64])
@pytest.mark.parametrize("T", [1, 17, 64, 200])
def test_chunk_matches_naive(T, chunk_size, with_init):
    x, dt, A, Bm, Cm, D, s0 = make_inputs(T)
    init = s0 if with_init else None
    y_ref, s_ref = ssd_naive(x, dt, A, Bm, Cm, D, init, output_final_state=True)
    y, s = ssd_chunk_torch(x, dt, A, Bm, Cm, D, init, True, chunk_size=chunk_size)
    assert y.shape == (B, T, H, P) and y.dtype == torch.float32
    assert s.shape == (B, H, N, P) and s.dtype == torch.float32
    assert y_ref.abs().max() > 0.1
    assert_close(y, y_ref)
    assert_close(s, s_ref)


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("T", [1, 17, 64, 200])
def test_chunk_gradients_match_naive(T, with_init):
    inputs = make_inputs(T)
    ours = outputs_and_grads(ssd_chunk_torch, inputs, with_init, chunk_size=7)
    ref = outputs_and_grads(ssd_naive, inputs, with_init)
    assert_all_close(ours, ref, may_vanish=("A",) if T == 1 and not with_init else ())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_every_group_count_matches_naive(groups):
    # One group for all heads (Mamba-2's default), two heads per group, one group per head.
    inputs = make_inputs(30, groups=groups)
    ours = outputs_and_grads(ssd_chunk_torch, inputs, chunk_size=8)
    assert_all_close(ours, outputs_and_grads(ssd_naive, inputs))


@pytest.mark.parametrize("min_log_decay", [-20.0, -80.0])
def test_strong_decay_stays_finite_and_exact(min_log_decay):
    # In-chunk cumulative decays reach about -1300 (-5000): exp(-b) would overflow, exp(b)
    # underflows, and e^(b_i - b_j) above the diagonal would overflow if it were not clamped.
    inputs = make_inputs(100, min_log_decay=min_log_decay, seed=1)
    ours = outputs_and_grads(ssd_chunk_torch, inputs, chunk_size=64)
    for t in (ours[0], ours[1], *ours[2]):
        assert torch.isfinite(t).all()
    assert_all_close(ours, outputs_and_grads(ssd_naive, inputs), tol=1e-5)


def test_without_skip_the_output_drops_exactly_d_times_x():
    x, dt, A, Bm, Cm, D, s0 = make_inputs(20)
    y_skip, _ = ssd_chunk_torch(x, dt, A, Bm, Cm, D, s0, chunk_size=8)
    y, _ = ssd_chunk_torch(x, dt, A, Bm, Cm, None, s0, chunk_size=8)
    assert_close(y_skip - y, x * D[:, None])
    assert_close(y, ssd_naive(x, dt, A, Bm, Cm, None, s0)[0])


@pytest.mark.parametrize("group_tokens", [8, 48])
def test_chunk_groups_chain_state(monkeypatch, group_tokens):
    # Real groups are ~1024 tokens; shrink them so a short sequence spans several groups.
    monkeypatch.setattr(ssd_module, "_GROUP_TOKENS", group_tokens)
    inputs = make_inputs(101)
    ours = outputs_and_grads(ssd_chunk_torch, inputs, chunk_size=8)
    assert_all_close(ours, outputs_and_grads(ssd_naive, inputs))


def test_no_final_state_unless_asked():
    x, dt, A, Bm, Cm, D, _ = make_inputs(10)
    assert ssd_chunk_torch(x, dt, A, Bm, Cm, D)[1] is None
    assert ssd(x, dt, A, Bm, Cm, D)[1] is None
    assert ssd(x[:, :1], dt[:, :1], A, Bm[:, :1], Cm[:, :1], D)[1] is None


def test_bf16_inputs_keep_dtype_and_fp32_state():
    x, dt, A, Bm, Cm, D, s0 = make_inputs(70)
    x, Bm, Cm = (t.bfloat16() for t in (x, Bm, Cm))
    y, s = ssd(x, dt, A, Bm, Cm, D, s0, output_final_state=True)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    y_ref, s_ref = ssd_naive(x.float(), dt, A, Bm.float(), Cm.float(), D, s0, True)
    assert_close(y.float(), y_ref, tol=2e-2)
    assert_close(s, s_ref, tol=1e-4)


def _forward_backward_memory(T: int) -> tuple[int, int]:
    inputs = make_inputs(T, batch=1, seed=4)
    ls = leaves(inputs[:5])
    mode = LiveBytes()
    with mode:
        y, _ = ssd_chunk_torch(*ls, chunk_size=16)
        y.square().sum().backward()
    return mode.peak, mode.largest


def test_chunked_memory_grows_linearly(monkeypatch):
    # Small groups, so both lengths span several of them as real inputs do.
    monkeypatch.setattr(ssd_module, "_GROUP_TOKENS", 64)
    peak_1, largest_1 = _forward_backward_memory(300)
    peak_4, largest_4 = _forward_backward_memory(1200)
    # 4x the tokens: linear growth gives ~4x, a T×T temporary would give 16x.
    assert 0 < peak_4 < 4.4 * peak_1, (peak_1, peak_4)
    assert largest_4 <= 4 * largest_1, (largest_1, largest_4)


# --- transformers' Mamba-2 ----------------------------------------------------------------------


def _transformers_mamba2(name: str):
    """A function of transformers' Mamba-2 modeling file, unwrapped from its hub-kernel decorator:
    its own torch code, whatever kernels are installed."""
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    if not hasattr(modeling, name):
        pytest.skip(f"this transformers has no {name} (renamed or inlined)")
    return inspect.unwrap(getattr(modeling, name))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_matches_transformers_mamba2_chunk_scan(groups):
    # transformers' torch path of Mamba2Mixer: repeat_interleave of the groups, x·dt, the
    # segment_sum decays. dt is passed as the layer would after its bias and softplus (no bias,
    # no softplus; the default (0, inf) clamp leaves dt ≥ 0 alone).
    chunk_scan = _transformers_mamba2("mamba2_chunk_scan")
    x, dt, A, Bm, Cm, D, s0 = make_inputs(45, groups=groups)
    y_ref, s_ref = chunk_scan(
        x, dt, A, Bm, Cm, chunk_size=16, D=D,
        initial_states=s0.transpose(-1, -2), return_final_states=True,
    )  # fmt: skip
    s_ref = s_ref.transpose(-1, -2)  # transformers' (B, H, P, N) -> (B, H, N, P)
    for fn in (ssd_naive, functools.partial(ssd_chunk_torch, chunk_size=16), ssd):
        y, s = fn(x, dt, A, Bm, Cm, D, s0, output_final_state=True)
        assert_close(y, y_ref)
        assert_close(s, s_ref)


@pytest.mark.parametrize("groups", [1, 2])
def test_step_matches_transformers_mamba2_decode(groups):
    update = _transformers_mamba2("mamba2_selective_state_update")
    x, dt, A, Bm, Cm, D, s0 = make_inputs(1, groups=groups)
    cache = s0.transpose(-1, -2).contiguous()  # (B, H, P, N), updated in place
    # Shaped as Mamba2Mixer's decode branch calls it: dt, A and D spread over head_dim.
    y_ref = update(
        cache, x[:, 0], dt[:, 0, :, None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N),
        Bm[:, 0], Cm[:, 0], D[:, None].expand(-1, P),
    )  # fmt: skip
    y, s = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, s0)
    assert_close(y, y_ref)
    assert_close(s, cache.transpose(-1, -2))


# --- decode -------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [1, 30, 64])
def test_prefill_then_steps_match_the_parallel_form(split):
    T = 80
    x, dt, A, Bm, Cm, D, s0 = make_inputs(T)
    y_all, s_all = ssd(x, dt, A, Bm, Cm, D, s0, output_final_state=True)
    head = slice(0, split)
    y, state = ssd(x[:, head], dt[:, head], A, Bm[:, head], Cm[:, head], D, s0, True)
    outs = [y]
    for t in range(split, T):
        before = state.clone()
        y_t, new_state = ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D, state)
        assert torch.equal(state, before), "ssd_step must not mutate state"
        outs.append(y_t.unsqueeze(1))
        state = new_state
    assert_close(torch.cat(outs, dim=1), y_all)
    assert_close(state, s_all)


def test_step_without_state_starts_from_zeros():
    x, dt, A, Bm, Cm, D, _ = make_inputs(1)
    y, s = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, None)
    y_ref, s_ref = ssd_naive(x, dt, A, Bm, Cm, D, output_final_state=True)
    assert_close(y, y_ref[:, 0])
    assert_close(s, s_ref)


def test_single_token_takes_the_step(ran):
    calls, spy = ran
    spy(ssd_module, "ssd_step", "step")
    spy(ssd_module, "ssd_chunk_torch", "chunk")
    x, dt, A, Bm, Cm, D, s0 = make_inputs(1)
    with torch.no_grad():
        y, s = ssd(x, dt, A, Bm, Cm, D, s0, output_final_state=True)
    assert calls == ["step"]
    y_ref, s_ref = ssd_naive(x, dt, A, Bm, Cm, D, s0, True)
    assert_close(y, y_ref)
    assert_close(s, s_ref)


# --- packed sequences ---------------------------------------------------------------------------


def packed_reference(lengths, inputs, with_init):
    """Each sequence of a packed batch alone through the oracle: (y, final states, grads)."""
    ls = leaves(inputs)
    x, dt, A, Bm, Cm, D, s0 = ls
    outs, finals = [], []
    bounds = [0, *itertools.accumulate(lengths)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        init = s0[i : i + 1] if with_init else None
        if a == b:  # an empty sequence passes its state through
            finals.append(init if with_init else torch.zeros(1, H, N, P))
            continue
        y, s = ssd_naive(x[:, a:b], dt[:, a:b], A, Bm[:, a:b], Cm[:, a:b], D, init, True)
        outs.append(y)
        finals.append(s)
    y, s = torch.cat(outs, dim=1), torch.cat(finals)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen)).sum()
    return y, s, torch.autograd.grad(loss, ls if with_init else ls[:6])


@pytest.mark.parametrize("with_init", [False, True])
def test_packed_sequences_match_each_alone(with_init):
    lengths = [5, 0, 23, 1, 40]  # an empty one, a single token, several chunks
    x, dt, A, Bm, Cm, D, _ = make_inputs(sum(lengths), batch=1)
    s0 = torch.randn(len(lengths), H, N, P, generator=torch.Generator().manual_seed(5))
    inputs = (x, dt, A, Bm, Cm, D, s0)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    ours = outputs_and_grads(ssd, inputs, with_init, cu_seqlens=cu, chunk_size=16)
    assert ours[1].shape == (len(lengths), H, N, P)
    assert_all_close(ours, packed_reference(lengths, inputs, with_init))


# --- Triton (the interpreter on CPU: tiny shapes) -----------------------------------------------


@pytest.fixture
def triton_backend(monkeypatch):
    """backend="triton" on CPU: the interpreter. The conftest turns it on before the kernels are
    compiled (triton.jit reads it once); it is set here too, as the backend check reads it per
    call."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize(
    ("T", "with_init"), [(1, True), (17, False), (17, True), (64, True), (200, True)]
)
def test_triton_matches_naive(triton_backend, T, with_init):
    inputs = make_inputs(T)
    ours = outputs_and_grads(ssd, inputs, with_init, chunk_size=16, backend="triton")
    assert_all_close(ours, outputs_and_grads(ssd_naive, inputs, with_init))


def test_triton_packed_sequences_match_each_alone(triton_backend):
    lengths = [5, 0, 20, 1]
    x, dt, A, Bm, Cm, D, _ = make_inputs(sum(lengths), batch=1)
    s0 = torch.randn(len(lengths), H, N, P, generator=torch.Generator().manual_seed(5))
    inputs = (x, dt, A, Bm, Cm, D, s0)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    ours = outputs_and_grads(ssd, inputs, cu_seqlens=cu, chunk_size=16, backend="triton")
    assert_all_close(ours, packed_reference(lengths, inputs, True))


def test_triton_strong_decay_stays_finite(triton_backend):
    # The shared kernels take e^(b_i - b_j) as a difference of in-chunk cumsums, as mamba_ssm's do,
    # which loses |b|·eps: at dt·A down to -80 (|b| ~ 2500) that is ~1e-3 of A's gradient, a sum
    # of B·T terms dt·∂L/∂(dt·A) that cancel. Everything else stays within 1e-4.
    inputs = make_inputs(64, min_log_decay=-80.0, seed=1)
    ours = outputs_and_grads(ssd, inputs, chunk_size=64, backend="triton")
    ref = outputs_and_grads(ssd_naive, inputs)
    for t in (ours[0], ours[1], *ours[2]):
        assert torch.isfinite(t).all()
    assert_close(ours[0], ref[0], what="output")
    assert_close(ours[1], ref[1], what="final state")
    for name, g, g_ref in zip(NAMES, ours[2], ref[2], strict=True):
        assert_close(g, g_ref, 5e-3 if name == "A" else 1e-4, f"gradient of {name}")


def test_triton_decode_takes_the_fused_step(triton_backend, ran):
    calls, spy = ran
    spy(linear_attention, "linear_attention_step", "fused step")
    spy(linear_attention, "chunk_linear_attention", "chunk")
    x, dt, A, Bm, Cm, D, s0 = make_inputs(1)
    with torch.no_grad():
        y, s = ssd(x, dt, A, Bm, Cm, D, s0, output_final_state=True, backend="triton")
    assert calls == ["fused step"]
    y_ref, s_ref = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, s0)
    assert_close(y[:, 0], y_ref)
    assert_close(s, s_ref)


def test_auto_backend_and_its_override(triton_backend, monkeypatch, ran):
    """The torch form for "auto" on CPU tensors; ZOO_KERNEL_BACKEND overrides "auto"."""
    calls, spy = ran
    spy(linear_attention, "chunk_linear_attention", "triton")
    spy(ssd_module, "ssd_chunk_torch", "torch")
    x, dt, A, Bm, Cm, D, _ = make_inputs(4)
    y_ref = ssd_naive(x, dt, A, Bm, Cm, D)[0]
    for env, expected in ((None, "torch"), ("torch", "torch"), ("triton", "triton")):
        if env is not None:
            monkeypatch.setenv("ZOO_KERNEL_BACKEND", env)
        calls.clear()
        assert_close(ssd(x, dt, A, Bm, Cm, D)[0], y_ref)
        assert calls == [expected]


# --- input validation ---------------------------------------------------------------------------


def test_errors_name_the_argument_and_its_shape():
    x, dt, A, Bm, Cm, D, s0 = make_inputs(6)
    B3 = torch.randn(B, 6, 3, N)
    cases = [
        ((x.flatten(2), dt, A, Bm, Cm), {}, r"x must be \(B, T, H, P\) but has shape \(2, 6, 24\)"),
        ((x, dt[:, :5], A, Bm, Cm), {}, r"dt has shape \(2, 5, 4\) but must be .* = \(2, 6, 4\)"),
        ((x, dt, A[:3], Bm, Cm), {}, r"A has shape \(3,\) but must be \(H,\) = \(4,\)"),
        ((x, dt, A, Bm[:, :5], Cm), {}, r"B has shape \(2, 5, 2, 5\) but must be \(B, T, G, N\)"),
        ((x, dt, A, Bm, Cm[..., :4]), {}, r"C has shape \(2, 6, 2, 4\) but B has \(2, 6, 2, 5\)"),
        ((x, dt, A, B3, B3), {}, r"G=3 groups, which does not divide the H=4 heads of x"),
        ((x, dt, A, Bm, Cm), {"D": D[:2]}, r"D has shape \(2,\) but must be \(H,\) = \(4,\)"),
        (
            (x, dt, A, Bm, Cm), {"initial_state": s0.transpose(-1, -2)},
            r"initial_state has shape \(2, 4, 6, 5\) but must be \(B, H, N, P\) = \(2, 4, 5, 6\)",
        ),
        ((x, dt.long(), A, Bm, Cm), {}, "dt must be a floating tensor"),
        ((x, -dt - 1, A, Bm, Cm), {}, "dt must be >= 0"),
        ((x, dt, -A, Bm, Cm), {}, r"A must be <= 0 \(A = -exp\(A_log\)\)"),
        ((x, dt, A, Bm, Cm), {"chunk_size": 0}, "chunk_size must be a positive int, got 0"),
        ((x, dt, A, Bm, Cm), {"backend": "cuda"}, r"backend must be one of .*'cuda'"),
        (
            (x, dt, A, Bm, Cm), {"cu_seqlens": torch.tensor([0, 6])},
            "cu_seqlens needs packed sequences with B=1 but x has B=2",
        ),
    ]  # fmt: skip
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ssd(*args, **kwargs)
    x, dt, A, Bm, Cm, D, _ = make_inputs(0)
    with pytest.raises(ValueError, match="x has T=0 tokens"):
        ssd(x, dt, A, Bm, Cm, D)


def test_packed_initial_state_must_have_one_row_per_sequence():
    x, dt, A, Bm, Cm, D, s0 = make_inputs(10, batch=1)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match=r"\(N_seq, H, N, P\).* = \(2, 4, 5, 6\)"):
        ssd(x, dt, A, Bm, Cm, D, initial_state=s0, cu_seqlens=cu)


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, dt, A, Bm, Cm, D, _ = make_inputs(4)
    with pytest.raises(RuntimeError, match=r"backend='triton' for ssd needs .* CUDA tensor"):
        ssd(x, dt, A, Bm, Cm, D, backend="triton")
