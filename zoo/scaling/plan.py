"""Sweep planner: the recipes of an IsoFLOP grid, and of MoE experts × top-k grids.

IsoFLOP grid (Hoffmann et al., arXiv 2203.15556, approach 2): for every family, FLOP budget C and
model size, train on D = C / (FLOPs per token) tokens, so that each budget is a row of models of
different sizes trained at equal compute. FLOPs per token are the zoo's own count
(`zoo.flops.model_flops` through `zoo.training.dry_run`, the number the training loop logs), not
6N: the attention, LM-head and mixer-specific terms make 6N·D off by a family- and size-dependent
factor, which every planned run records (`six_nd_ratio` = C / 6ND, with N all parameters, and
`six_nd_ratio_non_embedding` with Kaplan's non-embedding N).

Steps are whole: tokens = steps × global batch, with steps = round(C / (FLOPs/token · batch)),
at least `min_steps`; a run's FLOPs (`flops`) are its real ones, its `budget` the nominal C.

MoE grids (Abnar et al., arXiv 2501.12370): experts E × top-k at fixed active compute (every
run's active expert width k · f equal, so FLOPs per token, tokens and C are equal and sparsity
1 − k/E varies) or at a fixed total expert width E · f (a memory budget: equal total
parameters, FLOPs per token vary, so tokens follow C).

Each planned run is a recipe YAML (validated by `zoo.recipe.load_recipe` as it is written) in
one folder, with `plan.json` and `plan.md` beside them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from zoo.recipe import Recipe, RecipeError, load_recipe, merge_fields

# What a run's name (family-size-Cbudget) may hold: it names a folder inside the sweep.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A named model size: config overrides on top of the base recipe's model."""

    name: str
    overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    name: str
    family: str
    size: str
    budget: float
    """The nominal FLOP budget C of the grid row."""
    recipe_path: Path
    params: int
    non_embedding_params: int
    active_params: int
    sparsity: float
    train_flops_per_token: int
    tokens: int
    steps: int
    flops: float
    """Training FLOPs of the run as planned: FLOPs/token × tokens (the training loop's count)."""
    state_size: int
    """Inference cache elements at batch 1 and the recipe's sequence length (`state_size`)."""
    grid: str = "isoflop"
    """Which grid of the sweep: "isoflop" or "moe"."""

    @property
    def six_nd_ratio(self) -> float:
        return self.flops / (6 * self.params * self.tokens)

    @property
    def six_nd_ratio_non_embedding(self) -> float:
        return self.flops / (6 * self.non_embedding_params * self.tokens)

    @property
    def six_nd_ratio_active(self) -> float:
        return self.flops / (6 * self.active_params * self.tokens)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recipe_path"] = str(self.recipe_path)
        out["six_nd_ratio"] = self.six_nd_ratio
        out["six_nd_ratio_non_embedding"] = self.six_nd_ratio_non_embedding
        out["six_nd_ratio_active"] = self.six_nd_ratio_active
        return out


def _write_recipe(fields: dict[str, Any], path: Path) -> Recipe:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return load_recipe(path)


def _budget_label(budget: float) -> str:
    mantissa, exponent = f"{budget:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def plan_run(
    base: Mapping[str, Any],
    *,
    family: str,
    size: ModelSize,
    budget: float,
    folder: Path,
    runs_root: Path,
    min_steps: int = 10,
    grid: str = "isoflop",
) -> PlannedRun:
    """One run of the grid: `base` (a recipe mapping) with `family`'s preset and `size`'s
    overrides, trained for the whole steps closest to `budget` FLOPs."""
    name = f"{family}-{size.name}-C{_budget_label(budget)}"
    if not RUN_NAME.fullmatch(name):
        raise ValueError(f"run name {name!r} cannot be a folder name inside {runs_root}")
    fields = merge_fields(
        copy.deepcopy(dict(base)), {"model": {"preset": family, "overrides": dict(size.overrides)}}
    )
    fields["output_dir"] = str(runs_root / name)
    fields["training"] = {**fields.get("training", {}), "steps": 1}
    fields["training"].pop("tokens", None)  # a placeholder until FLOPs per token are known
    path = folder / f"{name}.yaml"
    probe = _write_recipe(fields, path)
    from zoo.training import dry_run  # parameters, FLOPs/token, state size (meta device)

    stats = dry_run(probe)
    per_step = stats["train_flops_per_token"] * probe.training.global_batch_tokens
    steps = max(min_steps, round(budget / per_step))
    fields["training"]["steps"] = steps
    recipe = _write_recipe(fields, path)
    tokens = recipe.plan().tokens
    return PlannedRun(
        name=name,
        family=family,
        size=size.name,
        budget=budget,
        recipe_path=path,
        params=stats["parameters"],
        non_embedding_params=stats["non_embedding_parameters"],
        active_params=stats["active_parameters"],
        sparsity=float(stats["sparsity"] or 0.0),
        train_flops_per_token=stats["train_flops_per_token"],
        tokens=tokens,
        steps=steps,
        flops=float(stats["train_flops_per_token"] * tokens),
        state_size=int(stats["state_size"]),
        grid=grid,
    )


