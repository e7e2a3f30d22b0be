"""The Triton forms are torch.library custom ops: `torch.library.opcheck` checks each one's schema,
fake (shape) implementation and autograd registration, run by the Triton interpreter at tiny
shapes; compiled with `fullgraph=True` each public op gives eager's outputs and gradients, so
torch.compile traces through them without a graph break."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import gated_delta as gated_delta_module
from zoo.kernels import grouped_gemm as grouped_gemm_module
from zoo.kernels import linear_attention as la
from zoo.kernels import long_conv as conv_module
from zoo.kernels import selective_scan as scan_module
from zoo.kernels.gated_delta import gated_delta
from zoo.kernels.gla import gla
from zoo.kernels.grouped_gemm import grouped_gemm
from zoo.kernels.lightning import lightning
from zoo.kernels.long_conv import long_conv, short_conv
from zoo.kernels.selective_scan import selective_scan
from zoo.kernels.ssd import ssd

pytest.importorskip("triton")

# opcheck's default set without its AOT-dispatch check on dynamic shapes: the ops take their
# sequence bounds as ints, which that check turns symbolic, where the real ops need values.
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).requires_grad_()


def _opcheck(op, args) -> None:
    torch.library.opcheck(op, args, test_utils=CHECKS)


def test_linear_attention_ops_pass_opcheck():
    torch.manual_seed(0)
    q, k, g = _leaf(1, 20, 2, 8), _leaf(1, 20, 2, 8), -torch.rand(1, 20, 2, 8)
    v, h0 = _leaf(1, 20, 2, 6), _leaf(2, 2, 8, 6)
    g.requires_grad_()
    for decay, decay_arg in ((la.DECAY_KEY, g), (la.DECAY_HEAD, -torch.rand(2)), (la.DECAY_NONE,
                             q.new_zeros(0))):  # fmt: skip
        _opcheck(
            la._chunk_forward, (q, k, v, decay_arg, h0, 0.5, decay, [0, 7, 20], 16, True, True)
        )
    _opcheck(la._chunk_forward, (q, k, v, g, None, 1.0, la.DECAY_KEY, [0, 20], 16, False, False))
    state = torch.randn(1, 2, 8, 6)
    _opcheck(la._step, (q[:, 0], k[:, 0], v[:, 0], state, None, g[:, 0].detach(), 1.0))
    _opcheck(la._step, (q[:, 0], k[:, 0], v[:, 0], None, -torch.rand(2), None, 1.0))


def test_selective_scan_ops_pass_opcheck():
    torch.manual_seed(0)
    u, delta = _leaf(1, 40, 6), torch.rand(1, 40, 6).requires_grad_()
    A = (-torch.rand(6, 4)).requires_grad_()
    B, C, D, z, h0 = _leaf(1, 40, 4), _leaf(1, 40, 4), _leaf(6), _leaf(1, 40, 6), _leaf(2, 6, 4)
    _opcheck(scan_module._scan_forward, (u, delta, A, B, C, D, z, h0, [0, 13, 40], True))
    _opcheck(scan_module._scan_forward, (u, delta, A, B, C, None, None, None, [0, 40], False))
    step = (u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, torch.randn(1, 6, 4))
    _opcheck(scan_module._selective_scan_step_triton, tuple(t.detach() for t in step))


def test_convolution_ops_pass_opcheck():
    torch.manual_seed(0)
    full, k, bias = _leaf(2, 12, 5), _leaf(5, 16), _leaf(5)
    _opcheck(conv_module._long_conv_forward, (full, k, bias, 7, True))
    _opcheck(conv_module._long_conv_forward, (full, k, None, 12, False))
    u, history = torch.randn(2, 5), torch.randn(2, 4, 5)
    _opcheck(conv_module._long_conv_step, (u, k.detach(), bias.detach(), history))
    x, weight, state = _leaf(2, 9, 5), _leaf(5, 4), _leaf(2, 3, 5)
    _opcheck(conv_module._short_conv_forward, (x, weight, bias, state))
    _opcheck(conv_module._short_conv_forward, (x, weight, None, None))


def test_gated_delta_ops_pass_opcheck():
    torch.manual_seed(0)
    q, k, v, h0 = _leaf(1, 20, 2, 8), _leaf(1, 20, 2, 8), _leaf(1, 20, 2, 6), _leaf(2, 2, 8, 6)
    g, beta = (-torch.rand(1, 20, 2)).requires_grad_(), torch.rand(1, 20, 2).requires_grad_()
    op = gated_delta_module._chunk_forward
    _opcheck(op, (q, k, v, g, beta, h0, 0.5, [0, 7, 20], 16, True, True))
    _opcheck(op, (q, k, v, g, beta, None, 0.5, [0, 20], 16, False, False))
    step = (q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], torch.randn(1, 2, 8, 6))
    _opcheck(gated_delta_module._step, (*(t.detach() for t in step), 0.5))


def test_grouped_gemm_ops_pass_opcheck():
    torch.manual_seed(0)
    x, offsets = _leaf(10, 8), torch.tensor([3, 3, 10], dtype=torch.int32)
    _opcheck(grouped_gemm_module._mm_triton, (x, _leaf(3, 8, 6), offsets, False))
    _opcheck(grouped_gemm_module._mm_triton, (x, _leaf(3, 6, 8), offsets, True))
    _opcheck(grouped_gemm_module._wgrad_triton, (x.detach(), torch.randn(10, 6), offsets, 3))


def _compiled_equals_eager(fn, leaves: list[torch.Tensor]) -> None:
    """fn(*leaves) → tensors; compiled whole (fullgraph: any graph break fails) it must give the
    same outputs and the same gradient of every leaf."""

    def run(f):
        for leaf in leaves:
            leaf.grad = None
        outs = [o for o in f(*leaves) if o is not None]
        sum(
            (o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs
        ).backward()
        return [o.detach() for o in outs], [leaf.grad.clone() for leaf in leaves]

    eager_outs, eager_grads = run(fn)
    torch._dynamo.reset()
    outs, grads = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    for got, want in zip(outs + grads, eager_outs + eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_linear_attention_ops_equal_eager():
    torch.manual_seed(0)
    q, k, v, h0 = _leaf(2, 20, 2, 8), _leaf(2, 20, 2, 8), _leaf(2, 20, 2, 6), _leaf(2, 2, 8, 6)
    g = (-torch.rand(2, 20, 2, 8)).requires_grad_()
    log_decay = -torch.rand(2)
    _compiled_equals_eager(
        lambda q, k, v, g, h0: gla(q, k, v, g, h0, True, chunk_size=16, backend="triton"),
        [q, k, v, g, h0],
    )
    _compiled_equals_eager(
        lambda q, k, v: lightning(q, k, v, log_decay, chunk_size=16, backend="triton"), [q, k, v]
    )


def test_compiled_gated_delta_and_ssd_equal_eager():
    torch.manual_seed(0)
    q, v, h0 = _leaf(2, 20, 2, 8), _leaf(2, 20, 2, 6), _leaf(2, 2, 8, 6)
    k = torch.nn.functional.normalize(torch.randn(2, 20, 2, 8), dim=-1).requires_grad_()
    g, beta = (-torch.rand(2, 20, 2)).requires_grad_(), torch.rand(2, 20, 2).requires_grad_()
    _compiled_equals_eager(
        lambda *t: gated_delta(*t[:5], initial_state=t[5], output_final_state=True,
                               chunk_size=16, backend="triton"),
        [q, k, v, g, beta, h0],
    )  # fmt: skip
    x, dt, A = _leaf(2, 20, 4, 6), torch.rand(2, 20, 4).requires_grad_(), -torch.rand(4)
    B, C, D = _leaf(2, 20, 2, 5), _leaf(2, 20, 2, 5), _leaf(4)
    _compiled_equals_eager(
        lambda x, dt, B, C, D: ssd(x, dt, A, B, C, D, chunk_size=16, backend="triton"),
        [x, dt, B, C, D],
    )


def test_compiled_scan_and_convolutions_equal_eager():
    torch.manual_seed(0)
    u, delta = _leaf(2, 40, 6), torch.rand(2, 40, 6).requires_grad_()
    A = (-torch.rand(6, 4)).requires_grad_()
    B, C, D, z = _leaf(2, 40, 4), _leaf(2, 40, 4), _leaf(6), _leaf(2, 40, 6)
    _compiled_equals_eager(
        lambda *t: selective_scan(*t[:6], output_final_state=True, backend="triton", z=t[6]),
        [u, delta, A, B, C, D, z],
    )
    x, k, bias, weight = _leaf(2, 9, 5), _leaf(5, 16), _leaf(5), _leaf(5, 4)
    _compiled_equals_eager(lambda x, k, b: long_conv(x, k, b, backend="triton"), [x, k, bias])
    _compiled_equals_eager(
        lambda x, w, b: short_conv(x, w, b, output_final_state=True, backend="triton"),
        [x, weight, bias],
    )
    offsets = torch.tensor([3, 3, 10], dtype=torch.int32)
    _compiled_equals_eager(
        lambda x, w: (grouped_gemm(x, w, offsets, backend="triton"),),
        [_leaf(10, 8), _leaf(3, 8, 6)],
    )
