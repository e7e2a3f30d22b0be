"""SSD, Mamba-2's state space duality: linear attention with a scalar decay per head and token.

"Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality" (Dao & Gu, arXiv 2405.21060), the op of Mamba-2 (mamba_ssm's ``mamba_chunk_scan_combined``,
transformers' ``mamba2_chunk_scan``). Per batch b and head h, with a step size dt_t ≥ 0 (after the
layer's dt_bias, softplus and clamp) and A_h = −exp(A_log_h) ≤ 0:

    h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t x_tᵀ        (h is N×P, kept in fp32)
    y_t = h_tᵀ C_t + D_h x_t

This is linear attention (`zoo.kernels.linear_attention`) with q = C, k = dt·B, v = x and the log
decay g_t = dt_t A_h, one scalar per head and token. B and C come in G groups (mamba's n_groups)
shared by H / G consecutive heads: head h reads group h // (H / G), as transformers'
``repeat_interleave``. Since dt is a scalar per (token, head), scaling B or x by it is the same;
the torch form scales x (v = dt·x, so B stays per group), the Triton path scales B (k = dt·B).

Chunked form (chunk length C, b = cumsum of g inside the chunk, S_n the state entering chunk n):

* intra-chunk: y_i += Σ_{j≤i} (C_i · B_j) exp(b_i − b_j) dt_j x_j, one masked C×C product per
  head; C_i · B_j is computed once per group and shared by its heads;
* inter-chunk: y_i += exp(b_i) C_iᵀ S_n;
* state: S_{n+1} = exp(b_C) S_n + Σ_j exp(b_C − b_j) dt_j B_j x_jᵀ.

Every exponent is ≤ 0, so nothing overflows however strong the decay. The torch form takes
b_i − b_j as a segment sum Σ_{j<t≤i} g_t (transformers' ``segment_sum``), not as a difference of
two cumsums, which would lose |b|·eps where decays are strong; it works on groups of
~``_GROUP_TOKENS`` tokens and loops in Python only over chunks for the N×P state recurrence, never
over tokens; autograd differentiates it.

Layout follows mamba_ssm and fla: x (B, T, H, P); dt (B, T, H); A, D (H,); B, C (B, T, G, N);
states (B, H, N, P) fp32, the linear-attention K×V layout with K = N (d_state) and V = P
(head_dim). Transformers' Mamba-2 cache holds the transpose, (B, H, P, N): convert with
``state.transpose(-1, -2)``. Module order: naive reference → decode step → chunked torch form →
public dispatch function; the Triton kernels are the shared ones, with the decay spread over the
key channels (DECAY_KEY).
"""

from __future__ import annotations

import itertools

import torch

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import (
    check_chunk_size,
    check_cu_seqlens,
    check_decay_and_step,
    check_tensors,
    chunk_spans,
    values_checkable,
)
from zoo.kernels.linear_attention import dispatch

__all__ = ["ssd", "ssd_chunk_torch", "ssd_naive", "ssd_step"]

_GROUP_TOKENS = 1024
# Floor of the in-chunk log decays: a term whose decay is below e^-60 ≈ 1e-26 is decayed by e^-60
# instead (an error under 1e-26 of its undecayed size), because exp(−87) and below, results
# under fp32's smallest normal, take exp's slow path on CPU, 10-30× slower, at strong decay.
_LOG_DECAY_FLOOR = -60.0


