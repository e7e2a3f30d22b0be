"""Gated DeltaNet: the delta rule with a data-dependent scalar decay per head and token.

"Gated Delta Networks: Improving Mamba2 with Delta Rule" (Yang, Kautz, Hatamizadeh, arXiv
2412.06464), fla's ``chunk_gated_delta_rule``; Qwen3-Next's linear-attention op. Per batch b and
head h, with a log decay g_t ≤ 0 and a write strength β_t ∈ (0, 1), both scalars per token:

    S'_t = exp(g_t) S_{t-1}                          (decay first, then the delta-rule write)
    S_t  = S'_t + β_t k_t (v_t − S'_tᵀ k_t)ᵀ           (S is K×V, kept in fp32)
    o_t  = scale · S_tᵀ q_t                           (the current token is included)

This is fla's ``naive_recurrent_gated_delta_rule`` and transformers'
``torch_recurrent_gated_delta_rule`` exactly; scale defaults to K^-1/2 as in both. The op does
not L2-normalise q and k (fla's ``use_qk_l2norm_in_kernel``): that is the layer's business. The
write multiplies S'_t by I − β_t k_t k_tᵀ, whose eigenvalue along k_t is 1 − β_t ‖k_t‖², so the
state stays bounded only while β_t ‖k_t‖² ≤ 2: a layer normalises k.

Chunked form (chunk length C, b = cumsum of g inside the chunk, D_ij = exp(b_i − b_j) for j ≤ i
and 0 above the diagonal; S_n is the state entering chunk n). Writing u_i for the value each
token actually writes, β_i (v_i − S'_iᵀ k_i), and unrolling S'_i over the chunk gives the
triangular system of the WY/UT representation (DeltaNet, arXiv 2406.06484):

    (I + A) U = diag(β) V − diag(β e^b) K S_n,    A_ij = β_i D_ij k_i·k_j for j < i,

so U = Ũ − W S_n with Ũ = (I + A)⁻¹ diag(β) V and W = (I + A)⁻¹ diag(β e^b) K, both free of
S_n and so solved for all chunks at once. Then, per chunk,

* output: o = scale · ((q ⊙ e^b) S_n + (Q Kᵀ ⊙ D) U);
* state:  S_{n+1} = e^{b_C} S_n + (K ⊙ e^{b_C − b})ᵀ U.

Every exponent is ≤ 0 (D is masked to -inf above the diagonal before the exp), so nothing
overflows however strong the decay; b itself is summed in fp64 (see `_chunk_block`). The torch
form works on groups of ~``_GROUP_TOKENS`` tokens (bounded temporaries, linear time and memory in
T), inverts the unit triangular I + A of every chunk of a group in one batched solve, and loops
in Python only over chunks, for the three small products per chunk that read or update the state
(U, o and S_{n+1}).

Layout follows fla: q, k (B, T, H, K); v (B, T, H, V); g, beta (B, T, H); state (B, H, K, V)
fp32. Module order: naive reference → decode step → chunked torch form → Triton kernels → their
custom ops → public dispatch function.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import (
    ChunkTable,
    check_cu_seqlens,
    check_initial_state,
    check_qkv,
    chunk_spans,
    dot_block,
    dot_precision,
    fold_batch,
    needs_grad,
    run_segments,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU deps
    triton = None

__all__ = [
    "gated_delta",
    "gated_delta_chunk_torch",
    "gated_delta_chunk_triton",
    "gated_delta_naive",
    "gated_delta_step",
    "gated_delta_step_triton",
]

_GROUP_TOKENS = 1024
# Warps of the chunk kernels: at K = V = 128 (bf16, sm_90) ptxas reports 3-9 KB of spills per
# thread at 4 warps and 0-4.5 KB at 8 (tests/kernels/sm90_compile.py --spills); each program
# holds all of K in one tile, which is where the registers go.
_WARPS = 8


def _default_scale(scale: float | None, key_dim: int) -> float:
    return key_dim**-0.5 if scale is None else float(scale)


def gated_delta_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in fp32: the oracle the faster forms are tested against."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _default_scale(scale, K)
    qf, kf, vf, gf, bf = q.float(), k.float(), v.float(), g.float(), beta.float()
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        S = initial_state.float()
    outs = []
    for t in range(T):
        S = gf[:, t].exp()[..., None, None] * S
        k_t = kf[:, t]  # (B, H, K)
        write = bf[:, t, :, None] * (vf[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))  # (B, H, V)
        S = S + k_t.unsqueeze(-1) * write.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), (S if output_final_state else None)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k: (B, H, K); v: (B, H, V); g, beta: (B, H); state: (B, H, K, V) or
    None (zeros).

    Returns o (B, H, V) in q's dtype and a new fp32 state; ``state`` is left untouched so a cache
    can keep the previous one.
    """
    B, H, K = q.shape
    scale = _default_scale(scale, K)
    kf, vf = k.float(), v.float()
    if state is None:
        decayed = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)
    else:
        decayed = g.float().exp()[..., None, None] * state.float()  # (B, H, K, V), a new tensor
    write = beta.float().unsqueeze(-1) * (vf - torch.einsum("bhk,bhkv->bhv", kf, decayed))
    new_state = torch.addcmul(decayed, kf.unsqueeze(-1), write.unsqueeze(-2))  # (B, H, K, V)
    o = scale * torch.einsum("bhk,bhkv->bhv", q.float(), new_state)
    return o.to(q.dtype), new_state