def plan_isoflop(
    base: Mapping[str, Any],
    families: Sequence[str],
    budgets: Sequence[float],
    sizes: Sequence[ModelSize] | Mapping[str, Sequence[ModelSize]],
    folder: str | Path,
    runs_root: str | Path,
    min_steps: int = 10,
) -> list[PlannedRun]:
    """Every family × budget × size; `sizes` may differ per family (a mapping family → sizes)."""
    if not families or not budgets or not sizes:
        raise ValueError("plan_isoflop needs at least one family, one budget and one size")
    bad = [b for b in budgets if not (math.isfinite(b) and b > 0)]
    if bad:
        raise ValueError(f"budgets must be positive FLOP counts, got {bad}")
    folder, runs_root = Path(folder), Path(runs_root)
    runs = []
    for family in families:
        family_sizes = sizes[family] if isinstance(sizes, Mapping) else sizes
        for budget in budgets:
            for size in family_sizes:
                runs.append(
                    plan_run(
                        base,
                        family=family,
                        size=size,
                        budget=budget,
                        folder=folder,
                        runs_root=runs_root,
                        min_steps=min_steps,
                    )
                )
    return runs


def moe_sizes(
    experts: Iterable[int],
    top_k: Iterable[int],
    *,
    expert_width: int,
    mode: str,
    num_layers: int,
    extra: Mapping[str, Any] | None = None,
) -> list[ModelSize]:
    """E × k MoE variants of one dense shape. mode "active": every run's active expert width
    k · f equals `expert_width` (f = expert_width / k); "total": every run's total expert width
    E · f equals `expert_width` (f = expert_width / E). Combinations with k > E, or a width that
    does not divide, are skipped; a dense run (E = 1) is the baseline of both."""
    if mode not in ("active", "total"):
        raise ValueError(f"mode must be 'active' or 'total', got {mode!r}")
    out = []
    for e in experts:
        for k in top_k:
            if k > e:
                continue
            divisor = k if mode == "active" else e
            if expert_width % divisor:
                continue
            f = expert_width // divisor
            if e == 1:
                overrides = {"intermediate_size": f}
            else:
                overrides = {
                    "channel_mixers": ["moe"] * num_layers,
                    "num_experts": e,
                    "num_experts_per_tok": k,
                    "moe_intermediate_size": f,
                }
            out.append(ModelSize(f"e{e}-k{k}", {**(extra or {}), **overrides}))
    if not out:
        raise ValueError(f"no experts × top-k combination fits expert_width={expert_width}")
    return out


def plan_table(runs: Sequence[PlannedRun]) -> str:
    """A markdown table of a plan: sizes, tokens, FLOPs and how far 6ND is from them."""
    lines = [
        "| run | params | active | non-emb. | tokens | steps | FLOPs | C / 6ND | C / 6N'D "
        "| C / 6N_aD |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.name} | {r.params:,} | {r.active_params:,} | {r.non_embedding_params:,} "
            f"| {r.tokens:,} | {r.steps:,} | {r.flops:.3e} | {r.six_nd_ratio:.3f} "
            f"| {r.six_nd_ratio_non_embedding:.3f} | {r.six_nd_ratio_active:.3f} |"
        )
    lines.append("")
    lines.append("C / 6ND: the zoo's training FLOPs over 6 × all parameters × tokens; N' counts")
    lines.append("non-embedding parameters (Kaplan's convention), N_a active ones (MoE).")
    return "\n".join(lines) + "\n"


def write_plan(runs: Sequence[PlannedRun], folder: str | Path) -> None:
    """plan.json and plan.md beside the recipes."""
    folder = Path(folder)
    (folder / "plan.json").write_text(json.dumps([r.to_dict() for r in runs], indent=2) + "\n")
    (folder / "plan.md").write_text(plan_table(runs))


def load_plan(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / "plan.json"
    if not path.is_file():
        raise RecipeError(f"{path}: no plan here (write one with `zoo scaling plan`)")
    return json.loads(path.read_text())
