"""The mesh of a run: rank layout and groups by hand, the `parallel:` recipe keys and their
one-line errors, `--dry-run`'s mesh and memory, and the DeviceMesh of 4 gloo processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.harness import run_ranks
from zoo.parallel.mesh import (
    GROUPS,
    ParallelSizes,
    coordinates,
    data_rank,
    memory_per_rank,
    rank_groups,
    resolve_sizes,
)
from zoo.recipe import RecipeError, load_recipe
from zoo.training import dry_run, main

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs"


def test_defaults_are_plain_data_parallelism():
    sizes = resolve_sizes(8)
    assert sizes == ParallelSizes(dp_replicate=8, dp_shard=1, cp=1, ep=1)
    assert not sizes.fsdp and sizes.dp == 8 and sizes.shard == 1
    assert [data_rank(sizes, r) for r in range(8)] == [(r, 8) for r in range(8)]


def test_rank_layout_and_groups_by_hand():
    """2 replicas × 2 shards × 2 context ranks, experts over 2: rank = (r·2 + s)·2 + c."""
    sizes = resolve_sizes(8, dp_shard=2, cp=2, ep=2, num_experts=4)
    assert sizes.dp_replicate == 2 and sizes.dp == 4 and sizes.shard == 4
    assert coordinates(sizes, 5) == {"dp_replicate": 1, "dp_shard": 0, "cp": 1}
    groups = rank_groups(sizes)
    assert list(groups) == list(GROUPS)
    assert groups["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]  # one batch per (r, s); cp shares it
    assert groups["cp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp_shard_cp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups["dp_replicate"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["ep_dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for kind, found in groups.items():  # each kind partitions the ranks
        assert sorted(r for g in found for r in g) == list(range(8)), kind
    assert data_rank(sizes, 5) == (2, 4) and data_rank(sizes, 4) == (2, 4)
    # ep spans the context dim and part of the shard dim when it is larger than cp.
    wide = rank_groups(resolve_sizes(8, dp_shard=4, cp=2, ep=4, num_experts=8))
    assert wide["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert wide["ep_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world": 4, "dp_shard": 3}, "parallel.dp_shard_size=3 × parallel.cp_size=1 = 3 does "
         "not divide the world size 4"),
        ({"world": 8, "dp_replicate": 2, "dp_shard": 2}, "parallel.dp_replicate_size=2: "
         "dp_replicate × dp_shard × cp = 2 × 2 × 1 = 4, but the world size is 8"),
        ({"world": 4, "dp_shard": 2, "ep": 4}, "parallel.ep_size=4: it must divide dp_shard × "
         "cp = 2 × 1 = 2"),
        ({"world": 4, "dp_shard": 4, "ep": 4, "num_experts": 6}, "parallel.ep_size=4: the "
         "model's num_experts=6 is not divisible by it"),
        ({"world": 2, "dp_shard": 2, "ep": 2, "num_experts": 0}, "parallel.ep_size=2: the model "
         "has no experts"),
        ({"world": 2, "cp": 0}, "parallel.cp_size=0: must be at least 1"),
    ],
)  # fmt: skip
def test_a_misfit_is_one_line_naming_the_key(kwargs, message):
    with pytest.raises(ValueError) as info:
        resolve_sizes(**kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def _recipe(*overrides: str):
    return load_recipe(CONFIGS / "tiny-striped-moe.yaml", list(overrides))


def test_recipe_keys_validate_against_world_seq_len_and_experts():
    recipe = _recipe("parallel.dp_shard_size=2", "parallel.ep_size=2")
    config = recipe.build_config()
    assert recipe.parallel_sizes(4, config) == ParallelSizes(2, 2, 1, 2)
    assert recipe.plan(4).accumulation == 1  # 2048 / (8 · 64 · 4 data-parallel ranks)
    with pytest.raises(RecipeError, match=r"tiny-striped-moe.yaml: parallel.colour: unknown key"):
        _recipe("parallel.colour=2")
    odd = _recipe("parallel.cp_size=3", "training.seq_len=512")
    with pytest.raises(RecipeError) as info:
        odd.parallel_sizes(3)
    assert str(info.value).endswith(
        "parallel.cp_size=3: training.seq_len=512 is not divisible by it"
    )
    with pytest.raises(RecipeError, match="num_experts=4 is not divisible by it"):
        _recipe("parallel.dp_shard_size=8", "parallel.ep_size=8").parallel_sizes(8, config)
    # Context-parallel ranks share their batch: the plan counts world ÷ cp batch readers.
    assert _recipe("parallel.cp_size=2").plan(4).accumulation == 2


def test_dry_run_prints_the_mesh_memory_and_tokens(capsys):
    report = main(
        [str(CONFIGS / "tiny-striped-moe.yaml"), "--dry-run", "--world-size", "8",
         "parallel.dp_shard_size=4", "parallel.cp_size=2", "parallel.ep_size=4"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "dp_replicate=1 × dp_shard=4 × cp=2 (ep=4): FSDP2 over 8 ranks" in out
    assert "ep           [0, 1, 2, 3] [4, 5, 6, 7]" in out
    assert "memory/rank" in out and "tokens/step   2,048 in all; 256 per rank" in out
    assert report["memory"]["tokens_per_rank"] == 8 * 64 // 2
    with pytest.raises(SystemExit) as exit_:
        main([str(CONFIGS / "tiny-llama.yaml"), "--dry-run", "--world-size", "2",
              "parallel.ep_size=2"])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parallel.ep_size=2: it must divide" in err


def test_memory_per_rank_follows_its_formula():
    fields = {
        "parameters": 1_000, "expert_parameters": 600, "largest_block_parameters": 100,
        "hidden_size": 8, "num_layers": 2, "vocab_size": 10, "seq_len": 16,
        "micro_batch_size": 2, "precision": "bf16",
    }  # fmt: skip
    fsdp = memory_per_rank(resolve_sizes(4, dp_shard=4, cp=1, ep=2, num_experts=4), **fields)
    held = 400 / 4 + 600 / 4  # dense and experts both over dp_shard × cp under FSDP
    assert fsdp["parameters_held"] == held
    b = fsdp["bytes"]
    assert (b["parameters"], b["gradients"], b["optimizer"]) == (4 * held, 4 * held, 8 * held)
    assert b["activations"] == 2 * 34 * 2 * 16 * 8 + 2 * 16 * 10 * (2 + 8)
    assert b["fsdp_gathered"] == 2 * 100 * 2
    ddp = memory_per_rank(resolve_sizes(4), **fields)  # replicated
    assert ddp["parameters_held"] == 1_000 and ddp["bytes"]["fsdp_gathered"] == 0
    assert ddp["tokens_per_rank"] == 2 * 16
    # Context-parallel ranks hold the same weights: FSDP shards over them too (dp_shard × cp).
    cp = memory_per_rank(resolve_sizes(4, cp=2), **fields)
    assert cp["parameters_held"] == 1_000 / 2 and cp["tokens_per_rank"] == 2 * 8
    experts = memory_per_rank(resolve_sizes(2, dp_shard=1, cp=2, ep=2, num_experts=4), **fields)
    assert experts["parameters_held"] == 400 / 2 + 600 / 2
    # The recipe-level plan the README quotes: a function returning a dict.
    recipe = load_recipe(CONFIGS / "sl-tnl-1b.yaml", ["parallel.dp_shard_size=8"])
    assert dry_run(recipe, world_size=8)["memory"]["total_gib"] > 0


def _mesh_groups(rank, world):
    import torch.distributed as dist

    from zoo.parallel.mesh import build_mesh, resolve_sizes

    mesh = build_mesh(resolve_sizes(world, dp_shard=2, cp=2, ep=2, num_experts=4), "cpu")
    ranks = dist.get_process_group_ranks
    return {
        "cp_dim": ranks(mesh.device_mesh.get_group("cp")),
        "fsdp": ranks(mesh.fsdp_mesh.get_group()),
        **{kind: ranks(group) for kind, group in mesh.groups.items()},
        "data_rank": list(mesh.data_rank),
    }


def test_the_device_mesh_of_four_processes_matches_the_layout():
    sizes = resolve_sizes(4, dp_shard=2, cp=2, ep=2, num_experts=4)
    layout = rank_groups(sizes)
    for rank, found in enumerate(run_ranks(_mesh_groups, 4)):
        for kind, groups in layout.items():
            assert found[kind] == next(g for g in groups if rank in g), (rank, kind)
        assert found["cp_dim"] == found["cp"] and found["fsdp"] == found["dp_shard_cp"]
        assert found["data_rank"] == list(data_rank(sizes, rank))
