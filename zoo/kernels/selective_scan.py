"""Selective scan: Mamba's input-dependent diagonal state-space recurrence.

Paper: "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao,
arXiv 2312.00752), §3.2 Alg. 2. Per batch b, channel d and state n, with A = −exp(A_log) < 0
and a step size Δ_t ≥ 0 per token and channel:

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t          (h is D_in × N, kept in fp32)
    y_t = h_t C_t + D ⊙ u_t

B̄ = Δ B is the Euler simplification of the paper's ZOH B̄ that mamba_ssm's kernels and its
`selective_scan_ref` use; we follow the code. The gate (y ⊙ SiLU(z)) stays in the layer.

Chunked form (chunk of C tokens, S_t = Σ_{r≤t} Δ_r within the chunk), after SSD's chunk
decomposition (Mamba-2, "Transformers are SSMs", arXiv 2405.21060, §6):

1. chunk states: each chunk's final state from a zero start;
2. state passing: h_{c+1} = exp(A · S_C) ⊙ h_c + (chunk state of c), a loop over chunks in fp32;
3. chunk outputs: every chunk re-runs its recurrence from its true start state h_c, then
   y_t = h_t C_t for all its positions in one contraction.

Every exponent is A times a segment sum of Δ (one token's, or a chunk's), so it is ≤ 0 and never
overflows, as the exp(±cumsum) factorisation does at real Δ. Ours, where Mamba-2 differs: SSD
computes 1 and 3 as masked C×C matrix products, which needs a scalar decay per head; Mamba-1's A
is diagonal per (channel, state), so that form needs C×C decays per (channel, state), D_in·N·C²
exponentials per chunk, C/2 times the work of the recurrence. On 2 CPU threads (D_in=768, N=16,
T=1024) it ran 4–8× slower than this form at C=4–8, and slower than a plain token loop. So 1
and 3 advance all n chunks of a group together, one position at a time: a Python loop over the
C positions of a chunk, each step one fused multiply-add over (B, n, D_in, N), about 2C + n
steps for n·C tokens. A group holds about `_GROUP_ELEMENTS` state elements, so memory per group
is bounded and time and memory grow linearly in T. When one chunk alone fills that budget
(large B·D_in) a group is one chunk and the loop takes one step per token, but each step is
then large enough that the loop's overhead is small.

Layout follows mamba_ssm's selective_scan_ref with time before channels: u, delta (B, T, D_in);
A (D_in, N); B, C (B, T, N); D (D_in,); state (B, D_in, N) fp32. Module order: naive reference →
decode step → chunked torch form → Triton kernels → public dispatch function.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU deps
    triton = None

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import check_cu_seqlens, needs_grad, run_segments

__all__ = [
    "selective_scan",
    "selective_scan_chunk_torch",
    "selective_scan_naive",
    "selective_scan_step",
]

# State elements (B · tokens · D_in · N) of one group of chunks: 2^20 fp32 values = 4 MiB per
# tensor, so a group's few such tensors stay in a CPU's L3 cache (2^21 and up measured slower).
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
    bu = (df * uf).unsqueeze(-1) * B.float().unsqueeze(-2)  # (B, D_in, N)
    if state is None:
        new_state = bu
    else:
        new_state = torch.addcmul(bu, torch.exp(df.unsqueeze(-1) * A.float()), state.float())
    y = (new_state @ C.float().unsqueeze(-1)).squeeze(-1)  # (B, D_in)
    if D is not None:
        y = y + uf * D.float()
    return y.to(u.dtype), new_state


def _scan_group(
    u: torch.Tensor,
    delta: torch.Tensor,
    A2: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n equal chunks of c tokens. u, delta: (B, n, c, D_in); B, C: (B, n, c, N);
    A2 = A · log2(e) (D_in, N); state (B, D_in, N) entering the first chunk; all fp32.

    Returns y (B, n, c, D_in) without the D skip, and the state after the last chunk.
    """
    n = u.shape[1]
    # exp(x) = 2^(x · log2 e); torch's exp2 is ~2.5x faster than its exp on CPU.
    decay = torch.exp2(delta.unsqueeze(-1) * A2)  # (B, n, c, D_in, N): exp(Δ_t A) ≤ 1
    inject = (delta * u).unsqueeze(-1) * B.unsqueeze(-2)  # (B, n, c, D_in, N): Δ_t u_t B_t
    # Per-position pieces come from unbind, not indexing: the backward of c index views would
    # build c zero-filled gradients of the whole group; unbind's is one stack.

    # 1. Final state of every chunk but the last from a zero start (the last one's is not
    # needed: step 3 ends on the group's true final state).
    starts = [state]
    if n > 1:
        head_decay = decay[:, :-1].unbind(dim=2)  # c x (B, n-1, D_in, N)
        head_inject = inject[:, :-1].unbind(dim=2)
        h = head_inject[0]
        for a_i, b_i in zip(head_decay[1:], head_inject[1:], strict=True):
            h = torch.addcmul(b_i, a_i, h)
        # 2. State passing: exp(A · Σ_chunk Δ) carries a start state across a whole chunk.
        chunk_decay = torch.exp2(delta[:, :-1].sum(dim=2).unsqueeze(-1) * A2)  # (B, n-1, D_in, N)
        for a_k, h_k in zip(chunk_decay.unbind(dim=1), h.unbind(dim=1), strict=True):
            starts.append(torch.addcmul(h_k, a_k, starts[-1]))
    h = torch.stack(starts, dim=1)  # (B, n, D_in, N)

    # 3. Every chunk re-runs its recurrence from its true start; y_t = h_t C_t for all positions
    # at once afterwards (one einsum is several times faster than c small matrix-vector products).
    states = []
    for a_i, b_i in zip(decay.unbind(dim=2), inject.unbind(dim=2), strict=True):
        h = torch.addcmul(b_i, a_i, h)
        states.append(h)
    y = torch.einsum("bncdk,bnck->bncd", torch.stack(states, dim=2), C)  # (B, n, c, D_in)
    return y, h[:, -1]


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked form in pure torch: O(T) time and memory, differentiable, any T ≥ 1.

    Inputs are not validated beyond T and chunk_size; ``selective_scan`` does that. Computes in
    fp32 and returns y in u's dtype.
    """
    batch, T, d_inner = u.shape
    n_state = A.shape[1]
    if T == 0:
        raise ValueError("selective_scan_chunk_torch needs at least one token but u has T=0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    A2 = A.float() * math.log2(math.e)  # (D_in, N)
    if initial_state is None:
        state = u.new_zeros(batch, d_inner, n_state, dtype=torch.float32)
    else:
        state = initial_state.float()

    c = min(chunk_size, T)
    full = T - T % c
    # Whole chunks go in groups of about _GROUP_ELEMENTS state elements (at least one chunk),
    # so memory is bounded per group; the ragged tail (T mod c tokens) is one more chunk of its
    # own length, chained on the state.
    group = max(1, _GROUP_ELEMENTS // (batch * c * d_inner * n_state)) * c
    spans = [(start, min(start + group, full), c) for start in range(0, full, group)]
    if full < T:
        spans.append((full, T, T - full))
    ys = []
    for start, end, length in spans:
        # fp32 copies of this group only: (B, tokens, X) -> (B, n, c, X).
        shape = (batch, (end - start) // length, length, -1)
        u_g, delta_g, B_g, C_g = (t[:, start:end].float().reshape(shape) for t in (u, delta, B, C))
        y, state = _scan_group(u_g, delta_g, A2, B_g, C_g, state)
        ys.append(y.reshape(batch, end - start, d_inner))  # (B, tokens, D_in)
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]  # (B, T, D_in)
    if D is not None:
        y = torch.addcmul(y, u.float(), D.float())
    return y.to(u.dtype), (state if output_final_state else None)


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


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, u, delta, A, B, C, D, z, h0, bounds, final):  # type: ignore[override]
        shape = u.shape
        d_inner, n_state = A.shape
        u_, delta_, B_, C_ = (x.reshape(-1, x.shape[-1]).contiguous() for x in (u, delta, B, C))
        z_ = z.reshape(-1, d_inner).contiguous() if z is not None else None
        A_ = A.float().contiguous()
        D_ = D.float().contiguous() if D is not None else None
        h0_ = h0.float().contiguous() if h0 is not None else None
        cu, block_offset, num_blocks = _scan_blocks(bounds, u.device)
        num_seqs = len(bounds) - 1
        y = torch.empty_like(u_)
        checkpoints = u.new_empty(num_blocks, d_inner, n_state, dtype=torch.float32)
        ht = u.new_empty(num_seqs, d_inner, n_state, dtype=torch.float32) if final else None
        grid = (triton.cdiv(d_inner, _SCAN_BD), num_seqs)
        _scan_fwd_kernel[grid](
            u_, delta_, A_, B_, C_, D_, z_, h0_, y, checkpoints, ht, cu, block_offset,
            d_inner, n_state,
            BT=_SCAN_BT, BD=_SCAN_BD, BN=_state_block(n_state),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, STORE_HT=final,
            num_warps=_SCAN_WARPS,
        )  # fmt: skip
        ctx.save_for_backward(u_, delta_, A_, B_, C_, D_, z_, checkpoints, cu, block_offset)
        dtypes = [t.dtype if t is not None else None for t in (A, B, C, D)]
        ctx.meta = (shape, B.shape, num_seqs, h0 is not None, dtypes)
        return y.view(shape), ht

    @staticmethod
    def backward(ctx: Any, dy, dht):  # type: ignore[override]
        u_, delta_, A_, B_, C_, D_, z_, checkpoints, cu, block_offset = ctx.saved_tensors
        shape, bc_shape, num_seqs, has_h0, dtypes = ctx.meta
        d_inner, n_state = A_.shape
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
        dh0 = u_.new_empty(num_seqs, d_inner, n_state, dtype=torch.float32) if has_h0 else None
        dD = u_.new_empty(num_seqs, d_inner, dtype=torch.float32) if D_ is not None else None
        dz = torch.empty_like(z_) if z_ is not None else None
        _scan_bwd_kernel[grid](
            u_, delta_, A_, B_, C_, D_, z_, dy_, checkpoints,
            dht.float().contiguous() if dht is not None else None, scratch,
            du, ddelta, dA, dB, dC, dD, dz, dh0, cu, block_offset, d_inner, n_state, tokens,
            BT=_SCAN_BT, BD=_SCAN_BD, BN=bn,
            HAS_D=D_ is not None, HAS_Z=z_ is not None, HAS_DHT=dht is not None,
            STORE_DH0=has_h0, num_warps=_SCAN_WARPS,
        )  # fmt: skip
        return (
            du.view(shape),
            ddelta.view(shape),
            dA.sum(0).to(dtypes[0]),
            dB.sum(0).view(bc_shape).to(dtypes[1]),
            dC.sum(0).view(bc_shape).to(dtypes[2]),
            dD.sum(0).to(dtypes[3]) if dD is not None else None,
            dz.view(shape) if dz is not None else None,
            dh0,
            None,
            None,
        )


def _selective_scan_step_triton(u, delta, A, B, C, D, state):
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
    named = [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)]
    if D is not None:
        named.append(("D", D))
    for name, t in named:
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    if T == 0:
        raise ValueError("u has T=0 tokens; selective_scan needs at least one")
    # Values are checked where that is free (CPU tensors); on a GPU each check would cost a
    # host sync per call, every decode step included.
    if u.device.type == "cpu":
        if bool((A > 0).any()):
            # A = -exp(A_log): a positive entry would make the state grow without bound.
            raise ValueError(f"A must be <= 0 (A = -exp(A_log)) but its max is {A.max().item()}")
        if bool((delta < 0).any()):
            raise ValueError(
                f"delta must be >= 0 (a step size, e.g. a softplus output) but its min is "
                f"{delta.min().item()}"
            )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
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
        return _SelectiveScan.apply(
            u, delta, A, B, C, D, z, initial_state, bounds, output_final_state
        )

    def scan(u_, delta_, B_, C_, init, final):
        if u_.shape[1] == 1:
            # Decode: a single token needs no chunk machinery.
            y, state = selective_scan_step(u_[:, 0], delta_[:, 0], A, B_[:, 0], C_[:, 0], D, init)
            return y.unsqueeze(1), (state if final else None)
        return selective_scan_chunk_torch(u_, delta_, A, B_, C_, D, init, final, chunk_size)

    if bounds is None:
        y, final_state = scan(u, delta, B, C, initial_state, output_final_state)
        return gate(y), final_state
    state_shape = (u.shape[2], A.shape[1])
    y, final_state = run_segments(
        scan, (u, delta, B, C), bounds, initial_state, output_final_state, state_shape
    )
    return gate(y), final_state