def _per_head(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., G, N) → (..., H, N): head h reads group h // (H / G), as transformers'
    repeat_interleave."""
    return t.repeat_interleave(num_heads // t.shape[-2], dim=-2)


def ssd_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in fp32: the oracle the faster forms are tested against."""
    batch, T, H, P = x.shape
    N = B.shape[-1]
    xf, dtf, Af = x.float(), dt.float(), A.float()
    Bh, Ch = _per_head(B.float(), H), _per_head(C.float(), H)  # (B, T, H, N)
    if initial_state is None:
        S = x.new_zeros(batch, H, N, P, dtype=torch.float32)
    else:
        S = initial_state.float()
    ys = []
    for t in range(T):
        decay = torch.exp(dtf[:, t] * Af)[..., None, None]  # (B, H, 1, 1)
        inject = (dtf[:, t, :, None] * Bh[:, t]).unsqueeze(-1) * xf[:, t].unsqueeze(-2)
        S = decay * S + inject  # (B, H, N, P)
        ys.append(torch.einsum("bhn,bhnp->bhp", Ch[:, t], S))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(batch, 0, H, P)  # (B, T, H, P)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), (S if output_final_state else None)


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. x: (B, H, P); dt: (B, H); B, C: (B, G, N); state: (B, H, N, P) or None
    (zeros).

    Returns y (B, H, P) in x's dtype and a new fp32 state; ``state`` is left untouched so a cache
    can keep the previous one.
    """
    H = x.shape[1]
    xf, dtf = x.float(), dt.float()
    Bh, Ch = _per_head(B.float(), H), _per_head(C.float(), H)  # (B, H, N)
    inject = Bh.unsqueeze(-1) * (dtf.unsqueeze(-1) * xf).unsqueeze(-2)  # (B, H, N, P)
    if state is None:
        new_state = inject
    else:
        decay = torch.exp(dtf * A.float())[..., None, None]  # (B, H, 1, 1)
        new_state = torch.addcmul(inject, decay, state.float())
    y = (Ch.unsqueeze(-2) @ new_state).squeeze(-2)  # (B, H, P)
    if D is not None:
        y = y + xf * D.float()[:, None]
    return y.to(x.dtype), new_state


def _chunk_block(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n equal chunks at once, all fp32, token-major with a group's r = H / G heads side by side:
    x (Bz, G, n, c, r, P); dt (Bz, G, n, c, r); A (G, r); B, C (Bz, G, n, c, N); state
    (Bz, G, N, r, P). Returns y (Bz, G, n, c, r, P) and the state after the last chunk.

    A group's heads side by side make the state products one (c, N) @ (N, r·P) matmul per chunk
    and group, and C·B one c×c product per group: B and C are never copied per head.
    """
    Bz, G, n, c, r, P = x.shape
    N = B.shape[-1]
    v = x * dt.unsqueeze(-1)  # (Bz, G, n, c, r, P)
    g = dt * A[:, None, None, :]  # (Bz, G, n, c, r): the log decay, ≤ 0
    b = g.cumsum(dim=3)  # (Bz, G, n, c, r): log decay from the chunk's start

    # seg[i, j] = Σ_{j<t≤i} g_t per head: the cumsum over t of g_t where t > j, so each sum has
    # only its own terms; b_i − b_j would lose |b|·eps to cancellation where decays are strong
    # (2e-3 of A's gradient at dt·A = −80). It is 0 for j ≥ i, where the causal mask zeroes the
    # scores instead, so every exponent is ≤ 0.
    above = torch.ones(c, c, dtype=torch.bool, device=x.device).triu(1)  # (c, c): j > i
    g_heads = g.transpose(-1, -2).contiguous()  # (Bz, G, n, r, c)
    seg = (g_heads.unsqueeze(-1) * above.T).cumsum(dim=-2)  # (Bz, G, n, r, c, c)
    decay = seg.clamp_min(_LOG_DECAY_FLOOR).exp_()  # (Bz, G, n, r, c, c)
    scores = (C @ B.transpose(-1, -2)).masked_fill_(above, 0)  # (Bz, G, n, c, c), per group
    intra = (scores.unsqueeze(3) * decay) @ v.transpose(3, 4).contiguous()  # (Bz, G, n, r, c, P)

    # The chunk's contribution to the state entering the next: its tokens decayed to its end.
    to_end = seg[..., -1, :].exp().transpose(-1, -2)  # (Bz, G, n, c, r): e^(b_C − b_j)
    v_end = (v * to_end.unsqueeze(-1)).reshape(Bz, G, n, c, r * P)
    delta = (B.transpose(-1, -2) @ v_end).view(Bz, G, n, N, r, P)  # (Bz, G, n, N, r, P)
    chunk_decay = b[:, :, :, -1:].exp().unsqueeze(-1)  # (Bz, G, n, 1, r, 1)

    # The only sequential part, n steps: read each chunk's entering state out through C (one
    # (c, N) @ (N, r·P) matmul), then advance it. Loops over chunks, never tokens; unbind, not
    # indexing, so backward stacks the chunks' gradients once rather than scattering each into
    # a zeroed copy of the whole block (quadratic in n).
    outs = []
    chunks = zip(C.unbind(2), delta.unbind(2), chunk_decay.unbind(2), strict=True)
    for C_i, delta_i, decay_i in chunks:
        outs.append(C_i @ state.reshape(Bz, G, N, r * P))  # (Bz, G, c, r·P)
        state = torch.addcmul(delta_i, decay_i, state)
    inter = torch.stack(outs, dim=2).view(Bz, G, n, c, r, P) * b.exp().unsqueeze(-1)
    return inter + intra.transpose(3, 4), state


