"""The studies under `experiments/`: one command regenerates any of their reports.

    zoo report experiments/mad          # or experiments/scaling, experiments/star, ...
    make reports                        # every study

A study folder holds its input (the file that names its kind, below), a compact summary of its
runs and the report made from that summary alone; each tool's run command writes the summary,
and its per-run logs stay in the folder's `runs/` (a cache, not tracked).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def _mad(folder: Path) -> Path:
    from zoo.eval.mad_study import write_report

    return write_report(folder)


def _scaling(folder: Path) -> Path:
    from zoo.scaling.report import write_report
    from zoo.scaling.runs import SUMMARY_FILE, load_runs

    runs, missing = load_runs(folder / SUMMARY_FILE)
    write_report(runs, missing, folder)
    return folder / "report.md"


def _star(folder: Path) -> Path:
    from zoo.star.report import write_report

    write_report(folder)
    return folder / "report.md"


def _saffu(folder: Path) -> Path:
    from zoo.saffu.experiment import load_experiment, write_report

    return write_report(load_experiment(folder / "experiment.yaml"), folder)


# The input file that names a study's kind, and how its report is made from its summary.
KINDS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "mad": ("study.yaml", _mad),
    "scaling": ("sweep.yaml", _scaling),
    "star": ("search.yaml", _star),
    "saffu": ("experiment.yaml", _saffu),
}


def study_kind(folder: str | Path) -> str:
    """The kind of study `folder` is, from its input file."""
    folder = Path(folder)
    for kind, (input_file, _) in KINDS.items():
        if (folder / input_file).is_file():
            return kind
    inputs = ", ".join(f"{name} ({kind})" for kind, (name, _) in KINDS.items())
    raise FileNotFoundError(f"{folder}: not a study folder (none of {inputs})")


def regenerate_report(folder: str | Path) -> Path:
    """Make the report of the study in `folder` again from its summary; returns report.md."""
    folder = Path(folder)
    return KINDS[study_kind(folder)][1](folder)


def study_folders(root: str | Path = "experiments") -> list[Path]:
    """Every study folder under `root` (a study may hold others, as saffu/long)."""
    root = Path(root)
    inputs = {name for name, _ in KINDS.values()}
    return sorted(
        p.parent for p in root.rglob("*.yaml") if p.name in inputs and "runs" not in p.parts
    )
