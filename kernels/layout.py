"""The fla layout every linear-attention op takes, and the input checks it shares.

q, k: (B, T, H, K); v: (B, T, H, V); gates (a decay or a forget gate) ride beside them. Errors
name the argument and both numbers, so a shape mistake is found at the call, not deep inside.
"""

from __future__ import annotations

import torch


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
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


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
