"""Lightning attention: linear attention with a constant per-head decay (TNL's token mixer).

Papers: TransNormerLLM (Qin et al., arXiv 2307.14995) and "Various Lengths, Constant Speed:
Efficient Language Modeling with Lightning Attention" (Qin et al., arXiv 2405.17381). There is no
softmax, no 1/sqrt(d) scale by default and no denominator. Per batch b and head h, with a
data-independent decay λ_h = exp(log_decay[h]) in (0, 1]:

    S_t = λ_h · S_{t-1} + k_t v_tᵀ        (S is K×V, kept in fp32)
    o_t = scale · q_tᵀ S_t                 (the current token is included)

``log_decay == 0`` means no decay, which is how cosFormer2 reuses this op.

Chunked form (chunk size C, position i/j inside a chunk, S_n the state entering chunk n):

* intra-chunk: O_intra = (Q Kᵀ ⊙ M) V, a dense C×C product with M[i, j] = λ^(i-j) for i ≥ j
  and 0 above the diagonal;
* inter-chunk: O_inter = (Q ⊙ λ^(i+1)) S_n, reading the carried fp32 state;
* state: S_{n+1} = λ^C S_n + (K ⊙ λ^(C-1-j))ᵀ V.

All decay powers are built in log space as exp(p · log λ) with p ≥ 0, so nothing can overflow.
The torch form batches the chunk products over groups of ~1024 tokens and loops only over
chunks for the K×V state recurrence, so time and memory grow linearly in T.

Layout follows fla: q, k (B, T, H, K); v (B, T, H, V); log_decay (H,); state (B, H, K, V) fp32.
Module order: naive reference → decode step → chunked torch form → public dispatch function.
The Triton kernels (chunked forward and backward, fused decode step) live in
`zoo.kernels.linear_attention`, shared with cosFormer2 and gated linear attention
(`zoo.kernels.gla`, of which this op is the case of a constant decay per head).
"""

from __future__ import annotations

import math

import torch

from zoo.kernels.gla import gla_naive, gla_step
from zoo.kernels.layout import (
    check_cu_seqlens,
    check_initial_state,
    check_qkv,
    chunk_spans,
    values_checkable,
)
from zoo.kernels.linear_attention import dispatch

__all__ = [
    "lightning",
    "lightning_chunk_torch",
    "lightning_naive",
    "lightning_step",
    "tnl_log_decay",
]

_DECAY_FORMS = ("alibi", "paper")
_GROUP_TOKENS = 1024


