"""Expert parallelism on gloo CPU processes against one process on the concatenated tokens.

Every rank builds the same full MoE layer (same seed), shards its experts and feeds its own slice
of the tokens; the parent runs the unsharded layer on all of them. Outputs, the aux loss and the
z-loss, the routing (capacity drops included) and the gradients of the tokens, the router and
every expert weight must agree: the router's gradients summed over ranks (the SUM convention of
`zoo.parallel.expert`), the experts' concatenated across ranks. Tolerance: fp32, 1e-5 relative
(elementwise rtol 1e-5, atol 1e-5 × the tensor's largest entry). Each world size is one spawn
that runs every case and backend (module-scoped fixtures); the tests read its results.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import zoo
from tests.parallel.harness import run_ranks
from zoo.layers.moe import (
    MoE,
    load_balancing_loss,
    resolve_moe_backend,
    router_losses,
    router_z_loss,
)
from zoo.parallel.expert import (
    enable_expert_parallel,
    expert_parallel_group,
    expert_parameter_names,
    full_state_dict,
    shard_experts,
)

D, F_EXPERT, TOKENS, K = 16, 32, 24, 2  # TOKENS per rank
CASES = ("balanced", "skewed", "capacity")
BACKENDS = ["torch"] + (["torch_grouped_mm"] if resolve_moe_backend("auto") != "torch" else [])


def _config(num_experts: int, backend: str, case: str) -> zoo.ZooConfig:
    return zoo.LlamaConfig(
        hidden_size=D,
        num_attention_heads=2,
        num_hidden_layers=1,
        moe_intermediate_size=F_EXPERT,
        num_experts=num_experts,
        num_experts_per_tok=K,
        channel_mixers=["moe"],
        moe_backend=backend,
        moe_capacity_factor=0.5 if case == "capacity" else None,
    )


def _setup(case: str, backend: str, num_experts: int, world: int):
    """The full layer and the tokens of all ranks, the same in every process.
    balanced: random routing; skewed: the upper half of the experts (the last ranks' experts)
    gets no token; capacity: half the dropless capacity, and some tokens padded."""
    torch.manual_seed(0)
    config = _config(num_experts, backend, case)
    moe = MoE(config)
    for param in moe.parameters():
        torch.nn.init.normal_(param, std=0.3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(world * TOKENS, D, generator=generator)
    grad = torch.randn(world * TOKENS, D, generator=generator)
    mask = None
    if case == "skewed":  # a large feature 0 that the lower half of the experts likes
        x[:, 0] += 6.0
        with torch.no_grad():
            moe.gate.weight[:, 0] = 2.0
            moe.gate.weight[num_experts // 2 :, 0] = -2.0
    elif case == "capacity":
        mask = torch.rand(world * TOKENS, generator=generator) > 0.2
    return config, moe, x, grad, mask


def _run(config, moe, x, grad, mask, group) -> dict:
    """Forward, Σ(out · grad) + aux + z backward; what the comparisons need."""
    x = x.clone().requires_grad_()
    token_mask = mask.view(1, -1) if mask is not None else None
    out, logits = moe(x.view(1, -1, D), token_mask)
    aux = load_balancing_loss([logits], K, "softmax", mask, group)
    z = router_z_loss([logits], mask, group)
    ((out.view(-1, D) * grad).sum() + aux + z).backward()
    _, _, index = moe.gate(x.detach(), mask, group)
    return {
        "out": out.detach().view(-1, D),
        "aux": aux.detach(),
        "z": z.detach(),
        "router_loss": router_losses([logits], config, mask, group)[1].detach(),
        "index": index,
        "dx": x.grad,
        "drouter": moe.gate.weight.grad,
        "dgate_up": moe.experts.gate_up_proj.grad,
        "ddown": moe.experts.down_proj.grad,
    }


def _every_case(rank: int, world: int, num_experts: int) -> dict:
    results = {}
    rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
    for backend in BACKENDS:
        for case in CASES:
            config, moe, x, grad, mask = _setup(case, backend, num_experts, world)
            enable_expert_parallel(moe)
            local_mask = mask[rows] if mask is not None else None
            results[f"{backend}/{case}"] = _run(
                config, moe, x[rows], grad[rows], local_mask, dist.group.WORLD
            )
    odd = MoE(_config(world + 1, "torch", "balanced"))
    try:
        shard_experts(odd.experts)
    except ValueError as error:
        results["error"] = str(error)
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_every_case, 2, 4)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_ranks(_every_case, 4, 8)


def _close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    atol = 1e-5 * float(expected.abs().max().clamp(min=1e-30))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol, msg=name)


def _check_against_one_process(results: list[dict], num_experts: int, backend: str, case: str):
    world = len(results)
    expected = _run(*_setup(case, backend, num_experts, world), group=None)
    mask = _setup(case, backend, num_experts, world)[-1]
    ranks = [r[f"{backend}/{case}"] for r in results]
    assert torch.equal(torch.cat([r["index"] for r in ranks]), expected["index"])
    for name in ("out", "dx", "dgate_up", "ddown"):
        _close(torch.cat([r[name] for r in ranks]), expected[name], name)
    _close(sum(r["drouter"] for r in ranks), expected["drouter"], "drouter")
    for name in ("aux", "z", "router_loss"):
        for r in ranks:
            _close(r[name], expected[name], name)
    index = expected["index"]
    if case == "skewed":  # the last rank's experts get no row: its empty pass, zero gradients
        assert bool((index < num_experts // 2).all())
        assert ranks[-1]["dgate_up"].abs().max() == 0 and ranks[-1]["ddown"].abs().max() == 0
    if case == "capacity":
        dropped = (index == num_experts) & mask.view(-1, 1)
        assert int(dropped.sum()) > 0  # the capacity dropped real pairs, not only padding


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_one_process(two_ranks, backend, case):
    _check_against_one_process(two_ranks, 4, backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_four_ranks_match_one_process(four_ranks, backend, case):
    _check_against_one_process(four_ranks, 8, backend, case)


def test_experts_not_divisible_by_the_group_is_one_line(two_ranks):
    message = two_ranks[0]["error"]
    assert "num_experts=3" in message and "expert-parallel size 2" in message
    assert "\n" not in message


# A small LM: three MoE layers, the last reusing the first's weights, one shared expert.
def _lm_config() -> zoo.ZooConfig:
    return zoo.LlamaConfig(
        hidden_size=D,
        num_hidden_layers=3,
        num_attention_heads=2,
        channel_mixers=["moe"] * 3,
        channel_mixer_weight_source=[None, None, 0],
        num_experts=4,
        moe_intermediate_size=F_EXPERT,
        num_shared_experts=1,
    )


def _lm(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_lm_config()).eval()


def _lm_ids(world: int) -> torch.Tensor:
    return torch.randint(0, 259, (2 * world, 9), generator=torch.Generator().manual_seed(2))


def _lm_under_ep(rank: int, world: int, folder: str) -> dict:
    model = _lm()
    enable_expert_parallel(model)
    ids = _lm_ids(world)[2 * rank : 2 * rank + 2]  # this rank's batch rows
    with torch.no_grad():
        logits = model(ids).logits
    state = full_state_dict(model)
    if rank == 0:
        model.save_pretrained(folder, state_dict=state)
    return {
        "logits": logits,
        "names": expert_parameter_names(model),
        "group_is_world": expert_parallel_group(model) is dist.group.WORLD,
        "local_shape": list(model.model.layers[0].channel_mixer.experts.gate_up_proj.shape),
    }


def test_model_under_ep_matches_and_its_checkpoint_loads_in_one_process(tmp_path):
    results = run_ranks(_lm_under_ep, 2, str(tmp_path))
    model = _lm()
    with torch.no_grad():
        expected = model(_lm_ids(2)).logits
    _close(torch.cat([r["logits"] for r in results]), expected, "logits")
    assert results[0]["local_shape"] == [2, 2 * F_EXPERT, D]  # 4 experts over 2 ranks
    assert results[0]["group_is_world"]
    # Layer 2 shares layer 0's experts: one Parameter, listed (and sliced) once.
    assert results[0]["names"] == [
        f"model.layers.{i}.channel_mixer.experts.{w}"
        for i in (0, 1)
        for w in ("gate_up_proj", "down_proj")
    ]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    experts = loaded.model.layers[2].channel_mixer.experts
    assert experts.gate_up_proj is loaded.model.layers[0].channel_mixer.experts.gate_up_proj