def ssd_chunk_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form in pure torch: O(T) time and memory, differentiable, any T ≥ 1.

    Inputs are not validated beyond T and chunk_size; ``ssd`` does that. Computes in fp32 and
    returns y in x's dtype.
    """
    batch, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    r = H // G
    if T == 0:
        raise ValueError("ssd_chunk_torch needs at least one token but x has T=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if initial_state is None:
        state = x.new_zeros(batch, G, N, r, P, dtype=torch.float32)
    else:
        # (B, H, N, P) -> (B, G, N, r, P): a group's heads side by side, as _chunk_block wants.
        state = initial_state.float().reshape(batch, G, r, N, P).transpose(2, 3)
    A_ = A.float().reshape(G, r)

    spans = chunk_spans(T, chunk_size, _GROUP_TOKENS)
    outs = []
    for start, end, c in spans:
        n = (end - start) // c
        # Views (B, t, H, ·) -> (B, G, n, c, r, ·), a group's heads side by side.
        x_ = x[:, start:end].float().reshape(batch, n, c, G, r, P).permute(0, 3, 1, 2, 4, 5)
        dt_ = dt[:, start:end].float().reshape(batch, n, c, G, r).permute(0, 3, 1, 2, 4)
        B_, C_ = (
            t[:, start:end].float().reshape(batch, n, c, G, N).permute(0, 3, 1, 2, 4)
            for t in (B, C)
        )  # (B, G, n, c, N)
        y, state = _chunk_block(x_, dt_, A_, B_, C_, state)
        y = y.permute(0, 2, 3, 1, 4, 5).reshape(batch, end - start, H, P)  # (B, t, H, P)
        if D is not None:
            y = y + x[:, start:end].float() * D.float()[:, None]
        outs.append(y.to(x.dtype))
    y = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]  # (B, T, H, P)
    final = state.transpose(2, 3).reshape(batch, H, N, P) if output_final_state else None
    return y, final


def _check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> list[int] | None:
    """Validate the public call; returns the packed sequence bounds as a host list, or None."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, T, H, P) but has shape {tuple(x.shape)}")
    batch, T, H, P = x.shape
    if dt.shape != x.shape[:3]:
        raise ValueError(
            f"dt has shape {tuple(dt.shape)} but must be (B, T, H) = {(batch, T, H)} from x"
        )
    if A.shape != (H,):
        raise ValueError(f"A has shape {tuple(A.shape)} but must be (H,) = ({H},) from x")
    if B.dim() != 4 or B.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"B has shape {tuple(B.shape)} but must be (B, T, G, N) with (B, T) = {(batch, T)} "
            "from x"
        )
    if C.shape != B.shape:
        raise ValueError(f"C has shape {tuple(C.shape)} but B has {tuple(B.shape)}")
    G, N = B.shape[2:]
    if G == 0 or H % G:
        raise ValueError(f"B and C have G={G} groups, which does not divide the H={H} heads of x")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D has shape {tuple(D.shape)} but must be (H,) = ({H},) from x")
    check_tensors(("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D))
    if T == 0:
        raise ValueError("x has T=0 tokens; ssd needs at least one")
    if values_checkable(x):
        check_decay_and_step(A, dt, "dt", "after dt_bias and softplus")
    check_chunk_size(chunk_size)
    if cu_seqlens is not None and batch != 1:
        raise ValueError(f"cu_seqlens needs packed sequences with B=1 but x has B={batch}")
    bounds = check_cu_seqlens(cu_seqlens, x)
    if initial_state is not None:
        expected = (batch if bounds is None else len(bounds) - 1, H, N, P)
        if tuple(initial_state.shape) != expected:
            what = "(B, H, N, P)" if bounds is None else "(N_seq, H, N, P), N_seq = #sequences"
            raise ValueError(
                f"initial_state has shape {tuple(initial_state.shape)} but must be {what} = "
                f"{expected}"
            )
        if initial_state.device != x.device:
            raise ValueError(f"initial_state is on {initial_state.device} but x is on {x.device}")
    return bounds


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2's SSD, the public entry point: (y (B, T, H, P) in x's dtype, final_state | None).

    x: (B, T, H, P); dt: (B, T, H), the step size after dt_bias, softplus and clamping (≥ 0);
    A: (H,) = −exp(A_log) (≤ 0); B, C: (B, T, G, N) with G dividing H; D: (H,) or None;
    initial_state: (B, H, N, P), kept in fp32 (transformers' cache holds its transpose,
    (B, H, P, N)). ``cu_seqlens`` packs variable-length sequences along T (B must be 1), with
    initial and final states (N_seq, H, N, P). ``backend``: see
    `zoo.kernels.linear_attention.dispatch`; the torch form uses ``chunk_size`` as given, the
    Triton kernels round it to a power of two in [16, 64].
    """
    bounds = _check_inputs(x, dt, A, B, C, D, initial_state, cu_seqlens, chunk_size)
    H = x.shape[2]
    backend = resolve_backend(backend, "ssd", x)
    if backend == "triton":
        # The shared kernels take per-head q and k and a decay per key channel: broadcast them.
        q = _per_head(C, H)  # (B, T, H, N)
        k = dt.float().unsqueeze(-1) * _per_head(B, H).float()  # (B, T, H, N)
        per_token = {"g": (dt.float() * A.float()).unsqueeze(-1).expand(q.shape)}  # (B, T, H, N)
    else:
        # The torch forms keep B and C per group and read dt and A themselves: q = C, k = B.
        q, k, per_token = C, B, {"dt": dt}
        empty = bounds is not None and any(a == b for a, b in itertools.pairwise(bounds))
        if empty and output_final_state and initial_state is None:
            # An empty sequence's final state is its initial one; run_segments would size its
            # zeros from q, which holds G groups here, not H heads.
            N, P = B.shape[3], x.shape[3]
            initial_state = x.new_zeros(len(bounds) - 1, H, N, P, dtype=torch.float32)

    # The torch forms as dispatch calls them: (q, k, v, *per-token tensors, state, ...).
    def step(C_t, B_t, x_t, dt_t, state):
        return ssd_step(x_t, dt_t, A, B_t, C_t, D, state)

    def chunk(C_, B_, x_, dt_, init, final, size):
        return ssd_chunk_torch(x_, dt_, A, B_, C_, D, init, final, size)

    y, final_state = dispatch(
        "ssd", backend, q, k, x,
        per_token=per_token, constants={}, initial_state=initial_state,
        output_final_state=output_final_state, bounds=bounds, chunk_size=chunk_size,
        torch_step=step, torch_chunk=chunk,
    )  # fmt: skip
    if backend == "triton" and D is not None:
        # The kernels have no skip term: D·x is added here, in fp32.
        y = y.float() + x.float() * D.float()[:, None]
    return y.to(x.dtype), final_state