def _per_key(log_decay: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-head log decay (H,) as GLA's per-key gate, broadcast to `like` (..., H, K)."""
    shape = (1,) * (like.dim() - 2) + (like.shape[-2], 1)
    return log_decay.to(device=like.device, dtype=torch.float32).view(shape).expand(like.shape)


def lightning_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in fp32: the oracle the faster forms are tested against. It is
    gated linear attention (`gla_naive`) with one constant decay per head."""
    o, state = gla_naive(
        q.float() * scale, k, v, _per_key(log_decay, q), initial_state, output_final_state
    )
    return o.to(q.dtype), state


def lightning_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    state: torch.Tensor | None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k: (B, H, K); v: (B, H, V); state: (B, H, K, V) fp32 or None (zeros).

    Returns o (B, H, V) in q's dtype and a new fp32 state; ``state`` is left untouched so a cache
    can keep the previous one. `gla_step` with one constant decay per head.
    """
    o, new_state = gla_step(q.float() * scale, k, v, _per_key(log_decay, q), state)
    return o.to(q.dtype), new_state


def _decay_tables(
    log_decay: torch.Tensor, C: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay powers for chunks of length C, all as exp(p · log λ) with p >= 0.

    Returns q_decay (H, C) = scale · λ^(i+1), k_decay (H, C) = λ^(C-1-j), chunk_decay (H,) = λ^C
    and mask (H, C, C) = scale · λ^(i-j) for i >= j else 0. scale rides on these small tables
    instead of costing a pass over q.
    """
    H = log_decay.shape[0]
    pos = torch.arange(C, device=log_decay.device, dtype=torch.float32)  # (C,)
    ld = log_decay.view(H, 1)  # (H, 1)
    q_decay = scale * torch.exp((pos + 1) * ld)  # (H, C)
    k_decay = torch.exp((C - 1 - pos) * ld)  # (H, C)
    chunk_decay = torch.exp(C * log_decay)  # (H,)
    diff = pos.view(C, 1) - pos.view(1, C)  # (C, C): i - j
    # Clamp before exp so the masked (i < j) entries never see a positive exponent.
    mask = scale * torch.exp(diff.clamp(min=0) * ld.view(H, 1, 1)) * (diff >= 0)  # (H, C, C)
    return q_decay, k_decay, chunk_decay, mask


def _chunk_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N equal chunks at once. q, k: (B, H, N, C, K); v: (B, H, N, C, V); state: (B, H, K, V).

    Everything is fp32 and contiguous; ``tables`` come from ``_decay_tables`` for this C. Returns
    o (B, H, N, C, V) and the state after the last chunk.
    """
    B, H, N, C, K = q.shape
    V = v.shape[-1]
    q_decay, k_decay, chunk_decay, mask = tables
    chunk_decay = chunk_decay.view(1, H, 1, 1)  # (1, H, 1, 1)

    # matmul's backward needs q and k, not the product, so masking in place is autograd-safe.
    attn = (q @ k.transpose(-1, -2)).mul_(mask.view(1, H, 1, C, C))  # (B, H, N, C, C)
    delta = (k * k_decay.view(1, H, 1, C, 1)).transpose(-1, -2) @ v  # (B, H, N, K, V)

    # The only sequential part: N cheap K×V updates, so the loop is over chunks, never tokens.
    starts = []
    for n in range(N):
        starts.append(state)
        state = torch.addcmul(delta[:, :, n], chunk_decay, state)
    start_states = torch.stack(starts, dim=2)  # (B, H, N, K, V)

    # Intra and inter outputs in one batched add-matmul: attn V + (Q ⊙ λ^(i+1)) S_n.
    o = torch.baddbmm(
        (attn @ v).view(-1, C, V),  # (B*H*N, C, V)
        (q * q_decay.view(1, H, 1, C, 1)).view(-1, C, K),  # (B*H*N, C, K)
        start_states.view(-1, K, V),  # (B*H*N, K, V)
    )
    return o.view(B, H, N, C, V), state


def lightning_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form in pure torch: O(T) time and memory, differentiable, any T ≥ 1.

    Inputs are not validated beyond T and chunk_size; ``lightning`` does that. Computes in fp32
    and returns o in q's dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        raise ValueError("lightning_chunk_torch needs at least one token but q has T=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    ld = log_decay.to(device=q.device, dtype=torch.float32)  # (H,)
    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        state = initial_state.float()

    # Grouped whole chunks keep time linear in T once tensors outgrow the cache.
    spans = chunk_spans(T, chunk_size, _GROUP_TOKENS)
    tables = {c: _decay_tables(ld, c, scale) for c in {span[2] for span in spans}}
    outs = []
    for start, end, c in spans:
        # Head-major copies of this group only: (B, t, H, K) -> (B, H, n, c, K).
        n = (end - start) // c
        o, state = _chunk_block(
            q[:, start:end].transpose(1, 2).contiguous().view(B, H, n, c, K).float(),
            k[:, start:end].transpose(1, 2).contiguous().view(B, H, n, c, K).float(),
            v[:, start:end].transpose(1, 2).contiguous().view(B, H, n, c, V).float(),
            tables[c],
            state,
        )
        outs.append(o.view(B, H, end - start, V).transpose(1, 2).to(q.dtype))  # (B, t, H, V)
    o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0].contiguous()  # (B, T, H, V)
    return o, (state if output_final_state else None)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> list[int] | None:
    """Validate the public call; returns the packed sequence bounds as a host list, or None."""
    gates = {} if log_decay is None else {"log_decay": log_decay}
    check_qkv("lightning", q, k, v, chunk_size, **gates)
    H = q.shape[2]
    if log_decay is not None:
        if log_decay.shape != (H,):
            raise ValueError(
                f"log_decay has shape {tuple(log_decay.shape)} but must be (H,) = ({H},) from q"
            )
        if values_checkable(log_decay):
            if not bool(torch.isfinite(log_decay).all()):
                raise ValueError(f"log_decay must be finite, got {log_decay.tolist()}")
            if bool((log_decay > 0).any()):
                raise ValueError(
                    f"log_decay must be <= 0 (decay in (0, 1]) but its max is "
                    f"{log_decay.max().item()}"
                )
    bounds = check_cu_seqlens(cu_seqlens, q)
    check_initial_state(initial_state, q, v, bounds)
    return bounds


def lightning(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention, the public entry point. Returns (o (B, T, H, V), final_state | None).

    ``log_decay`` (H,) ≤ 0, or None for no decay at all (cosFormer2), which the Triton kernels
    run without any decay arithmetic. ``cu_seqlens`` packs variable-length sequences along T (B
    must be 1): each segment starts from its own row of ``initial_state`` (N, H, K, V) or zeros,
    and final_state is (N, H, K, V). ``backend``: see `zoo.kernels.linear_attention.dispatch`; the
    torch form uses ``chunk_size`` as given, the Triton kernels round it to a power of two in
    [16, 64].
    """
    bounds = _check_inputs(q, k, v, log_decay, initial_state, cu_seqlens, chunk_size)
    # The torch forms need a decay tensor; no decay (cosFormer2) is log λ = 0 there.
    ld = log_decay if log_decay is not None else q.new_zeros(q.shape[2], dtype=torch.float32)
    return dispatch(
        "lightning attention", backend, q, k, v,
        per_token={}, constants={"log_decay": log_decay, "scale": scale},
        initial_state=initial_state, output_final_state=output_final_state, bounds=bounds,
        chunk_size=chunk_size,
        torch_step=lambda q, k, v, state: lightning_step(q, k, v, ld, state, scale),
        torch_chunk=lambda q, k, v, state, final, chunk: lightning_chunk_torch(
            q, k, v, ld, scale, state, final, chunk
        ),
    )  # fmt: skip


def _alibi_slopes(n: int) -> list[float]:
    """ALiBi head slopes (Press et al.), with the interleave rule for non-power-of-two n."""
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    lower = 2 ** math.floor(math.log2(n))
    return _alibi_slopes(lower) + _alibi_slopes(2 * lower)[0::2][: n - lower]


def tnl_log_decay(
    num_heads: int, layer_idx: int, num_layers: int, form: str = "alibi"
) -> torch.Tensor:
    """log λ per head, shape (H,) float32, for TNL layer ``layer_idx`` of ``num_layers``.

    "alibi" (released TransNormerLLM / lightning-attention code): ALiBi slopes scaled by
    (1 - l/(L-1) + 1e-5), so lower layers decay fastest and the last barely decays.
    "paper" (Eq. 10 of arXiv 2307.14995): log λ_h = -(8h/H)(1 - l/L), h from 0 (head 0 undecayed).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got {layer_idx}")
    if form == "alibi":
        depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
        slopes = torch.tensor(_alibi_slopes(num_heads), dtype=torch.float64)
        log_decay = -slopes * (1.0 - depth + 1e-5)
    elif form == "paper":
        h = torch.arange(num_heads, dtype=torch.float64)
        log_decay = -(8.0 * h / num_heads) * (1.0 - layer_idx / num_layers)
    else:
        raise ValueError(f"form must be one of {_DECAY_FORMS}, got {form!r}")
    return log_decay.to(torch.float32)
