"""Causal long convolution (Hyena's token mixer) and the causal short depthwise convolution.

Paper: "Hyena Hierarchy: Towards Larger Convolutional Language Models" (Poli et al., arXiv
2302.10866); reference code HazyResearch/safari (`fftconv_ref` in src/models/sequence/hyena.py).
Every channel d has its own filter k_d of length ≥ T and a skip weight bias_d:

    y_t = Σ_{s ≤ t} k_{t−s} ⊙ u_s  +  bias ⊙ u_t          (per channel, positions from 0)

There is no finite recurrence: the "state" after a prefix is the prefix itself, so
``initial_state`` is the history (B, S, D) of earlier inputs, the new inputs sit at positions
S … S+T−1 and the filter needs S+T taps. ``final_state`` is that history extended by u.

Three torch forms of the same sum:

* FFT (``long_conv_fft``): zero-pad history+u and the filter to n ≥ 2(S+T), multiply the rfft's
  and keep the last T outputs of the irfft: O(N log N) time and O(N) memory for N = S+T. safari
  uses n = 2N exactly; we round n up to the next 2·3·5-smooth size (same result, since any
  n ≥ 2N−1 avoids wrap-around), because pocketfft falls back to Bluestein on sizes with a large
  prime factor (N = 1021 ran 2x slower with n = 2N on our CPU).
* direct (``long_conv_direct``): a depthwise ``conv1d`` with the flipped filter, O(T·N) time and
  O(N) memory. It wins when few outputs are needed (short prompts, short continuations).
* step (``long_conv_step``): one new token, the dot product of the history with the flipped
  filter, O(N) — the decode path.

``long_conv_naive`` is the definition above, token by token in fp32: the oracle. Every form
computes in fp32 (torch.fft has no bf16) and returns u's dtype.

Layout: channels last, like the zoo layers: u (B, T, D), history (B, S, D), filters k (D, L)
with L ≥ S+T (only the first S+T taps are read), bias (D,).

``short_conv`` is the causal depthwise conv Hyena (and Mamba) put on the projections: weight
(C, K), y_t = Σ_j w_j ⊙ u_{t−K+1+j} + b, i.e. PyTorch's Conv1d(padding=K−1) truncated to the
first T outputs, as in safari; its state is the last K−1 inputs (B, K−1, C).

Triton kernels (fp32 accumulation for bf16, fp16 and fp32 inputs; no tensor cores: a depthwise
conv has no contraction over channels, so every kernel is elementwise multiply-adds over a
(rows × channels) tile, channels contiguous):

* ``_long_conv_kernel``: the direct long conv, one program per (block of output rows, block of
  channels, batch row), walking the lags j one at a time: y_p += taps_j ⊙ x_{p−j}, a shifted
  (rows × channels) tile of the sequence per lag. The skip weight is folded into tap 0
  (y_p = (k_0 + bias) ⊙ x_p + …), so one tap table (N, D) fp32 serves y, dx, dk and dbias. Its
  REVERSE mode is the backward for the inputs, dx_p = Σ_j taps_j ⊙ dy_{p+j}: the same walk
  anti-causally, over the history's positions too when the history needs a gradient. The lags
  where every row of the tile has its source row run without a per-lag mask (a load and a
  multiply-add per element); only the < 64 lags at the edges of the triangle check rows.
* ``_long_conv_taps_grad_kernel``: dtaps_j = Σ_t dy_t ⊙ x_{t−j} per batch row for a tile of
  lags, summed over the batch by the caller; dk = dtaps and dbias = dtaps_0.
* ``_long_conv_step_kernel``: one decode token, the history read in place (no concatenation).
* ``_short_conv_kernel`` / ``_short_conv_grad_kernel``: the K-tap short conv reading its state
  in place; the backward writes du, the state's gradient and per-block weight partials.

Both convs are differentiable custom ops (``long_conv_triton``, ``short_conv_triton``);
final states are concatenations in torch, so their gradients flow through autograd.

Dispatch (``long_conv``): "auto" picks the Triton path for CUDA tensors and the torch forms
otherwise (``ZOO_KERNEL_BACKEND`` overrides "auto"); "triton" also runs under TRITON_INTERPRET=1.
On the Triton path one decode token without autograd takes the step kernel, T ≤
``_TRITON_DIRECT_MAX_NEW_TOKENS`` new tokens the direct kernel, longer inputs the FFT form
(O(T·N) against O(N log N)). On the torch path: the step for T = 1, the direct conv for
T ≤ ``_DIRECT_MAX_NEW_TOKENS`` without autograd, the FFT otherwise. ``short_conv`` takes the
same ``backend``: its Triton kernels for any T (decode included), else the Conv1d form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU deps
    triton = None

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import check_tensors, needs_grad

HAS_TRITON = triton is not None

__all__ = [
    "HAS_TRITON",
    "long_conv",
    "long_conv_direct",
    "long_conv_fft",
    "long_conv_naive",
    "long_conv_step",
    "long_conv_step_triton",
    "long_conv_triton",
    "short_conv",
    "short_conv_naive",
    "short_conv_triton",
]


# Dispatch threshold, measured on this repo's 2-core CPU (torch 2.13, one thread, B=2,
# D ∈ {256, 864}, median of 11 runs, history empty so N = T): forward only, direct and FFT
# break even at T ≈ 128 (0.38 vs 0.35 ms at D=256, 1.12 vs 1.11 ms at D=864); at T = 64 the
# direct conv is 1.1-1.3x faster, at T = 256 the FFT 1.5x. With a long history the direct form
# wins for longer still (N = 2048, T = 64: 8.8 vs 34.5 ms): its cost grows with T·N, the FFT's
# with N log N.
# Backward is another matter: conv1d's weight gradient over a long kernel made forward+backward
# 1.4x (T = 16) to 7x (T = 256) slower than the FFT's, so with autograd recording we always FFT.
_DIRECT_MAX_NEW_TOKENS = 128
# The same choice on the Triton path (forward and backward alike: the Triton backward is the
# same O(T·N) walk, unlike conv1d's): new tokens up to this many run the direct kernel, more
# the FFT. Measured on an H200 in bf16 at (8, T, 2048) (benchmarks/results/gpu_ssm_conv.json,
# 2026-12-04): at T = 256 the direct kernel took 1.39x (forward) and 1.13x (forward+backward)
# the FFT form's time, so the FFT already wins there; shorter lengths were not measured (the
# benchmark now times T = 64 and 128 too). The direct kernel keeps chunked prefills and short
# continuations, where its T·N work shrinks with T while the FFT's does not.
_TRITON_DIRECT_MAX_NEW_TOKENS = 128
# Tiles: rows (output positions, or lags for the tap gradient) × channels, and warps. ptxas
# (sm_90, bf16 and fp32; tests/kernels/sm90_compile.py --spills) reports no spills for any
# kernel here: at 64×64 and 8 warps at most 145 registers a thread (47-80 once the channel
# count and pointers are 16-divisible, as a real launch specializes them, with vector loads);
# at 4 warps they needed up to 254 of the 255 registers.
_ROWS = 64
_CHANNELS = 64
_WARPS = 8
# The decode step: 64 history rows × 32 channels at 4 warps (72 registers, no spills); narrow
# channel blocks give a batch of one more programs to spread the history's read over.
_STEP_ROWS = 64
_STEP_CHANNELS = 32
_STEP_WARPS = 4


def _fft_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ n: sizes pocketfft transforms without Bluestein's detour."""
    best = 1 << (n - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            m = power35
            while m < n:
                m *= 2
            best = min(best, m)
            power35 *= 3
        power5 *= 5
    return best


def _with_history(u: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    """(B, S+T, D): history then the new inputs, the whole sequence the filter slides over."""
    if initial_state is None or initial_state.shape[1] == 0:
        return u
    return torch.cat([initial_state.to(u.dtype), u], dim=1)


def _finish(
    y: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    full: torch.Tensor,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Add the skip term in fp32, cast to u's dtype, and hand back the history if asked."""
    if bias is not None:
        y = y + u.float() * bias.float()
    return y.to(u.dtype), (full if output_final_state else None)


def long_conv_naive(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition, one output position at a time in fp32: the oracle of the other forms."""
    full = _with_history(u, initial_state)  # (B, N, D)
    N, T = full.shape[1], u.shape[1]
    xf, kf = full.float(), k.float()
    outs = []
    for t in range(N - T, N):
        # y_t = Σ_{s ≤ t} k_{t−s} u_s: taps t, t−1, …, 0 meet inputs 0, 1, …, t.
        taps = kf[:, : t + 1].flip(-1).t()  # (t+1, D)
        outs.append((xf[:, : t + 1] * taps).sum(dim=1))  # (B, D)
    y = torch.stack(outs, dim=1)  # (B, T, D)
    return _finish(y, u, bias, full, output_final_state)


def long_conv_step(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step. u: (B, D) at position S; history: (B, S, D) or None; k: (D, ≥ S+1).

    Returns y (B, D) in u's dtype and, if asked, the history extended by u (B, S+1, D); the
    history passed in is left untouched, so a cache can keep it.
    """
    S = 0 if history is None else history.shape[1]
    y = u.float() * k[:, 0].float()  # (B, D): the current token meets tap 0
    if S:
        # Tap S meets position 0, tap 1 meets position S−1: the flipped first S+1 taps.
        taps = k[:, 1 : S + 1].float().flip(-1)  # (D, S)
        y = y + torch.einsum("bsd,ds->bd", history.float(), taps)
    full = None
    if output_final_state:
        full = _with_history(u.unsqueeze(1), history)  # (B, S+1, D)
    return _finish(y, u, bias, full, output_final_state)


def long_conv_direct(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise conv1d with the flipped filter: O(T·N) time, O(N) memory, N = S+T."""
    full = _with_history(u, initial_state)  # (B, N, D)
    _, N, D = full.shape
    T = u.shape[1]
    # conv1d correlates: out_i = Σ_j w_j x_{i+j}. With w_j = k_{N−1−j} and T−1 zeros in front,
    # out_i is y at position S+i, so exactly the T new outputs come out.
    x = F.pad(full.float().transpose(1, 2), (T - 1, 0))  # (B, D, N+T−1)
    weight = k[:, :N].float().flip(-1).unsqueeze(1)  # (D, 1, N)
    y = F.conv1d(x, weight, groups=D).transpose(1, 2)  # (B, T, D)
    return _finish(y, u, bias, full, output_final_state)


def long_conv_fft(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FFT convolution: O(N log N) time, O(N) memory, N = S+T; differentiable."""
    full = _with_history(u, initial_state)  # (B, N, D)
    N = full.shape[1]
    T = u.shape[1]
    n = _fft_size(2 * N)
    # Time last, so each rfft runs over contiguous memory (25% faster than dim=1 here).
    x_f = torch.fft.rfft(full.float().transpose(1, 2), n=n)  # (B, D, n//2+1) complex
    k_f = torch.fft.rfft(k[:, :N].float(), n=n)  # (D, n//2+1) complex
    y = torch.fft.irfft(x_f * k_f, n=n)[..., N - T : N]  # (B, D, T)
    return _finish(y.transpose(1, 2), u, bias, full, output_final_state)


def short_conv_naive(
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``short_conv`` as a sum over its K taps in fp32 (tap K−1 meets the current token)."""
    _check_short_inputs(u, weight, bias, initial_state)
    B, T, C = u.shape
    K = weight.shape[1]
    if initial_state is None:
        initial_state = u.new_zeros(B, K - 1, C)
    full = torch.cat([initial_state.to(u.dtype), u], dim=1).float()  # (B, K−1+T, C)
    y = sum(full[:, j : j + T] * weight[:, j].float() for j in range(K))  # (B, T, C)
    if bias is not None:
        y = y + bias.float()
    return y.to(u.dtype), (full[:, T:].to(u.dtype) if output_final_state else None)


# --- Triton ---------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _lags(
        acc, x_base, taps_ptr, src, j0, j1, row_ok, ds, d_ok, D, x_rows,
        STEP: tl.constexpr, CHECK: tl.constexpr,
    ):  # fmt: skip
        """acc += Σ_{j0 ≤ j < j1} taps_j ⊙ x_{src + STEP·(j − j0)}, a (rows × channels) tile a lag:
        `src` are the source rows at lag j0, moving by STEP (−1 causal, +1 anti-causal) per lag.
        CHECK: some source rows leave [0, x_rows) within these lags and are masked lag by lag;
        otherwise the mask is loop-invariant and the inner loop is a load and a multiply-add."""
        offs = src[:, None] * D + ds[None, :]
        tile_ok = row_ok[:, None] & d_ok[None, :]
        for j in range(j0, j1):
            tap = tl.load(taps_ptr + j * D + ds, mask=d_ok, other=0.0)
            lag_base = x_base + (j - j0) * STEP * D
            if CHECK:
                rows_in = (src >= 0) & (src < x_rows)
                x = tl.load(lag_base + offs, mask=tile_ok & rows_in[:, None], other=0.0)
                src += STEP
            else:
                x = tl.load(lag_base + offs, mask=tile_ok, other=0.0)
            acc += tap[None, :] * x.to(tl.float32)
        return acc

    @triton.jit
    def _long_conv_kernel(
        x_ptr, taps_ptr, y_ptr, S, T, D, row0,
        BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr,
    ):  # fmt: skip
        """A (BT rows × BD channels) tile of the direct long conv, one lag at a time; N = S+T.

        Forward: x is history+u (B, N, D) and output row p ∈ [S, N) is
        y_p = Σ_{j ≤ p} taps_j ⊙ x_{p−j}, stored at p − S of y (B, T, D).
        REVERSE (backward): x is dy (B, T, D), dy_i belonging to position S+i, and row
        p ∈ [row0, N) is dx_p = Σ_j taps_j ⊙ dy_{p+j−S} over 0 ≤ p+j−S < T, stored at p of
        y = dx (B, N, D).
        The lags are walked in ranges where every row of the tile has its source row (no
        per-lag mask) and the few at the edges where some rows do not.
        """
        pt, pd, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        N = S + T
        first = (row0 if REVERSE else S) + pt * BT  # the tile's first position
        last = tl.minimum(first + BT, N) - 1
        rows = first + tl.arange(0, BT)
        ok = rows < N
        ds = pd * BD + tl.arange(0, BD)
        d_ok = ds < D
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        if REVERSE:
            x_base = x_ptr + b.to(tl.int64) * T * D
            # dy rows p+j−S: all in [0, T) for lags in [full_lo, full_hi), some outside around.
            lo = tl.maximum(S - last, 0)
            full_lo = tl.maximum(S - first, 0)
            full_hi = tl.maximum(full_lo, N - last)
            hi = N - first
            src = rows - S
            acc = _lags(acc, x_base, taps_ptr, src + lo, lo, full_lo, ok, ds, d_ok, D, T,
                        STEP=1, CHECK=True)  # fmt: skip
            acc = _lags(acc, x_base, taps_ptr, src + full_lo, full_lo, full_hi, ok, ds, d_ok, D, T,
                        STEP=1, CHECK=False)  # fmt: skip
            acc = _lags(acc, x_base, taps_ptr, src + full_hi, full_hi, hi, ok, ds, d_ok, D, T,
                        STEP=1, CHECK=True)  # fmt: skip
            y_base = y_ptr + b.to(tl.int64) * N * D
            out_rows = rows
        else:
            x_base = x_ptr + b.to(tl.int64) * N * D
            # Lags up to `first` find every source row p−j ≥ 0; the tile's later lags do not.
            acc = _lags(acc, x_base, taps_ptr, rows, 0, first + 1, ok, ds, d_ok, D, N,
                        STEP=-1, CHECK=False)  # fmt: skip
            acc = _lags(acc, x_base, taps_ptr, rows - first - 1, first + 1, last + 1, ok, ds, d_ok,
                        D, N, STEP=-1, CHECK=True)  # fmt: skip
            y_base = y_ptr + b.to(tl.int64) * T * D
            out_rows = rows - S
        tl.store(
            y_base + out_rows[:, None] * D + ds[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _taps_grad_rows(
        acc, x_base, dy_base, i0, i1, src, j_ok, ds, d_ok, D, CHECK: tl.constexpr
    ):  # fmt: skip
        """acc += Σ_{i0 ≤ i < i1} dy_i ⊙ x_{src + i − i0} over a tile of lags (source rows `src`
        at output i0); CHECK masks source rows before position 0 output by output."""
        offs = src[:, None] * D + ds[None, :]
        tile_ok = j_ok[:, None] & d_ok[None, :]
        for i in range(i0, i1):
            g = tl.load(dy_base + i * D + ds, mask=d_ok, other=0.0).to(tl.float32)
            row_base = x_base + (i - i0) * D
            if CHECK:
                x = tl.load(row_base + offs, mask=tile_ok & (src >= 0)[:, None], other=0.0)
                src += 1
            else:
                x = tl.load(row_base + offs, mask=tile_ok, other=0.0)
            acc += g[None, :] * x.to(tl.float32)
        return acc

    @triton.jit
    def _long_conv_taps_grad_kernel(
        x_ptr, dy_ptr, dtaps_ptr, S, T, D,
        BJ: tl.constexpr, BD: tl.constexpr,
    ):  # fmt: skip
        """dtaps_j = Σ_i dy_i ⊙ x_{S+i−j} of one batch row, for BJ lags × BD channels.

        x is history+u (B, N, D), dy (B, T, D); writes this row's share of dtaps (B, N, D) fp32.
        """
        pj, pd, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        N = S + T
        j0 = pj * BJ
        js = j0 + tl.arange(0, BJ)
        j_ok = js < N
        ds = pd * BD + tl.arange(0, BD)
        d_ok = ds < D
        x_base = x_ptr + b.to(tl.int64) * N * D
        dy_base = dy_ptr + b.to(tl.int64) * T * D
        acc = tl.zeros((BJ, BD), dtype=tl.float32)
        # Output i meets lag j at position S+i−j: the tile's first lag from i = j0 − S on, its
        # last one (and so every lag) from i = j_last − S on.
        i0 = tl.maximum(j0 - S, 0)
        i_full = tl.maximum(tl.minimum(j0 + BJ, N) - 1 - S, i0)
        acc = _taps_grad_rows(acc, x_base, dy_base, i0, i_full, S + i0 - js, j_ok, ds, d_ok, D,
                              CHECK=True)  # fmt: skip
        acc = _taps_grad_rows(acc, x_base, dy_base, i_full, T, S + i_full - js, j_ok, ds, d_ok, D,
                              CHECK=False)  # fmt: skip
        tl.store(
            dtaps_ptr + b.to(tl.int64) * N * D + js[:, None] * D + ds[None, :],
            acc,
            mask=j_ok[:, None] & d_ok[None, :],
        )

    @triton.jit
    def _long_conv_step_kernel(
        u_ptr, hist_ptr, k_ptr, bias_ptr, y_ptr, S, D,
        stride_hb, stride_hs, stride_kd, stride_kj,
        BS: tl.constexpr, BD: tl.constexpr, HAS_HISTORY: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        """One decode token for BD channels of one batch row, reading the history and the
        filter in place: y = (k_0 + bias) ⊙ u + Σ_{s < S} k_{S−s} ⊙ h_s."""
        pd, b = tl.program_id(0), tl.program_id(1)
        ds = pd * BD + tl.arange(0, BD)
        d_ok = ds < D
        tap0 = tl.load(k_ptr + ds * stride_kd, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            tap0 += tl.load(bias_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + b * D + ds, mask=d_ok, other=0.0).to(tl.float32)
        y = tap0 * u
        if HAS_HISTORY:
            h_base = hist_ptr + b.to(tl.int64) * stride_hb
            acc = tl.zeros((BS, BD), dtype=tl.float32)
            for s0 in range(0, S, BS):
                ss = s0 + tl.arange(0, BS)
                m = (ss < S)[:, None] & d_ok[None, :]
                h = tl.load(h_base + ss[:, None] * stride_hs + ds[None, :], mask=m, other=0.0)
                taps = tl.load(
                    k_ptr + ds[None, :] * stride_kd + (S - ss)[:, None] * stride_kj,
                    mask=m, other=0.0,
                )  # fmt: skip
                acc += h.to(tl.float32) * taps.to(tl.float32)
            y += tl.sum(acc, axis=0)
        tl.store(y_ptr + b * D + ds, y.to(y_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _short_inputs(
        x_ptr, hist_ptr, b, pos, ok, cs, c_ok, T, C, K, HAS_HISTORY: tl.constexpr
    ):  # fmt: skip
        """history+u of batch row b at positions `pos` (from −(K−1)), fp32 (rows × channels);
        zeros where not `ok`, and for negative positions without a history."""
        x = tl.load(
            x_ptr + b.to(tl.int64) * T * C + pos[:, None] * C + cs[None, :],
            mask=(ok & (pos >= 0))[:, None] & c_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_HISTORY:
            x += tl.load(
                hist_ptr + b.to(tl.int64) * (K - 1) * C + (pos + K - 1)[:, None] * C + cs[None, :],
                mask=(ok & (pos < 0))[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        return x

    @triton.jit
    def _short_conv_kernel(
        x_ptr, hist_ptr, weight_ptr, bias_ptr, y_ptr, T, C, K,
        BT: tl.constexpr, BC: tl.constexpr, HAS_HISTORY: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        """y_t = Σ_j w_j ⊙ x_{t−K+1+j} + bias for BT rows × BC channels of one batch row; x is
        u (B, T, C) after the history (B, K−1, C), weight (C, K)."""
        pt, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ts = pt * BT + tl.arange(0, BT)
        ok = ts < T
        cs = pc * BC + tl.arange(0, BC)
        c_ok = cs < C
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cs, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        for j in range(K):
            w = tl.load(weight_ptr + cs * K + j, mask=c_ok, other=0.0).to(tl.float32)
            x = _short_inputs(
                x_ptr, hist_ptr, b, ts - (K - 1) + j, ok, cs, c_ok, T, C, K, HAS_HISTORY
            )
            acc += w[None, :] * x
        tl.store(
            y_ptr + b.to(tl.int64) * T * C + ts[:, None] * C + cs[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=ok[:, None] & c_ok[None, :],
        )

    @triton.jit
    def _short_conv_grad_kernel(
        x_ptr, hist_ptr, weight_ptr, dy_ptr, dx_ptr, dhist_ptr, dw_ptr, T, C, K,
        BT: tl.constexpr, BC: tl.constexpr, HAS_HISTORY: tl.constexpr,
        HISTORY_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
    ):  # fmt: skip
        """Positions p ∈ [p0, p0+BT) of history+u, p0 = −(K−1) + pt·BT, one batch row:
        dx_p = Σ_j w_j ⊙ dy_{p+K−1−j} (into dhist (B, K−1, C) for p < 0, dx (B, T, C) else),
        and, for the rows 0 ≤ t < T among them, this block's share Σ_t dy_t ⊙ x_{t−K+1+j} of
        dw_j, into dw (B, blocks, K, C) fp32. The blocks tile [−(K−1), T), so the shares of
        all blocks cover every t once."""
        pt, pc, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ps = pt * BT - (K - 1) + tl.arange(0, BT)
        in_seq = ps < T
        cs = pc * BC + tl.arange(0, BC)
        c_ok = cs < C
        dy_base = dy_ptr + b.to(tl.int64) * T * C
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        for j in range(K):
            w = tl.load(weight_ptr + cs * K + j, mask=c_ok, other=0.0).to(tl.float32)
            src = ps + K - 1 - j  # the output that meets position p through tap j
            g = tl.load(
                dy_base + src[:, None] * C + cs[None, :],
                mask=((src >= 0) & (src < T))[:, None] & c_ok[None, :],
                other=0.0,
            )
            acc += w[None, :] * g.to(tl.float32)
        tl.store(
            dx_ptr + b.to(tl.int64) * T * C + ps[:, None] * C + cs[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=(in_seq & (ps >= 0))[:, None] & c_ok[None, :],
        )
        if HISTORY_GRAD:
            tl.store(
                dhist_ptr + b.to(tl.int64) * (K - 1) * C + (ps + K - 1)[:, None] * C + cs[None, :],
                acc.to(dhist_ptr.dtype.element_ty),
                mask=(ps < 0)[:, None] & c_ok[None, :],
            )
        if WEIGHT_GRAD:
            t_ok = in_seq & (ps >= 0)
            g = tl.load(
                dy_base + ps[:, None] * C + cs[None, :],
                mask=t_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            dw_base = dw_ptr + (b.to(tl.int64) * tl.num_programs(0) + pt) * K * C
            for j in range(K):
                x = _short_inputs(
                    x_ptr, hist_ptr, b, ps - (K - 1) + j, t_ok, cs, c_ok, T, C, K, HAS_HISTORY
                )
                tl.store(dw_base + j * C + cs, tl.sum(g * x, axis=0), mask=c_ok)


def _tile(n: int, cap: int) -> int:
    """A power-of-two tile side ≥ n, at most `cap` (fewer compiled variants than exact sizes)."""
    return min(cap, triton.next_power_of_2(max(n, 1)))


def _taps(k: torch.Tensor, bias: torch.Tensor | None, N: int) -> torch.Tensor:
    """(N, D) fp32, channels contiguous: the first N taps with the skip weight folded into tap 0.
    A fresh tensor, never a view of k."""
    taps = torch.empty(N, k.shape[0], device=k.device, dtype=torch.float32)
    taps.copy_(k[:, :N].t())
    if bias is not None:
        taps[0] += bias.float()
    return taps


# The Triton forms are torch.library custom ops: torch.compile keeps each as one opaque node
# (shapes from its fake implementation) instead of breaking the graph at an autograd.Function.


@torch.library.custom_op("zoo::long_conv", mutates_args=())
def _long_conv_forward(
    full: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, T: int, history_grad: bool
) -> torch.Tensor:
    """full = history+u (B, N, D) contiguous; returns y (B, T, D) in full's dtype.
    ``history_grad``: whether the backward computes the history rows' gradient too."""
    B, N, D = full.shape
    taps = _taps(k, bias, N)  # (N, D) fp32
    y = torch.empty(B, T, D, device=full.device, dtype=full.dtype)
    bt, bd = _tile(T, _ROWS), _tile(D, _CHANNELS)
    _long_conv_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd), B)](
        full, taps, y, N - T, T, D, 0, BT=bt, BD=bd, REVERSE=False, num_warps=_WARPS
    )
    return y


@_long_conv_forward.register_fake
def _(full, k, bias, T, history_grad):
    return full.new_empty(full.shape[0], T, full.shape[2])


@torch.library.custom_op("zoo::long_conv_backward", mutates_args=())
def _long_conv_backward(
    full: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None,
    dy: torch.Tensor,
    T: int,
    input_grad: bool,
    history_grad: bool,
    taps_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d full, dk, d bias), empty where not asked for (or where there is no bias)."""
    B, N, D = full.shape
    S = N - T
    taps = _taps(k, bias, N)
    dy = dy.contiguous()
    bd = _tile(D, _CHANNELS)
    d_full, dk, dbias = full.new_empty(0), k.new_empty(0), full.new_empty(0)
    if input_grad:
        # Without a history to differentiate, only u's rows S … N−1 are computed.
        row0 = 0 if history_grad else S
        d_full = torch.empty_like(full)  # (B, N, D)
        d_full[:, :row0].zero_()
        bt = _tile(N - row0, _ROWS)
        _long_conv_kernel[(triton.cdiv(N - row0, bt), triton.cdiv(D, bd), B)](
            dy, taps, d_full, S, T, D, row0, BT=bt, BD=bd, REVERSE=True, num_warps=_WARPS
        )
    if taps_grad:
        # One share per batch row, summed here: the batch adds programs, not a serial loop.
        shares = torch.empty(B, N, D, device=full.device, dtype=torch.float32)
        bj = _tile(N, _ROWS)
        _long_conv_taps_grad_kernel[(triton.cdiv(N, bj), triton.cdiv(D, bd), B)](
            full, dy, shares, S, T, D, BJ=bj, BD=bd, num_warps=_WARPS
        )
        dtaps = shares.sum(0)  # (N, D)
        dk = torch.zeros_like(k)  # taps ≥ N unused
        dk[:, :N] = dtaps.t()
        if bias is not None:
            dbias = dtaps[0].to(bias.dtype)  # the skip weight rides on tap 0
    return d_full, dk, dbias


@_long_conv_backward.register_fake
def _(full, k, bias, dy, T, input_grad, history_grad, taps_grad):
    return (
        torch.empty_like(full) if input_grad else full.new_empty(0),
        torch.empty_like(k) if taps_grad else k.new_empty(0),
        torch.empty_like(bias) if taps_grad and bias is not None else full.new_empty(0),
    )


def _long_conv_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    full, k, bias, T, history_grad = inputs
    ctx.save_for_backward(full, k, bias)
    ctx.meta = (T, history_grad)


def _long_conv_autograd(ctx: Any, dy: torch.Tensor) -> tuple:
    full, k, bias = ctx.saved_tensors
    T, history_grad = ctx.meta
    d_full, dk, dbias = _long_conv_backward(
        full, k, bias, dy, T, ctx.needs_input_grad[0], history_grad,
        ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
    )  # fmt: skip
    return (
        d_full if ctx.needs_input_grad[0] else None,
        dk if ctx.needs_input_grad[1] else None,
        dbias if ctx.needs_input_grad[2] else None,
        None,
        None,
    )


_long_conv_forward.register_autograd(_long_conv_autograd, setup_context=_long_conv_setup)


def long_conv_triton(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The direct long conv in Triton, differentiable in u, k, bias and the history.

    Same arguments and results as ``long_conv_direct``; O(T·N) work, O(N) memory (N = S+T), plus
    (B, N, D) fp32 for the filter gradient. Inputs are validated by ``long_conv``.
    """
    if triton is None:
        raise ImportError("the Triton long-convolution kernels need triton (pip install triton)")
    full = _with_history(u, initial_state)  # (B, N, D)
    history_grad = needs_grad(initial_state)
    y = _long_conv_forward(full.contiguous(), k, bias, u.shape[1], history_grad)
    return y, (full if output_final_state else None)


def long_conv_step_triton(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step in one kernel (no autograd); arguments and results as ``long_conv_step``.

    The history (B, S, D) is read in place, any batch and row strides (a slice of a cache).
    """
    if triton is None:
        raise ImportError("the Triton long-convolution kernels need triton (pip install triton)")
    y = _long_conv_step(u, k, bias, history)
    full = _with_history(u.unsqueeze(1), history) if output_final_state else None
    return y, full


@torch.library.custom_op("zoo::long_conv_step", mutates_args=())
def _long_conv_step(
    u: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor | None
) -> torch.Tensor:
    B, D = u.shape
    S = 0 if history is None else history.shape[1]
    if S and history.stride(-1) != 1:
        history = history.contiguous()
    y = torch.empty(B, D, device=u.device, dtype=u.dtype)
    bd = _tile(D, _STEP_CHANNELS)
    _long_conv_step_kernel[(triton.cdiv(D, bd), B)](
        u.contiguous(), history if S else None, k, None if bias is None else bias.contiguous(),
        y, S, D,
        history.stride(0) if S else 0, history.stride(1) if S else 0, k.stride(0), k.stride(1),
        BS=_STEP_ROWS, BD=bd, HAS_HISTORY=S > 0, HAS_BIAS=bias is not None,
        num_warps=_STEP_WARPS,
    )  # fmt: skip
    return y


@_long_conv_step.register_fake
def _(u, k, bias, history):
    return torch.empty_like(u)


@torch.library.custom_op("zoo::short_conv", mutates_args=())
def _short_conv_forward(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> torch.Tensor:
    """u (B, T, C) and state (B, K−1, C) or None contiguous, weight (C, K) contiguous."""
    B, T, C = u.shape
    K = weight.shape[1]
    y = torch.empty_like(u)
    bt, bc = _tile(T, _ROWS), _tile(C, _CHANNELS)
    if y.numel():
        _short_conv_kernel[(triton.cdiv(T, bt), triton.cdiv(C, bc), B)](
            u, state, weight, bias, y, T, C, K,
            BT=bt, BC=bc, HAS_HISTORY=state is not None, HAS_BIAS=bias is not None,
            num_warps=_WARPS,
        )  # fmt: skip
    return y


@_short_conv_forward.register_fake
def _(u, weight, bias, state):
    return torch.empty_like(u)


@torch.library.custom_op("zoo::short_conv_backward", mutates_args=())
def _short_conv_backward(
    u: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None,
    dy: torch.Tensor,
    weight_grad: bool,
    history_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, dweight, dstate); the last two empty where not asked for."""
    B, T, C = u.shape
    K = weight.shape[1]
    dy = dy.contiguous()
    rows = T + K - 1  # positions −(K−1) … T−1 of history+u
    bt, bc = _tile(rows, _ROWS), _tile(C, _CHANNELS)
    blocks = triton.cdiv(rows, bt)
    du = torch.empty_like(u)
    d_state = torch.empty_like(state) if history_grad else None
    shares = None
    if weight_grad:
        shares = torch.zeros(B, blocks, K, C, device=u.device, dtype=torch.float32)
    if B * C * rows:
        _short_conv_grad_kernel[(blocks, triton.cdiv(C, bc), B)](
            u, state, weight, dy, du, d_state, shares, T, C, K,
            BT=bt, BC=bc, HAS_HISTORY=state is not None, HISTORY_GRAD=history_grad,
            WEIGHT_GRAD=weight_grad, num_warps=_WARPS,
        )  # fmt: skip
    dw = shares.sum((0, 1)).t().to(weight.dtype) if weight_grad else weight.new_empty(0)  # (C, K)
    return du, dw, d_state if history_grad else u.new_empty(0)


@_short_conv_backward.register_fake
def _(u, weight, state, dy, weight_grad, history_grad):
    return (
        torch.empty_like(u),
        torch.empty_like(weight) if weight_grad else weight.new_empty(0),
        torch.empty_like(state) if history_grad else u.new_empty(0),
    )


def _short_conv_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    u, weight, bias, state = inputs
    ctx.save_for_backward(u, weight, state)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _short_conv_autograd(ctx: Any, dy: torch.Tensor) -> tuple:
    u, weight, state = ctx.saved_tensors
    weight_grad, history_grad = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    du, dw, d_state = _short_conv_backward(u, weight, state, dy, weight_grad, history_grad)
    dbias = dy.float().sum((0, 1)).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return du, dw if weight_grad else None, dbias, d_state if history_grad else None


_short_conv_forward.register_autograd(_short_conv_autograd, setup_context=_short_conv_setup)


def short_conv_triton(
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The short conv in Triton, differentiable in u, weight, bias and the state; arguments and
    results as ``short_conv`` (fp32 accumulation, y in u's dtype). Validated by ``short_conv``."""
    if triton is None:
        raise ImportError("the Triton short-convolution kernels need triton (pip install triton)")
    B, T, C = u.shape
    K = weight.shape[1]
    state = None if initial_state is None else initial_state.to(u.dtype)
    y = _short_conv_forward(
        u.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        None if state is None else state.contiguous(),
    )
    final = None
    if output_final_state:
        # The last K−1 positions of history+u, without copying all of u.
        history = state if state is not None else u.new_zeros(B, K - 1, C)
        tail = torch.cat([history, u[:, max(0, T - (K - 1)) :]], dim=1)  # (B, ≥ K−1, C)
        final = tail[:, tail.shape[1] - (K - 1) :]
    return y, final


# --- public entry points ----------------------------------------------------------------


def _check_inputs(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (B, T, D) but has shape {tuple(u.shape)}")
    B, T, D = u.shape
    if T == 0:
        raise ValueError("u has T=0 tokens; long_conv needs at least one")
    check_tensors(("u", u), ("k", k), ("bias", bias), ("initial_state", initial_state))
    S = 0
    if initial_state is not None:
        if initial_state.dim() != 3 or initial_state.shape[0] != B or initial_state.shape[2] != D:
            raise ValueError(
                f"initial_state has shape {tuple(initial_state.shape)} but must be (B, S, D) "
                f"with B={B} and D={D} from u"
            )
        S = initial_state.shape[1]
    if k.dim() != 2 or k.shape[0] != D:
        raise ValueError(f"k has shape {tuple(k.shape)} but must be (D, L) with D={D} from u")
    if k.shape[1] < S + T:
        raise ValueError(
            f"k has {k.shape[1]} taps but the convolution needs {S + T} "
            f"(history S={S} + new tokens T={T})"
        )
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"bias has shape {tuple(bias.shape)} but must be (D,) = ({D},) from u")


def long_conv(
    u: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal long convolution, the public entry point. Returns (y (B, T, D), history | None).

    u (B, T, D); k (D, L) with L ≥ S+T; bias (D,) skip weight or None; initial_state: the
    history (B, S, D) of earlier inputs (None = empty). final_state is history+u (B, S+T, D).
    ``backend``: "auto" (Triton for CUDA tensors, torch otherwise; ``ZOO_KERNEL_BACKEND``
    overrides it), "torch" or "triton" (CUDA, or the CPU interpreter under TRITON_INTERPRET=1).
    Triton: the step kernel for one token without autograd, the direct kernel for T ≤
    ``_TRITON_DIRECT_MAX_NEW_TOKENS`` (autograd or not), the FFT form above. Torch: the decode
    step for T = 1, the direct conv for short T without autograd, the FFT otherwise (see
    ``_DIRECT_MAX_NEW_TOKENS``).
    """
    _check_inputs(u, k, bias, initial_state)
    T = u.shape[1]
    grad = needs_grad(u, k, bias, initial_state)
    if resolve_backend(backend, "long-convolution", u) == "triton":
        if T == 1 and not grad:
            y, full = long_conv_step_triton(u[:, 0], k, bias, initial_state, output_final_state)
            return y.unsqueeze(1), full
        if T <= _TRITON_DIRECT_MAX_NEW_TOKENS:
            return long_conv_triton(u, k, bias, initial_state, output_final_state)
        return long_conv_fft(u, k, bias, initial_state, output_final_state)
    if T == 1:
        y, full = long_conv_step(u[:, 0], k, bias, initial_state, output_final_state)
        return y.unsqueeze(1), full
    if T <= _DIRECT_MAX_NEW_TOKENS and not grad:
        return long_conv_direct(u, k, bias, initial_state, output_final_state)
    return long_conv_fft(u, k, bias, initial_state, output_final_state)


def _check_short_inputs(
    u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (B, T, C) but has shape {tuple(u.shape)}")
    B, _, C = u.shape
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but must be (C, K) with C={C} from u"
        )
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"bias has shape {tuple(bias.shape)} but must be (C,) = ({C},) from u")
    K = weight.shape[1]
    if state is not None and state.shape != (B, K - 1, C):
        raise ValueError(
            f"initial_state has shape {tuple(state.shape)} but must be (B, K-1, C) = "
            f"{(B, K - 1, C)} from u and weight"
        )


def short_conv(
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv. u (B, T, C); weight (C, K); bias (C,); state (B, K−1, C).

    ``initial_state`` holds the K−1 inputs before u (None = zeros); ``final_state`` the last
    K−1 of history+u. ``backend`` as for ``long_conv``: "triton" runs ``short_conv_triton``
    (fp32 accumulation), "torch" K shifted multiply-adds in u's dtype, like the Conv1d it
    replaces.
    """
    _check_short_inputs(u, weight, bias, initial_state)
    if resolve_backend(backend, "short-convolution", u) == "triton":
        return short_conv_triton(u, weight, bias, initial_state, output_final_state)
    B, T, C = u.shape
    K = weight.shape[1]
    if initial_state is None:
        initial_state = u.new_zeros(B, K - 1, C)
    full = torch.cat([initial_state.to(u.dtype), u], dim=1)  # (B, K−1+T, C)
    # K shifted multiply-adds in the (B, T, C) layout: no transposes, and for the small K of
    # these convs faster than a depthwise conv1d on a CPU (Mamba's layer measured it so).
    y = full[:, K - 1 :] * weight[:, K - 1]
    for j in range(K - 1):
        y = torch.addcmul(y, full[:, j : j + T], weight[:, j])
    if bias is not None:
        y = y + bias
    return y, (full[:, T:] if output_final_state else None)
