"""`zoo.kernels.matvec`: a token's products as reductions, eager and compiled, equal `F.linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels.matvec import linear, materialize, matvec, vecmat


@pytest.mark.parametrize("shape", [(7,), (1, 7), (1, 1, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_matvec_equals_linear(shape, bias):
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(5, 7)
    b = torch.randn(5) if bias else None
    expected = F.linear(x, weight, b)
    torch.testing.assert_close(matvec(x, weight, b), expected, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()  # one compile per case (dynamo's recompile limit is 8)
    compiled = torch.compile(matvec, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(x, weight, b), expected, atol=1e-5, rtol=1e-5)


def test_matvec_of_a_computed_input_compiles_to_the_same_values():
    """The input an RMSNorm computes: stored once by `materialize`, the same values either way."""
    torch.manual_seed(0)
    x, gain, weight = torch.randn(1, 1, 64), torch.randn(64), torch.randn(48, 64)

    def normed_product(x: torch.Tensor) -> torch.Tensor:
        return matvec(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * gain, weight)

    compiled = torch.compile(normed_product, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(x), normed_product(x), atol=1e-5, rtol=1e-5)


def test_materialize_is_the_same_tensor_values():
    x = torch.randn(3, 4).t()  # not contiguous: a contiguous copy, same values
    y = materialize(x)
    assert y.is_contiguous() and torch.equal(y, x)
    z = torch.randn(2, 3)
    assert materialize(z).data_ptr() == z.data_ptr()  # contiguous: a view, no copy


def test_matvec_reads_a_batch_of_matrices():
    """A decode step's readout: each row of x against its own matrix (a recurrent state)."""
    torch.manual_seed(0)
    x, states = torch.randn(2, 3, 8), torch.randn(2, 3, 5, 8)
    expected = torch.einsum("bhk,bhvk->bhv", x, states)
    torch.testing.assert_close(matvec(x, states), expected, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()  # one compile per case (dynamo's recompile limit is 8)
    compiled = torch.compile(matvec, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(x, states), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [8, 40, 64])
def test_vecmat_equals_the_product_and_reads_the_matrix_in_one_pass(n):
    """x (..., K) times matrix (..., K, N), broadcast over the leading dimensions, for N under one
    slice, with a short last slice and of whole slices; compiled, the slices' sums share one loop
    over the K rows (an accumulator per slice: tmp_acc3 is the fourth of N = 64's)."""
    torch.manual_seed(0)
    x, matrix = torch.randn(2, 3, 1, 9), torch.randn(2, 1, 4, 9, n)
    expected = (x.unsqueeze(-2) @ matrix).squeeze(-2)  # (2, 3, 4, N)
    torch.testing.assert_close(vecmat(x, matrix), expected, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()  # one compile per case (dynamo's recompile limit is 8)
    compiled = torch.compile(vecmat, dynamic=False, fullgraph=True)
    out, sources = torch._inductor.utils.run_and_get_code(compiled, x, matrix)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if n == 64:
        assert "tmp_acc3_vec" in "".join(sources)


@pytest.mark.parametrize("shape", [(1, 1, 24), (2, 1, 24)])
def test_linear_is_f_linear_eagerly_and_matvec_for_one_compiled_row(shape):
    """Eager: exactly `F.linear`. Compiled: one row becomes the reduction inductor fuses into the
    step (no external BLAS call), several rows stay a product; the values agree either way."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(shape), torch.randn(48, 24), torch.randn(48)
    expected = F.linear(x, weight, bias)
    assert torch.equal(linear(x, weight, bias), expected)
    torch._dynamo.reset()  # one compile per case (dynamo's recompile limit is 8)
    code = torch._inductor.utils.run_and_get_code(
        torch.compile(linear, dynamic=False, fullgraph=True), x, weight, bias
    )
    out, sources = code
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    external = any("extern_kernels." in src for src in sources)
    assert external == (shape[0] > 1)
