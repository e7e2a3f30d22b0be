"""The report of a STAR search: Pareto fronts, the best genomes, the hand-made baselines.

    zoo star report runs/star --out benchmarks/results/star

Writes `report.md` (the final front as genomes, per-layer patterns and objectives, each checked
against the baselines), `front_params.png` (loss vs parameters), `front_cache.png` (loss vs
decode cache), `generations.png` (loss of the population per generation), `front.json` and
`best/<rank>-<digest>/config.json` (each front member as a config `AutoConfig` loads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.star.genome import Backbone, Genome, decode, decode_fields, describe, layer_pattern
from zoo.star.search import (
    LOG_FILE,
    RESULT,
    SEARCH_FILE,
    SearchConfig,
    backbone_of,
    base_recipe,
    baseline_genomes,
    candidate_recipe,
    load_search,
    model_size,
)

# A candidate "matches" a baseline's quality when its loss is at most this much higher (nats):
# below the spread of one training seed at this scale.
MATCH_TOLERANCE = 0.01


@dataclass(frozen=True)
class Point:
    name: str
    loss: float
    params: int
    cache: int


def _load_run(run_dir: Path) -> tuple[SearchConfig, list[dict[str, Any]]]:
    path = run_dir / SEARCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {SEARCH_FILE}; is it a `zoo star search` folder?")
    config = SearchConfig.model_validate(yaml.safe_load(path.read_text()))
    log = run_dir / LOG_FILE
    if not log.is_file() or not log.read_text().strip():
        raise FileNotFoundError(f"{log}: no finished generation yet")
    return config, [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def evaluated_points(run_dir: Path, space: Backbone, cache_context: int) -> list[Point]:
    """Every trained candidate of the run (survivors or not), from its recipe and result."""
    import torch
    from transformers import AutoModelForCausalLM

    from zoo.configuration import HybridConfig

    points = []
    for result in sorted((run_dir / "evals").glob(f"*/{RESULT}")):
        recipe = yaml.safe_load((result.parent / "recipe.yaml").read_text())
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(HybridConfig(**recipe["model"]["overrides"]))
        loss = json.loads(result.read_text())["eval_loss"]
        points.append(
            Point(
                result.parent.name, loss, model.num_parameters(), model.state_size(1, cache_context)
            )
        )
    return points


def _baselines(config: SearchConfig, run_dir: Path) -> dict[str, Point]:
    space = backbone_of(config)
    out = {}
    for name, genome in baseline_genomes(config).items():
        result = run_dir / "evals" / genome.digest(space) / RESULT
        if result.is_file():
            params, cache = model_size(genome, space, config.cache_context)
            out[name] = Point(name, json.loads(result.read_text())["eval_loss"], params, cache)
    return out


def _verdict(member: dict[str, Any], baseline: Point) -> str:
    """How a front member compares with a baseline: quality, then size and cache."""
    better = member["loss"] <= baseline.loss
    matches = member["loss"] <= baseline.loss + MATCH_TOLERANCE
    smaller = [
        what
        for what, mine, theirs in (
            ("params", member["params"], baseline.params),
            ("cache", member["cache"], baseline.cache),
        )
        if mine < theirs
    ]
    if not matches:
        return "worse loss"
    quality = "better loss" if better else "matching loss"
    return f"{quality}, smaller {' and '.join(smaller)}" if smaller else f"{quality}, not smaller"


def _plot(
    points: list[Point],
    front: list[dict[str, Any]],
    baselines: dict[str, Point],
    x: str,
    out: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter(
        [getattr(p, x) for p in points],
        [p.loss for p in points],
        s=14,
        c="0.75",
        label=f"every candidate ({len(points)})",
    )
    # The 2-D front of this projection over every candidate, as a staircase; the final
    # population's 3-objective front as labelled points (it need not be a curve in 2-D).
    staircase, best = [], float("inf")
    for point in sorted(points, key=lambda p: (getattr(p, x), p.loss)):
        if point.loss < best:
            best = point.loss
            staircase.append(point)
    ax.step(
        [getattr(p, x) for p in staircase],
        [p.loss for p in staircase],
        where="post",
        c="0.4",
        lw=1,
        ls="--",
        label=f"2-D front of loss vs {x}",
    )
    ax.scatter(
        [m[x] for m in front],
        [m["loss"] for m in front],
        c="tab:blue",
        s=22,
        zorder=3,
        label="final 3-objective front",
    )
    for rank, member in enumerate(front):
        ax.annotate(
            str(rank),
            (member[x], member["loss"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    for name, point in baselines.items():
        ax.scatter([getattr(point, x)], [point.loss], marker="*", s=140, zorder=3, label=name)
    if x == "cache":
        ax.set_xscale("symlog", linthresh=1e3)
        ax.set_xlabel("decode cache (elements, batch 1)")
    else:
        ax.set_xlabel("parameters (shared weights once)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def _plot_generations(records: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    gens = [r["generation"] for r in records]
    losses = [sorted(m["loss"] for m in r["population"]) for r in records]
    ax.plot(gens, [v[0] for v in losses], "o-", label="best")
    ax.plot(gens, [float(np.median(v)) for v in losses], "s--", label="median")
    ax.set_xlabel("generation")
    ax.set_ylabel("held-out loss of the population")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out


def write_report(run_dir: str | Path, out: str | Path) -> list[Path]:
    """Write the report of a search run (finished or not: the last logged generation)."""
    run_dir, out = Path(run_dir), Path(out)
    config, records = _load_run(run_dir)
    space = backbone_of(config)
    out.mkdir(parents=True, exist_ok=True)
    last = records[-1]
    # Genomes that differ only in genes without effect are one architecture: listed once.
    unique = {last["population"][i]["digest"]: last["population"][i] for i in last["front"]}
    front = sorted(unique.values(), key=lambda m: m["loss"])
    baselines = _baselines(config, run_dir)
    points = evaluated_points(run_dir, space, config.cache_context)

    written = [
        _plot(points, front, baselines, "params", out / "front_params.png"),
        _plot(points, front, baselines, "cache", out / "front_cache.png"),
        _plot_generations(records, out / "generations.png"),
    ]
    lines = [
        "# STAR search on CPU",
        "",
        f"Run `{run_dir}`: {len(records)} generations of {config.population}, "
        f"{len(points)} candidates trained; objectives {', '.join(config.objectives)} "
        f"(cache at {config.cache_context} tokens, batch 1). Backbone: {space.blocks} blocks, "
        f"width {space.hidden_size}, {space.num_attention_heads} heads, "
        f"{space.groups} sharing groups.",
        "",
        "## Baselines",
        "",
        "| model | pattern | loss | params | cache |",
        "|---|---|---|---|---|",
    ]
    for name, point in baselines.items():
        lines.append(
            f"| {name} | `{config.baselines[name]}` | {point.loss:.4f} | {point.params:,} | "
            f"{point.cache:,} |"
        )
    lines += [
        "",
        "## Final first front (by loss)",
        "",
        "| # | loss | params | cache | "
        + " | ".join(f"vs {name}" for name in baselines)
        + " | layers |",
        "|---|---|---|---|" + "---|" * len(baselines) + "---|",
    ]
    best_dir = out / "best"
    summary = []
    for rank, member in enumerate(front):
        genome = Genome.parse(member["genome"], space)
        verdicts = [_verdict(member, b) for b in baselines.values()]
        lines.append(
            f"| {rank} | {member['loss']:.4f} | {member['params']:,} | {member['cache']:,} | "
            + " | ".join(verdicts)
            + f" | `{layer_pattern(genome, space)}` |"
        )
        folder = best_dir / f"{rank}-{member['digest']}"
        decode(genome, space).save_pretrained(folder)
        written.append(folder / "config.json")
        summary.append({**member, "rank": rank, "layers": describe(genome, space)})
    lines += ["", "## The front's genomes, block by block", ""]
    for entry in summary:
        lines.append(f"{entry['rank']}. `{entry['genome']}` (loss {entry['loss']:.4f})")
        lines += [f"   - {line}" for line in entry["layers"]]
    lines += [
        "",
        f"A front member *matches* a baseline when its loss is at most {MATCH_TOLERANCE} nats "
        "above it. Plots: `front_params.png`, `front_cache.png`, `generations.png`.",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    front_json = {
        "baselines": {k: vars(v) for k, v in baselines.items()},
        "front": summary,
    }
    (out / "front.json").write_text(json.dumps(front_json, indent=2) + "\n")
    return [*written, out / "report.md", out / "front.json"]


def export_genome(genome: str, search_file: str | Path, out: str | Path) -> Path:
    """A genome as `config.json` (loads with `AutoConfig`) and a `recipe.yaml` training it with
    the search's recipe (output under runs/star-export/<digest>); returns the recipe's path."""
    config = load_search(search_file)
    space = backbone_of(config)
    parsed = Genome.parse(genome, space)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decode(parsed, space).save_pretrained(out)
    digest = parsed.digest(space)
    output_dir = Path("runs/star-export") / digest
    recipe = candidate_recipe(base_recipe(config), decode_fields(parsed, space), output_dir)
    path = out / "recipe.yaml"
    header = f"# STAR genome {parsed}\n# from {search_file}\n"
    path.write_text(header + yaml.safe_dump(recipe, sort_keys=False))
    return path
