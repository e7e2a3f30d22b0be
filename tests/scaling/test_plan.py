"""The sweep planner, runner and run loader: recipes that validate, FLOPs the training loop
agrees with, MoE grids at equal active or total width, resumable sweeps, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zoo.recipe import RecipeError, load_recipe
from zoo.scaling.plan import ModelSize, moe_sizes, plan_isoflop
from zoo.scaling.runs import load_runs
from zoo.scaling.sweep import pending_runs, plan_sweep, run_sweep
from zoo.training import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "configs" / "_tiny.yaml"
QUIET = {
    "logging": {"log_every": 5, "eval_every": None, "eval_batches": 2, "checkpoint_every": None}
}


def _base() -> dict:
    fields = yaml.safe_load(TINY.read_text())
    fields.update(QUIET)
    return fields


SIZES = [
    ModelSize("a", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}),
    ModelSize("b", {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3}),
]


def test_isoflop_recipes_validate_and_spend_their_budget(tmp_path):
    runs = plan_isoflop(_base(), ["llama", "tnl"], [2e10, 6e10], SIZES, tmp_path, tmp_path / "r")
    assert len(runs) == 2 * 2 * 2
    batch = 2048  # _tiny.yaml's global batch
    for run in runs:
        recipe = load_recipe(run.recipe_path)  # the schema accepts every planned recipe
        assert recipe.model.preset == run.family
        assert recipe.plan().tokens == run.tokens == run.steps * batch
        # Whole steps: within half a step of the budget.
        assert abs(run.flops - run.budget) <= 0.5 * run.train_flops_per_token * batch
        # The zoo's count is not 6ND: the LM head and mixers make it differ, and it is recorded.
        assert run.six_nd_ratio == pytest.approx(run.flops / (6 * run.params * run.tokens))
        assert 0.8 < run.six_nd_ratio < 1.3
    by_budget = {}
    for run in runs:
        by_budget.setdefault((run.family, run.budget), []).append(run)
    for row in by_budget.values():  # bigger models see fewer tokens at equal compute
        small, large = sorted(row, key=lambda r: r.params)
        assert small.tokens > large.tokens


def test_the_new_mixers_families_plan_like_the_others(tmp_path):
    families = ["gla", "mamba2", "gated_deltanet"]
    runs = plan_isoflop(_base(), families, [2e10], SIZES, tmp_path, tmp_path / "r")
    assert sorted({run.family for run in runs}) == sorted(families)
    for run in runs:
        assert load_recipe(run.recipe_path).model.preset == run.family
        # Their layers count their FLOPs (zoo.flops): at least 6ND; more for Mamba2 at these
        # widths, whose 128-state recurrence costs FLOPs that hold no parameters.
        assert 0.8 < run.six_nd_ratio < 2.0, (run.family, run.six_nd_ratio)


def test_planned_flops_equal_the_training_loops_count(tmp_path):
    (run,) = plan_isoflop(_base(), ["tnl"], [1e10], SIZES[:1], tmp_path, tmp_path / "r")
    result = train(load_recipe(run.recipe_path), resume="never", save_final=False, echo=print)
    assert result.tokens == run.tokens
    assert result.flops_per_token * result.tokens == run.flops


def test_moe_grids_hold_active_or_total_width_fixed(tmp_path):
    dense = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    active = moe_sizes([1, 4, 8], [1, 2], expert_width=64, mode="active", num_layers=2, extra=dense)
    runs = plan_isoflop(_base(), ["llama"], [3e10], active, tmp_path / "a", tmp_path / "r")
    per_token = {run.train_flops_per_token for run in runs if run.sparsity > 0}
    # Equal active expert width: the routers' few FLOPs apart, equal compute per token.
    assert max(per_token) / min(per_token) < 1.02
    assert {round(run.sparsity, 3) for run in runs} == {0.0, 0.5, 0.75, 0.875}
    total = moe_sizes([1, 4, 8], [1, 2], expert_width=64, mode="total", num_layers=2, extra=dense)
    runs = plan_isoflop(_base(), ["llama"], [3e10], total, tmp_path / "t", tmp_path / "r")
    params = [run.params for run in runs]
    assert max(params) / min(params) < 1.02  # routers only
    sparse = [run for run in runs if run.sparsity > 0.8]
    dense_run = next(run for run in runs if run.sparsity == 0 and "e1-" in run.name)
    assert all(run.tokens > dense_run.tokens for run in sparse)  # fewer FLOPs/token, more tokens


def test_moe_grid_rejects_nothing_left(tmp_path):
    with pytest.raises(ValueError, match="expert_width=7"):
        moe_sizes([4], [2], expert_width=7, mode="active", num_layers=1)
    with pytest.raises(ValueError, match="mode must be"):
        moe_sizes([4], [2], expert_width=8, mode="both", num_layers=1)


def _sweep_file(tmp_path: Path, **changes) -> Path:
    sweep = {
        "base": str(TINY),
        "overrides": QUIET,
        "families": ["tnl"],
        "budgets": [8e9],
        "sizes": {s.name: dict(s.overrides) for s in SIZES},
        "family_overrides": {"tnl": {"lightning_chunk_size": 16}},
        "min_steps": 3,
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_trains_pending_runs_and_resumes(tmp_path):
    plan_dir = tmp_path / "plan"
    planned = plan_sweep(_sweep_file(tmp_path), plan_dir)
    assert [e["name"] for e in pending_runs(plan_dir)] == sorted(
        (r.name for r in planned), key=lambda n: -next(r.flops for r in planned if r.name == n)
    )
    # A sweep "killed" after one run: only the other one is still pending, and runs again.
    first = pending_runs(plan_dir)[0]
    from zoo.training import train_recipe_file

    train_recipe_file(first["recipe_path"], threads=1)
    assert [e["name"] for e in pending_runs(plan_dir)] == [
        r.name for r in planned if r.name != first["name"]
    ]
    assert run_sweep(plan_dir, workers=1, threads=1) == 1
    assert pending_runs(plan_dir) == [] and run_sweep(plan_dir) == 0
    runs, missing = load_runs(plan_dir)
    assert missing == [] and len(runs) == 2
    for run in runs:
        assert run.loss > 0 and run.curve and run.curve[-1].tokens == run.tokens
        assert run.budget == 8e9 and run.state_size > 0


def test_bad_sweep_files_name_the_key(tmp_path):
    with pytest.raises(RecipeError, match=r"sweep.yaml: families: Field required"):
        path = _sweep_file(tmp_path)
        fields = yaml.safe_load(path.read_text())
        del fields["families"]
        path.write_text(yaml.safe_dump(fields))
        plan_sweep(path, tmp_path / "p")
    with pytest.raises(ValueError, match=r"budgets must be positive FLOP counts, got \[-1\.0\]"):
        plan_sweep(_sweep_file(tmp_path, budgets=[-1.0]), tmp_path / "p")
    with pytest.raises(RecipeError, match=r"model\.overrides\.hiden_size: not a field"):
        plan_sweep(_sweep_file(tmp_path, sizes={"x": {"hiden_size": 8}}), tmp_path / "p")


def test_csv_runs_name_the_bad_row_and_column(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("name,family,params,tokens,flops,loss\nr1,llama,1e6,2e7,1.2e14,3.1\n")
    (run,), missing = load_runs(path)
    assert run.params == 1e6 and run.active == 1e6 and missing == []
    path.write_text("name,family,params,tokens,flops,loss\nr1,llama,big,2e7,1.2e14,3.1\n")
    with pytest.raises(ValueError, match=r"runs\.csv:2 \(r1\), column params: 'big'"):
        load_runs(path)
    path.write_text("name,family,params,tokens\nr1,llama,1,2\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['flops', 'loss'\]"):
        load_runs(path)
