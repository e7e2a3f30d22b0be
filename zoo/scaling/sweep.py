"""A scaling sweep from one YAML file: plan its recipes, train them resumably, in parallel.

    zoo scaling plan benchmarks/results/scaling/sweep.yaml runs/scaling   # recipes + plan.json
    zoo scaling run runs/scaling --workers 2                              # train what is missing
    zoo scaling fit runs/scaling --out benchmarks/results/scaling          # tables, fits, plots

The sweep file names a base recipe, the families, the FLOP budgets and the model sizes of an
IsoFLOP grid, and optionally an MoE experts × top-k grid (see `SweepConfig`). `run` trains every
planned recipe that has no `result.json` yet, each in a worker process with its own torch
threads, and writes that file atomically when the run ends: a killed sweep loses at most the runs
in flight and `run` again picks up the rest.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from zoo.recipe import load_settings_file, merge_fields, recipe_fields
from zoo.scaling.plan import (
    RUN_NAME,
    ModelSize,
    PlannedRun,
    load_plan,
    moe_sizes,
    plan_isoflop,
    plan_run,
    write_plan,
)
from zoo.training import RESULT_FILE, train_recipe_file
from zoo.workers import process_pool


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MoEGrid(_Section):
    family: str = "llama"
    size: dict[str, Any] = Field(description="the dense shape (config overrides) the MoE varies")
    experts: list[int]
    top_k: list[int]
    mode: Literal["active", "total"] = Field(
        description="active: equal active expert width k·f; total: equal total width E·f"
    )
    expert_width: int = Field(gt=0, description="k·f (active) or E·f (total)")
    budgets: list[float]


class SweepConfig(_Section):
    base: Path = Field(description="the recipe every run starts from (relative to this file)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="recipe keys, nested")
    families: list[str]
    budgets: list[float]
    sizes: dict[str, dict[str, Any]] = Field(description="size name → config overrides")
    family_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    min_steps: int = Field(10, gt=0)
    moe: MoEGrid | None = None

    @field_validator("sizes", "family_overrides")
    @classmethod
    def _names_are_path_components(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Each name becomes part of a run folder's name: nothing that could leave the sweep.
        for name in value:
            if not RUN_NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} cannot name a run folder: use letters, digits, '.', '_' and '-' "
                    "(not starting with '.')"
                )
        return value


def load_sweep(path: str | Path) -> SweepConfig:
    return load_settings_file(SweepConfig, path)


def _base_fields(config: SweepConfig) -> dict[str, Any]:
    fields = merge_fields(recipe_fields(config.base), config.overrides)
    fields.pop("source", None)
    return fields


def plan_sweep(config_path: str | Path, out_dir: str | Path) -> list[PlannedRun]:
    """Write every recipe of the sweep into `out_dir`/recipes, and plan.json / plan.md."""
    config = load_sweep(config_path)
    out_dir = Path(out_dir)
    base = _base_fields(config)
    sizes = {
        family: [
            ModelSize(name, {**overrides, **config.family_overrides.get(family, {})})
            for name, overrides in config.sizes.items()
        ]
        for family in config.families
    }
    recipes, runs_root = out_dir / "recipes", out_dir / "runs"
    runs = plan_isoflop(
        base, config.families, config.budgets, sizes, recipes, runs_root, config.min_steps
    )
    if config.moe is not None:
        moe = config.moe
        extra = {**moe.size, **config.family_overrides.get(moe.family, {})}
        layers = int(extra.get("num_hidden_layers", 2))
        for budget in moe.budgets:
            for size in moe_sizes(
                moe.experts, moe.top_k, expert_width=moe.expert_width, mode=moe.mode,
                num_layers=layers, extra=extra,
            ):  # fmt: skip
                runs.append(
                    plan_run(
                        base,
                        family=moe.family,
                        size=ModelSize(f"moe-{size.name}", size.overrides),
                        budget=budget,
                        folder=recipes,
                        runs_root=runs_root,
                        min_steps=config.min_steps,
                        grid="moe",
                    )
                )
    write_plan(runs, out_dir)
    return runs


def pending_runs(plan_dir: str | Path) -> list[dict[str, Any]]:
    """Planned runs without a result yet, largest FLOPs first (so the slowest start early)."""
    plan = load_plan(plan_dir)
    todo = []
    for entry in plan:
        recipe = yaml.safe_load(Path(entry["recipe_path"]).read_text())
        if not (Path(recipe["output_dir"]) / RESULT_FILE).is_file():
            todo.append(entry)
    return sorted(todo, key=lambda e: -e["flops"])


def run_sweep(plan_dir: str | Path, workers: int = 1, threads: int | None = None) -> int:
    """Train every pending run of a plan, `workers` at a time; returns how many ran."""
    from tqdm.auto import tqdm

    todo = pending_runs(plan_dir)
    if not todo:
        return 0
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    with process_pool(workers) as pool:
        futures = {
            pool.submit(train_recipe_file, e["recipe_path"], threads): e["name"] for e in todo
        }
        bar = tqdm(total=len(futures), desc="scaling sweep", unit="run")
        for future in concurrent.futures.as_completed(futures):
            record = future.result()  # a failed run stops the sweep with its own error
            bar.set_postfix(last=f"{futures[future]}: {record['eval_loss']:.3f}", refresh=False)
            bar.update()
        bar.close()
    return len(todo)
