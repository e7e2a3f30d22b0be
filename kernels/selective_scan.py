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
decode step → chunked torch form → public dispatch function (the Triton kernel arrives in its
own issue).
"""

from __future__ import annotations

import math

import torch

from zoo.kernels.backend import resolve_backend

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


def _check_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> None:
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
    if initial_state is not None and initial_state.shape != (batch, d_inner, n_state):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)} but must be (B, D_in, N) = "
            f"{(batch, d_inner, n_state)}"
        )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The selective scan, public entry point. Returns (y (B, T, D_in), final_state | None).

    ``delta`` is the step size after its bias and softplus (≥ 0) and ``A`` = −exp(A_log) (≤ 0).
    ``backend``: "auto" (the torch chunked form for now; once the Triton kernel lands in its own
    issue it picks it for CUDA tensors), "torch", or "triton" (not built yet). The environment
    variable ``ZOO_KERNEL_BACKEND`` overrides "auto".
    """
    _check_inputs(u, delta, A, B, C, D, initial_state, chunk_size)
    resolve_backend(backend, "selective-scan")
    if u.shape[1] == 1:
        # Decode: a single token needs no chunk machinery.
        y, state = selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, initial_state)
        return y.unsqueeze(1), (state if output_final_state else None)
    return selective_scan_chunk_torch(
        u, delta, A, B, C, D, initial_state, output_final_state, chunk_size
    )
