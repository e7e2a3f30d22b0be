"""Gated linear attention (GLA): linear attention with a data-dependent decay per key channel.

"Gated Linear Attention Transformers with Hardware-Efficient Training" (Yang et al., arXiv
2312.06635), fla's ``chunk_gla``; it is the op of HGRN2 ("HGRN2: Gated Linear RNNs with State
Expansion", Qin et al., arXiv 2404.07904), which named it by the model (`zoo.kernels.hgrn2` is
the old name, kept as an alias). Per batch b and head h, with a decay f_t = exp(g_t) ∈ (0, 1]^K
that varies per token and per key channel (g, fla's name for the log gate, is ≤ 0):

    S_t = Diag(f_t) S_{t-1} + k_t v_tᵀ        (S is K×V, kept in fp32)
    o_t = q_tᵀ S_t                             (the current token is included)

HGRN2 reads q as its output gate, k = 1 − f and v as its input. Unlike fla we apply no
1/sqrt(K) scale: HGRN2 normalises o over the full width right after, which absorbs any scale.

Chunked form (chunk length C, b = cumsum of g inside the chunk, so b_i ≤ b_j for i ≥ j and
b_i − b_j = Σ_{j<t≤i} g_t; S_n is the state entering chunk n):

* inter-chunk: o_i += (q_i ⊙ exp(b_i)) S_n;
* intra-chunk: o_i += Σ_{j≤i} (Σ_c q_ic k_jc exp(b_ic − b_jc)) v_j;
* state: S_{n+1} = Diag(exp(b_C)) S_n + Σ_j (k_j ⊙ exp(b_C − b_j)) v_jᵀ.

Every exponent above is ≤ 0, so nothing overflows however strong the decay. The intra-chunk sum
cannot be factored as (q ⊙ e^b)(k ⊙ e^-b)ᵀ (e^-b overflows), so we use GLA's secondary chunking:
the chunk is cut into sub-chunks of ``_SUB_CHUNK`` tokens; a query sub-chunk starting at s meets
the earlier keys through the reference b_s, as (q_i ⊙ exp(b_i − b_s)) (k_j ⊙ exp(b_s − b_j))ᵀ
with both exponents ≤ 0, and meets its own keys through the exact c×c×K product. That product is
the op's largest temporary, so the intra-chunk part is recomputed in backward (activation
checkpointing) instead of being kept: saved memory stays a few copies of the inputs.

The torch form works on groups of ~``_GROUP_TOKENS`` tokens (bounded temporaries, linear time and
memory in T) and loops in Python only over chunks for the K×V state recurrence, never over tokens.
Layout follows fla: q, k, g (B, T, H, K); v (B, T, H, V); state (B, H, K, V) fp32. Module
order: naive reference → decode step → chunked torch form → public dispatch function. The Triton
kernels (chunked forward and backward, fused decode step) live in `zoo.kernels.linear_attention`,
shared with TNL and cosFormer2.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from zoo.kernels.layout import check_cu_seqlens, check_initial_state, check_qkv, chunk_spans
from zoo.kernels.linear_attention import dispatch
from zoo.kernels.matvec import vecmat

__all__ = ["gla", "gla_chunk_torch", "gla_naive", "gla_step"]

_GROUP_TOKENS = 1024
# Sub-chunk length c of the secondary chunking. Per token the exact diagonal blocks cost c·K and
# the re-referenced earlier keys C/(2c)·K elementwise work, so c ≈ sqrt(C/2) balances them for
# C = 64 (fla's Triton kernel uses 16, where on-chip tiles favour it; 8 measured fastest here).
_SUB_CHUNK = 8


def gla_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in fp32: the oracle the faster forms are tested against."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    qf, kf, vf, gf = q.float(), k.float(), v.float(), g.float()
    if initial_state is None:
        S = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        S = initial_state.float()
    outs = []
    for t in range(T):
        S = gf[:, t].exp().unsqueeze(-1) * S + kf[:, t].unsqueeze(-1) * vf[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=torch.float32)
    return o.to(q.dtype), (S if output_final_state else None)


def gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. q, k, g: (B, H, K); v: (B, H, V); state: (B, H, K, V) or None (zeros).

    Returns o (B, H, V) in q's dtype and a new fp32 state; ``state`` is left untouched so a cache
    can keep the previous one.
    """
    kv = k.float().unsqueeze(-1) * v.float().unsqueeze(-2)  # (B, H, K, V)
    if state is None:
        new_state = kv
    else:
        new_state = torch.addcmul(kv, g.float().exp().unsqueeze(-1), state.float())
    if torch.compiler.is_compiling():
        # A reduction inductor fuses with the update: the state is read once, no extern bmm.
        o = vecmat(q.float(), new_state)
    else:
        o = torch.einsum("bhk,bhkv->bhv", q.float(), new_state)
    return o.to(q.dtype), new_state