def _chunk_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N equal chunks at once. q, k: (B, H, N, C, K); v: (B, H, N, C, V); g, beta: (B, H, N, C);
    state (B, H, K, V).

    Everything is fp32. Returns o (B, H, N, C, V) and the state after the last chunk.
    """
    B, H, N, C, K = q.shape
    V = v.shape[-1]
    # b in fp64: under strong decay the partial sums reach ~-1000s, where an fp32 ulp (2^-13)
    # would already be a 1e-4 relative error in e^(b_i - b_j) between neighbours.
    b = g.double().cumsum(dim=-1)  # (B, H, N, C), ≤ 0 and non-increasing along C
    above = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)  # (C, C): j > i
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).float().masked_fill(above, -torch.inf).exp()  # D
    to_end = (b[..., -1:] - b).float()  # (B, H, N, C): b_C - b_j
    b = b.float()

    # (I + A)⁻¹ once per chunk, then Ũ and W as plain products: a triangular solve against the
    # C×C identity costs a quarter of one against the K + V columns of [βV, βe^b K].
    # Only the strict lower triangle of A is read: unitriangular puts ones on the diagonal.
    A = (k @ k.transpose(-1, -2)) * (decay * beta.unsqueeze(-1))  # (B, H, N, C, C)
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand_as(A)
    t_inv = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # (I + A)⁻¹
    u_free = (t_inv * beta.unsqueeze(-2)) @ v  # Ũ (B, H, N, C, V)
    w = (t_inv * (beta * b.exp()).unsqueeze(-2)) @ k  # W (B, H, N, C, K)

    k_end = k * to_end.exp().unsqueeze(-1)  # (B, H, N, C, K)
    chunk_decay = b[..., -1:].exp().unsqueeze(-1)  # (B, H, N, 1, 1)
    attn = (q @ k.transpose(-1, -2)) * (decay * scale)  # (B, H, N, C, C)
    q_start = q * (scale * b.exp()).unsqueeze(-1)  # (B, H, N, C, K): reads the entering state

    # The only sequential part, a few products per chunk on (B·H) batches: the loop is over
    # chunks, never tokens. Chunks come from unbind, whose backward stacks the gradients once
    # (indexing would scatter each chunk's gradient into a zero tensor of the whole group).
    u_free, w, k_end, q_start, attn = (
        x.reshape(B * H, N, C, x.shape[-1]).unbind(1) for x in (u_free, w, k_end, q_start, attn)
    )
    chunk_decay = chunk_decay.reshape(B * H, N, 1, 1).unbind(1)
    S = state.reshape(B * H, K, V)
    outs = []
    for n in range(N):
        u = torch.baddbmm(u_free[n], w[n], S, alpha=-1.0)  # U (B·H, C, V)
        outs.append(torch.baddbmm(attn[n] @ u, q_start[n], S))  # (B·H, C, V)
        S = torch.baddbmm(S * chunk_decay[n], k_end[n].transpose(-1, -2), u)
    o = torch.stack(outs, dim=1).view(B, H, N, C, V)
    return o, S.view(B, H, K, V)


def gated_delta_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked WY form in pure torch: O(T) time and memory, differentiable, any T ≥ 1.

    Inputs are not validated beyond T and chunk_size; ``gated_delta`` does that. Computes in fp32
    and returns o in q's dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        raise ValueError("gated_delta_chunk_torch needs at least one token but q has T=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    scale = _default_scale(scale, K)
    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        state = initial_state.float()

    outs = []
    for start, end, c in chunk_spans(T, chunk_size, _GROUP_TOKENS):
        # Head-major fp32 copies of this group only: (B, t, H, D) -> (B, H, n, c, D).
        q_, k_, v_ = (
            x[:, start:end].transpose(1, 2).float().contiguous().view(B, H, -1, c, x.shape[-1])
            for x in (q, k, v)
        )
        g_, beta_ = (
            x[:, start:end].transpose(1, 2).float().contiguous().view(B, H, -1, c)
            for x in (g, beta)
        )
        o, state = _chunk_block(q_, k_, v_, g_, beta_, scale, state)
        outs.append(o.view(B, H, end - start, V).transpose(1, 2).to(q.dtype))  # (B, t, H, V)
    o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0].contiguous()  # (B, T, H, V)
    return o, (state if output_final_state else None)


# --- Triton kernels ------------------------------------------------------------------------------
# The same chunked form, one program per chunk (or per sequence for the recurrence) and head. The
# batch is folded into one token axis with sequence bounds, as in `zoo.kernels.linear_attention`,
# so a batch of B rows and a packed ``cu_seqlens`` batch run the same code. K must fit one tile
# (K ≤ 256, as in fla): the triangular system and W S contract over all of K. b is kept in fp64,
# as in the torch form. Everything is computed in fp32; products of half inputs use tf32.

if triton is not None:

    @triton.jit
    def _prepare_kernel(
        k_ptr, v_ptr, g_ptr, beta_ptr, b_ptr, t_inv_ptr, w_ptr, u_ptr,
        chunk_start_ptr, chunk_len_ptr, H, K, V,
        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """Per chunk and head: b = cumsum g (fp64), T = (I + A)⁻¹ (fp32, C×C),
        W = T diag(β e^b) K and Ũ = T diag(β) V (fp32)."""
        n, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        t0 = tl.load(chunk_start_ptr + n).to(tl.int64)
        length = tl.load(chunk_len_ptr + n)
        rows = tl.arange(0, C)
        ok = rows < length
        ks = tl.arange(0, BK)
        k_mask = ok[:, None] & (ks[None, :] < K)
        k_offs = ((t0 + rows[:, None]) * H + h) * K + ks[None, :]
        kt = tl.load(k_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + (t0 + rows) * H + h, mask=ok, other=0.0).to(tl.float64)
        beta = tl.load(beta_ptr + (t0 + rows) * H + h, mask=ok, other=0.0).to(tl.float32)
        b = tl.cumsum(g, axis=0)
        tl.store(b_ptr + (t0 + rows) * H + h, b, mask=ok)
        strict = rows[:, None] > rows[None, :]
        decay = tl.exp(tl.where(strict, (b[:, None] - b[None, :]).to(tl.float32), float("-inf")))
        a = tl.dot(kt, tl.trans(kt), input_precision=PREC) * decay * beta[:, None]
        # Forward substitution, row by row: X = T - I, X_i = -A_i - A_i X (rows above i final).
        x = -a
        for i in range(1, length):
            row = tl.sum(tl.where(rows[:, None] == i, x, 0.0), 0)  # (C,)
            row += tl.sum(row[:, None] * x, 0)
            x = tl.where(rows[:, None] == i, row[None, :], x)
        t_inv = x + tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
        tl.store(t_inv_ptr + ((n * H + h) * C + rows[:, None]) * C + rows[None, :], t_inv)
        scaled_k = kt * (beta * tl.exp(b.to(tl.float32)))[:, None]
        tl.store(w_ptr + k_offs, tl.dot(t_inv, scaled_k, input_precision=PREC), mask=k_mask)
        for v0 in range(0, V, BV):
            vs = v0 + tl.arange(0, BV)
            v_mask = ok[:, None] & (vs[None, :] < V)
            v_offs = ((t0 + rows[:, None]) * H + h) * V + vs[None, :]
            vt = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
            u = tl.dot(t_inv, vt * beta[:, None], input_precision=PREC)
            tl.store(u_ptr + v_offs, u, mask=v_mask)

    @triton.jit
    def _chunk_rows(ptr, t0, rows, ok, h, H, D, BD: tl.constexpr):
        """The chunk's rows of a (T, H, D) tensor at head h, in fp32, zero-padded to BD columns."""
        cols = tl.arange(0, BD)
        mask = ok[:, None] & (cols[None, :] < D)
        offs = ((t0 + rows[:, None]) * H + h) * D + cols[None, :]
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _decays(b_ptr, t0, rows, ok, length, h, H):
        """(D: e^(b_i - b_j) for j ≤ i < length else 0, e^b, e^(b_last - b), e^b_last)."""
        b = tl.load(b_ptr + (t0 + rows) * H + h, mask=ok, other=0.0)  # fp64
        b_last = tl.load(b_ptr + (t0 + length - 1) * H + h)
        causal = (rows[:, None] >= rows[None, :]) & ok[:, None]
        decay = tl.exp(tl.where(causal, (b[:, None] - b[None, :]).to(tl.float32), float("-inf")))
        to_end = tl.exp(tl.where(ok, (b_last - b).to(tl.float32), float("-inf")))
        return decay, tl.exp(b.to(tl.float32)), to_end, tl.exp(b_last.to(tl.float32))

    @triton.jit
    def _fwd_states_kernel(
        k_ptr, w_ptr, u_free_ptr, b_ptr, h0_ptr, states_ptr, u_ptr, ht_ptr,
        cu_ptr, chunk_offset_ptr, H, K, V,
        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
        STORE_HT: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One sequence's chunks in order, one block of V: stores the state entering each chunk
        and U = Ũ − W S, then S ← e^{b_last} S + (K ⊙ e^{b_last − b})ᵀ U."""
        pv, seq_head = tl.program_id(0), tl.program_id(1)
        seq, h = seq_head // H, seq_head % H
        tok0 = tl.load(cu_ptr + seq).to(tl.int64)
        tok1 = tl.load(cu_ptr + seq + 1).to(tl.int64)
        chunk0 = tl.load(chunk_offset_ptr + seq).to(tl.int64)
        rows = tl.arange(0, C)
        ks = tl.arange(0, BK)
        vs = pv * BV + tl.arange(0, BV)
        kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
        kv_offs = ks[:, None] * V + vs[None, :]
        state = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_H0:
            state += tl.load(h0_ptr + seq_head.to(tl.int64) * K * V + kv_offs, mask=kv_mask)
        for i in range(tl.cdiv(tok1 - tok0, C)):
            tl.store(states_ptr + ((chunk0 + i) * H + h) * K * V + kv_offs, state, mask=kv_mask)
            t0 = tok0 + i * C
            length = tl.minimum(tok1 - t0, C)
            ok = rows < length
            _, _, to_end, last = _decays(b_ptr, t0, rows, ok, length, h, H)
            v_mask = ok[:, None] & (vs[None, :] < V)
            v_offs = ((t0 + rows[:, None]) * H + h) * V + vs[None, :]
            u = tl.load(u_free_ptr + v_offs, mask=v_mask, other=0.0)
            u -= tl.dot(_chunk_rows(w_ptr, t0, rows, ok, h, H, K, BK), state, input_precision=PREC)
            tl.store(u_ptr + v_offs, u, mask=v_mask)
            kt = _chunk_rows(k_ptr, t0, rows, ok, h, H, K, BK) * to_end[:, None]
            state = state * last + tl.dot(tl.trans(kt), u, input_precision=PREC)
        if STORE_HT:
            tl.store(ht_ptr + seq_head.to(tl.int64) * K * V + kv_offs, state, mask=kv_mask)

    @triton.jit
    def _output_kernel(
        q_ptr, k_ptr, b_ptr, u_ptr, states_ptr, o_ptr, chunk_start_ptr, chunk_len_ptr,
        scale, H, K, V,
        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """o = scale ((q ⊙ e^b) S_n + (q kᵀ ⊙ D) U) for one chunk, head and block of V."""
        n, pv, h = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        t0 = tl.load(chunk_start_ptr + n).to(tl.int64)
        length = tl.load(chunk_len_ptr + n)
        rows = tl.arange(0, C)
        ok = rows < length
        ks = tl.arange(0, BK)
        vs = pv * BV + tl.arange(0, BV)
        qt = _chunk_rows(q_ptr, t0, rows, ok, h, H, K, BK)
        kt = _chunk_rows(k_ptr, t0, rows, ok, h, H, K, BK)
        decay, e_b, _, _ = _decays(b_ptr, t0, rows, ok, length, h, H)
        state = tl.load(
            states_ptr + (n * H + h) * K * V + ks[:, None] * V + vs[None, :],
            mask=(ks[:, None] < K) & (vs[None, :] < V), other=0.0,
        )  # fmt: skip
        v_mask = ok[:, None] & (vs[None, :] < V)
        v_offs = ((t0 + rows[:, None]) * H + h) * V + vs[None, :]
        u = tl.load(u_ptr + v_offs, mask=v_mask, other=0.0)
        attn = tl.dot(qt, tl.trans(kt), input_precision=PREC) * decay
        o = tl.dot(qt * e_b[:, None], state, input_precision=PREC)
        o += tl.dot(attn, u, input_precision=PREC)
        tl.store(o_ptr + v_offs, (o * scale).to(o_ptr.dtype.element_ty), mask=v_mask)

    @triton.jit
    def _bwd_states_kernel(
        q_ptr, k_ptr, w_ptr, b_ptr, do_ptr, dht_ptr, dstates_ptr, du_ptr, dh0_ptr,
        cu_ptr, chunk_offset_ptr, scale, H, K, V,
        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
        STORE_DH0: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One sequence's chunks last first, one block of V: with dS the gradient of the state
        leaving chunk n (stored per chunk), the gradient of its U,
        dU = scale (q kᵀ ⊙ D)ᵀ do + (K ⊙ e^{b_last − b}) dS, and of the state entering it,
        dS ← e^{b_last} dS + scale (q ⊙ e^b)ᵀ do − Wᵀ dU."""
        pv, seq_head = tl.program_id(0), tl.program_id(1)
        seq, h = seq_head // H, seq_head % H
        tok0 = tl.load(cu_ptr + seq).to(tl.int64)
        tok1 = tl.load(cu_ptr + seq + 1).to(tl.int64)
        chunk0 = tl.load(chunk_offset_ptr + seq).to(tl.int64)
        rows = tl.arange(0, C)
        ks = tl.arange(0, BK)
        vs = pv * BV + tl.arange(0, BV)
        kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
        kv_offs = ks[:, None] * V + vs[None, :]
        dstate = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_DHT:
            dstate += tl.load(dht_ptr + seq_head.to(tl.int64) * K * V + kv_offs, mask=kv_mask)
        num_chunks = tl.cdiv(tok1 - tok0, C)
        for i in range(num_chunks):
            n = num_chunks - 1 - i
            tl.store(dstates_ptr + ((chunk0 + n) * H + h) * K * V + kv_offs, dstate, mask=kv_mask)
            t0 = tok0 + n * C
            length = tl.minimum(tok1 - t0, C)
            ok = rows < length
            decay, e_b, to_end, last = _decays(b_ptr, t0, rows, ok, length, h, H)
            qt = _chunk_rows(q_ptr, t0, rows, ok, h, H, K, BK) * scale
            kt = _chunk_rows(k_ptr, t0, rows, ok, h, H, K, BK)
            v_mask = ok[:, None] & (vs[None, :] < V)
            v_offs = ((t0 + rows[:, None]) * H + h) * V + vs[None, :]
            do = tl.load(do_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
            attn = tl.dot(qt, tl.trans(kt), input_precision=PREC) * decay
            du = tl.dot(tl.trans(attn), do, input_precision=PREC)
            du += tl.dot(kt * to_end[:, None], dstate, input_precision=PREC)
            tl.store(du_ptr + v_offs, du, mask=v_mask)
            wt = _chunk_rows(w_ptr, t0, rows, ok, h, H, K, BK)
            dstate = dstate * last + tl.dot(tl.trans(qt * e_b[:, None]), do, input_precision=PREC)
            dstate -= tl.dot(tl.trans(wt), du, input_precision=PREC)
        if STORE_DH0:
            tl.store(dh0_ptr + seq_head.to(tl.int64) * K * V + kv_offs, dstate, mask=kv_mask)

    @triton.jit
    def _row_sums_minus_col_sums(x):
        """Σ_j x_ij − Σ_j x_ji per row i: the gradient of b through a factor e^(b_i − b_j)."""
        return tl.sum(x, 1) - tl.sum(x, 0)

    @triton.jit
    def _bwd_grads_kernel(
        q_ptr, k_ptr, v_ptr, beta_ptr, b_ptr, t_inv_ptr, u_ptr, du_ptr, states_ptr, dstates_ptr,
        do_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dg_ptr, chunk_start_ptr, chunk_len_ptr,
        scale, H, K, V,
        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """dq, dk, dv, dβ and dg for one chunk and head (the module docstring has the forward).

        With S the state entering the chunk, dS the gradient of the one leaving it and dU the
        full gradient of U (from `_bwd_states_kernel`): U = Ũ − W S gives dŨ = dU and
        dW = −dU Sᵀ; Ũ = T diag(β) V and W = T diag(β e^b) K give dT, then
        dA = −Tᵀ dT Tᵀ (strict lower) for A = diag(β) (K Kᵀ ⊙ D). b collects its terms from
        every factor e^(...) and dg is its reverse cumsum inside the chunk.
        """
        n, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        t0 = tl.load(chunk_start_ptr + n).to(tl.int64)
        length = tl.load(chunk_len_ptr + n)
        rows = tl.arange(0, C)
        ok = rows < length
        ks = tl.arange(0, BK)
        qt = _chunk_rows(q_ptr, t0, rows, ok, h, H, K, BK)
        kt = _chunk_rows(k_ptr, t0, rows, ok, h, H, K, BK)
        beta = tl.load(beta_ptr + (t0 + rows) * H + h, mask=ok, other=0.0).to(tl.float32)
        decay, e_b, to_end, last = _decays(b_ptr, t0, rows, ok, length, h, H)
        t_inv = tl.load(t_inv_ptr + ((n * H + h) * C + rows[:, None]) * C + rows[None, :])
        state_base = (n * H + h) * K * V

        dq = tl.zeros((C, BK), dtype=tl.float32)  # do Sᵀ
        dk_state = tl.zeros((C, BK), dtype=tl.float32)  # U dSᵀ
        dw = tl.zeros((C, BK), dtype=tl.float32)  # −dU Sᵀ
        d_attn = tl.zeros((C, C), dtype=tl.float32)  # do Uᵀ
        dt = tl.zeros((C, C), dtype=tl.float32)  # dŨ (diag(β) V)ᵀ, then + dW (...)ᵀ
        dbeta = tl.zeros((C,), dtype=tl.float32)
        d_last = tl.zeros((1,), dtype=tl.float32)  # Σ S ⊙ dS
        for v0 in range(0, V, BV):
            vs = v0 + tl.arange(0, BV)
            kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
            kv_offs = state_base + ks[:, None] * V + vs[None, :]
            state = tl.load(states_ptr + kv_offs, mask=kv_mask, other=0.0)
            dstate = tl.load(dstates_ptr + kv_offs, mask=kv_mask, other=0.0)
            v_mask = ok[:, None] & (vs[None, :] < V)
            v_offs = ((t0 + rows[:, None]) * H + h) * V + vs[None, :]
            do = tl.load(do_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + v_offs, mask=v_mask, other=0.0)
            du = tl.load(du_ptr + v_offs, mask=v_mask, other=0.0)
            vt = tl.load(v_ptr + v_offs, mask=v_mask, other=0.0).to(tl.float32)
            dq += tl.dot(do, tl.trans(state), input_precision=PREC)
            dk_state += tl.dot(u, tl.trans(dstate), input_precision=PREC)
            dw -= tl.dot(du, tl.trans(state), input_precision=PREC)
            d_attn += tl.dot(do, tl.trans(u), input_precision=PREC)
            dt += tl.dot(du, tl.trans(vt * beta[:, None]), input_precision=PREC)
            d_last += tl.sum(tl.sum(state * dstate, 1), 0)
            t_du = tl.dot(tl.trans(t_inv), du, input_precision=PREC)  # Tᵀ dŨ
            tl.store(dv_ptr + v_offs, (t_du * beta[:, None]).to(dv_ptr.dtype.element_ty),
                     mask=v_mask)  # fmt: skip
            dbeta += tl.sum(t_du * vt, 1)

        # The state entering the chunk, read by the queries: o += scale e^b q S.
        dq *= (scale * e_b)[:, None]
        db = tl.sum(dq * qt, 1)
        # Intra-chunk attention: o += scale (q kᵀ ⊙ D) U.
        d_attn *= decay * scale
        dq += tl.dot(d_attn, kt, input_precision=PREC)
        dk = tl.dot(tl.trans(d_attn), qt, input_precision=PREC)
        db += _row_sums_minus_col_sums(d_attn * tl.dot(qt, tl.trans(kt), input_precision=PREC))
        # The state leaving the chunk: e^{b_last} S + (K ⊙ e^{b_last − b})ᵀ U.
        dk_state *= to_end[:, None]
        dk += dk_state
        to_end_terms = tl.sum(dk_state * kt, 1)
        db -= to_end_terms
        db_last = tl.sum(to_end_terms, 0) + last * tl.sum(d_last, 0)
        # W = T diag(β e^b) K.
        scaled_k = kt * (beta * e_b)[:, None]
        dt += tl.dot(dw, tl.trans(scaled_k), input_precision=PREC)
        t_dw = tl.dot(tl.trans(t_inv), dw, input_precision=PREC)  # Tᵀ dW
        dk += t_dw * (beta * e_b)[:, None]
        w_terms = tl.sum(t_dw * kt, 1) * e_b
        dbeta += w_terms
        db += w_terms * beta
        # T = (I + A)⁻¹ and A = diag(β) (K Kᵀ ⊙ D), strictly lower.
        strict = (rows[:, None] > rows[None, :]) & ok[:, None]
        da = -tl.dot(tl.trans(t_inv), tl.dot(dt, tl.trans(t_inv), input_precision=PREC),
                     input_precision=PREC)  # fmt: skip
        da = tl.where(strict, da, 0.0)
        kk_decay = tl.dot(kt, tl.trans(kt), input_precision=PREC) * decay
        dbeta += tl.sum(da * kk_decay, 1)
        m = da * decay * beta[:, None]
        dk += tl.dot(m, kt, input_precision=PREC) + tl.dot(tl.trans(m), kt, input_precision=PREC)
        db += _row_sums_minus_col_sums(da * kk_decay * beta[:, None])
        db += tl.where(rows == length - 1, db_last, 0.0)
        # b is the in-chunk cumsum of g: dg_t = Σ_{i ≥ t} db_i.
        dg = tl.sum(db, 0) - tl.cumsum(db, axis=0) + db

        k_mask = ok[:, None] & (ks[None, :] < K)
        k_offs = ((t0 + rows[:, None]) * H + h) * K + ks[None, :]
        tl.store(dq_ptr + k_offs, dq, mask=k_mask)
        tl.store(dk_ptr + k_offs, dk, mask=k_mask)
        tl.store(dbeta_ptr + (t0 + rows) * H + h, dbeta, mask=ok)
        tl.store(dg_ptr + (t0 + rows) * H + h, dg, mask=ok)

    @triton.jit
    def _step_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, new_state_ptr, o_ptr, scale, K, V,
        BK: tl.constexpr, BV: tl.constexpr, HAS_STATE: tl.constexpr,
    ):  # fmt: skip
        """One decode step for one (batch, head) and block of V (the recurrence at the top)."""
        bh, pv = tl.program_id(0), tl.program_id(1)
        ks = tl.arange(0, BK)
        vs = pv * BV + tl.arange(0, BV)
        kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
        offs = bh.to(tl.int64) * K * V + ks[:, None] * V + vs[None, :]
        q = tl.load(q_ptr + bh * K + ks, mask=ks < K, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + bh * K + ks, mask=ks < K, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + bh * V + vs, mask=vs < V, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + bh).to(tl.float32)
        state = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_STATE:
            g = tl.load(g_ptr + bh).to(tl.float32)
            state += tl.exp(g) * tl.load(state_ptr + offs, mask=kv_mask, other=0.0)
        write = beta * (v - tl.sum(k[:, None] * state, 0))  # (BV,)
        state += k[:, None] * write[None, :]
        tl.store(new_state_ptr + offs, state, mask=kv_mask)
        o = tl.sum(q[:, None] * state, 0) * scale
        tl.store(o_ptr + bh * V + vs, o.to(o_ptr.dtype.element_ty), mask=vs < V)


def _require_triton(K: int) -> None:
    if triton is None:
        raise ImportError("the Triton gated delta rule kernels need triton (pip install triton)")
    if K > 256:
        raise ValueError(f"the Triton gated delta rule kernels take K <= 256, got K={K}")


# The Triton forms are torch.library custom ops, as every op's in zoo.kernels: torch.compile
# keeps each as one opaque node (shapes from its fake implementation) instead of breaking the graph.


@torch.library.custom_op("zoo::chunk_gated_delta", mutates_args=())
def _chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    scale: float,
    bounds: list[int],
    chunk: int,
    final: bool,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, T, H, V), final states (S, H, K, V) fp32, or an empty tensor without `final`)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunks = ChunkTable(bounds, chunk, q.device, None if packed else T)
    qf, kf, vf = fold_batch(q), fold_batch(k), fold_batch(v)
    gf, betaf = g.reshape(-1, H).contiguous(), beta.reshape(-1, H).contiguous()
    h0c = h0.float().contiguous() if h0 is not None else None
    b, _, w, u_free = _prepare(kf, vf, gf, betaf, chunks)
    states, u, ht = _fwd_states(kf, w, u_free, b, h0c, chunks, final)
    o = torch.empty(qf.shape[0], H, V, device=q.device, dtype=q.dtype)
    bv = dot_block(V, 64)
    _output_kernel[(chunks.num_chunks, triton.cdiv(V, bv), H)](
        qf, kf, b, u, states, o, chunks.chunk_start, chunks.chunk_len, scale, H, K, V,
        C=chunk, BK=dot_block(K, 256), BV=bv, PREC=dot_precision(q.dtype), num_warps=_WARPS,
    )  # fmt: skip
    return o.view(B, T, H, V), ht if ht is not None else q.new_empty(0, dtype=torch.float32)


