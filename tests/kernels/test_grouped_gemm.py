"""Triton grouped GEMM (interpreter on CPU) against the per-group torch reference, and its use by
our MoE layer and by transformers' Mixtral through ExpertsInterface."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from zoo.kernels.grouped_gemm import grouped_gemm, grouped_gemm_torch
from zoo.layers.moe import EXPERTS_IMPLEMENTATION

SIZES = {
    "uneven": [5, 0, 37, 3],  # an empty group, sizes not multiples of the tile
    "one_group_takes_all": [0, 70, 0, 0],
    "all_empty": [0, 0, 0, 0],
    "single_row": [0, 0, 1, 0],
}


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", sorted(SIZES))
def test_forward_dx_dw_match_the_reference(case, trans_b):
    torch.manual_seed(0)
    sizes = torch.tensor(SIZES[case])
    offsets = sizes.cumsum(0).to(torch.int32)
    m, k, n = int(sizes.sum()) + 3, 24, 40  # 3 trailing rows past the last group (dropped)
    x = torch.randn(m, k, requires_grad=True)
    w = (torch.randn(4, n, k) if trans_b else torch.randn(4, k, n)).requires_grad_()
    grad = torch.randn(m, n)

    def run(fn):
        x.grad = w.grad = None
        out = fn(x, w, offsets, trans_b)
        out.backward(grad)
        rows = int(offsets[-1])
        return out[:rows], x.grad[:rows], w.grad

    got = run(lambda *a: grouped_gemm(*a, backend="triton"))
    expected = run(grouped_gemm_torch)
    for name, a, b in zip(("out", "dx", "dw"), got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="x has 8 features"):
        grouped_gemm(torch.zeros(4, 8), torch.zeros(2, 16, 4), torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_gemm(torch.zeros(4, 8), torch.zeros(2, 8, 4), torch.tensor([2, 4]), backend="cuda")


def _mixtral(implementation: str) -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    config._experts_implementation = implementation
    return MixtralForCausalLM(config)


def test_transformers_mixtral_runs_its_experts_on_our_kernel():
    ids = torch.randint(0, 64, (2, 9))
    results = {}
    for implementation in ("eager", EXPERTS_IMPLEMENTATION):
        model = _mixtral(implementation)
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[implementation] = (out.logits.detach(), grads)
    (logits_a, grads_a), (logits_b, grads_b) = results.values()
    torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_name_is_valid_at_load_time():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert EXPERTS_IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS.valid_keys()


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
def test_cuda_bf16_matches_fp32_reference(trans_b):
    torch.manual_seed(0)
    sizes = torch.tensor([700, 0, 3, 1500, 97, 0, 2000, 5])
    offsets = sizes.cumsum(0).to(device="cuda", dtype=torch.int32)
    m, k, n = int(sizes.sum()), 512, 768
    x = torch.randn(m, k, device="cuda")
    w = torch.randn(8, n, k, device="cuda") if trans_b else torch.randn(8, k, n, device="cuda")
    grad = torch.randn(m, n, device="cuda")
    results = []
    for dtype, backend in ((torch.float32, "torch"), (torch.bfloat16, "triton")):
        xi = x.to(dtype).detach().requires_grad_()  # fresh leaves, also for fp32
        wi = w.to(dtype).detach().requires_grad_()
        out = grouped_gemm(xi, wi, offsets, trans_b, backend=backend)
        out.backward(grad.to(dtype))
        results.append([t.float() for t in (out, xi.grad, wi.grad)])
    for name, a, b in zip(("out", "dx", "dw"), results[1], results[0], strict=True):
        assert (a - b).abs().max() / b.abs().max() < 2e-2, name
