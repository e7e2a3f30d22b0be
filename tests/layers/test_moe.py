"""MoE: every experts backend against a per-token oracle, the router, the losses, the errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralExperts,
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)

import zoo
from zoo import registry
from zoo.layers.moe import (
    EXPERTS_BACKENDS,
    MoE,
    Router,
    drop_over_capacity,
    expert_capacity,
    expert_load,
    experts_forward,
    load_balancing_loss,
    load_imbalance,
    router_z_loss,
)

D, F_EXPERT, E = 16, 24, 4


def _config(**overrides) -> zoo.ZooConfig:
    fields = dict(
        hidden_size=D,
        num_attention_heads=2,
        num_hidden_layers=1,
        moe_intermediate_size=F_EXPERT,
        num_experts=E,
        num_experts_per_tok=2,
        channel_mixers=["moe"],
    )
    return zoo.LlamaConfig(**{**fields, **overrides})


def _moe(**overrides) -> MoE:
    torch.manual_seed(0)
    moe = MoE(_config(**overrides))
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return moe


def _available_backends() -> list[str]:
    names = ["torch", "torch_grouped_mm", "triton"]
    if importlib.util.find_spec("megablocks") is not None and torch.cuda.is_available():
        names.append("megablocks")
    return names


def oracle(experts, x, top_k_index, top_k_weights) -> torch.Tensor:
    """Token by token, slot by slot: y_t = Σ_j w_tj · SwiGLU_{e_tj}(x_t) (E = dropped)."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for e, w in zip(top_k_index[t].tolist(), top_k_weights[t], strict=True):
            if e == experts.num_experts:
                continue
            gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
            y = y + w * (experts.down_proj[e] @ (F.silu(gate) * up))
        rows.append(y)
    return torch.stack(rows)


def _routing(case: str, tokens: int, k: int, generator: torch.Generator):
    if case == "random":
        index = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(tokens)])
    elif case == "one_expert_idle":  # expert 2 receives nothing
        pool = torch.tensor([0, 1, 3])
        index = torch.stack(
            [pool[torch.randperm(3, generator=generator)[:k]] for _ in range(tokens)]
        )
    elif case == "all_on_one":  # every token's first choice is expert 1, second expert 3
        index = torch.tensor([[1, 3][:k]] * tokens)
    elif case == "dropped":  # some pairs dropped by a capacity (sentinel E)
        index = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(tokens)])
        index[::3, -1] = E
    else:
        raise ValueError(case)
    weights = torch.rand(tokens, k, generator=generator)
    return index, weights.masked_fill(index == E, 0.0)


CASES = [
    ("random", 13, 2),
    ("one_expert_idle", 13, 2),
    ("all_on_one", 9, 2),
    ("random", 11, E),  # top-k = E
    ("random", 1, 2),  # a batch of one token
    ("dropped", 12, 2),
]


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize(("case", "tokens", "k"), CASES)
def test_backend_matches_oracle_forward_and_backward(backend, case, tokens, k):
    moe = _moe(num_experts_per_tok=k)
    experts = moe.experts
    generator = torch.Generator().manual_seed(1)
    index, weights = _routing(case, tokens, k, generator)
    x = torch.randn(tokens, D, generator=generator)
    grad = torch.randn(tokens, D, generator=generator)

    def run(fn):
        experts.zero_grad()
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = fn(xi, wi)
        out.backward(grad)
        return out, xi.grad, wi.grad, experts.gate_up_proj.grad, experts.down_proj.grad

    expected = run(lambda xi, wi: oracle(experts, xi, index, wi))
    got = run(lambda xi, wi: experts_forward(experts, xi, index, wi, backend=backend))
    for name, a, b in zip(("out", "dx", "dw", "dgate_up", "ddown"), got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    if case == "one_expert_idle":
        assert experts.gate_up_proj.grad[2].abs().max() == 0


@pytest.mark.parametrize("backend", _available_backends())
def test_backends_run_transformers_mixtral_experts(backend):
    """Our backends take transformers' experts module (same layout) and agree with its eager."""
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=D, intermediate_size=F_EXPERT, num_local_experts=E, num_experts_per_tok=2
    )
    config._experts_implementation = "eager"
    experts = MixtralExperts(config)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.3)
    generator = torch.Generator().manual_seed(2)
    index, weights = _routing("random", 10, 2, generator)
    x = torch.randn(10, D, generator=generator)
    torch.testing.assert_close(
        experts_forward(experts, x, index, weights, backend=backend),
        experts(x, index, weights),
        atol=1e-5,
        rtol=1e-5,
    )