@_chunk_forward.register_fake
def _(q, k, v, g, beta, h0, scale, bounds, chunk, final, packed):
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    shape = (len(bounds) - 1, H, K, V) if final else (0,)
    return q.new_empty(*q.shape[:3], V), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("zoo::chunk_gated_delta_backward", mutates_args=())
def _chunk_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    h0: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    bounds: list[int],
    chunk: int,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, dβ, dh0), each in its input's dtype; dh0 empty without h0."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunks = ChunkTable(bounds, chunk, q.device, None if packed else T)
    qf, kf, vf = fold_batch(q), fold_batch(k), fold_batch(v)
    gf, betaf = g.reshape(-1, H).contiguous(), beta.reshape(-1, H).contiguous()
    h0c = h0.float().contiguous() if h0 is not None else None
    prec = dot_precision(qf.dtype)
    bk, bv = dot_block(K, 256), dot_block(V, 64)
    # Everything the forward made is recomputed rather than kept: (chunks, H, K, V) fp32 states
    # are the op's largest tensor, and the prepared W, Ũ, T⁻¹ cost one cheap kernel.
    b, t_inv, w, u_free = _prepare(kf, vf, gf, betaf, chunks)
    states, u, _ = _fwd_states(kf, w, u_free, b, h0c, chunks, False)
    do = fold_batch(do)
    dht = dht.float().contiguous() if dht is not None else None
    dstates = torch.empty_like(states)
    du = torch.empty_like(u)
    dh0 = torch.empty_like(h0c) if h0c is not None else q.new_empty(0, dtype=torch.float32)
    _bwd_states_kernel[(triton.cdiv(V, bv), chunks.num_seqs * H)](
        qf, kf, w, b, do, dht, dstates, du, dh0 if h0c is not None else None, chunks.cu,
        chunks.chunk_offset, scale, H, K, V,
        C=chunks.chunk, BK=bk, BV=bv, HAS_DHT=dht is not None, STORE_DH0=h0c is not None,
        PREC=prec, num_warps=_WARPS,
    )  # fmt: skip
    dq = torch.empty(qf.shape, device=qf.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(vf)
    dbeta = torch.empty(betaf.shape, device=qf.device, dtype=torch.float32)
    dg = torch.empty_like(dbeta)
    _bwd_grads_kernel[(chunks.num_chunks, H)](
        qf, kf, vf, betaf, b, t_inv, u, du, states, dstates, do, dq, dk, dv, dbeta, dg,
        chunks.chunk_start, chunks.chunk_len, scale, H, K, V,
        C=chunks.chunk, BK=bk, BV=dot_block(V, 32), PREC=prec, num_warps=_WARPS,
    )  # fmt: skip
    return (
        dq.view(B, T, H, K).to(q.dtype),
        dk.view(B, T, H, K).to(k.dtype),
        dv.view(B, T, H, V),
        dg.view(B, T, H).to(g.dtype),
        dbeta.view(B, T, H).to(beta.dtype),
        dh0,
    )


@_chunk_backward.register_fake
def _(q, k, v, g, beta, h0, do, dht, scale, bounds, chunk, packed):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(g),
        torch.empty_like(beta),
        torch.empty_like(h0, dtype=torch.float32) if h0 is not None else q.new_empty(0),
    )


