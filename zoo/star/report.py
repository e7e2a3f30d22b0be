"""The report of a STAR search: Pareto fronts, the best genomes, the hand-made baselines.

    zoo star report experiments/star/runs --out experiments/star   # summarize a run, report
    zoo report experiments/star                                    # report from the summary

A search run folder holds every candidate's training logs (a cache). `summarize` condenses it
into a study folder: the search file, the generations log and `evaluations.jsonl` (one line per
trained candidate: loss, parameters, cache, config fields). `write_report` reads only those and
writes `report.md` (the final front as genomes, per-layer patterns and objectives, each checked
against the baselines), `front_params.png` (loss vs parameters), `front_cache.png` (loss vs
decode cache), `generations.png` (loss of the population per generation), `front.json` and
`best/<rank>-<digest>/config.json` (each front member as a config `AutoConfig` loads).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from zoo.atomic import write_json_atomic, write_text_atomic
from zoo.star.genome import Backbone, Genome, decode, decode_fields, describe, layer_pattern
from zoo.star.search import (
    LOG_FILE,
    RESULT_FILE,
    SEARCH_FILE,
    SearchConfig,
    backbone_of,
    base_recipe,
    baseline_genomes,
    candidate_recipe,
    load_search,
)

# A candidate "matches" a baseline's quality when its loss is at most this much higher (nats):
# below the spread of one training seed at this scale.
MATCH_TOLERANCE = 0.01
EVALUATIONS_FILE = "evaluations.jsonl"


@dataclass(frozen=True)
class Point:
    name: str
    loss: float
    params: int
    cache: int


def _load_log(folder: Path) -> tuple[SearchConfig, list[dict[str, Any]]]:
    """The search file and the generations logged in `folder` (a run or a study folder)."""
    path = folder / SEARCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {SEARCH_FILE}; is it a STAR search or study folder?")
    config = SearchConfig.model_validate(yaml.safe_load(path.read_text()))
    log = folder / LOG_FILE
    if not log.is_file() or not log.read_text().strip():
        raise FileNotFoundError(f"{log}: no finished generation yet")
    return config, [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def evaluated_points(run_dir: Path, space: Backbone, cache_context: int) -> list[dict[str, Any]]:
    """Every trained candidate of a run (survivors or not): its digest, held-out loss,
    parameters and decode cache, and the config fields it was built from."""
    import torch
    from transformers import AutoModelForCausalLM

    from zoo.configuration import HybridConfig

    points = []
    for result in sorted((run_dir / "evals").glob(f"*/{RESULT_FILE}")):
        fields = yaml.safe_load((result.parent / "recipe.yaml").read_text())["model"]["overrides"]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(HybridConfig(**fields))
        points.append(
            {
                "digest": result.parent.name,
                "loss": json.loads(result.read_text())["eval_loss"],
                "params": model.num_parameters(),
                "cache": model.state_size(1, cache_context),
                "fields": fields,
            }
        )
    return points


def summarize(run_dir: str | Path, out: str | Path) -> Path:
    """The study summary of a search run in `out`: its search file, its generations log and
    `evaluations.jsonl` (one line per trained candidate): all a report needs, in ~100 KB."""
    run_dir, out = Path(run_dir), Path(out)
    config, _ = _load_log(run_dir)
    points = evaluated_points(run_dir, backbone_of(config), config.cache_context)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / SEARCH_FILE).is_file():  # a study folder keeps its own (commented) input
        write_text_atomic(out / SEARCH_FILE, (run_dir / SEARCH_FILE).read_text())
    if (out / LOG_FILE).resolve() != (run_dir / LOG_FILE).resolve():
        write_text_atomic(out / LOG_FILE, (run_dir / LOG_FILE).read_text())
    return write_text_atomic(
        out / EVALUATIONS_FILE, "".join(json.dumps(p, sort_keys=True) + "\n" for p in points)
    )


def _points(folder: Path) -> list[Point]:
    path = folder / EVALUATIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary; `zoo star report RUN --out {folder}`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Point(r["digest"], r["loss"], r["params"], r["cache"]) for r in rows]


def _baselines(config: SearchConfig, points: list[Point]) -> dict[str, Point]:
    space = backbone_of(config)
    by_digest = {p.name: p for p in points}
    out = {}
    for name, genome in baseline_genomes(config).items():
        point = by_digest.get(genome.digest(space))
        if point is not None:
            out[name] = Point(name, point.loss, point.params, point.cache)
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


def write_report(folder: str | Path) -> list[Path]:
    """The report of a study folder (its search file, generations log and `evaluations.jsonl`,
    see `summarize`): fronts, the front's configs, the baselines (the last logged generation
    of an unfinished search)."""
    out = Path(folder)
    config, records = _load_log(out)
    space = backbone_of(config)
    last = records[-1]
    # Genomes that differ only in genes without effect are one architecture: listed once.
    unique = {last["population"][i]["digest"]: last["population"][i] for i in last["front"]}
    front = sorted(unique.values(), key=lambda m: m["loss"])
    points = _points(out)
    baselines = _baselines(config, points)

    written = [
        _plot(points, front, baselines, "params", out / "front_params.png"),
        _plot(points, front, baselines, "cache", out / "front_cache.png"),
        _plot_generations(records, out / "generations.png"),
    ]
    lines = [
        "# STAR search on CPU",
        "",
        f"{len(records)} generations of {config.population}, "
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
    keep = {f"{rank}-{member['digest']}" for rank, member in enumerate(front)}
    for stale in best_dir.glob("*-*/config.json") if best_dir.is_dir() else ():
        # A front member of an earlier report of this search (an extended search moves the
        # front): its folder goes, so that best/ holds exactly this front.
        if re.fullmatch(r"\d+-[0-9a-f]{16}", stale.parent.name) and stale.parent.name not in keep:
            shutil.rmtree(stale.parent)
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
    write_text_atomic(out / "report.md", "\n".join(lines))
    front_json = {
        "baselines": {k: vars(v) for k, v in baselines.items()},
        "front": summary,
    }
    write_json_atomic(out / "front.json", front_json)
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
