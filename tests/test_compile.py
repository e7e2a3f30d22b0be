"""torch.compile: every family and a striped MoE hybrid trace without a graph break in any mixer
(dynamo's `explain`; the only break allowed is the documented escape around the routed experts,
whose shapes are data), and the compiled model's loss and gradients equal eager's.

The comparison compiles with the `aot_eager` backend: dynamo's graphs and AOTAutograd's joint
forward-backward, run by eager kernels, so that the test is about what is traced, in seconds;
inductor's code generation is timed by the benchmarks."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from tests.tiny import tiny_config
from zoo import registry
from zoo.cache import new_cache

FAMILIES = sorted(name for name in registry.families() if name != "hybrid")
MOE_ESCAPE = "zoo/layers/moe.py"


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "striped-moe":
        config = zoo.HybridConfig.from_pattern(
            "lightning:moe mamba:swiglu attention:moe hgrn2:moe hyena:swiglu",
            num_experts=4, num_experts_per_tok=2, hidden_size=32, num_attention_heads=4,
            vocab_size=300, intermediate_size=48, moe_intermediate_size=24,
            hgrn2_expand_ratio=8, mamba_d_state=4, max_position_embeddings=64,
            lightning_chunk_size=8, hgrn2_chunk_size=8, mamba_chunk_size=8, hyena_filter_order=8,
        )  # fmt: skip
    else:
        config = tiny_config(family)
    return AutoModelForCausalLM.from_config(config)


def _breaks_outside_the_escape(explanation) -> list[str]:
    found = []
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{frame.filename}:{frame.lineno}" if frame else "?"
        if MOE_ESCAPE not in where:
            found.append(f"{reason.reason.splitlines()[0]} at {where}")
    return found


@pytest.mark.parametrize("family", [*FAMILIES, "striped-moe"])
def test_no_graph_break_in_any_mixer(family):
    model = _model(family).train()
    ids = torch.randint(3, 200, (2, 24))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, labels=ids)
    assert _breaks_outside_the_escape(explanation) == []


def test_triton_kernels_compile_without_a_graph_break(monkeypatch):
    """The Triton ops are custom ops (run by the interpreter here): the striped hybrid, every
    kernel family in it, compiles whole outside the MoE escape and equals eager."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ZOO_KERNEL_BACKEND", "triton")
    model = _model("striped-moe").train()
    ids = torch.randint(3, 200, (2, 24))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(ids, labels=ids)
    assert _breaks_outside_the_escape(explanation) == []
    _assert_compiled_equals_eager(model, ids)


@pytest.mark.parametrize("family", ["llama", "tnl", "mamba"])
def test_no_graph_break_in_a_decode_step(family):
    model = _model(family).eval()
    ids = torch.randint(3, 200, (2, 12))
    cache = new_cache(model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(ids[:, :1], cache=cache, use_cache=True)
    assert _breaks_outside_the_escape(explanation) == []


@pytest.mark.parametrize("family", [*FAMILIES, "striped-moe"])
def test_compiled_forward_and_backward_equal_eager(family):
    _assert_compiled_equals_eager(_model(family).train(), torch.randint(3, 200, (2, 24)))


def _assert_compiled_equals_eager(model: torch.nn.Module, ids: torch.Tensor) -> None:
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