def _chunk_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, g, beta, h0, scale, bounds, chunk, final, packed = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0)
    ctx.meta = (scale, bounds, chunk, final, packed)


def _chunk_autograd(ctx: Any, do: torch.Tensor, dht: torch.Tensor) -> tuple:
    q, k, v, g, beta, h0 = ctx.saved_tensors
    scale, bounds, chunk, final, packed = ctx.meta
    dq, dk, dv, dg, dbeta, dh0 = _chunk_backward(
        q, k, v, g, beta, h0, do, dht if final else None, scale, bounds, chunk, packed
    )
    return dq, dk, dv, dg, dbeta, dh0 if h0 is not None else None, *(None,) * 5


_chunk_forward.register_autograd(_chunk_autograd, setup_context=_chunk_setup)


def _prepare(kf, vf, gf, betaf, chunks: ChunkTable):
    """Run `_prepare_kernel`: (b fp64 (T, H), T⁻¹ (chunks, H, C, C), W (T, H, K), Ũ (T, H, V))."""
    _, H, K = kf.shape
    V = vf.shape[-1]
    C = chunks.chunk
    b = torch.empty(gf.shape, device=kf.device, dtype=torch.float64)
    t_inv = torch.empty(chunks.num_chunks, H, C, C, device=kf.device, dtype=torch.float32)
    w = torch.empty(kf.shape, device=kf.device, dtype=torch.float32)
    u_free = torch.empty(vf.shape, device=kf.device, dtype=torch.float32)
    _prepare_kernel[(chunks.num_chunks, H)](
        kf, vf, gf, betaf, b, t_inv, w, u_free, chunks.chunk_start, chunks.chunk_len, H, K, V,
        C=C, BK=dot_block(K, 256), BV=dot_block(V, 64), PREC=dot_precision(kf.dtype),
        num_warps=_WARPS,
    )  # fmt: skip
    return b, t_inv, w, u_free


