"""Causal long convolution (Hyena's token mixer) and the causal short depthwise convolution.

Paper: "Hyena Hierarchy: Towards Larger Convolutional Language Models" (Poli et al., arXiv
2302.10866); reference code HazyResearch/safari (`fftconv_ref` in src/models/sequence/hyena.py).
Every channel d has its own filter k_d of length ≥ T and a skip weight bias_d:

    y_t = Σ_{s ≤ t} k_{t−s} ⊙ u_s  +  bias ⊙ u_t          (per channel, positions from 0)

There is no finite recurrence: the "state" after a prefix is the prefix itself, so
``initial_state`` is the history (B, S, D) of earlier inputs, the new inputs sit at positions
S … S+T−1 and the filter needs S+T taps. ``final_state`` is that history extended by u.

Three forms of the same sum:

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.kernels.backend import resolve_backend

__all__ = [
    "long_conv",
    "long_conv_direct",
    "long_conv_fft",
    "long_conv_naive",
    "long_conv_step",
    "short_conv",
    "short_conv_naive",
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
    for name, t in (("u", u), ("k", k), ("bias", bias), ("initial_state", initial_state)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
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
    ``backend``: "auto" or "torch" run the torch forms — the decode step for T = 1, the direct
    conv for short T without autograd, the FFT otherwise (see ``_DIRECT_MAX_NEW_TOKENS``);
    "triton" is not built yet. ``ZOO_KERNEL_BACKEND`` overrides "auto".
    """
    _check_inputs(u, k, bias, initial_state)
    resolve_backend(backend, "long-convolution")
    T = u.shape[1]
    if T == 1:
        y, full = long_conv_step(u[:, 0], k, bias, initial_state, output_final_state)
        return y.unsqueeze(1), full
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, k, bias, initial_state)
    )
    if T <= _DIRECT_MAX_NEW_TOKENS and not needs_grad:
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal depthwise conv. u (B, T, C); weight (C, K); bias (C,); state (B, K−1, C).

    ``initial_state`` holds the K−1 inputs before u (None = zeros); ``final_state`` the last
    K−1 of history+u. Computes in u's dtype, like the Conv1d it replaces.
    """
    _check_short_inputs(u, weight, bias, initial_state)
    B, T, C = u.shape
    K = weight.shape[1]
    if initial_state is None:
        initial_state = u.new_zeros(B, K - 1, C)
    full = torch.cat([initial_state.to(u.dtype), u], dim=1)  # (B, K−1+T, C)
    y = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), bias, groups=C)  # (B, C, T)
    return y.transpose(1, 2), (full[:, T:] if output_final_state else None)


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