def test_moe_block_matches_mixtral_sparse_moe_block():
    """Same weights, same router: our MoE layer and transformers' MixtralSparseMoeBlock agree."""
    moe = _moe()
    config = MixtralConfig(
        hidden_size=D, intermediate_size=F_EXPERT, num_local_experts=E, num_experts_per_tok=2
    )
    config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(config)
    block.load_state_dict(moe.state_dict())
    x = torch.randn(2, 7, D)
    out, logits = moe(x)
    torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, block.gate(x)[0])


def test_router_scores_and_renormalisation():
    torch.manual_seed(0)
    x = torch.randn(5, D)
    for scoring in ("softmax", "sigmoid"):
        for norm in (True, False):
            router = Router(_config(router_scoring_func=scoring, norm_topk_prob=norm))
            torch.nn.init.normal_(router.weight)
            logits, weights, index = router(x)
            scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
            top = scores.topk(2, dim=-1)
            assert torch.equal(index, top.indices)
            expected = top.values / top.values.sum(-1, keepdim=True) if norm else top.values
            torch.testing.assert_close(weights, expected)


def test_capacity_drops_over_capacity_pairs_first_choices_first():
    # 6 tokens all choose expert 0 first and expert 1 second; capacity ceil(1.0·6·2/4) = 3.
    index = torch.tensor([[0, 1]] * 6)
    weights = torch.full((6, 2), 0.5)
    assert expert_capacity(6, 2, 4, 1.0) == 3
    kept_w, kept_i = drop_over_capacity(weights, index, num_experts=4, capacity_factor=1.0)
    assert kept_i[:, 0].tolist() == [0, 0, 0, 4, 4, 4]
    assert kept_i[:, 1].tolist() == [1, 1, 1, 4, 4, 4]
    assert kept_w[3:].abs().sum() == 0 and torch.equal(kept_w[:3], weights[:3])
    # Second choices never take a slot a first choice wants: expert 0 is first for tokens 0-2
    # and second for tokens 3-5; with capacity 3 the three first choices win.
    index = torch.tensor([[0, 1]] * 3 + [[2, 0]] * 3)
    _, kept_i = drop_over_capacity(weights, index, num_experts=4, capacity_factor=1.0)
    assert kept_i[:, 1].tolist() == [1, 1, 1, 4, 4, 4]


def test_capacity_ignores_padded_tokens():
    index = torch.tensor([[0, 1]] * 4)
    mask = torch.tensor([False, False, True, True])
    _, kept = drop_over_capacity(torch.ones(4, 2), index, 4, 1.0, token_mask=mask)
    # Two real tokens: capacity ceil(2·2/4) = 1; the padded ones are dropped and take nothing.
    assert kept.tolist() == [[4, 4], [4, 4], [0, 1], [4, 4]]


def test_moe_with_capacity_matches_the_dropped_oracle():
    moe = _moe(moe_capacity_factor=0.5)
    x = torch.randn(1, 12, D)
    out, _ = moe(x)
    _, weights, index = moe.gate(x[0])
    assert (index == E).any()  # something was dropped
    torch.testing.assert_close(out[0], oracle(moe.experts, x[0], index, weights))


def test_shared_experts_add_a_dense_swiglu():
    moe = _moe(num_shared_experts=2)
    assert moe.shared_experts.gate_proj.weight.shape == (2 * F_EXPERT, D)
    x = torch.randn(1, 5, D)
    out, _ = moe(x)
    _, weights, index = moe.gate(x[0])
    expected = oracle(moe.experts, x[0], index, weights) + moe.shared_experts(x[0])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_matches_transformers_for_one_layer():
    torch.manual_seed(0)
    logits = torch.randn(20, E)
    ours = load_balancing_loss([logits], top_k=2)
    torch.testing.assert_close(ours, load_balancing_loss_func((logits,), E, top_k=2))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False
    torch.testing.assert_close(
        load_balancing_loss([logits], top_k=2, token_mask=mask),
        load_balancing_loss_func((logits,), E, top_k=2, attention_mask=mask),
    )


def test_load_balancing_loss_is_k_when_uniform_and_grows_when_collapsed():
    # Tokens spread evenly with near-uniform scores: loss = k. All on experts 0, 1: larger.
    balanced = torch.eye(E).repeat(5, 1) * 1e-3
    assert load_balancing_loss([balanced], top_k=1).item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(20, E)
    collapsed[:, :2] = 5.0
    assert load_balancing_loss([collapsed], top_k=2).item() > 1.9


