"""Selective scan: Mamba's input-dependent diagonal state-space recurrence.

Paper: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao,
arXiv 2312.00752), §3.2 Alg. 2. Per batch b, channel d and state n, with A = −exp(A_log) < 0
and a step size Δ_t ≥ 0 per token and channel:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t          (h is D_in × N, kept in fp32)
    y_t = h_t C_t + D ⊙ u_t

B̄ = Δ B is the Euler simplification of the paper's ZOH B̄ that mamba_ssm's kernels and its
`selective_scan_ref` use; we follow the code. The gate (y ⊙ SiLU(z)) is fused into the torch
form and the Triton kernels when ``z`` is given (the layer passes it).

Blocked torch form (`selective_scan_chunk_torch`, an autograd.Function with its own backward).
Tokens go in blocks of whole chunks holding about `_GROUP_ELEMENTS` state elements (at least one
chunk); per block, time-major, with states laid out (N, D_in):

1. exp(Δ_t A) and Δ_t u_t B_t for the block, each one op into a buffer reused by every block;
2. the recurrence in place in the second buffer, one fused multiply-add per token;
3. y_t = C_t h_t for the whole block in one batched (1, N) @ (N, D_in) product.

Every exponent is A times one token's Δ (≤ 0), so nothing overflows, as the exp(±cumsum)
factorisation does at real Δ. Only the state entering each block is kept for backward, which
recomputes a block's states from it and walks the block backwards (g_t = C_t ⊗ dy_t + exp(Δ_{t+1}
A) ⊙ g_{t+1}), as the Triton kernels do per block of `_SCAN_BT` tokens: memory and time are
linear in T. Why this shape, measured on 2 CPU threads at Mamba's benchmark size (B=1,
D_in=768, N=16, T=1024): a token-step costs ~3 µs, mostly dispatch overhead, so the scan is
bounded by T such steps per layer. SSD's chunk decomposition (Mamba-2, arXiv 2405.21060, §6)
needs C×C decays per (channel, state) for Mamba-1's diagonal A, C/2 times the recurrence's work,
and ran 4–8× slower; advancing several chunks together from zero and fixing their starts up
afterwards (our previous form) doubles the elementwise work, and under autograd kept every
state and stacked them, 2–3× slower than this form forward and backward. (D_in, N) states made
the read-out a (D_in, N) @ (N, 1) product per token, ~7× slower than (1, N) @ (N, D_in).

Layout follows mamba_ssm's selective_scan_ref with time before channels: u, delta (B, T, D_in);
A (D_in, N); B, C (B, T, N); D (D_in,); state (B, D_in, N) fp32. Module order: naive reference →
decode step → blocked torch form → Triton kernels → public dispatch function.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU deps
    triton = None

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import (
    check_chunk_size,
    check_cu_seqlens,
    check_decay_and_step,
    check_tensors,
    needs_grad,
    run_segments,
    values_checkable,
)
from zoo.kernels.matvec import materialize, matvec

__all__ = [
    "selective_scan",
    "selective_scan_chunk_torch",
    "selective_scan_naive",
    "selective_scan_step",
]

# State elements (B · tokens · D_in · N) of one block of chunks: 2^20 fp32 values = 4 MiB per
# buffer, so a block's three buffers stay in a CPU's L3 cache.
_GROUP_ELEMENTS = 1 << 20


def selective_scan_naive(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence in fp32 (mamba_ssm's selective_scan_ref): the oracle."""
    batch, T, d_inner = u.shape
    n_state = A.shape[1]
    uf, df, Af, Bf, Cf = u.float(), delta.float(), A.float(), B.float(), C.float()
    if initial_state is None:
        h = u.new_zeros(batch, d_inner, n_state, dtype=torch.float32)
    else:
        h = initial_state.float()
    ys = []
    for t in range(T):
        decay = torch.exp(df[:, t, :, None] * Af)  # (B, D_in, N)
        h = decay * h + (df[:, t] * uf[:, t])[:, :, None] * Bf[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, t]))
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(batch, 0, d_inner)  # (B, T, D_in)
    if D is not None:
        y = y + uf * D.float()
    return y.to(u.dtype), (h if output_final_state else None)


