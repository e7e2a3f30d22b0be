"""A MAD study: one `study.yaml` in, one `runs.jsonl` summary and a report out.

    zoo mad run experiments/mad --workers 2      # train what runs.jsonl lacks, then report
    zoo report experiments/mad                   # the report again, from runs.jsonl alone

`study.yaml` names the architectures (`all`: every registered sequence mixer and the stripes of
`zoo.eval.mad.STRIPES`; or a list of names and layer patterns), the tasks (`all` or a list) and
the protocol scale (`zoo.eval.mad.MAD_SCALES`). Each finished (architecture, task) run is one
line of `runs.jsonl`, appended as it lands, so a killed study resumes where it stopped; the
report (`report.md`: settings and the score table; `mad.png`) is made from that file only.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from zoo.atomic import write_text_atomic
from zoo.eval import mad
from zoo.recipe import import_modules, load_settings_file
from zoo.workers import process_pool

STUDY_FILE = "study.yaml"
RUNS_FILE = "runs.jsonl"


class MADStudy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    imports: list[str] = []
    """Modules to import first (in every worker too): they register your own mixers."""
    architectures: list[str] | str = "all"
    tasks: list[str] | str = "all"
    scale: str = "cpu"

    @field_validator("imports")
    @classmethod
    def _import_first(cls, modules: list[str]) -> list[str]:
        return import_modules(modules)

    @field_validator("scale")
    @classmethod
    def _known_scale(cls, value: str) -> str:
        if value not in mad.MAD_SCALES:
            raise ValueError(f"scale={value!r} is not one of {list(mad.MAD_SCALES)}")
        return value

    def architecture_list(self) -> list[str]:
        names = mad.architectures() if self.architectures == "all" else list(self.architectures)
        for name in names:
            mad.architecture_config(name, 2, 64)  # an unknown one fails before any training
        return names

    def task_list(self) -> list[str]:
        tasks = list(mad.TASKS) if self.tasks == "all" else list(self.tasks)
        unknown = [t for t in tasks if t not in mad.TASKS]
        if unknown:
            raise ValueError(f"unknown MAD tasks {unknown}; known: {sorted(mad.TASKS)}")
        return tasks


def load_study(folder: str | Path) -> MADStudy:
    return load_settings_file(MADStudy, Path(folder) / STUDY_FILE)


def load_runs(folder: str | Path) -> list[dict[str, Any]]:
    """The finished runs (a torn last line, from a kill mid-write, is left out)."""
    path = Path(folder) / RUNS_FILE
    runs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return runs


def _train(args: tuple[str, str, dict[str, Any], int, list[str]]) -> dict[str, Any]:
    architecture, task, settings, threads, imports = args
    import torch

    import_modules(imports)
    torch.set_num_threads(threads)
    return mad.train_task(architecture, task, mad.MADSettings(**settings))


def run_study(folder: str | Path, workers: int = 1, echo: Callable[[str], None] = print) -> Path:
    """Train every (architecture, task) run that `runs.jsonl` lacks, then write the report."""
    folder = Path(folder)
    study = load_study(folder)
    settings = asdict(mad.MAD_SCALES[study.scale])
    done = {(r["architecture"], r["task"]) for r in load_runs(folder)}
    pending = [
        (architecture, task)
        for architecture in study.architecture_list()
        for task in study.task_list()
        if (architecture, task) not in done
    ]
    echo(f"{len(done)} runs done, {len(pending)} to train")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with process_pool(workers) as pool, (folder / RUNS_FILE).open("a") as log:
        jobs = [pool.submit(_train, (a, t, settings, threads, study.imports)) for a, t in pending]
        # Logged as each finishes (not in submission order): a kill loses only runs in flight.
        for i, job in enumerate(concurrent.futures.as_completed(jobs), start=1):
            result = job.result()
            log.write(json.dumps(result) + "\n")
            log.flush()
            os.fsync(log.fileno())
            echo(f"[{i}/{len(jobs)}] {result['architecture']} / {result['task']}: "
                 f"accuracy {result['accuracy']:.3f}")  # fmt: skip
    return write_report(folder)


def write_report(folder: str | Path) -> Path:
    """`report.md` and `mad.png` from `study.yaml` and `runs.jsonl` alone."""
    folder = Path(folder)
    study = load_study(folder)
    runs = load_runs(folder)
    if not runs:
        raise ValueError(f"{folder / RUNS_FILE}: no finished runs to report")
    architectures = list(dict.fromkeys(r["architecture"] for r in runs))
    scores = {
        a: sum(r["accuracy"] for r in runs if r["architecture"] == a)
        / sum(1 for r in runs if r["architecture"] == a)
        for a in architectures
    }
    result = {"runs": runs, "mad_score": scores}
    mad.mad_plot(result, folder / "mad.png")
    settings = mad.MAD_SCALES[study.scale]
    lines = [
        "# MAD",
        "",
        f"Protocol scale `{study.scale}`: width {settings.width}, two [sequence mixer, channel "
        f"mixer] blocks, {settings.num_train:,} training sequences, {settings.epochs} epochs, "
        f"batch {settings.batch_size}, AdamW lr {settings.lr} (weight decay "
        f"{settings.weight_decay}), task settings {settings.task_overrides or 'of the paper'}. "
        "MoE architectures train with their router losses. Test accuracy on the scored "
        "positions; the MAD score is the mean over tasks. Made by `zoo report` from "
        f"`{RUNS_FILE}` ({len(runs)} runs).",
        "",
        mad.mad_table(result),
        "",
        "![MAD accuracy per task](mad.png)",
        "",
    ]
    return write_text_atomic(folder / "report.md", "\n".join(lines))
