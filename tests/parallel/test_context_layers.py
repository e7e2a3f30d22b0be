"""Context parallelism of the softmax-attention, gated short conv and Hyena layers: on 2 and 4
gloo processes, each holding a span of the sequence, the span's outputs, the gradient of its
inputs and the parameter gradients summed over ranks equal one process on the whole sequence.

Tolerance (fp32): rtol 1e-4, atol 1e-5 × the reference tensor's largest magnitude (at least 1).
One spawn per world size runs every case, in both the parallel form (`forward`) and the naive
one (`reference_forward`).
"""

from __future__ import annotations

import pytest
import torch

from tests.parallel.harness import run_ranks
from tests.tiny import tiny_mixer_config
from zoo.layers import build_sequence_mixer
from zoo.layers.context import MixerContext
from zoo.parallel.context import context_parallel, shard_sequence

B, T = 2, 32

# name: (mixer, config overrides); with kv_source, layer 1 reads layer 0's keys and values
CASES = {
    "attention": ("attention", {"num_key_value_heads": 4}),
    "attention_gqa": ("attention", {"num_key_value_heads": 2}),
    "attention_kv_source": ("attention", {"num_key_value_heads": 2, "kv_source": [None, 0, 0]}),
    "gated_conv": ("gated_conv", {}),
    "gated_conv_k4": ("gated_conv", {"gated_conv_kernel": 4}),
    "hyena": ("hyena", {}),
    "hyena_order3": ("hyena", {"hyena_order": 3}),
}
FORMS = ("forward", "reference_forward")


def _layers(case: str) -> tuple[list[torch.nn.Module], int]:
    """The case's layers (a K/V-sharing layer and one that reads it, or one layer) and width."""
    mixer, overrides = CASES[case]
    config = tiny_mixer_config(mixer, **overrides)
    torch.manual_seed(0)
    count = 2 if config.kv_source else 1
    return [build_sequence_mixer(config, i) for i in range(count)], config.hidden_size


def _data(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)


def _run(case: str, form: str, cp) -> dict:
    """Outputs, input gradient and parameter gradients of the case on this rank's span (or the
    whole sequence when `cp` is None)."""
    layers, d = _layers(case)
    x, w = _data(d)
    if cp is not None:
        x, w = shard_sequence(x, cp), shard_sequence(w, cp)
    x = x.clone().requires_grad_()
    context = MixerContext.build(None, None, B, x.shape[1], 0, x.device, cp)
    ys = [getattr(layer, form)(x, context) for layer in layers]
    loss = sum(((i + 1) * y * w).sum() for i, y in enumerate(ys))
    loss.backward()
    grads = {
        f"{i}.{name}": p.grad
        for i, layer in enumerate(layers)
        for name, p in layer.named_parameters()
    }
    return {"y": torch.stack(ys).detach(), "dx": x.grad, "grads": grads}


def _all_cases(rank: int, world: int) -> dict:
    import torch.distributed as dist

    results = {}
    with context_parallel(dist.group.WORLD) as cp:
        for case in CASES:
            for form in FORMS:
                results[f"{case}/{form}"] = _run(case, form, cp)
    return results


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=what)


@pytest.fixture(scope="module", params=[2, 4])
def spans(request):
    return request.param, run_ranks(_all_cases, request.param)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_under_context_parallelism_matches_one_process(spans, case, form):
    world, ranks = spans
    whole = _run(case, form, None)
    L = T // world
    for rank, got in enumerate(ranks):
        got = got[f"{case}/{form}"]
        span = slice(rank * L, (rank + 1) * L)
        _close(got["y"], whole["y"][:, :, span], f"{case} {form} rank {rank}: outputs")
        _close(got["dx"], whole["dx"][:, span], f"{case} {form} rank {rank}: input gradient")
    for name, want in whole["grads"].items():
        summed = sum(got[f"{case}/{form}"]["grads"][name] for got in ranks)
        _close(summed, want, f"{case} {form}: gradient of {name} summed over {world} ranks")