def selective_scan_step(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. u, delta: (B, D_in); B, C: (B, N); state: (B, D_in, N) fp32 or None.

    Returns y (B, D_in) in u's dtype and a new fp32 state; ``state`` is left untouched so a
    cache can keep the previous one.
    """
    uf, df = u.float(), delta.float()
    if torch.compiler.is_compiling():  # computed once, not once per state column
        uf, df = materialize(uf), materialize(df)
    bu = (df * uf).unsqueeze(-1) * B.float().unsqueeze(-2)  # (B, D_in, N)
    if state is None:
        new_state = bu
    else:
        new_state = torch.addcmul(bu, torch.exp(df.unsqueeze(-1) * A.float()), state.float())
    if torch.compiler.is_compiling():
        # A reduction inductor fuses with the update: the state is read once, no extern bmm.
        y = matvec(C.float(), new_state)  # (B, D_in)
    else:
        y = (new_state @ C.float().unsqueeze(-1)).squeeze(-1)  # (B, D_in)
    if D is not None:
        y = y + uf * D.float()
    return y.to(u.dtype), new_state


def _block_states(
    delta: torch.Tensor,
    inject: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    h: torch.Tensor,
    decay: torch.Tensor,
    states: torch.Tensor,
    decays: tuple[torch.Tensor, ...],
    hs: tuple[torch.Tensor, ...],
) -> None:
    """One block of L tokens, time-major, fp32, states as (N, D_in): delta and inject = Δ ⊙ u
    (L, B, D_in); B (L, B, N); A2 = Aᵀ · log2(e) (N, D_in); h (B, N, D_in), the state entering
    the block.

    Fills the buffers ``decay`` (L, B, N, D_in) with exp(Δ_t A) and ``states`` with h_1 … h_L,
    in place: no (L, B, N, D_in) tensor is allocated. ``decays`` and ``hs`` are the per-token
    views of the whole buffers (unbound once per call, not per block: a view costs ~1 µs).
    """
    # exp(x) = 2^(x · log2 e); torch's exp2 is ~2.5x faster than its exp on CPU.
    torch.mul(delta.unsqueeze(-2), A2, out=decay).exp2_()
    torch.mul(B.unsqueeze(-1), inject.unsqueeze(-2), out=states)  # Δ_t u_t B_t
    hs[0].addcmul_(decays[0], h)
    for t in range(1, states.shape[0]):
        hs[t].addcmul_(decays[t], hs[t - 1])


def _block_spans(T: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, T)) for start in range(0, T, block)]


def _scratch_mode() -> contextlib.AbstractContextManager:
    """Inference mode for the scan's scratch loop in eager mode (less dispatch per token); plain
    no_grad under torch.compile, whose tracer cannot take inference tensors."""
    return torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode()


class _ChunkScan(torch.autograd.Function):
    """The blocked torch form with its own backward. Autograd would keep every state of every
    block (or could not differentiate the in-place updates at all); this forward keeps only the
    state entering each block, and backward recomputes one block's states from it and walks the
    block backwards, as the Triton kernels do per block of ``_SCAN_BT`` tokens."""

    @staticmethod
    def forward(ctx: Any, u, delta, A, B, C, D, z, h0, block, final):  # type: ignore[override]
        batch, T, d_inner = u.shape
        n_state = A.shape[1]
        # Time-major fp32 views (T, B, X): one token's (B, N, D_in) slice of a buffer is
        # contiguous. States are kept as (N, D_in), so y_t = C_t h_t is a (1, N) @ (N, D_in)
        # product per token (a batched matrix-vector product the other way round, (D_in, N) @
        # (N, 1), ran ~7x slower on a CPU).
        u_, delta_, B_, C_ = (x.float().transpose(0, 1) for x in (u, delta, B, C))
        inject = delta_ * u_  # (T, B, D_in)
        # Contiguous: a strided (N, D_in) view would make every broadcast with it ~3x slower.
        A2 = (A.float().t() * math.log2(math.e)).contiguous()  # (N, D_in)
        spans = _block_spans(T, block)
        # The state entering each block: all that backward keeps of the scan.
        checkpoints = u_.new_empty(len(spans), batch, n_state, d_inner)
        if h0 is None:
            checkpoints[0].zero_()
        else:
            checkpoints[0] = h0.transpose(1, 2)
        y = u_.new_empty(T, batch, d_inner)
        final_state = u_.new_empty(batch, d_inner, n_state) if final else None  # (B, D_in, N)
        # Scratch only, under inference mode: ~15% less dispatch overhead per token-step, which
        # is most of a step's cost at these sizes. What leaves this block (y, the checkpoints,
        # the final state) is made outside it: an inference tensor cannot take part in autograd.
        with _scratch_mode():
            decay = u_.new_empty(block, batch, n_state, d_inner)  # reused by every block
            states = torch.empty_like(decay)
            views = decay.unbind(0), states.unbind(0)
            for k, (start, end) in enumerate(spans):
                L = end - start
                _block_states(
                    delta_[start:end],
                    inject[start:end],
                    A2,
                    B_[start:end],
                    checkpoints[k],
                    decay[:L],
                    states[:L],
                    *views,
                )
                # y_t = C_t h_t for the whole block at once. (Assigned, not `out=` a view of y:
                # torch.compile's functionalization cannot write a matmul into such a view.)
                y[start:end] = torch.matmul(C_[start:end].unsqueeze(-2), states[:L]).squeeze(-2)
                if k + 1 < len(spans):
                    checkpoints[k + 1] = states[L - 1]
            if final_state is not None:
                final_state.copy_(states[L - 1].transpose(1, 2))
        if D is not None:
            y.addcmul_(u_, D.float())
        y = y.transpose(0, 1)  # (B, T, D_in)
        gated = F.silu(z.float()).mul_(y) if z is not None else y
        saved_y = y if z is not None else None  # the gate's backward needs y
        ctx.save_for_backward(u, delta, A, B, C, D, z, h0, checkpoints, saved_y)
        ctx.block = block
        return gated.to(u.dtype).contiguous(), final_state

    @staticmethod
    @once_differentiable  # the scratch buffers are updated in place, under inference mode
    def backward(ctx: Any, dy, dht):  # type: ignore[override]
        u, delta, A, B, C, D, z, h0, checkpoints, y = ctx.saved_tensors
        batch, T, d_inner = u.shape
        n_state = A.shape[1]
        block = ctx.block
        dy = dy.float()
        dz = None
        if z is not None:
            zf = z.float()
            sig = torch.sigmoid(zf)
            # d(y · z σ(z))/dz = y σ(z) (1 + z (1 − σ(z))), in place on one fresh tensor.
            dz = torch.sub(1.0, sig).mul_(zf).add_(1.0).mul_(sig).mul_(y).mul_(dy).to(z.dtype)
            dy = zf.mul(sig).mul_(dy)  # the gradient of y, through the gate
        dD = (dy * u.float()).sum((0, 1)).to(D.dtype) if D is not None else None
        u_, delta_, B_, C_, dy_ = (x.float().transpose(0, 1) for x in (u, delta, B, C, dy))
        inject = delta_ * u_  # (T, B, D_in)
        At = A.float().t().contiguous()  # (N, D_in)
        A2 = At * math.log2(math.e)
        # Time-major gradients, written block by block.
        du = u_.new_empty(T, batch, d_inner)
        ddelta = torch.empty_like(du)
        dB = u_.new_empty(T, batch, n_state)
        dC = torch.empty_like(dB)
        dA = torch.zeros_like(At)
        # The gradient of the state after the current block's last token, from later tokens.
        if dht is None:
            carry = u_.new_zeros(batch, n_state, d_inner)
        else:
            carry = dht.float().transpose(1, 2)
        with _scratch_mode():  # scratch only, as in forward
            decay = u_.new_empty(block, batch, n_state, d_inner)
            states = torch.empty_like(decay)
            grad = torch.empty_like(decay)
            decays, hs_all, gs = decay.unbind(0), states.unbind(0), grad.unbind(0)
            for k, (start, end) in reversed(list(enumerate(_block_spans(T, block)))):
                L = end - start
                h = checkpoints[k]
                a, hs, g = decay[:L], states[:L], grad[:L]
                dy_k, delta_k, inject_k = dy_[start:end], delta_[start:end], inject[start:end]
                B_k, C_k = B_[start:end], C_[start:end]
                _block_states(delta_k, inject_k, A2, B_k, h, a, hs, decays, hs_all)
                # dC_t = h_t dy_t, before the buffers are reused; (1, D_in) @ (D_in, N) ran ~9x
                # faster than the (N, D_in) @ (D_in, 1) product on a CPU.
                dC[start:end] = torch.matmul(dy_k.unsqueeze(-2), hs.mT).squeeze(-2)
                # g_t = dL/dh_t = C_t ⊗ dy_t + exp(Δ_{t+1} A) ⊙ g_{t+1}, the last token first.
                torch.mul(C_k.unsqueeze(-1), dy_k.unsqueeze(-2), out=g)
                gs[L - 1].add_(carry)
                for t in range(L - 2, -1, -1):
                    gs[t].addcmul_(decays[t + 1], gs[t + 1])
                carry = decays[0] * gs[0]  # the gradient of the state entering this block
                # Through the input Δ_t u_t B_t: gB_t = B_t g_t (D_in), dB_t = g_t (Δ_t u_t) (N).
                gB = torch.matmul(B_k.unsqueeze(-2), g).squeeze(-2)  # (L, B, D_in)
                dB[start:end] = torch.matmul(inject_k.unsqueeze(-2), g.mT).squeeze(-2)
                # Through the decay: q = g_t ⊙ h_{t-1} ⊙ exp(Δ_t A) = dL/d(Δ_t A), in a's buffer.
                q = a.mul_(g)
                q[1:].mul_(hs[:-1])
                q[0].mul_(h)
                dA += torch.mul(q, delta_k.unsqueeze(-2), out=g).sum((0, 1))
                q_A = q.mul_(At).sum(-2)  # (L, B, D_in): Σ_n q A
                torch.addcmul(q_A, gB, u_[start:end], out=ddelta[start:end])
                torch.mul(gB, delta_k, out=du[start:end])
        du = du.transpose(0, 1)
        if D is not None:
            du = torch.addcmul(du, dy, D.float())
        # clone(): carry may be an inference tensor, which must not leave as a gradient.
        dh0 = carry.transpose(1, 2).clone().to(h0.dtype) if h0 is not None else None
        # Contiguous (B, T, ...) gradients, the layout of their inputs: compiled backward graphs
        # view them flat (torch.compile of a Mamba failed on the transposed ones).
        return (
            du.to(u.dtype).contiguous(),
            ddelta.transpose(0, 1).to(delta.dtype).contiguous(),
            dA.t().to(A.dtype),
            dB.transpose(0, 1).to(B.dtype).contiguous(),
            dC.transpose(0, 1).to(C.dtype).contiguous(),
            dD,
            dz,
            dh0,
            None,
            None,
        )


def _block_tokens(batch: int, d_inner: int, n_state: int, chunk_size: int) -> int:
    """Tokens per block: whole chunks holding about _GROUP_ELEMENTS state elements, at least one."""
    chunks = max(1, _GROUP_ELEMENTS // (batch * chunk_size * d_inner * n_state))
    return chunks * chunk_size


def selective_scan_chunk_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocked form in pure torch: O(T) time and memory, differentiable, any T ≥ 1.

    ``z`` (B, T, D_in): returns y ⊙ SiLU(z), the gate fused (in forward and backward). Inputs
    are not validated beyond T and chunk_size; ``selective_scan`` does that. Computes in fp32
    and returns y in u's dtype.
    """
    batch, T, d_inner = u.shape
    if T == 0:
        raise ValueError("selective_scan_chunk_torch needs at least one token but u has T=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    block = min(T, _block_tokens(batch, d_inner, A.shape[1], chunk_size))
    return _ChunkScan.apply(u, delta, A, B, C, D, z, initial_state, block, output_final_state)


# ---------------------------------------------------------------------------------------------
# Triton. Every (sequence, channel, state) lane is independent, so programs take BD channels of
# one sequence and walk its tokens in order, each step one fused update of a (BD, N) state in
# registers; the loads of later tokens do not depend on the state, so they pipeline. Sequences
# are folded into one token axis with bounds `cu` (a batch's B equal rows, or packed
# `cu_seqlens`).

if triton is not None:

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, h0_ptr, y_ptr, checkpoints_ptr,
        ht_ptr, cu_ptr, block_offset_ptr, D_in, N,
        BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
    ):  # fmt: skip
        """y (times SiLU(z) with a gate) for one sequence and BD channels; writes the state
        entering every block of BT tokens (the backward's checkpoints) and optionally the final
        state."""
        pd, seq = tl.program_id(0), tl.program_id(1)
        tok0 = tl.load(cu_ptr + seq).to(tl.int64)
        tok1 = tl.load(cu_ptr + seq + 1).to(tl.int64)
        block0 = tl.load(block_offset_ptr + seq).to(tl.int64)
        ds = pd * BD + tl.arange(0, BD)
        ns = tl.arange(0, BN)
        d_ok, n_ok = ds < D_in, ns < N
        dn_mask = d_ok[:, None] & n_ok[None, :]
        dn_offs = ds[:, None] * N + ns[None, :]
        A = tl.load(A_ptr + dn_offs, mask=dn_mask, other=0.0).to(tl.float32)  # (BD, BN)
        h = tl.zeros((BD, BN), dtype=tl.float32)
        if HAS_H0:
            h += tl.load(h0_ptr + seq.to(tl.int64) * D_in * N + dn_offs, mask=dn_mask, other=0.0)
        if HAS_D:
            skip = tl.load(D_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
        for i in range(tl.cdiv(tok1 - tok0, BT)):
            tl.store(checkpoints_ptr + (block0 + i) * D_in * N + dn_offs, h, mask=dn_mask)
            for r in range(BT):
                t = tok0 + i * BT + r
                # Past the end: Δ = 0, so a = 1 and b = 0 keep h (a vector compare as mask).
                d_live = ds < tl.where(t < tok1, D_in, 0)
                n_live = ns < tl.where(t < tok1, N, 0)
                u = tl.load(u_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                dt = tl.load(delta_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + t * N + ns, mask=n_live, other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + t * N + ns, mask=n_live, other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
                y = tl.sum(h * Ct[None, :], 1)  # (BD,)
                if HAS_D:
                    y += skip * u
                if HAS_Z:
                    z = tl.load(z_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                    y *= z * tl.sigmoid(z)
                tl.store(y_ptr + t * D_in + ds, y.to(y_ptr.dtype.element_ty), mask=d_live)
        if STORE_HT:
            tl.store(ht_ptr + seq.to(tl.int64) * D_in * N + dn_offs, h, mask=dn_mask)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dy_ptr, checkpoints_ptr, dht_ptr,
        scratch_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dh0_ptr,
        cu_ptr, block_offset_ptr, D_in, N, total_tokens,
        BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    ):  # fmt: skip
        """Gradients for one sequence and BD channels, last block first.

        Per block of BT tokens: the states are recomputed from the block's checkpoint into this
        program's scratch rows, then walked backwards with dh_t = dy_t C_tᵀ + a_{t+1} dh_{t+1}.
        dB and dC sum over channels: each program writes its own partial sums (reduced on the
        host, deterministic, no atomics); dA and dD sum over tokens here and over sequences on
        the host. With a gate, dy arrives as the gradient of y ⊙ SiLU(z) and y is recomputed.
        """
        pd, seq = tl.program_id(0), tl.program_id(1)
        tok0 = tl.load(cu_ptr + seq).to(tl.int64)
        tok1 = tl.load(cu_ptr + seq + 1).to(tl.int64)
        block0 = tl.load(block_offset_ptr + seq).to(tl.int64)
        ds = pd * BD + tl.arange(0, BD)
        ns = tl.arange(0, BN)
        d_ok, n_ok = ds < D_in, ns < N
        dn_mask = d_ok[:, None] & n_ok[None, :]
        dn_offs = ds[:, None] * N + ns[None, :]
        A = tl.load(A_ptr + dn_offs, mask=dn_mask, other=0.0).to(tl.float32)
        # Scratch rows of this program: BT states of (BD, BN), contiguous.
        scratch = scratch_ptr + (seq.to(tl.int64) * tl.num_programs(0) + pd) * BT * BD * BN
        tile = tl.arange(0, BD)[:, None] * BN + ns[None, :]
        partial = pd.to(tl.int64) * total_tokens * N  # this program's rows of dB and dC
        # Gradient of the state after the current token, from later tokens (or the final state).
        carry = tl.zeros((BD, BN), dtype=tl.float32)
        if HAS_DHT:
            carry += tl.load(dht_ptr + seq.to(tl.int64) * D_in * N + dn_offs, mask=dn_mask,
                             other=0.0)  # fmt: skip
        if HAS_D:
            skip = tl.load(D_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
        dA = tl.zeros((BD, BN), dtype=tl.float32)
        dD = tl.zeros((BD,), dtype=tl.float32)
        num_blocks = tl.cdiv(tok1 - tok0, BT)
        for j in range(num_blocks):
            i = num_blocks - 1 - j
            h = tl.load(checkpoints_ptr + (block0 + i) * D_in * N + dn_offs, mask=dn_mask,
                        other=0.0)  # fmt: skip
            for r in range(BT):  # recompute: scratch row r holds the state before token r
                t = tok0 + i * BT + r
                d_live = ds < tl.where(t < tok1, D_in, 0)
                n_live = ns < tl.where(t < tok1, N, 0)
                tl.store(scratch + r * BD * BN + tile, h)
                u = tl.load(u_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                dt = tl.load(delta_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + t * N + ns, mask=n_live, other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            for k in range(BT):  # walk back
                r = BT - 1 - k
                t = tok0 + i * BT + r
                d_live = ds < tl.where(t < tok1, D_in, 0)
                n_live = ns < tl.where(t < tok1, N, 0)
                h_prev = tl.load(scratch + r * BD * BN + tile)
                u = tl.load(u_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                dt = tl.load(delta_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + t * N + ns, mask=n_live, other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + t * N + ns, mask=n_live, other=0.0).to(tl.float32)
                a = tl.exp(dt[:, None] * A)
                ah = a * h_prev
                h = ah + (dt * u)[:, None] * Bt[None, :]
                if HAS_Z:
                    z = tl.load(z_ptr + t * D_in + ds, mask=d_live, other=0.0).to(tl.float32)
                    y = tl.sum(h * Ct[None, :], 1)
                    if HAS_D:
                        y += skip * u
                    sig = tl.sigmoid(z)
                    dz = dy * y * sig * (1.0 + z * (1.0 - sig))
                    tl.store(dz_ptr + t * D_in + ds, dz.to(dz_ptr.dtype.element_ty), mask=d_live)
                    dy *= z * sig
                if HAS_D:
                    dD += dy * u
                dh = dy[:, None] * Ct[None, :] + carry
                du = tl.sum(dh * Bt[None, :], 1) * dt
                if HAS_D:
                    du += skip * dy
                ddt = tl.sum(dh * (u[:, None] * Bt[None, :] + A * ah), 1)
                tl.store(du_ptr + t * D_in + ds, du.to(du_ptr.dtype.element_ty), mask=d_live)
                tl.store(ddelta_ptr + t * D_in + ds, ddt.to(ddelta_ptr.dtype.element_ty),
                         mask=d_live)  # fmt: skip
                tl.store(dB_ptr + partial + t * N + ns, tl.sum(dh * (dt * u)[:, None], 0),
                         mask=n_live)  # fmt: skip
                tl.store(dC_ptr + partial + t * N + ns, tl.sum(h * dy[:, None], 0),
                         mask=n_live)  # fmt: skip
                dA += dh * dt[:, None] * ah
                carry = a * dh
        tl.store(dA_ptr + seq.to(tl.int64) * D_in * N + dn_offs, dA, mask=dn_mask)
        if HAS_D:
            tl.store(dD_ptr + seq.to(tl.int64) * D_in + ds, dD, mask=d_ok)
        if STORE_DH0:
            tl.store(dh0_ptr + seq.to(tl.int64) * D_in * N + dn_offs, carry, mask=dn_mask)

    @triton.jit
    def _scan_step_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, state_ptr, new_state_ptr, y_ptr, D_in, N,
        BD: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, HAS_STATE: tl.constexpr,
    ):  # fmt: skip
        """One decode step for one batch row and BD channels: h' = e^{ΔA} h + Δ u B, y = h' C."""
        pd, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
        ds = pd * BD + tl.arange(0, BD)
        ns = tl.arange(0, BN)
        dn_mask = (ds[:, None] < D_in) & (ns[None, :] < N)
        dn_offs = ds[:, None] * N + ns[None, :]
        u = tl.load(u_ptr + row * D_in + ds, mask=ds < D_in, other=0.0).to(tl.float32)
        dt = tl.load(delta_ptr + row * D_in + ds, mask=ds < D_in, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + row * N + ns, mask=ns < N, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + row * N + ns, mask=ns < N, other=0.0).to(tl.float32)
        h = (dt * u)[:, None] * Bt[None, :]
        if HAS_STATE:
            A = tl.load(A_ptr + dn_offs, mask=dn_mask, other=0.0).to(tl.float32)
            old = tl.load(state_ptr + row * D_in * N + dn_offs, mask=dn_mask, other=0.0)
            h += tl.exp(dt[:, None] * A) * old
        tl.store(new_state_ptr + row * D_in * N + dn_offs, h, mask=dn_mask)
        y = tl.sum(h * Ct[None, :], 1)
        if HAS_D:
            y += tl.load(D_ptr + ds, mask=ds < D_in, other=0.0).to(tl.float32) * u
        tl.store(y_ptr + row * D_in + ds, y.to(y_ptr.dtype.element_ty), mask=ds < D_in)


# Tokens per checkpoint block and channels per program. Checkpoints hold one fp32 state per
# block (N/BT fp32 values per input element); the backward's scratch holds BT states per program.
_SCAN_BT = 32
_SCAN_BD = 64
_SCAN_WARPS = 4


def _scan_blocks(bounds: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(cu, block_offset, total blocks) for sequences with these bounds, int32 on `device`."""
    offsets = [0]
    for start, end in itertools.pairwise(bounds):
        offsets.append(offsets[-1] + -(-(end - start) // _SCAN_BT))
    as_int = dict(device=device, dtype=torch.int32)
    return torch.tensor(bounds, **as_int), torch.tensor(offsets, **as_int), offsets[-1]


def _state_block(n_state: int) -> int:
    return triton.next_power_of_2(n_state)


# The Triton forms are torch.library custom ops: torch.compile keeps each as one opaque node
# (shapes from its fake implementation) instead of breaking the graph at an autograd.Function.
# The forward also returns its state checkpoints, which the backward op reads.


@torch.library.custom_op("zoo::selective_scan", mutates_args=())
def _scan_forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    h0: torch.Tensor | None,
    bounds: list[int],
    final: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y like u, final states (S, D_in, N) fp32 or empty, state checkpoints for backward)."""
    d_inner, n_state = A.shape
    u_, delta_, B_, C_ = (x.reshape(-1, x.shape[-1]).contiguous() for x in (u, delta, B, C))
    z_ = z.reshape(-1, d_inner).contiguous() if z is not None else None
    D_ = D.float().contiguous() if D is not None else None
    h0_ = h0.float().contiguous() if h0 is not None else None
    cu, block_offset, num_blocks = _scan_blocks(bounds, u.device)
    num_seqs = len(bounds) - 1
    y = torch.empty_like(u_)
    checkpoints = u.new_empty(num_blocks, d_inner, n_state, dtype=torch.float32)
    ht = u.new_empty(num_seqs if final else 0, d_inner, n_state, dtype=torch.float32)
    grid = (triton.cdiv(d_inner, _SCAN_BD), num_seqs)
    _scan_fwd_kernel[grid](
        u_, delta_, A.float().contiguous(), B_, C_, D_, z_, h0_, y, checkpoints,
        ht if final else None, cu, block_offset,
        d_inner, n_state,
        BT=_SCAN_BT, BD=_SCAN_BD, BN=_state_block(n_state),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, STORE_HT=final,
        num_warps=_SCAN_WARPS,
    )  # fmt: skip
    return y.view(u.shape), ht, checkpoints


@_scan_forward.register_fake
def _(u, delta, A, B, C, D, z, h0, bounds, final):
    d_inner, n_state = A.shape
    num_blocks = sum(-(-(end - start) // _SCAN_BT) for start, end in itertools.pairwise(bounds))
    num_seqs = len(bounds) - 1 if final else 0
    return (
        torch.empty_like(u),
        u.new_empty(num_seqs, d_inner, n_state, dtype=torch.float32),
        u.new_empty(num_blocks, d_inner, n_state, dtype=torch.float32),
    )


@torch.library.custom_op("zoo::selective_scan_backward", mutates_args=())
def _scan_backward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    checkpoints: torch.Tensor,
    dy: torch.Tensor,
    dht: torch.Tensor | None,
    bounds: list[int],
    has_h0: bool,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor,
]:  # fmt: skip
    """(du, dδ, dA, dB, dC, dD, dz, dh0), each in its input's dtype; empty where absent."""
    d_inner, n_state = A.shape
    u_, delta_, B_, C_ = (x.reshape(-1, x.shape[-1]).contiguous() for x in (u, delta, B, C))
    z_ = z.reshape(-1, d_inner).contiguous() if z is not None else None
    D_ = D.float().contiguous() if D is not None else None
    cu, block_offset, _ = _scan_blocks(bounds, u.device)
    num_seqs = len(bounds) - 1
    tokens = u_.shape[0]
    dy_ = dy.reshape(-1, d_inner).contiguous()
    grid = (triton.cdiv(d_inner, _SCAN_BD), num_seqs)
    bn = _state_block(n_state)
    scratch = u_.new_empty(grid[0] * num_seqs * _SCAN_BT * _SCAN_BD * bn, dtype=torch.float32)
    du = torch.empty_like(u_)
    ddelta = torch.empty_like(delta_)
    dA = u_.new_empty(num_seqs, d_inner, n_state, dtype=torch.float32)
    # Per channel block partial sums of dB and dC (summed below).
    dB = u_.new_empty(grid[0], tokens, n_state, dtype=torch.float32)
    dC = torch.empty_like(dB)
    dh0 = u_.new_empty(num_seqs if has_h0 else 0, d_inner, n_state, dtype=torch.float32)
    dD = u_.new_empty(num_seqs, d_inner, dtype=torch.float32) if D is not None else None
    dz = torch.empty_like(z_) if z_ is not None else None
    _scan_bwd_kernel[grid](
        u_, delta_, A.float().contiguous(), B_, C_, D_, z_, dy_, checkpoints,
        dht.float().contiguous() if dht is not None else None, scratch,
        du, ddelta, dA, dB, dC, dD, dz, dh0 if has_h0 else None, cu, block_offset,
        d_inner, n_state, tokens,
        BT=_SCAN_BT, BD=_SCAN_BD, BN=bn,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DHT=dht is not None,
        STORE_DH0=has_h0, num_warps=_SCAN_WARPS,
    )  # fmt: skip
    return (
        du.view(u.shape),
        ddelta.view(u.shape),
        dA.sum(0).to(A.dtype),
        dB.sum(0).view(B.shape).to(B.dtype),
        dC.sum(0).view(C.shape).to(C.dtype),
        dD.sum(0).to(D.dtype) if D is not None else u.new_empty(0),
        dz.view(u.shape) if dz is not None else u.new_empty(0),
        dh0,
    )


@_scan_backward.register_fake
def _(u, delta, A, B, C, D, z, checkpoints, dy, dht, bounds, has_h0):
    num_seqs = len(bounds) - 1 if has_h0 else 0
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D) if D is not None else u.new_empty(0),
        torch.empty_like(u) if z is not None else u.new_empty(0),
        u.new_empty(num_seqs, *A.shape, dtype=torch.float32),
    )


def _scan_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    u, delta, A, B, C, D, z, h0, bounds, final = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[2])
    ctx.meta = (bounds, final, h0 is not None)


def _scan_autograd(ctx: Any, dy: torch.Tensor, dht: torch.Tensor, _: torch.Tensor) -> tuple:
    u, delta, A, B, C, D, z, checkpoints = ctx.saved_tensors
    bounds, final, has_h0 = ctx.meta
    du, ddelta, dA, dB, dC, dD, dz, dh0 = _scan_backward(
        u, delta, A, B, C, D, z, checkpoints, dy, dht if final else None, bounds, has_h0
    )
    return (
        du, ddelta, dA, dB, dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dh0 if has_h0 else None,
        None, None,
    )  # fmt: skip


_scan_forward.register_autograd(_scan_autograd, setup_context=_scan_setup)


@torch.library.custom_op("zoo::selective_scan_step", mutates_args=())
def _selective_scan_step_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused decode step: u, delta (B, D_in); B, C (B, N); state (B, D_in, N) fp32 or None."""
    batch, d_inner = u.shape
    n_state = A.shape[1]
    new_state = u.new_empty(batch, d_inner, n_state, dtype=torch.float32)
    y = torch.empty_like(u)
    _scan_step_kernel[(triton.cdiv(d_inner, _SCAN_BD), batch)](
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        D.contiguous() if D is not None else None,
        state.float().contiguous() if state is not None else None, new_state, y,
        d_inner, n_state,
        BD=_SCAN_BD, BN=_state_block(n_state),
        HAS_D=D is not None, HAS_STATE=state is not None,
    )  # fmt: skip
    return y, new_state


@_selective_scan_step_triton.register_fake
def _(u, delta, A, B, C, D, state):
    return torch.empty_like(u), u.new_empty(*u.shape, A.shape[1], dtype=torch.float32)


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> list[int] | None:
    """Validate the public call; returns the packed sequence bounds as a host list, or None."""
    if u.dim() != 3:
        raise ValueError(f"u must be (B, T, D_in) but has shape {tuple(u.shape)}")
    batch, T, d_inner = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but u has {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(
            f"A has shape {tuple(A.shape)} but must be (D_in, N) with D_in = {d_inner} from u"
        )
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, T, n_state):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but must be (B, T, N) = "
                f"{(batch, T, n_state)} from u and A"
            )
    if D is not None and D.shape != (d_inner,):
        raise ValueError(f"D has shape {tuple(D.shape)} but must be (D_in,) = ({d_inner},)")
    check_tensors(("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D))
    if T == 0:
        raise ValueError("u has T=0 tokens; selective_scan needs at least one")
    if values_checkable(u):
        check_decay_and_step(A, delta, "delta", "a step size, e.g. a softplus output")
    check_chunk_size(chunk_size)
    bounds = check_cu_seqlens(cu_seqlens, u)
    n_states = batch if bounds is None else len(bounds) - 1
    if initial_state is not None and initial_state.shape != (n_states, d_inner, n_state):
        what = "(B, D_in, N)" if bounds is None else "(N_seq, D_in, N), N_seq = len(cu_seqlens) - 1"
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)} but must be {what} = "
            f"{(n_states, d_inner, n_state)}"
        )
    return bounds


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan, public entry point. Returns (y (B, T, D_in), final_state | None).

    ``delta`` is the step size after its bias and softplus (≥ 0) and ``A`` = −exp(A_log) (≤ 0).
    ``z`` (B, T, D_in), Mamba's gate: y ⊙ SiLU(z) is returned instead of y (fused into the
    Triton kernels, as mamba_ssm's ``selective_scan_fn(z=...)``). ``cu_seqlens`` packs
    variable-length sequences along T (B must be 1), with initial and final states
    (N_seq, D_in, N). ``backend``: "auto" (the Triton kernels for CUDA tensors, the torch
    chunked form otherwise), "torch", or "triton" (CUDA, or the CPU interpreter under
    TRITON_INTERPRET=1). ``ZOO_KERNEL_BACKEND`` overrides "auto". ``chunk_size`` is the torch
    form's; the Triton scan checkpoints its state every ``_SCAN_BT`` tokens.
    """
    bounds = _check_inputs(u, delta, A, B, C, D, initial_state, cu_seqlens, chunk_size)
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z has shape {tuple(z.shape)} but u has {tuple(u.shape)}")

    def gate(y: torch.Tensor) -> torch.Tensor:
        return y if z is None else y * F.silu(z)

    if resolve_backend(backend, "selective-scan", u) == "triton":
        step = bounds is None and u.shape[1] == 1
        if step and not needs_grad(u, delta, A, B, C, D, initial_state, z):
            y, state = _selective_scan_step_triton(
                u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, initial_state
            )
            return gate(y.unsqueeze(1)), (state if output_final_state else None)
        if bounds is None:
            bounds = [b * u.shape[1] for b in range(u.shape[0] + 1)]
        y, final_state, _ = _scan_forward(
            u, delta, A, B, C, D, z, initial_state, bounds, output_final_state
        )
        return y, (final_state if output_final_state else None)

    def scan(u_, delta_, B_, C_, init, final):
        if u_.shape[1] == 1:
            # Decode: a single token needs no chunk machinery.
            y, state = selective_scan_step(u_[:, 0], delta_[:, 0], A, B_[:, 0], C_[:, 0], D, init)
            return y.unsqueeze(1), (state if final else None)
        return selective_scan_chunk_torch(u_, delta_, A, B_, C_, D, init, final, chunk_size)

    if bounds is None:
        if u.shape[1] > 1:
            # The gate fused into the blocked form: no separate pass over y in either direction.
            return selective_scan_chunk_torch(
                u, delta, A, B, C, D, initial_state, output_final_state, chunk_size, z
            )
        y, final_state = scan(u, delta, B, C, initial_state, output_final_state)
        return gate(y), final_state
    state_shape = (u.shape[2], A.shape[1])
    y, final_state = run_segments(
        scan, (u, delta, B, C), bounds, initial_state, output_final_state, state_shape
    )
    return gate(y), final_state