def _intra_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Intra-chunk outputs. q, k, b: (B, H, N, C, K); v: (B, H, N, C, V), all fp32.

    b is the in-chunk inclusive cumsum of g. Returns (B, H, N, C, V).
    """
    C = q.shape[-2]
    above = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)  # (C, C): j > i
    outs = []
    for s in range(0, C, _SUB_CHUNK):
        e = min(s + _SUB_CHUNK, C)
        qs, ks, bs = q[..., s:e, :], k[..., s:e, :], b[..., s:e, :]  # (B, H, N, c, K)
        # Own keys, exactly: -inf above the diagonal so exp never meets a positive exponent.
        # In place, so only two c×c×K temporaries are alive at once (they dominate peak memory).
        decay = bs.unsqueeze(-2) - bs.unsqueeze(-3)  # (B, H, N, c, c, K): b_i - b_j
        decay = decay.masked_fill_(above[: e - s, : e - s, None], -torch.inf).exp_()
        attn = (decay * ks.unsqueeze(-3)) @ qs.unsqueeze(-1)  # (B, H, N, c, c, 1)
        o = attn.squeeze(-1) @ v[..., s:e, :]  # (B, H, N, c, V)
        if s:
            # Earlier keys through the reference b_s: b_i - b_s ≤ 0 and b_s - b_j ≤ 0.
            ref = bs[..., :1, :]  # (B, H, N, 1, K)
            q_ref = qs * (bs - ref).exp()  # (B, H, N, c, K)
            k_ref = k[..., :s, :] * (ref - b[..., :s, :]).exp()  # (B, H, N, s, K)
            o = o + (q_ref @ k_ref.transpose(-1, -2)) @ v[..., :s, :]
        outs.append(o)
    return torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]


def _chunk_block(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N equal chunks at once. q, k, g: (B, H, N, C, K); v: (B, H, N, C, V); state (B, H, K, V).

    Everything is fp32. Returns o (B, H, N, C, V) and the state after the last chunk.
    """
    N = q.shape[2]
    b = g.cumsum(dim=-2)  # (B, H, N, C, K), ≤ 0 and non-increasing along C
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, b)):
        intra = checkpoint(_intra_chunk, q, k, v, b, use_reentrant=False)
    else:
        intra = _intra_chunk(q, k, v, b)

    b_last = b[..., -1:, :]  # (B, H, N, 1, K)
    delta = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # (B, H, N, K, V)
    chunk_decay = b_last.exp().transpose(-1, -2)  # (B, H, N, K, 1)

    # The only sequential part: N cheap K×V updates, so the loop is over chunks, never tokens.
    starts = []
    for n in range(N):
        starts.append(state)
        state = torch.addcmul(delta[:, :, n], chunk_decay[:, :, n], state)
    start_states = torch.stack(starts, dim=2)  # (B, H, N, K, V)
    return intra + (q * b.exp()) @ start_states, state


def gla_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked parallel form in pure torch: O(T) time and memory, differentiable, any T ≥ 1.

    Inputs are not validated beyond T and chunk_size; ``gla`` does that. Computes in fp32 and
    returns o in q's dtype.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T == 0:
        raise ValueError("gla_chunk_torch needs at least one token but q has T=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    if initial_state is None:
        state = q.new_zeros(B, H, K, V, dtype=torch.float32)
    else:
        state = initial_state.float()

    # Grouped whole chunks keep time linear in T once tensors outgrow the cache.
    spans = chunk_spans(T, chunk_size, _GROUP_TOKENS)
    outs = []
    for start, end, c in spans:
        # Head-major fp32 copies of this group only: (B, t, H, D) -> (B, H, n, c, D).
        q_, k_, v_, g_ = (
            x[:, start:end].transpose(1, 2).float().contiguous().view(B, H, -1, c, x.shape[-1])
            for x in (q, k, v, g)
        )
        o, state = _chunk_block(q_, k_, v_, g_, state)
        outs.append(o.view(B, H, end - start, V).transpose(1, 2).to(q.dtype))  # (B, t, H, V)
    o = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0].contiguous()  # (B, T, H, V)
    return o, (state if output_final_state else None)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> list[int] | None:
    """Validate the public call; returns the packed sequence bounds as a host list, or None."""
    check_qkv("gla", q, k, v, chunk_size, g=g)
    if g.shape != q.shape:
        raise ValueError(f"g has shape {tuple(g.shape)} but q has {tuple(q.shape)}")
    bounds = check_cu_seqlens(cu_seqlens, q)
    check_initial_state(initial_state, q, v, bounds)
    return bounds


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, the public entry point: (o (B, T, H, V), final_state | None).

    q, k, g: (B, T, H, K); v: (B, T, H, V); initial_state: (B, H, K, V), kept in fp32.
    ``g`` ≤ 0 is the log decay per key channel; its values are not checked, since they are data
    (a rounding-level positive value is harmless). ``cu_seqlens`` packs variable-length
    sequences along T (B must be 1), with initial and final states (N, H, K, V). ``backend``:
    see `zoo.kernels.linear_attention.dispatch`; the torch form uses ``chunk_size`` as given, the
    Triton kernels round it to a power of two in [16, 64].
    """
    bounds = _check_inputs(q, k, v, g, initial_state, cu_seqlens, chunk_size)
    return dispatch(
        "gated linear attention", backend, q, k, v,
        per_token={"g": g}, constants={}, initial_state=initial_state,
        output_final_state=output_final_state, bounds=bounds, chunk_size=chunk_size,
        torch_step=gla_step, torch_chunk=gla_chunk_torch,
    )  # fmt: skip
