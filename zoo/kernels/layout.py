"""The fla layout every linear-attention op takes, and the input checks it shares.

q, k: (B, T, H, K); v: (B, T, H, V); gates (a decay or a forget gate) ride beside them. Errors
name the argument and both numbers, so a shape mistake is found at the call, not deep inside.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def values_checkable(t: torch.Tensor) -> bool:
    """Whether an op may check `t`'s values (finite, signs) for a clear error: only where that is
    free. On a GPU it costs a host sync per call, every decode step included; under
    torch.compile it would break the graph (a tensor read into Python)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def constant_cache(maxsize: int) -> Callable[[F], F]:
    """`functools.lru_cache` for the tables a layer rebuilds from its settings (decays, RoPE and
    LRPE frequencies): cached in eager calls; traced as the plain function under torch.compile,
    where the table becomes a constant of the graph (dynamo would trace through the cache anyway,
    warning each time that it ignores it)."""

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        return call  # type: ignore[return-value]

    return wrap


def check_tensors(*named: tuple[str, torch.Tensor | None]) -> None:
    """Every tensor of `named` ((name, tensor), None skipped) is floating and on the first's
    device; errors name the tensor."""
    first_name, first = named[0]
    for name, t in named:
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_chunk_size(chunk_size: Any) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_decay_and_step(A: torch.Tensor, step: torch.Tensor, step_name: str, what: str) -> None:
    """An SSM's A ≤ 0 (A = −exp(A_log): a positive entry grows the state without bound) and its
    step ≥ 0 (`what` says where the step comes from), one reduction each."""
    if bool((A > 0).any()):
        raise ValueError(f"A must be <= 0 (A = -exp(A_log)) but its max is {A.max().item()}")
    if bool(step.min() < 0):
        raise ValueError(f"{step_name} must be >= 0 ({what}) but its min is {step.min().item()}")


def check_qkv(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    **gates: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices of q, k, v (and of `gates`), a token count and the chunk size."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K) but has shape {tuple(q.shape)}")
    B, T, H, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v has shape {tuple(v.shape)} but must be (B, T, H, V) with (B, T, H) = {(B, T, H)} "
            "from q"
        )
    tensors = {"q": q, "k": k, "v": v, **gates}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if len({t.device for t in tensors.values()}) > 1:
        names = ", ".join(tensors)
        devices = ", ".join(str(t.device) for t in tensors.values())
        raise ValueError(f"{names} must share a device, got {devices}")
    if T == 0:
        raise ValueError(f"q has T=0 tokens; {op} needs at least one")
    check_chunk_size(chunk_size)


def chunk_spans(num_tokens: int, chunk_size: int, group_tokens: int) -> list[tuple[int, int, int]]:
    """(start, end, chunk length) spans of a chunked scan: whole chunks in groups of about
    `group_tokens` tokens (which bounds every temporary and keeps a group's working set in
    cache), then the ragged tail (num_tokens mod chunk_size) as one more chunk of its own length,
    chained on the state like the others."""
    full = num_tokens - num_tokens % chunk_size
    group = max(1, group_tokens // chunk_size) * chunk_size
    spans = [(start, min(start + group, full), chunk_size) for start in range(0, full, group)]
    if full < num_tokens:
        spans.append((full, num_tokens, num_tokens - full))
    return spans


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> list[int] | None:
    """Validated sequence bounds of a packed batch as a host list (one sync), or None."""
    if cu_seqlens is None:
        return None
    B, T = q.shape[:2]
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be a 1-D int tensor [0, l1, l1+l2, ..., total] with at least 2 "
            f"entries, got shape {tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}"
        )
    if B != 1:
        raise ValueError(f"cu_seqlens needs packed sequences with B=1 but q has B={B}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={T}, got {bounds[0]} and {bounds[-1]}"
        )
    if any(b < a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")
    return bounds


def check_initial_state(
    initial_state: torch.Tensor | None,
    q: torch.Tensor,
    v: torch.Tensor,
    bounds: list[int] | None,
    key_dim: int | None = None,
) -> None:
    """initial_state is (B, H, K, V), or (N, H, K, V) for N packed sequences, on q's device."""
    if initial_state is None:
        return
    B, _, H, K = q.shape
    expected = (B if bounds is None else len(bounds) - 1, H, key_dim or K, v.shape[-1])
    if tuple(initial_state.shape) != expected:
        what = "(B, H, K, V)" if bounds is None else "(N, H, K, V) with N = len(cu_seqlens) - 1"
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)} but must be {what} = {expected}"
        )
    if initial_state.device != q.device:
        raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")


def run_segments(
    scan: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    per_token: tuple[torch.Tensor, ...],
    bounds: list[int],
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    state_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A packed batch through a single-sequence `scan(*per_token_slices, init, output_final)`.

    Each segment of `bounds` starts from its row of `initial_state` or zeros; an empty segment
    emits nothing and passes its state through. Returns (o (1, T, ...), final (N, H, K, V)).
    """
    outs, finals = [], []
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        init = None if initial_state is None else initial_state[i : i + 1]
        if end == start:
            if output_final_state:
                zeros = per_token[0].new_zeros(1, *state_shape, dtype=torch.float32)
                finals.append(zeros if init is None else init.float())
            continue
        o, final = scan(*(x[:, start:end] for x in per_token), init, output_final_state)
        outs.append(o)
        if output_final_state:
            finals.append(final)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will track a call on `tensors` (a decode step, typically, will not)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# -- what the Triton ops share: tile sizes, dot precision and the folded token axis -------------


def dot_block(n: int, cap: int) -> int:
    """Smallest power of two >= n, between tl.dot's minimum 16 and `cap`."""
    return max(16, min(cap, 1 << max(n - 1, 0).bit_length()))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 callers get exact fp32 products (what the torch
    reference computes); half inputs go through tensor cores anyway, where fp32 operands are
    best served by tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


class ChunkTable:
    """Sequence bounds of the folded token axis and its chunk table, built once per call."""

    def __init__(
        self, bounds: list[int], chunk: int, device: torch.device, row_length: int | None
    ) -> None:
        starts, lens, offsets = [], [], [0]
        for start, end in itertools.pairwise(bounds):
            for t in range(start, end, chunk):
                starts.append(t)
                lens.append(min(chunk, end - t))
            offsets.append(len(starts))
        self.chunk = chunk
        self.num_seqs = len(bounds) - 1
        self.num_chunks = len(starts)
        self.bounds = bounds
        self.row_length = row_length  # T when the sequences are a batch's B equal rows
        as_int = dict(device=device, dtype=torch.int32)
        self.cu = torch.tensor(bounds, **as_int)
        self.chunk_offset = torch.tensor(offsets, **as_int)
        self.chunk_start = torch.tensor(starts, **as_int)
        self.chunk_len = torch.tensor(lens, **as_int)


def fold_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) → contiguous (B·T, H, D): batches become sequences of one token axis."""
    return x.reshape(-1, *x.shape[2:]).contiguous()