def _fwd_states(kf, w, u_free, b, h0, chunks: ChunkTable, store_ht: bool):
    """Run `_fwd_states_kernel`: (states entering each chunk, U (T, H, V), final states or None)."""
    _, H, K = kf.shape
    V = u_free.shape[-1]
    states = torch.empty(chunks.num_chunks, H, K, V, device=kf.device, dtype=torch.float32)
    u = torch.empty_like(u_free)
    ht = None
    if store_ht:
        ht = torch.empty(chunks.num_seqs, H, K, V, device=kf.device, dtype=torch.float32)
    bv = dot_block(V, 64)
    _fwd_states_kernel[(triton.cdiv(V, bv), chunks.num_seqs * H)](
        kf, w, u_free, b, h0, states, u, ht, chunks.cu, chunks.chunk_offset, H, K, V,
        C=chunks.chunk, BK=dot_block(K, 256), BV=bv, HAS_H0=h0 is not None, STORE_HT=store_ht,
        PREC=dot_precision(kf.dtype), num_warps=_WARPS,
    )  # fmt: skip
    return states, u, ht


def gated_delta_chunk_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: list[int] | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton chunked form, differentiable in q, k, v, g, beta and the initial state.

    ``cu_seqlens`` are host-side sequence bounds over T (B = 1). The chunk length is
    ``chunk_size`` rounded to a power of two in [16, 64]. Inputs are validated by `gated_delta`.
    """
    _require_triton(q.shape[-1])
    B, T = q.shape[:2]
    bounds = list(cu_seqlens) if cu_seqlens is not None else [i * T for i in range(B + 1)]
    k, v = k.to(q.dtype), v.to(q.dtype)
    o, ht = _chunk_forward(
        q, k, v, g, beta, initial_state, scale, bounds, dot_block(chunk_size, 64),
        output_final_state, cu_seqlens is not None,
    )  # fmt: skip
    return o, (ht if output_final_state else None)


def gated_delta_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused decode step (no autograd), `gated_delta_step`'s arguments and results."""
    _require_triton(q.shape[-1])
    return _step(q, k, v, g, beta, state, scale)