def test_z_loss_and_load_statistics():
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(router_z_loss([logits]), expected)
    load = expert_load([torch.tensor([[5.0, 0, 0, 0]] * 3 + [[0, 5.0, 0, 0]])], top_k=1)
    torch.testing.assert_close(load, torch.tensor([[0.75, 0.25, 0.0, 0.0]]))
    torch.testing.assert_close(load_imbalance(load), torch.tensor([3.0]))


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"num_experts_per_tok": 5}, ValueError, "num_experts_per_tok=5 must be <= num_experts=4"),
        ({"num_experts": 0}, ValueError, "num_experts=0 must be a positive integer"),
        ({"moe_backend": "cutlass"}, ValueError, "moe_backend='cutlass' is not one of"),
        ({"router_scoring_func": "relu"}, ValueError, "router_scoring_func='relu'"),
        ({"moe_capacity_factor": 0}, ValueError, "moe_capacity_factor=0 must be a positive"),
        ({"num_shared_experts": -1}, ValueError, "num_shared_experts=-1"),
    ],
)
def test_bad_moe_config_names_the_field(fields, error, message):
    with pytest.raises(error, match=message):
        _config(**fields)


@pytest.mark.skipif(importlib.util.find_spec("megablocks") is not None, reason="installed")
def test_megablocks_backend_without_megablocks_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'hybrid-zoo\[megablocks\]'"):
        MoE(_config(moe_backend="megablocks"))


def test_every_backend_is_named_in_the_config():
    allowed = registry.channel_mixer("moe").settings["moe_backend"].check.allowed
    assert set(EXPERTS_BACKENDS) | {"auto"} == set(allowed)


@pytest.mark.parametrize(
    ("pattern", "mixers", "channels"),
    [
        ("attention", ["attention"], ["swiglu"]),
        (
            "lightning:moe*2, attention:glu",
            ["lightning"] * 2 + ["attention"],
            ["moe"] * 2 + ["glu"],
        ),
        (
            "(hgrn2:none attention:moe)*2 mamba:none",
            ["hgrn2", "attention", "hgrn2", "attention", "mamba"],
            ["none", "moe", "none", "moe", "none"],
        ),
        (
            "((lightning:moe)*2 hyena)*2",
            ["lightning"] * 2 + ["hyena"] + ["lightning"] * 2 + ["hyena"],
            ["moe", "moe", "swiglu"] * 2,
        ),
    ],
)
def test_layer_pattern_round_trip(pattern, mixers, channels):
    assert zoo.configuration.parse_layer_pattern(pattern) == (mixers, channels)
    config = zoo.HybridConfig.from_pattern(pattern, hidden_size=32, hgrn2_expand_ratio=16)
    assert (config.mixers, config.channel_mixers) == (mixers, channels)
    assert zoo.configuration.parse_layer_pattern(config.layer_pattern) == (mixers, channels)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("attention:mlp", "'mlp' is not a channel mixer"),
        ("transformer:moe", "'transformer' is not a sequence mixer"),
        ("(attention:moe", "unbalanced"),
        ("", "has no layers"),
        ("attention::moe", "cannot read layer"),
    ],
)
def test_bad_layer_pattern_names_the_layer(pattern, message):
    with pytest.raises(ValueError, match=message):
        zoo.configuration.parse_layer_pattern(pattern)


def test_fused_swiglu_gradient():
    from zoo.layers.moe import swiglu

    gate_up = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate_up,))
    gate, up = gate_up.detach().chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(gate_up), F.silu(gate) * up)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in _available_backends() if b != "torch"])
@pytest.mark.parametrize("case", ["random", "one_expert_idle", "all_on_one", "dropped"])
def test_cuda_bf16_backend_matches_fp32_torch(backend, case):
    """On the GPU, in bf16, at a larger shape: every backend against the fp32 torch reference."""
    if backend == "megablocks" and case == "dropped":
        pytest.skip("megablocks is dropless")
    torch.manual_seed(0)
    config = _config(hidden_size=256, moe_intermediate_size=512, num_attention_heads=4)
    experts = MoE(config).experts.cuda()
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.05)
    generator = torch.Generator().manual_seed(3)
    index, weights = _routing(case, 1024, 2, generator)
    x = torch.randn(1024, 256, generator=generator)
    grad = torch.randn(1024, 256, generator=generator)
    index, weights, x, grad = index.cuda(), weights.cuda(), x.cuda(), grad.cuda()

    def run(module, dtype, name):
        module.zero_grad()
        xi = x.to(dtype).detach().requires_grad_()  # a leaf of its own, also for fp32
        out = experts_forward(module, xi, index, weights, backend=name)
        out.backward(grad.to(dtype))
        return [t.float() for t in (out, xi.grad, module.gate_up_proj.grad, module.down_proj.grad)]

    expected = run(experts, torch.float32, "torch")
    low = MoE(config).experts.cuda().to(torch.bfloat16)
    low.load_state_dict(experts.state_dict())
    got = run(low, torch.bfloat16, backend)
    for name, a, b in zip(("out", "dx", "dgate_up", "ddown"), got, expected, strict=True):
        scale = b.abs().max().clamp(min=1e-6)
        assert (a - b).abs().max() / scale < 2e-2, name
