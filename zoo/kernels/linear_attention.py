"""Chunked linear attention in Triton: one kernel family for TNL, cosFormer2, GLA (HGRN2) and
Mamba2's SSD (`zoo.kernels.ssd`, its scalar decay spread over the key channels).

The three linear mixers share one recurrence over a K×V state per head, kept in fp32,

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ,        o_t = scale · q_tᵀ S_t,

and differ only in the decay g_t, which is a compile-time mode of every kernel here:

* ``DECAY_NONE``: g = 0, cosFormer2 (its LRPE is applied to q and k before the op);
* ``DECAY_HEAD``: g_t = log λ_h, one constant per head, TNL's lightning attention;
* ``DECAY_KEY``: g_t ∈ (-∞, 0]^K per token and key channel, gated linear attention (HGRN2's op,
  fla's ``chunk_gla``).

The references are the torch forms in `zoo.kernels.lightning` and `zoo.kernels.gla`, and their
docstrings derive the chunked form used here (chunk length C, b the in-chunk cumsum of g):
o = (q ⊙ e^b) S_n + intra-chunk attention, and S_{n+1} = e^{b_C} S_n + Σ_j (k_j ⊙ e^{b_C-b_j}) v_jᵀ.

Kernels, each one program per tile and head:

* ``_states_kernel`` walks a sequence's chunks in order and writes the state entering every
  chunk (fp32) and optionally the final state; in reverse (backward) it walks them last first
  and writes the gradient of the state leaving every chunk, and that of the initial state.
* ``_output_kernel``: o for a tile of rows of a chunk. For a per-head or no decay the intra-chunk
  part is one masked C×C product on tensor cores. For a per-key decay, e^{b_i-b_j} does not
  factor without overflow, so (as in GLA) a chunk is cut into row tiles of ``_SUB`` tokens: earlier
  keys are met through the reference b at the tile's first row (both exponents ≤ 0, dense
  products), the tile's own keys through an exact R×R×K elementwise product.
* ``_grads_kernel``: dq, dk, dv for a tile of rows, recomputing the intra-chunk scores.

The gradient of the decay needs no kernel: with B the running sum of g, every path from q_t
carries +B_t and every path from k_t carries -B_t, so dL/dB_t = q_t ⊙ dq_t - k_t ⊙ dk_t (plus
S_T ⊙ dS_T at a sequence's last token), and dg is its reverse cumsum within each sequence.

Layout follows fla and the torch forms: q, k, g (B, T, H, K); v (B, T, H, V); states
(·, H, K, V) fp32. Batches are folded into one token axis with sequence bounds ``cu``, so a batch
of B equal rows and a packed ``cu_seqlens`` batch run the same code. Inputs may be bf16, fp16 or
fp32; products accumulate in fp32 (fp32 inputs use exact fp32 products, others tensor cores).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import (
    ChunkTable,
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

HAS_TRITON = triton is not None

__all__ = [
    "DECAY_HEAD",
    "DECAY_KEY",
    "DECAY_NONE",
    "HAS_TRITON",
    "chunk_linear_attention",
    "dispatch",
    "linear_attention_step",
]

DECAY_NONE, DECAY_HEAD, DECAY_KEY = 0, 1, 2
# Row tile of the per-key decay (GLA's secondary chunking): the R×R×K exact product grows as R².
_SUB = 16
# Tile shapes and warps: ptxas (sm_90, bf16) reports no register spills for the chunk kernels at
# 8 warps with 64-wide tiles (32-wide in the gradient kernel and for the per-key decay); at
# 4 warps they spill up to 4.7 KB per thread. Measured offline, tests/kernels/sm90_compile.py.
_WARPS = 8


if triton is not None:

    @triton.jit
    def _chunk_cumsum_kernel(
        g_ptr, b_ptr, chunk_start_ptr, chunk_len_ptr, H, K,
        C: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        """b = cumsum of g within each chunk, fp32 (per-key decay only)."""
        n = tl.program_id(0)
        h = tl.program_id(1)
        t0 = tl.load(chunk_start_ptr + n).to(tl.int64)
        length = tl.load(chunk_len_ptr + n)
        rows = tl.arange(0, C)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            mask = (rows[:, None] < length) & (ks[None, :] < K)
            offs = ((t0 + rows[:, None]) * H + h) * K + ks[None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(b_ptr + offs, tl.cumsum(g, axis=0), mask=mask)

    @triton.jit
    def _states_kernel(
        x_ptr, y_ptr, b_ptr, ld_ptr, start_ptr, chunk_states_ptr, end_ptr, cu_ptr,
        chunk_offset_ptr, scale, H, K, V,
        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr,
        REVERSE: tl.constexpr, HAS_START: tl.constexpr, STORE_END: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        """The K×V recurrence over one sequence's chunks, one tile of it: S ← e^{b_L} S + x̃ᵀ y.

        Forward: x = k with x̃ = k ⊙ e^{b_L - b_i} (its decay to the chunk's end), y = v, from
        the initial state; writes the state entering each chunk, then the final state.
        REVERSE (backward): x = q with x̃ = scale · q ⊙ e^{b_i} (its decay from the chunk's
        start), y = do, from the final state's gradient, last chunk first; writes the gradient
        of the state leaving each chunk, then that of the initial state.
        """
        pk, pv, seq_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq, h = seq_head // H, seq_head % H
        tok0 = tl.load(cu_ptr + seq).to(tl.int64)
        tok1 = tl.load(cu_ptr + seq + 1).to(tl.int64)
        chunk0 = tl.load(chunk_offset_ptr + seq).to(tl.int64)
        ks = pk * BK + tl.arange(0, BK)
        vs = pv * BV + tl.arange(0, BV)
        rows = tl.arange(0, C)
        kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
        kv_offs = ks[:, None] * V + vs[None, :]
        state = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_START:
            state += tl.load(start_ptr + seq_head.to(tl.int64) * K * V + kv_offs, mask=kv_mask)
        if DECAY == 1:
            ld = tl.load(ld_ptr + h)
        num_chunks = tl.cdiv(tok1 - tok0, C)
        for i in range(num_chunks):
            n = num_chunks - 1 - i if REVERSE else i
            tl.store(
                chunk_states_ptr + ((chunk0 + n) * H + h) * K * V + kv_offs, state, mask=kv_mask
            )
            t = tok0 + n * C
            length = tl.minimum(tok1 - t, C)
            ok = rows < length
            k_mask = ok[:, None] & (ks[None, :] < K)
            xt = tl.load(x_ptr + ((t + rows[:, None]) * H + h) * K + ks[None, :], mask=k_mask,
                         other=0.0)  # fmt: skip
            yt = tl.load(
                y_ptr + ((t + rows[:, None]) * H + h) * V + vs[None, :],
                mask=ok[:, None] & (vs[None, :] < V), other=0.0,
            )  # fmt: skip
            xw = xt.to(tl.float32)
            if REVERSE:
                xw *= scale
            if DECAY == 1:
                power = rows + 1 if REVERSE else length - 1 - rows
                xw *= tl.exp(tl.where(ok, power * ld, float("-inf")))[:, None]
                state *= tl.exp(length * ld)
            if DECAY == 2:
                bt = tl.load(b_ptr + ((t + rows[:, None]) * H + h) * K + ks[None, :], mask=k_mask,
                             other=0.0)  # fmt: skip
                b_last = tl.load(
                    b_ptr + ((t + length - 1) * H + h) * K + ks, mask=ks < K, other=0.0
                )
                if REVERSE:
                    xw *= tl.exp(bt)
                else:
                    xw *= tl.exp(tl.where(ok[:, None], b_last[None, :] - bt, float("-inf")))
                state *= tl.exp(b_last)[:, None]
            state += tl.dot(tl.trans(xw.to(yt.dtype)), yt, input_precision=PREC)
        if STORE_END:
            tl.store(end_ptr + seq_head.to(tl.int64) * K * V + kv_offs, state, mask=kv_mask)

    @triton.jit
    def _tile(ptr, t0, rows, mask, h, H, D, cols):
        """Rows `rows` of a chunk starting at token t0, head h, columns `cols` of a (T, H, D)
        tensor; zeros where `mask` (rows × cols) is false."""
        return tl.load(
            ptr + ((t0 + rows[:, None]) * H + h) * D + cols[None, :], mask=mask, other=0.0
        )

    @triton.jit
    def _output_kernel(
        q_ptr, k_ptr, v_ptr, b_ptr, ld_ptr, states_ptr, o_ptr, chunk_start_ptr, chunk_len_ptr,
        scale, H, K, V,
        C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        DECAY: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """o for rows r0 .. r0+R of one chunk, one head, one block of V."""
        tile, pv, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n = tile // (C // R)
        r0 = (tile % (C // R)) * R
        t0 = tl.load(chunk_start_ptr + n).to(tl.int64)
        length = tl.load(chunk_len_ptr + n)
        if r0 >= length:
            return
        rows = r0 + tl.arange(0, R)  # this tile's rows, chunk-relative
        ok = rows < length
        cols = tl.arange(0, C)  # every row of the chunk
        earlier = cols < r0
        vs = pv * BV + tl.arange(0, BV)
        causal = (rows[:, None] >= rows[None, :]) & ok[:, None]
        state_base = states_ptr + (n * H + h) * K * V
        o = tl.zeros((R, BV), dtype=tl.float32)
        scores = tl.zeros((R, R), dtype=tl.float32)
        scores_earlier = tl.zeros((R, C), dtype=tl.float32)
        if DECAY == 1:
            ld = tl.load(ld_ptr + h)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            qt = _tile(q_ptr, t0, rows, ok[:, None] & (ks[None, :] < K), h, H, K, ks)
            kt = _tile(k_ptr, t0, rows, ok[:, None] & (ks[None, :] < K), h, H, K, ks)
            state = tl.load(
                state_base + ks[:, None] * V + vs[None, :],
                mask=(ks[:, None] < K) & (vs[None, :] < V), other=0.0,
            )  # fmt: skip
            qf = qt.to(tl.float32)
            if DECAY == 2:
                bt = _tile(b_ptr, t0, rows, ok[:, None] & (ks[None, :] < K), h, H, K, ks)
                o += tl.dot(qf * tl.exp(bt), state, input_precision=PREC)
                # The tile's own keys, exactly: e^(b_i - b_j) with i >= j, never a positive power.
                diff = tl.where(causal[:, :, None], bt[:, None, :] - bt[None, :, :], float("-inf"))
                scores += tl.sum(qf[:, None, :] * kt.to(tl.float32)[None, :, :] * tl.exp(diff), 2)
                # Earlier keys through the reference b at row r0: b_i - b_r0 <= 0 <= b_j - b_r0.
                b_ref = tl.load(b_ptr + ((t0 + r0) * H + h) * K + ks, mask=ks < K, other=0.0)
                kc = _tile(k_ptr, t0, cols, earlier[:, None] & (ks[None, :] < K), h, H, K, ks)
                bc = _tile(b_ptr, t0, cols, earlier[:, None] & (ks[None, :] < K), h, H, K, ks)
                kw = tl.exp(tl.where(earlier[:, None], b_ref[None, :] - bc, float("-inf")))
                qw = tl.exp(tl.where(ok[:, None], bt - b_ref[None, :], float("-inf")))
                scores_earlier += tl.dot(
                    (qf * qw).to(qt.dtype), tl.trans((kc.to(tl.float32) * kw).to(qt.dtype)),
                    input_precision=PREC,
                )  # fmt: skip
            else:
                qd = qf
                if DECAY == 1:
                    qd *= tl.exp(tl.where(ok, (rows + 1) * ld, float("-inf")))[:, None]
                o += tl.dot(qd, state, input_precision=PREC)
                scores += tl.dot(qt, tl.trans(kt), input_precision=PREC)
        if DECAY == 0:
            scores = tl.where(causal, scores, 0.0)
        if DECAY == 1:
            scores *= tl.exp(tl.where(causal, (rows[:, None] - rows[None, :]) * ld, float("-inf")))
        vt = _tile(v_ptr, t0, rows, ok[:, None] & (vs[None, :] < V), h, H, V, vs)
        o += tl.dot(scores.to(vt.dtype), vt, input_precision=PREC)
        if DECAY == 2:
            vc = _tile(v_ptr, t0, cols, earlier[:, None] & (vs[None, :] < V), h, H, V, vs)
            o += tl.dot(scores_earlier.to(vt.dtype), vc, input_precision=PREC)
        tl.store(
            o_ptr + ((t0 + rows[:, None]) * H + h) * V + vs[None, :],
            (o * scale).to(o_ptr.dtype.element_ty),
            mask=ok[:, None] & (vs[None, :] < V),
        )

    @triton.jit
    def _grads_kernel(
        q_ptr, k_ptr, v_ptr, b_ptr, ld_ptr, states_ptr, dstates_ptr, do_ptr,
        dq_ptr, dk_ptr, dv_ptr, chunk_start_ptr, chunk_len_ptr,
        scale, H, K, V,
        C: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        DECAY: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """dq, dk (fp32) and dv for rows r0 .. r0+R of one chunk and one head.

        The rows act as queries (dq: the tile's own and earlier keys, and the state entering the
        chunk) and as keys and values (dk, dv: the tile's own and later queries, and the
        gradient of the state leaving the chunk).
        """
        tile, h = tl.program_id(0), tl.program_id(1)
        n = tile // (C // R)
        r0 = (tile % (C // R)) * R
        t0 = tl.load(chunk_start_ptr + n).to(tl.int64)
        length = tl.load(chunk_len_ptr + n)
        if r0 >= length:
            return
        rows = r0 + tl.arange(0, R)
        ok = rows < length
        cols = tl.arange(0, C)
        earlier = cols < r0
        later = (cols >= r0 + R) & (cols < length)
        causal = (rows[:, None] >= rows[None, :]) & ok[:, None]
        state_base = (n * H + h) * K * V
        if DECAY == 1:
            ld = tl.load(ld_ptr + h)

        # Score gradients dA[i, j] = scale · do_i · v_j, reduced over V.
        d_scores = tl.zeros((R, R), dtype=tl.float32)
        d_scores_earlier = tl.zeros((R, C), dtype=tl.float32)  # this tile's queries, earlier keys
        d_scores_later = tl.zeros((C, R), dtype=tl.float32)  # later queries, this tile's keys
        for v0 in range(0, V, BV):
            vs = v0 + tl.arange(0, BV)
            do_t = _tile(do_ptr, t0, rows, ok[:, None] & (vs[None, :] < V), h, H, V, vs)
            vt = _tile(v_ptr, t0, rows, ok[:, None] & (vs[None, :] < V), h, H, V, vs)
            d_scores += tl.dot(do_t, tl.trans(vt), input_precision=PREC)
            if DECAY == 2:
                vc = _tile(v_ptr, t0, cols, earlier[:, None] & (vs[None, :] < V), h, H, V, vs)
                do_c = _tile(do_ptr, t0, cols, later[:, None] & (vs[None, :] < V), h, H, V, vs)
                d_scores_earlier += tl.dot(do_t, tl.trans(vc), input_precision=PREC)
                d_scores_later += tl.dot(do_c, tl.trans(vt), input_precision=PREC)
        if DECAY == 1:
            mask = tl.exp(tl.where(causal, (rows[:, None] - rows[None, :]) * ld, float("-inf")))
        else:
            mask = tl.where(causal, 1.0, 0.0)
        d_scores *= mask * scale
        d_scores_earlier *= scale
        d_scores_later *= scale

        # dq and dk per block of K, and the scores A (reduced over K) that dv needs.
        scores = tl.zeros((R, R), dtype=tl.float32)
        scores_later = tl.zeros((C, R), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            tile_mask = ok[:, None] & (ks[None, :] < K)
            qt = _tile(q_ptr, t0, rows, tile_mask, h, H, K, ks)
            kt = _tile(k_ptr, t0, rows, tile_mask, h, H, K, ks)
            qf, kf = qt.to(tl.float32), kt.to(tl.float32)
            dq = tl.zeros((R, BK), dtype=tl.float32)
            dk = tl.zeros((R, BK), dtype=tl.float32)
            for v0 in range(0, V, BV):
                vs = v0 + tl.arange(0, BV)
                kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
                state = tl.load(states_ptr + state_base + ks[:, None] * V + vs[None, :],
                                mask=kv_mask, other=0.0)  # fmt: skip
                dstate = tl.load(dstates_ptr + state_base + ks[:, None] * V + vs[None, :],
                                 mask=kv_mask, other=0.0)  # fmt: skip
                do_t = _tile(do_ptr, t0, rows, ok[:, None] & (vs[None, :] < V), h, H, V, vs)
                vt = _tile(v_ptr, t0, rows, ok[:, None] & (vs[None, :] < V), h, H, V, vs)
                dq += tl.dot(do_t.to(tl.float32), tl.trans(state), input_precision=PREC)
                dk += tl.dot(vt.to(tl.float32), tl.trans(dstate), input_precision=PREC)
            if DECAY == 0:
                dq *= scale
            if DECAY == 1:
                dq *= tl.exp(tl.where(ok, (rows + 1) * ld, float("-inf")))[:, None] * scale
                dk *= tl.exp(tl.where(ok, (length - 1 - rows) * ld, float("-inf")))[:, None]
            if DECAY == 2:
                bt = _tile(b_ptr, t0, rows, tile_mask, h, H, K, ks)
                b_last = tl.load(
                    b_ptr + ((t0 + length - 1) * H + h) * K + ks, mask=ks < K, other=0.0
                )
                dq *= tl.exp(bt) * scale
                dk *= tl.exp(tl.where(ok[:, None], b_last[None, :] - bt, float("-inf")))
            if DECAY == 2:
                diff = tl.where(causal[:, :, None], bt[:, None, :] - bt[None, :, :], float("-inf"))
                decay = tl.exp(diff)  # (R, R, BK): e^(b_i - b_j) for i >= j, else 0
                dq += tl.sum(d_scores[:, :, None] * kf[None, :, :] * decay, 1)
                dk += tl.sum(d_scores[:, :, None] * qf[:, None, :] * decay, 0)
                scores += tl.sum(qf[:, None, :] * kf[None, :, :] * decay, 2)
                bc = _tile(b_ptr, t0, cols, (cols < length)[:, None] & (ks[None, :] < K),
                           h, H, K, ks)  # fmt: skip
                # Earlier keys, referenced at row r0 as in the forward kernel.
                b_ref = tl.load(b_ptr + ((t0 + r0) * H + h) * K + ks, mask=ks < K, other=0.0)
                kc = _tile(k_ptr, t0, cols, earlier[:, None] & (ks[None, :] < K), h, H, K, ks)
                kw = tl.exp(tl.where(earlier[:, None], b_ref[None, :] - bc, float("-inf")))
                qw = tl.exp(tl.where(ok[:, None], bt - b_ref[None, :], float("-inf")))
                dq += qw * tl.dot(
                    d_scores_earlier.to(qt.dtype), (kc.to(tl.float32) * kw).to(qt.dtype),
                    input_precision=PREC,
                )  # fmt: skip
                # Later queries, referenced at the tile's last row r1: b_i <= b_r1 <= b_j.
                r1 = tl.minimum(r0 + R, length) - 1
                b_ref = tl.load(b_ptr + ((t0 + r1) * H + h) * K + ks, mask=ks < K, other=0.0)
                qc = _tile(q_ptr, t0, cols, later[:, None] & (ks[None, :] < K), h, H, K, ks)
                qcw = (qc.to(tl.float32) * tl.exp(
                    tl.where(later[:, None], bc - b_ref[None, :], float("-inf"))
                )).to(qt.dtype)  # fmt: skip
                kw = tl.exp(tl.where(ok[:, None], b_ref[None, :] - bt, float("-inf")))
                dk += kw * tl.dot(tl.trans(d_scores_later).to(qt.dtype), qcw, input_precision=PREC)
                scores_later += tl.dot(qcw, tl.trans((kf * kw).to(qt.dtype)), input_precision=PREC)
            else:
                dq += tl.dot(d_scores.to(kt.dtype), kt, input_precision=PREC)
                dk += tl.dot(tl.trans(d_scores).to(qt.dtype), qt, input_precision=PREC)
                scores += tl.dot(qt, tl.trans(kt), input_precision=PREC)
            out_offs = ((t0 + rows[:, None]) * H + h) * K + ks[None, :]
            tl.store(dq_ptr + out_offs, dq, mask=tile_mask)
            tl.store(dk_ptr + out_offs, dk, mask=tile_mask)
        if DECAY == 2:
            scores *= scale
        else:
            scores *= mask * scale
        scores_later *= scale

        # dv = Aᵀ do over this tile's and later queries, plus the state path (k ⊙ decay) dS.
        for v0 in range(0, V, BV):
            vs = v0 + tl.arange(0, BV)
            do_t = _tile(do_ptr, t0, rows, ok[:, None] & (vs[None, :] < V), h, H, V, vs)
            dv = tl.dot(tl.trans(scores).to(do_t.dtype), do_t, input_precision=PREC)
            if DECAY == 2:
                do_c = _tile(do_ptr, t0, cols, later[:, None] & (vs[None, :] < V), h, H, V, vs)
                dv += tl.dot(tl.trans(scores_later).to(do_t.dtype), do_c, input_precision=PREC)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                tile_mask = ok[:, None] & (ks[None, :] < K)
                kd = _tile(k_ptr, t0, rows, tile_mask, h, H, K, ks).to(tl.float32)
                if DECAY == 1:
                    kd *= tl.exp(tl.where(ok, (length - 1 - rows) * ld, float("-inf")))[:, None]
                if DECAY == 2:
                    bt = _tile(b_ptr, t0, rows, tile_mask, h, H, K, ks)
                    b_last = tl.load(
                        b_ptr + ((t0 + length - 1) * H + h) * K + ks, mask=ks < K, other=0.0
                    )
                    kd *= tl.exp(tl.where(ok[:, None], b_last[None, :] - bt, float("-inf")))
                dstate = tl.load(
                    dstates_ptr + state_base + ks[:, None] * V + vs[None, :],
                    mask=(ks[:, None] < K) & (vs[None, :] < V), other=0.0,
                )  # fmt: skip
                dv += tl.dot(kd, dstate, input_precision=PREC)
            tl.store(
                dv_ptr + ((t0 + rows[:, None]) * H + h) * V + vs[None, :],
                dv.to(dv_ptr.dtype.element_ty),
                mask=ok[:, None] & (vs[None, :] < V),
            )

    @triton.jit
    def _step_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, ld_ptr, state_ptr, new_state_ptr, o_ptr,
        scale, H, K, V,
        BK: tl.constexpr, BV: tl.constexpr, DECAY: tl.constexpr, HAS_STATE: tl.constexpr,
    ):  # fmt: skip
        """One decode step for one (batch, head) and block of V: S' = e^g S + k vᵀ, o = q S'."""
        bh, pv = tl.program_id(0), tl.program_id(1)
        vs = pv * BV + tl.arange(0, BV)
        v = tl.load(v_ptr + bh * V + vs, mask=vs < V, other=0.0).to(tl.float32)
        o = tl.zeros((BV,), dtype=tl.float32)
        base = bh.to(tl.int64) * K * V
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            kv_mask = (ks[:, None] < K) & (vs[None, :] < V)
            offs = base + ks[:, None] * V + vs[None, :]
            q = tl.load(q_ptr + bh * K + ks, mask=ks < K, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + bh * K + ks, mask=ks < K, other=0.0).to(tl.float32)
            state = k[:, None] * v[None, :]
            if HAS_STATE:
                old = tl.load(state_ptr + offs, mask=kv_mask, other=0.0)
                if DECAY == 0:
                    state += old
                if DECAY == 1:
                    state += tl.exp(tl.load(ld_ptr + bh % H)) * old
                if DECAY == 2:
                    g = tl.load(g_ptr + bh * K + ks, mask=ks < K, other=0.0).to(tl.float32)
                    state += tl.exp(g)[:, None] * old
            tl.store(new_state_ptr + offs, state, mask=kv_mask)
            o += tl.sum(q[:, None] * state, 0)
        tl.store(o_ptr + bh * V + vs, (o * scale).to(o_ptr.dtype.element_ty), mask=vs < V)


def _chunk_cumsum(g: torch.Tensor, chunks: ChunkTable) -> torch.Tensor:
    _, H, K = g.shape
    b = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    _chunk_cumsum_kernel[(chunks.num_chunks, H)](
        g, b, chunks.chunk_start, chunks.chunk_len, H, K, C=chunks.chunk, BK=dot_block(K, 64)
    )
    return b


def _states(x, y, b, ld, start, chunks: ChunkTable, decay: int, store_end: bool, reverse: bool,
            scale: float = 1.0):  # fmt: skip
    """Run `_states_kernel`: (per-chunk states (N, H, K, V), end state (S, H, K, V) or None)."""
    _, H, K = x.shape
    V = y.shape[-1]
    chunk_states = torch.empty(chunks.num_chunks, H, K, V, device=x.device, dtype=torch.float32)
    end = None
    if store_end:
        end = torch.empty(chunks.num_seqs, H, K, V, device=x.device, dtype=torch.float32)
    bk, bv = dot_block(K, 64), dot_block(V, 64)
    grid = (triton.cdiv(K, bk), triton.cdiv(V, bv), chunks.num_seqs * H)
    _states_kernel[grid](
        x, y, b, ld, start, chunk_states, end, chunks.cu, chunks.chunk_offset,
        scale, H, K, V,
        C=chunks.chunk, BK=bk, BV=bv, DECAY=decay, REVERSE=reverse,
        HAS_START=start is not None, STORE_END=store_end, PREC=dot_precision(x.dtype),
        num_warps=_WARPS,
    )  # fmt: skip
    return chunk_states, end


def _decay_inputs(
    decay_arg: torch.Tensor, decay: int, chunks: ChunkTable
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(log λ (H,) fp32 for a per-head decay, in-chunk cumsum b (T, H, K) for a per-key one)."""
    ld = decay_arg.float().contiguous() if decay == DECAY_HEAD else None
    b = _chunk_cumsum(fold_batch(decay_arg), chunks) if decay == DECAY_KEY else None
    return ld, b


def _row_tile(decay: int, chunk: int) -> int:
    return _SUB if decay == DECAY_KEY else chunk


# The Triton forms are torch.library custom ops: torch.compile treats each as one opaque node
# (its fake implementation gives the output shapes) instead of breaking the graph at a Python
# autograd.Function, and the backward is a second op registered as the first one's autograd.
# The ops take the decay mode and the sequence bounds as plain ints; `chunk_linear_attention`
# below is the Python face.


@torch.library.custom_op("zoo::chunk_linear_attention", mutates_args=())
def _chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_arg: torch.Tensor,
    h0: torch.Tensor | None,
    scale: float,
    decay: int,
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
    ld, b = _decay_inputs(decay_arg, decay, chunks)
    h0c = h0.float().contiguous() if h0 is not None else None
    states, ht = _states(kf, vf, b, ld, h0c, chunks, decay, final, reverse=False)
    o = torch.empty(qf.shape[0], H, V, device=q.device, dtype=q.dtype)
    rows = _row_tile(decay, chunk)
    bk, bv = dot_block(K, 64), dot_block(V, 64)
    grid = (chunks.num_chunks * (chunk // rows), triton.cdiv(V, bv), H)
    _output_kernel[grid](
        qf, kf, vf, b, ld, states, o, chunks.chunk_start, chunks.chunk_len,
        scale, H, K, V,
        C=chunk, R=rows, BK=bk if decay != DECAY_KEY else dot_block(K, 32), BV=bv,
        DECAY=decay, PREC=dot_precision(q.dtype), num_warps=_WARPS,
    )  # fmt: skip
    return o.view(B, T, H, V), ht if ht is not None else q.new_empty(0, dtype=torch.float32)


@_chunk_forward.register_fake
def _(q, k, v, decay_arg, h0, scale, decay, bounds, chunk, final, packed):
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    shape = (len(bounds) - 1, H, K, V) if final else (0,)
    return q.new_empty(*q.shape[:3], V), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("zoo::chunk_linear_attention_backward", mutates_args=())
def _chunk_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay_arg: torch.Tensor,
    h0: torch.Tensor | None,
    ht: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    decay: int,
    bounds: list[int],
    chunk: int,
    packed: bool,
    decay_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_decay, dh0): the last two empty where not wanted."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunks = ChunkTable(bounds, chunk, q.device, None if packed else T)
    qf, kf, vf = fold_batch(q), fold_batch(k), fold_batch(v)
    ld, b = _decay_inputs(decay_arg, decay, chunks)
    h0c = h0.float().contiguous() if h0 is not None else None
    do = fold_batch(do).to(q.dtype)
    states, _ = _states(kf, vf, b, ld, h0c, chunks, decay, False, reverse=False)
    dht = dht.float().contiguous() if dht is not None else None
    dstates, dh0 = _states(qf, do, b, ld, dht, chunks, decay, h0 is not None, True, scale)
    dq = torch.empty(qf.shape, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(vf)
    rows = _row_tile(decay, chunks.chunk)
    _grads_kernel[(chunks.num_chunks * (chunks.chunk // rows), H)](
        qf, kf, vf, b, ld, states, dstates, do, dq, dk, dv,
        chunks.chunk_start, chunks.chunk_len,
        scale, H, K, V,
        C=chunks.chunk, R=rows, BK=dot_block(K, 32), BV=dot_block(V, 32),
        DECAY=decay, PREC=dot_precision(q.dtype), num_warps=_WARPS,
    )  # fmt: skip
    d_decay = q.new_empty(0)
    if decay != DECAY_NONE and decay_grad:
        d_decay = _decay_grad(qf, kf, dq, dk, ht if dht is not None else None, dht, chunks, decay)
        d_decay = d_decay.view(decay_arg.shape).to(decay_arg.dtype)
    return (
        dq.view(B, T, H, K).to(q.dtype),
        dk.view(B, T, H, K).to(k.dtype),
        dv.view(B, T, H, V),
        d_decay,
        dh0 if dh0 is not None else q.new_empty(0, dtype=torch.float32),
    )


@_chunk_backward.register_fake
def _(q, k, v, decay_arg, h0, ht, do, dht, scale, decay, bounds, chunk, packed, decay_grad):
    wanted = decay != DECAY_NONE and decay_grad
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(decay_arg) if wanted else q.new_empty(0),
        torch.empty_like(h0, dtype=torch.float32) if h0 is not None else q.new_empty(0),
    )


def _chunk_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, decay_arg, h0, scale, decay, bounds, chunk, final, packed = inputs
    ctx.save_for_backward(q, k, v, decay_arg, h0, output[1])
    ctx.meta = (scale, decay, bounds, chunk, final, packed)


def _chunk_autograd(ctx: Any, do: torch.Tensor, dht: torch.Tensor) -> tuple:
    q, k, v, decay_arg, h0, ht = ctx.saved_tensors
    scale, decay, bounds, chunk, final, packed = ctx.meta
    dq, dk, dv, d_decay, dh0 = _chunk_backward(
        q, k, v, decay_arg, h0, ht, do, dht if final else None,
        scale, decay, bounds, chunk, packed, ctx.needs_input_grad[3],
    )  # fmt: skip
    wanted = decay != DECAY_NONE and ctx.needs_input_grad[3]
    return (
        dq, dk, dv, d_decay if wanted else None, dh0 if h0 is not None else None,
        *(None,) * 6,
    )  # fmt: skip


_chunk_forward.register_autograd(_chunk_autograd, setup_context=_chunk_setup)


def _decay_grad(q, k, dq, dk, ht, dht, chunks: ChunkTable, decay: int) -> torch.Tensor:
    """dg from dL/dB_t = q ⊙ dq − k ⊙ dk (see the module docstring), per folded token (T, H, K),
    or summed into dlog λ (H,) for a per-head decay."""
    d_cum = q.float() * dq - k.float() * dk  # (T, H, K)
    if chunks.row_length is not None:
        # B rows of equal length: one batched reverse cumsum, no loop over sequences.
        rows = d_cum.view(chunks.num_seqs, chunks.row_length, *d_cum.shape[1:])  # (B, T, H, K)
        if dht is not None:
            # The final state carries +B at each sequence's last token: Σ_v S_T ⊙ dS_T.
            rows[:, -1] += (ht * dht.float()).sum(-1)
        if decay == DECAY_KEY:
            return rows.flip(1).cumsum(1).flip(1).view(d_cum.shape)
        # Σ_t Σ_{s >= t} x_s = Σ_s (s + 1) x_s within a sequence.
        weight = torch.arange(1, chunks.row_length + 1, device=q.device, dtype=torch.float32)
        return torch.einsum("bthk,t->h", rows, weight)
    spans = list(itertools.pairwise(chunks.bounds))
    if dht is not None:
        for i, (start, end) in enumerate(spans):
            if end > start:
                d_cum[end - 1] += (ht[i] * dht[i].float()).sum(-1)
    out = torch.zeros_like(d_cum) if decay == DECAY_KEY else d_cum.new_zeros(d_cum.shape[1])
    for start, end in spans:
        if end == start:
            continue
        piece = d_cum[start:end]  # (L, H, K)
        if decay == DECAY_KEY:
            out[start:end] = piece.flip(0).cumsum(0).flip(0)
        else:
            weight = torch.arange(1, end - start + 1, device=piece.device, dtype=piece.dtype)
            out += torch.einsum("thk,t->h", piece, weight)
    return out


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_decay: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: list[int] | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton chunked form, differentiable in q, k, v, the decay and the initial state.

    At most one of ``log_decay`` (H,) (per-head decay) and ``g`` (B, T, H, K) (per-key decay);
    neither means no decay. ``cu_seqlens`` are host-side sequence bounds over T (B = 1). The
    chunk length is ``chunk_size`` rounded to a power of two in [16, 64], the tile sizes the
    kernels are built for. Inputs are validated by the callers (`lightning`, `gla`).
    """
    if triton is None:
        raise ImportError("the Triton linear-attention kernels need triton (pip install triton)")
    if log_decay is not None and g is not None:
        raise ValueError("pass log_decay (per head) or g (per key channel), not both")
    B, T = q.shape[:2]
    bounds = list(cu_seqlens) if cu_seqlens is not None else [b * T for b in range(B + 1)]
    chunk = dot_block(chunk_size, 64)
    if g is not None:
        decay, decay_arg = DECAY_KEY, g
    elif log_decay is not None:
        decay, decay_arg = DECAY_HEAD, log_decay
    else:
        decay, decay_arg = DECAY_NONE, q.new_zeros(0)
    # One dtype for the tensor-core products (HGRN2 hands k over in fp32 whatever q is).
    k, v = k.to(q.dtype), v.to(q.dtype)
    packed = cu_seqlens is not None
    o, ht = _chunk_forward(
        q, k, v, decay_arg, initial_state, scale, decay, bounds, chunk, output_final_state, packed
    )
    return o, (ht if output_final_state else None)


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    *,
    log_decay: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused decode step (no autograd). q, k, g: (B, H, K); v: (B, H, V); state
    (B, H, K, V) fp32 or None. Returns o (B, H, V) in q's dtype and a new fp32 state."""
    return _step(q, k, v, state, log_decay, g, scale)


@torch.library.custom_op("zoo::linear_attention_step", mutates_args=())
def _step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor | None,
    log_decay: torch.Tensor | None,
    g: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, K = q.shape
    V = v.shape[-1]
    decay = DECAY_KEY if g is not None else DECAY_HEAD if log_decay is not None else DECAY_NONE
    new_state = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    o = torch.empty(B, H, V, device=q.device, dtype=q.dtype)
    bv = dot_block(V, 64)
    _step_kernel[(B * H, triton.cdiv(V, bv))](
        q.contiguous(), k.contiguous(), v.contiguous(),
        g.contiguous() if g is not None else None,
        log_decay.float().contiguous() if log_decay is not None else None,
        state.float().contiguous() if state is not None else None, new_state, o,
        scale, H, K, V,
        BK=dot_block(K, 64), BV=bv, DECAY=decay, HAS_STATE=state is not None,
    )  # fmt: skip
    return o, new_state


@_step.register_fake
def _(q, k, v, state, log_decay, g, scale):
    B, H, K = q.shape
    V = v.shape[-1]
    return q.new_empty(B, H, V), q.new_empty(B, H, K, V, dtype=torch.float32)


def dispatch(
    op: str,
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    per_token: dict[str, torch.Tensor],
    constants: dict[str, Any],
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    bounds: list[int] | None,
    chunk_size: int,
    torch_step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    torch_chunk: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one dispatch of the linear-attention ops (lightning, cosFormer2, GLA and SSD), after
    their inputs are checked: the Triton kernels here, or the op's torch forms.

    ``backend``: "auto" (Triton for CUDA tensors, the torch form otherwise; the environment
    variable ``ZOO_KERNEL_BACKEND`` overrides it), "torch", or "triton" (CUDA, or the CPU
    interpreter under TRITON_INTERPRET=1). ``per_token`` holds decay tensors with q's leading
    (B, T) axes, by the name the Triton functions take (GLA's ``g``); ``constants`` the rest of
    their keywords (lightning's ``log_decay`` and ``scale``). The torch forms take the per-token
    tensors positionally after q, k, v: ``torch_step(q, k, v, *per_token_t, state)`` for one
    token and ``torch_chunk(q, k, v, *per_token, state, output_final_state, chunk_size)``.
    A single token without autograd takes the fused decode step on either path; ``bounds``
    (packed sequences) run segment by segment on the torch path.
    """
    tensors = (q, k, v, *per_token.values())
    if resolve_backend(backend, op, q) == "triton":
        if bounds is None and q.shape[1] == 1 and not needs_grad(*tensors, initial_state):
            firsts = {name: t[:, 0] for name, t in per_token.items()}
            o, state = linear_attention_step(
                q[:, 0], k[:, 0], v[:, 0], initial_state, **constants, **firsts
            )
            return o.unsqueeze(1), (state if output_final_state else None)
        return chunk_linear_attention(
            q, k, v, **constants, **per_token, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=bounds, chunk_size=chunk_size,
        )  # fmt: skip

    def scan(*args: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        *segment, init, final = args  # q, k, v, per-token tensors of one sequence
        if segment[0].shape[1] == 1:
            o, state = torch_step(*(t[:, 0] for t in segment), init)
            return o.unsqueeze(1), (state if final else None)
        return torch_chunk(*segment, init, final, chunk_size)

    if bounds is None:
        return scan(*tensors, initial_state, output_final_state)
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    return run_segments(scan, tensors, bounds, initial_state, output_final_state, (H, K, V))