@torch.library.custom_op("zoo::gated_delta_step", mutates_args=())
def _step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, K = q.shape
    V = v.shape[-1]
    new_state = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    bv = dot_block(V, 64)
    _step_kernel[(B * H, triton.cdiv(V, bv))](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        state.float().contiguous() if state is not None else None, new_state, o, scale, K, V,
        BK=dot_block(K, 256), BV=bv, HAS_STATE=state is not None,
    )  # fmt: skip
    return o, new_state


@_step.register_fake
def _(q, k, v, g, beta, state, scale):
    B, H, K = q.shape
    V = v.shape[-1]
    return q.new_empty(B, H, V), q.new_empty(B, H, K, V, dtype=torch.float32)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> list[int] | None:
    """Validate the public call; returns the packed sequence bounds as a host list, or None."""
    check_qkv("gated delta rule", q, k, v, chunk_size, g=g, beta=beta)
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != q.shape[:3]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but must be (B, T, H) = {tuple(q.shape[:3])} "
                "from q: one scalar per token and head"
            )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < math.inf
    ):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    bounds = check_cu_seqlens(cu_seqlens, q)
    check_initial_state(initial_state, q, v, bounds)
    return bounds


def gated_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule, the public entry point: (o (B, T, H, V), final_state | None).

    q, k: (B, T, H, K); v: (B, T, H, V); g (log decay, ≤ 0), beta (write strength, in [0, 1]):
    (B, T, H); initial_state: (B, H, K, V), kept in fp32; scale defaults to K^-1/2. q and k are
    used as given (normalise k in the layer). The values of g and beta are not checked: they are
    data. ``cu_seqlens`` packs variable-length sequences along T (B must be 1), with initial and
    final states (N, H, K, V). ``backend``: "auto" (Triton for CUDA tensors, the torch form
    otherwise; the environment variable ZOO_KERNEL_BACKEND overrides it), "torch" or "triton"
    (CUDA, or the CPU interpreter under TRITON_INTERPRET=1). A single token without autograd
    takes the decode step.
    """
    bounds = _check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size)
    _, T, H, K = q.shape
    V = v.shape[-1]
    scale = _default_scale(scale, K)
    per_token = (q, k, v, g, beta)
    if resolve_backend(backend, "gated delta rule", q) == "triton":
        if bounds is None and T == 1 and not needs_grad(*per_token, initial_state):
            o, state = gated_delta_step_triton(*(t[:, 0] for t in per_token), initial_state, scale)
            return o.unsqueeze(1), (state if output_final_state else None)
        return gated_delta_chunk_triton(
            *per_token, scale, initial_state, output_final_state, bounds, chunk_size
        )

    def scan(*args: torch.Tensor | bool | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v, g, beta, init, final = args
        if q.shape[1] == 1 and not needs_grad(q, k, v, g, beta, init):
            o, state = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], init, scale)
            return o.unsqueeze(1), (state if final else None)
        return gated_delta_chunk_torch(q, k, v, g, beta, scale, init, final, chunk_size)

    if bounds is None:
        return scan(*per_token, initial_state, output_final_state)
    return run_segments(scan, per_token, bounds, initial_state, output_final_state, (H, K, V))
