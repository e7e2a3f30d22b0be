"""Grouped GEMM for MoE experts: rows of `x` sorted by expert, one weight matrix per expert.

    out[r] = x[r] @ W[g(r)]           (trans_b=False, W: [E, K, N])
    out[r] = x[r] @ W[g(r)]ᵀ          (trans_b=True,  W: [E, N, K], transformers' layout)

where group g owns rows offsets[g-1] .. offsets[g] - 1 (`offsets` = cumulative group sizes,
int32, no host sync needed). Rows past offsets[-1] (dropped pairs) are left unwritten.

`grouped_gemm(x, w, offsets, trans_b, backend)` is differentiable: dX is the same kernel with
the weights read transposed, dW a per-group xᵀ·dy (or dyᵀ·x) reduction kernel. Backends:
"triton" (the kernels below: fp32 accumulation for bf16/fp16/fp32 inputs; the tile schedule is
computed on the device from the group sizes, so empty and uneven groups cost nothing and no
size ever reaches the host), "torch" (the reference: a loop of `torch.mm` over groups, the CPU
path and the test oracle), "auto" (Triton on CUDA tensors, torch otherwise;
ZOO_KERNEL_BACKEND overrides).
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch and in our CPU deps
    triton = None

from zoo.kernels.backend import resolve_backend
from zoo.kernels.layout import dot_block


def grouped_gemm_torch(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """Reference: one `torch.mm` per group, empty groups included (so the result is in the
    autograd graph of x and w whatever the sizes); rows past the last group are zeros."""
    out_features = w.shape[1] if trans_b else w.shape[2]
    pieces, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        weight = w[g].t() if trans_b else w[g]
        pieces.append(x[start:end] @ weight)
        start = end
    pieces.append(x.new_zeros(x.shape[0] - start, out_features))
    return torch.cat(pieces)


if triton is not None:

    @triton.jit
    def _group_of_tile(tile, tile_ends_ptr, num_groups):
        """The group whose tile range holds `tile` (tile_ends = cumulative tiles per group)."""
        group = 0
        for g in range(num_groups):
            end = tl.load(tile_ends_ptr + g)
            group += (tile >= end).to(tl.int32)
        return group

    @triton.jit
    def _grouped_mm_kernel(
        x_ptr, w_ptr, out_ptr, offsets_ptr, tile_ends_ptr,
        num_groups, n_out, k_in,
        stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        total_tiles = tl.load(tile_ends_ptr + num_groups - 1)
        if tile >= total_tiles:
            return
        group = _group_of_tile(tile, tile_ends_ptr, num_groups)
        first_tile = tl.where(group > 0, tl.load(tile_ends_ptr + group - 1, mask=group > 0), 0)
        row_start = tl.where(group > 0, tl.load(offsets_ptr + group - 1, mask=group > 0), 0)
        row_end = tl.load(offsets_ptr + group)
        rows = row_start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        w_group = w_ptr + group.to(tl.int64) * stride_wg
        for k0 in range(0, k_in, BLOCK_K):
            k = k0 + ks
            a = tl.load(
                x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=(rows[:, None] < row_end) & (k[None, :] < k_in),
                other=0.0,
            )
            b = tl.load(
                w_group + k[:, None] * stride_wk + cols[None, :] * stride_wn,
                mask=(k[:, None] < k_in) & (cols[None, :] < n_out),
                other=0.0,
            )
            acc += tl.dot(a, b, allow_tf32=False)
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < row_end) & (cols[None, :] < n_out),
        )

    @triton.jit
    def _grouped_wgrad_kernel(
        a_ptr, b_ptr, out_ptr, offsets_ptr,
        dim_a, dim_b,
        stride_am, stride_ak, stride_bm, stride_bn, stride_og, stride_oa, stride_ob,
        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        """out[g] = a[rows of g]ᵀ @ b[rows of g]: [dim_a, dim_b] per group (zeros if empty)."""
        group = tl.program_id(0)
        pid_a = tl.program_id(1)
        pid_b = tl.program_id(2)
        row_start = tl.where(group > 0, tl.load(offsets_ptr + group - 1, mask=group > 0), 0)
        row_end = tl.load(offsets_ptr + group)
        ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
        ib = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        ms = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
        for m0 in range(row_start, row_end, BLOCK_M):
            m = m0 + ms
            a = tl.load(
                a_ptr + m[:, None] * stride_am + ia[None, :] * stride_ak,
                mask=(m[:, None] < row_end) & (ia[None, :] < dim_a),
                other=0.0,
            )
            b = tl.load(
                b_ptr + m[:, None] * stride_bm + ib[None, :] * stride_bn,
                mask=(m[:, None] < row_end) & (ib[None, :] < dim_b),
                other=0.0,
            )
            acc += tl.dot(tl.trans(a), b, allow_tf32=False)
        tl.store(
            out_ptr + group.to(tl.int64) * stride_og + ia[:, None] * stride_oa
            + ib[None, :] * stride_ob,
            acc.to(out_ptr.dtype.element_ty),
            mask=(ia[:, None] < dim_a) & (ib[None, :] < dim_b),
        )  # fmt: skip


# The Triton forms are torch.library custom ops, so that torch.compile keeps them as opaque nodes
# (shapes from their fake implementations) instead of breaking the graph around them.


@torch.library.custom_op("zoo::grouped_mm", mutates_args=())
def _mm_triton(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, trans_b: bool
) -> torch.Tensor:
    m, k_in = x.shape
    num_groups = w.shape[0]
    n_out = w.shape[1] if trans_b else w.shape[2]
    # W[g] read as [k_in, n_out]: trans_b swaps the two inner strides.
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if trans_b else (w.stride(1), w.stride(2))
    out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = dot_block(64, 64), dot_block(n_out, 64), dot_block(k_in, 32)
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
    tile_ends = torch.cumsum(torch.div(sizes + block_m - 1, block_m, rounding_mode="floor"), 0)
    tile_ends = tile_ends.to(torch.int32)
    # Upper bound on the tiles: every group may waste one partial tile.
    grid = (triton.cdiv(m, block_m) + num_groups, triton.cdiv(n_out, block_n))
    _grouped_mm_kernel[grid](
        x, w, out, offsets, tile_ends,
        num_groups, n_out, k_in,
        x.stride(0), x.stride(1), w.stride(0), stride_wk, stride_wn, out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


@_mm_triton.register_fake
def _(x, w, offsets, trans_b):
    return x.new_empty(x.shape[0], w.shape[1] if trans_b else w.shape[2])


@torch.library.custom_op("zoo::grouped_mm_weight_grad", mutates_args=())
def _wgrad_triton(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """[E, dim_a, dim_b]: out[g] = a_gᵀ @ b_g."""
    dim_a, dim_b = a.shape[1], b.shape[1]
    out = a.new_empty(num_groups, dim_a, dim_b)
    block_a, block_b = dot_block(dim_a, 64), dot_block(dim_b, 64)
    grid = (num_groups, triton.cdiv(dim_a, block_a), triton.cdiv(dim_b, block_b))
    _grouped_wgrad_kernel[grid](
        a, b, out, offsets,
        dim_a, dim_b,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_M=32,
    )  # fmt: skip
    return out


@_wgrad_triton.register_fake
def _(a, b, offsets, num_groups):
    return a.new_empty(num_groups, a.shape[1], b.shape[1])


def _mm_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, w, offsets, trans_b = inputs
    ctx.save_for_backward(x, w, offsets)
    ctx.trans_b = trans_b


def _mm_backward(ctx: Any, grad: torch.Tensor) -> tuple:
    x, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _mm_triton(grad, w, offsets, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        if ctx.trans_b:  # W[g]: [N, K], dW[g] = dy_gᵀ x_g
            dw = _wgrad_triton(grad, x, offsets, w.shape[0])
        else:  # W[g]: [K, N], dW[g] = x_gᵀ dy_g
            dw = _wgrad_triton(x, grad, offsets, w.shape[0])
    return dx, dw, None, None


_mm_triton.register_autograd(_mm_backward, setup_context=_mm_setup)


def grouped_gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    trans_b: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """x [M, K] (rows sorted by group) times W[g] per group; see the module docstring."""
    if x.dim() != 2 or w.dim() != 3 or offsets.dim() != 1 or offsets.numel() != w.shape[0]:
        raise ValueError(
            f"expected x [M, K], w [E, ., .], offsets [E]; got {tuple(x.shape)}, "
            f"{tuple(w.shape)}, {tuple(offsets.shape)}"
        )
    k_w = w.shape[2] if trans_b else w.shape[1]
    if x.shape[1] != k_w:
        raise ValueError(f"x has {x.shape[1]} features, W[g] expects {k_w} (trans_b={trans_b})")
    if resolve_backend(backend, "grouped GEMM", x) == "torch":
        return grouped_gemm_torch(x, w, offsets, trans_b)
    return _mm_triton(x, w, offsets.to(torch.int32).contiguous(), trans_b)
