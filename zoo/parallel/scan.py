"""Context parallelism for the recurrent mixers: the state each span starts from (LASP-2 style).

A linear recurrence S_t = Λ_t ⊙ S_{t-1} + (input of token t), with a decay Λ_t that is
elementwise over the state (a scalar per head, a vector per key channel, a D_in × N matrix), is
affine in its start state: run over one span of tokens from a zero state it ends at S_r (the
span's "final state") and carries any start state h through as Λ_r ⊙ h, where Λ_r = Π_t Λ_t is
the span's total decay. So the state span r starts from is

    h_r = Σ_{j<r} (Π_{j<i<r} Λ_i) ⊙ S_j        (h_0 = 0)

and the span's outputs are those of its tokens from h_r. Rank r runs its op once from zero
(getting S_r and its outputs from zero), all ranks exchange (S_j, log Λ_j) in one all-gather
(`previous_states`), and h_r's contribution is added to the outputs: for the linear-attention
ops it is a linear read-out, o_t += scale · (q_t ⊙ decay from the span's start to t) h_r, one
more (L × K)·(K × V) product per head, the op's inter-chunk read-out again (`lightning_cp`,
`gla_cp`); for the selective scan that read-out needs a (B, L, D_in, N) decay tensor, so the op
runs a second time from h_r instead, 2× the scan (`selective_scan_cp`). The exchange is one
all-gather of a state and a decay per rank (not of the sequence), whatever the span's length.

Gradients are exact: the gather is differentiable (`zoo.parallel.context.gather_sequence`), so
the gradient reaching h_r flows back into every earlier rank's S_j and decays, and through them
into its tokens. Every rank runs the same collective in forward and backward (rank 0 reads its
zero start state out of the gathered tensor, see `previous_states`).

Packed sequences (documents in one row, `cu_seqlens` over the whole sequence): a document that
crosses a rank boundary carries its state across, a span whose first token starts a document
starts from zero, and a span in which a document starts passes no earlier state beyond it (its
Λ is 0 from there on). `span_documents` turns the global bounds into the span's local ones and
`carried_state` gives the state its first local document starts from.

Layout of the ops, as in `zoo.kernels`: linear attention q, k, g (B, L, H, K), v (B, L, H, V),
state (B, H, K, V) fp32; selective scan u, delta (B, L, D_in), B, C (B, L, N), state
(B, D_in, N) fp32. L is this rank's span; every rank has the same L.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from zoo.kernels.gla import gla
from zoo.kernels.lightning import lightning
from zoo.kernels.selective_scan import selective_scan
from zoo.parallel.context import ContextParallel, current, gather_sequence

__all__ = [
    "SpanDocuments",
    "carried_state",
    "gla_cp",
    "lightning_cp",
    "previous_states",
    "recurrent_group",
    "selective_scan_cp",
    "span_documents",
]


def recurrent_group(cache: object | None, context: object | None = None) -> ContextParallel | None:
    """The context-parallel group a recurrent mixer's forward is split over, or None: the
    mixer context's ``cp`` when it carries one, else `zoo.parallel.context.current()`. A cache
    under context parallelism is refused: it splits a training or full forward; decoding, and a
    prefill that fills a cache, run outside `context_parallel`."""
    cp = getattr(context, "cp", None) or current()
    if cp is not None and cache is not None:
        raise ValueError(
            "a recurrent mixer under context parallelism runs without a cache (training or a "
            "full forward); decode, or prefill a cache, outside `context_parallel(...)`"
        )
    return cp


def previous_states(
    final_state: torch.Tensor, log_decay_total: torch.Tensor, cp: ContextParallel
) -> torch.Tensor:
    """The state this rank's span starts from: h_r = Σ_{j<r} (Π_{j<i<r} Λ_i) ⊙ S_j, fp32.

    ``final_state`` S_r: the state at the end of this rank's span when it starts from zeros, any
    shape (the same on every rank), e.g. (B, H, K, V). ``log_decay_total`` log Λ_r ≤ 0, any shape
    that broadcasts to ``final_state``'s (the same on every rank): the span carries a start state
    h to Λ_r ⊙ h + S_r. −inf means the span lets no earlier state through. Examples: lightning
    L · log λ as (1, H, 1, 1); GLA Σ_t g_t as (B, H, K, 1); Mamba A · Σ_t Δ_t as (B, D_in, N).

    Returns a tensor of ``final_state``'s shape, zeros on rank 0. One all-gather of S and log Λ
    (their sizes added) forward, one reduce-scatter backward, on every rank; the prefix combine
    is P − 1 multiply-adds in fp32. Differentiable in both inputs of every rank.
    """
    state = final_state.float()
    log_decay = log_decay_total.float()
    try:
        fits = torch.broadcast_shapes(log_decay.shape, state.shape) == state.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"log_decay_total has shape {tuple(log_decay.shape)}, which does not broadcast to "
            f"the final state's {tuple(state.shape)}"
        )
    # h_{j+1} = Λ_j ⊙ h_j + S_j, with Λ_j = exp(log Λ_j) (exp(−inf) = 0).
    return _compose_spans(
        state, log_decay, cp, lambda s, log_d, h: torch.addcmul(s, log_d.exp(), h)
    )


def _compose_spans(
    state: torch.Tensor,
    carrier: torch.Tensor,
    cp: ContextParallel,
    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """This rank's start state from every rank's (S_j, carrier_j), composed in rank order as
    h_{j+1} = step(S_j, carrier_j, h_j) from h_0 = 0. One collective for both: every rank's
    (S, carrier) as a row of the gathered (P, n + m)."""
    n = state.numel()
    packed = torch.cat([state.reshape(-1), carrier.reshape(-1)]).unsqueeze(0)
    rows = gather_sequence(packed, cp, dim=0)  # (P, n + m)
    states = rows[:, :n].reshape(cp.size, *state.shape)
    carriers = rows[:, n:].reshape(cp.size, *carrier.shape)
    # Every rank, rank 0 included, takes its start state out of a prefix list built from the
    # gathered rows, so its backward reaches the gather's collective like every other rank's.
    prefixes = [torch.zeros_like(state)]
    for j in range(max(cp.rank, 1)):
        prefixes.append(step(states[j], carriers[j], prefixes[-1]))
    return torch.stack(prefixes)[cp.rank]


def previous_states_matrix(
    final_state: torch.Tensor, transition: torch.Tensor, cp: ContextParallel
) -> torch.Tensor:
    """`previous_states` for a recurrence whose spans carry a start state h through a matrix:
    a span takes h to M_r h + S_r (the delta rule's M_r = Π_t e^{g_t}(I − β_t k_t k_tᵀ)).

    ``final_state`` S_r (..., K, V) from a zero start and ``transition`` M_r (..., K, K), the
    same shapes on every rank. Returns this rank's start state h_r (zeros on rank 0), fp32:
    h_{j+1} = M_j h_j + S_j. One all-gather forward, one reduce-scatter backward, on every rank;
    differentiable in both inputs of every rank."""
    return _compose_spans(final_state.float(), transition.float(), cp, lambda s, m, h: m @ h + s)


@dataclass(frozen=True)
class SpanDocuments:
    """This rank's part of a packed row, from the whole row's document bounds."""

    cu_seqlens: torch.Tensor
    """Local bounds (N + 1,) int32 over the span, [0, ..., L]: the pieces of the N documents
    that meet it, in order; the first may continue a document from an earlier rank."""
    continues: bool
    """The span's first token continues a document that began on an earlier rank."""
    passes_through: bool
    """No document starts in the span: the state entering it reaches its end (decayed)."""
    first_len: int
    """Tokens of the first local document, the one an earlier rank's state may reach."""


def span_documents(cu_seqlens: torch.Tensor, cp: ContextParallel, local_len: int) -> SpanDocuments:
    """This rank's documents: ``cu_seqlens`` (N + 1,) are the bounds over the whole row of
    cp.size · local_len tokens, [0, l1, l1 + l2, ..., total] (empty documents allowed); this
    rank's span is [rank · local_len, (rank + 1) · local_len). One host sync."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    total = cp.size * local_len
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens must run from 0 to the whole row's {total} tokens ({cp.size} "
            f"context-parallel spans of {local_len}), got {bounds}"
        )
    if any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    start = cp.rank * local_len
    end = start + local_len
    inside = sorted({b - start for b in bounds if start < b < end})
    local = torch.tensor([0, *inside, local_len], dtype=torch.int32, device=cu_seqlens.device)
    starts_here = start in bounds
    return SpanDocuments(
        cu_seqlens=local,
        continues=not starts_here,
        passes_through=not starts_here and not inside,
        first_len=inside[0] if inside else local_len,
    )


def carried_state(
    final_states: torch.Tensor,
    log_decay_total: torch.Tensor,
    docs: SpanDocuments,
    cp: ContextParallel,
) -> torch.Tensor:
    """The state the span's first local document starts from, (1, *state) fp32: what earlier
    ranks carry into it, or zeros when the span starts a document.

    ``final_states`` (N, *state): the op's final states of the span's N local documents
    (``docs.cu_seqlens``), each from a zero start; the last one is what this span passes on.
    ``log_decay_total``: the log decay of the whole span, broadcastable to (1, *state); read
    only when no document starts in the span (otherwise log Λ = −inf: nothing passes). Runs the
    same collective as `previous_states` on every rank, whatever its documents.
    """
    last = final_states[-1:]
    if not docs.passes_through:
        log_decay_total = torch.full(
            log_decay_total.shape, -torch.inf, device=last.device, dtype=torch.float32
        )
    start = previous_states(last, log_decay_total, cp)
    # A span that starts a document reads nothing from earlier ranks, but its start state stays
    # in the graph (times 0) so that its backward runs the gather's collective too.
    return start if docs.continues else start * 0.0


def _with_start_states(start: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Initial states (N, *state) of a span's N local documents: `start` (1, *state) for the
    first, zeros for the others (they begin in the span)."""
    if num_docs == 1:
        return start
    return torch.cat([start, start.new_zeros(num_docs - 1, *start.shape[1:])])


def _add_to_first(o: torch.Tensor, correction: torch.Tensor) -> torch.Tensor:
    """o (B, L, ...) with ``correction`` (B, l, ...) fp32 added to its first l tokens."""
    first = correction.shape[1]
    head = (o[:, :first].float() + correction).to(o.dtype)
    return head if first == o.shape[1] else torch.cat([head, o[:, first:]], dim=1)


def _span_start(
    finals: torch.Tensor,
    log_decay_total: torch.Tensor,
    docs: SpanDocuments | None,
    cp: ContextParallel,
) -> tuple[torch.Tensor, int | None]:
    """(the state the span starts from, tokens it reaches: None for all of them)."""
    if docs is None:
        return previous_states(finals, log_decay_total, cp), None
    return carried_state(finals, log_decay_total, docs, cp), docs.first_len


def lightning_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    cp: ContextParallel,
    scale: float = 1.0,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """`zoo.kernels.lightning.lightning` over a sequence split across the ranks of ``cp``: this
    rank's o (B, L, H, V) for its span of q, k (B, L, H, K) and v; log_decay (H,) or None (no
    decay, cosFormer2). ``cu_seqlens``: the whole row's document bounds (B = 1), see
    `span_documents`. Forward and backward exact.

    Cost over the op on the span: the op runs once from zero with its final state, then
    o_t += scale · (q_t ⊙ λ^(t+1)) h_r, one (L × K) · (K × V) product per head (the op's
    inter-chunk read-out again), and one all-gather of B·H·K·V + H values.
    """
    L, H = q.shape[1], q.shape[2]
    docs = span_documents(cu_seqlens, cp, L) if cu_seqlens is not None else None
    o, finals = lightning(
        q, k, v, log_decay, scale, output_final_state=True,
        cu_seqlens=None if docs is None else docs.cu_seqlens,
        chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    ld = None if log_decay is None else log_decay.to(device=q.device, dtype=torch.float32)
    total = q.new_zeros(1, H, 1, 1, dtype=torch.float32) if ld is None else L * ld.view(1, H, 1, 1)
    start, first = _span_start(finals, total, docs, cp)
    first = L if first is None else first
    qd = q[:, :first].float()  # (B, l, H, K)
    if ld is not None:
        pos = torch.arange(1, first + 1, device=q.device, dtype=torch.float32)
        qd = qd * torch.exp(pos[:, None] * ld)[None, :, :, None]  # λ^(t+1), exponent ≤ 0
    correction = torch.einsum("blhk,bhkv->blhv", qd, start)
    return _add_to_first(o, correction * scale if scale != 1.0 else correction)


def gla_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cp: ContextParallel,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """`zoo.kernels.gla.gla` over a sequence split across the ranks of ``cp``: this rank's
    o (B, L, H, V) for its span of q, k, g (B, L, H, K) and v. ``cu_seqlens``: the whole row's
    document bounds (B = 1), see `span_documents`. Forward and backward exact.

    Cost over the op on the span: the op runs once from zero with its final state, then
    o_t += (q_t ⊙ exp(Σ_{s≤t} g_s)) h_r (a cumsum of g over the span and one (L × K) · (K × V)
    product per head), and one all-gather of B·H·K·(V + 1) values.
    """
    L = q.shape[1]
    docs = span_documents(cu_seqlens, cp, L) if cu_seqlens is not None else None
    o, finals = gla(
        q, k, v, g, output_final_state=True,
        cu_seqlens=None if docs is None else docs.cu_seqlens,
        chunk_size=chunk_size, backend=backend,
    )  # fmt: skip
    gf = g.float()
    start, first = _span_start(finals, gf.sum(dim=1).unsqueeze(-1), docs, cp)  # Λ (B, H, K, 1)
    first = L if first is None else first
    decay = gf[:, :first].cumsum(dim=1).exp()  # (B, l, H, K): exponents ≤ 0
    correction = torch.einsum("blhk,bhkv->blhv", q[:, :first].float() * decay, start)
    return _add_to_first(o, correction)


def selective_scan_cp(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    cp: ContextParallel,
    z: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """`zoo.kernels.selective_scan.selective_scan` over a sequence split across the ranks of
    ``cp``: this rank's y (B, L, D_in) (gated by SiLU(z) if given) for its span of u, delta
    (B, L, D_in), B, C (B, L, N). ``cu_seqlens``: the whole row's document bounds (B = 1), see
    `span_documents`. Forward and backward exact.

    Cost: 2× the scan forward, 3× backward. It runs once from zero for the final state (no D,
    no gate), then again from h_r for the outputs: h_r's read-out C_t · (exp(A Σ_{s≤t} Δ_s) ⊙
    h_r) would need a (B, L, D_in, N) decay tensor, which the fused scan never holds. The first
    pass keeps no activations (`torch.utils.checkpoint`: its backward recomputes it), so a
    span holds one scan's, as without context parallelism (measured by benchmarks/parallel.py:
    keeping both made Mamba's activations per rank 0.89 of one process's at 2 ranks). Plus one
    all-gather of 2 · B·D_in·N values.
    """
    L = u.shape[1]
    docs = span_documents(cu_seqlens, cp, L) if cu_seqlens is not None else None
    local = None if docs is None else docs.cu_seqlens

    def final_states(u, delta, A, B, C):
        return selective_scan(
            u, delta, A, B, C, None, output_final_state=True, cu_seqlens=local,
            chunk_size=chunk_size, backend=backend,
        )[1]  # fmt: skip

    finals = torch.utils.checkpoint.checkpoint(final_states, u, delta, A, B, C, use_reentrant=False)
    total = delta.float().sum(dim=1).unsqueeze(-1) * A.float()  # (B, D_in, N): log Λ = A Σ Δ
    start, _ = _span_start(finals, total, docs, cp)
    if docs is not None:
        start = _with_start_states(start, len(docs.cu_seqlens) - 1)
    y, _ = selective_scan(
        u, delta, A, B, C, D, initial_state=start, cu_seqlens=local,
        chunk_size=chunk_size, backend=backend, z=z,
    )  # fmt: skip
    return y
