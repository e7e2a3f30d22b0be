"""Runs for the scaling-law fitters: one record per trained model, from logs or a CSV.

A `Run` is what every fitter reads: its size (total and active parameters), the tokens it saw,
the training FLOPs by the zoo's own accounting (`zoo.flops`), its final held-out loss, and where
they exist its MoE sparsity, inference state size and loss curve. `load_runs` builds them from a
sweep's run folders (each with the recipe loop's `recipe.yaml` and `metrics.jsonl`), from the
summary `runs.jsonl` a report writes beside itself (every field, curves included, so the report
regenerates without the run folders), or from a CSV with the same columns.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from zoo.atomic import write_text_atomic
from zoo.data import iter_jsonl
from zoo.scaling.plan import load_plan


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One evaluation along a run: tokens seen, FLOPs spent, loss there."""

    tokens: float
    flops: float
    loss: float


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model. `params` counts every parameter (embeddings included); `active_params`
    those a token uses (= params for dense models); `flops` the training FLOPs (zoo.flops);
    `loss` the final held-out loss in nats per token."""

    name: str
    family: str
    params: float
    tokens: float
    flops: float
    loss: float
    active_params: float | None = None
    non_embedding_params: float | None = None
    sparsity: float = 0.0
    state_size: float | None = None
    budget: float | None = None
    curve: tuple[CurvePoint, ...] = ()
    grid: str = "isoflop"
    """The sweep grid the run belongs to: "isoflop" (families × budgets × sizes) or "moe"."""

    @property
    def active(self) -> float:
        return self.active_params if self.active_params is not None else self.params


# CSV columns: the required ones, then the optional ones with their Run field names.
CSV_REQUIRED = ("name", "family", "params", "tokens", "flops", "loss")
CSV_OPTIONAL = (
    "active_params", "non_embedding_params", "sparsity", "state_size", "budget", "grid",
)  # fmt: skip


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a number") from None


def runs_from_csv(path: Path) -> list[Run]:
    """Runs from a CSV with the columns of `CSV_REQUIRED` (and any of `CSV_OPTIONAL`)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; need {list(CSV_REQUIRED)}")
        runs = []
        for line, row in enumerate(reader, start=2):
            fields: dict[str, Any] = {"name": row["name"], "family": row["family"]}
            for column in (*CSV_REQUIRED[2:], *CSV_OPTIONAL):
                value = (row.get(column) or "").strip()
                if not value:
                    continue
                where = f"{path}:{line} ({row['name']}), column {column}"
                fields[column] = value if column == "grid" else _number(value, where)
            runs.append(Run(**fields))
    return runs


def _curve(metrics: Path, flops_per_token: float) -> tuple[CurvePoint, ...]:
    """Training-loss points of a metrics.jsonl (the envelope fit's curves)."""
    points = []
    for _, record in iter_jsonl(metrics):
        if "loss" in record and "tokens" in record:
            tokens = float(record["tokens"])
            points.append(CurvePoint(tokens, tokens * flops_per_token, float(record["loss"])))
    return tuple(points)


def runs_from_plan(plan_dir: Path) -> tuple[list[Run], list[str]]:
    """The finished runs of a `zoo scaling plan` folder, and the names of those not finished.

    Sizes and FLOPs come from plan.json (the planner's count, the training loop's); the loss is
    the final held-out `eval_loss` of runs/<name>/result.json; the curve is the training loss
    logged in runs/<name>/metrics.jsonl.
    """
    runs, missing = [], []
    for entry in load_plan(plan_dir):
        run_dir = plan_dir / "runs" / entry["name"]
        result = run_dir / "result.json"
        if not result.is_file():
            missing.append(entry["name"])
            continue
        record = json.loads(result.read_text())
        metrics = run_dir / "metrics.jsonl"
        per_token = entry["flops"] / entry["tokens"]
        runs.append(
            Run(
                name=entry["name"],
                family=entry["family"],
                params=entry["params"],
                tokens=entry["tokens"],
                flops=entry["flops"],
                loss=record["eval_loss"],
                active_params=entry["active_params"],
                non_embedding_params=entry["non_embedding_params"],
                sparsity=entry["sparsity"],
                state_size=entry["state_size"],
                budget=entry["budget"],
                curve=_curve(metrics, per_token) if metrics.is_file() else (),
                grid=entry.get("grid", "isoflop"),
            )
        )
    return runs, missing


SUMMARY_FILE = "runs.jsonl"


def write_summary(runs: list[Run], missing: list[str], path: str | Path) -> Path:
    """`runs.jsonl`: one line per run (curves as [tokens, flops, loss] triples), then one line
    per planned run without a result (`{"name": ..., "unfinished": true}`)."""
    lines = []
    for run in runs:
        record = dataclasses.asdict(run)
        record["curve"] = [[p.tokens, p.flops, p.loss] for p in run.curve]
        lines.append(json.dumps(record))
    lines += [json.dumps({"name": name, "unfinished": True}) for name in missing]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


def runs_from_summary(path: Path) -> tuple[list[Run], list[str]]:
    """The runs and unfinished names of a `runs.jsonl` (see `write_summary`)."""
    runs, missing = [], []
    for line, record in iter_jsonl(path):
        if record.get("unfinished"):
            missing.append(record["name"])
            continue
        try:
            curve = tuple(CurvePoint(*point) for point in record.pop("curve", ()))
            runs.append(Run(**record, curve=curve))
        except TypeError as error:
            raise ValueError(f"{line}: not a run record ({error})") from None
    return runs, missing


def check_runs(runs: list[Run], source: Path) -> None:
    """Every number a fit reads must be finite and positive (sparsity in [0, 1)): a diverged
    run's NaN loss, or a zero parameter count, is named here rather than deep inside a fit."""
    for run in runs:
        for column in ("params", "tokens", "flops", "loss"):
            value = getattr(run, column)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"{source}: run {run.name!r}: {column}={value} is not finite and > 0"
                )
        if not 0 <= run.sparsity < 1:
            raise ValueError(f"{source}: run {run.name!r}: sparsity={run.sparsity} not in [0, 1)")


def load_runs(path: str | Path) -> tuple[list[Run], list[str]]:
    """Runs from a plan folder (see `runs_from_plan`), a `runs.jsonl` summary or a CSV file; and
    the unfinished ones."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        runs, missing = runs_from_csv(path), []
    elif path.is_file() and path.suffix == ".jsonl":
        runs, missing = runs_from_summary(path)
    elif path.is_dir():
        runs, missing = runs_from_plan(path)
    else:
        raise ValueError(
            f"{path}: neither a plan folder (with plan.json), a runs.jsonl summary nor a .csv of "
            "runs"
        )
    check_runs(runs, path)
    return runs, missing
