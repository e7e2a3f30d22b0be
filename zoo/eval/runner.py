"""`zoo eval`: run tasks on a model (or train-and-score architectures), write one results file.

Model tasks: `mqar` (zero-shot MQAR grid), `niah` (needle-in-a-haystack grid + heat-map),
`perplexity` (sliding window over `--text`), and the commonsense tasks (`--data-dir` holds
`<task>.jsonl` in each dataset's own fields). Architecture tasks (`--architectures`): `mad` (the
MAD protocol, table + plot) and `mqar` (Zoology's train-then-test protocol). Unknown task names
fail before anything runs. Results: `results.json` (lm-eval's layout, written atomically),
`results.md`, PNGs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.eval import commonsense as cs
from zoo.eval import mad, retrieval
from zoo.results import lm_eval_layout, results_table, write_json_atomic

MODEL_TASKS = ("mqar", "niah", "perplexity")
ARCHITECTURE_TASKS = ("mad", "mqar")


@dataclass
class EvalRequest:
    model: str | None
    tasks: list[str]
    architectures: list[str] = field(default_factory=list)
    output: Path = Path("runs/eval")
    data_dir: Path | None = None
    text: Path | None = None
    niah_style: str = "passkey"
    quick: bool = False
    mad_scale: str = "cpu"


def resolve_model_path(model: str) -> str:
    """A training run's folder stands for its `final/` model (`zoo eval runs/demo/tnl`)."""
    folder = Path(model)
    if folder.is_dir() and not (folder / "config.json").is_file():
        if (folder / "final" / "config.json").is_file():
            return str(folder / "final")
        raise FileNotFoundError(f"{folder}: no config.json (nor final/config.json) to load")
    return model


def local_task(task: str) -> tuple[str, str] | None:
    """`NAME:FORMAT` (a file `NAME.jsonl` in `--data-dir`, read in FORMAT's fields, e.g.
    `my_qa:piqa`) or a format's own name: (file name, format); None for other tasks."""
    name, _, form = task.partition(":")
    form = form or name
    return (name, form) if form in cs.TASKS else None


def _check(request: EvalRequest) -> None:
    commonsense = [t for t in request.tasks if local_task(t)]
    known = set(MODEL_TASKS) | set(ARCHITECTURE_TASKS)
    unknown = [t for t in request.tasks if t not in known and t not in commonsense]
    if unknown:
        raise ValueError(
            f"unknown tasks {unknown}; known: {sorted(known | set(cs.TASKS))}, or NAME:FORMAT "
            f"for a file NAME.jsonl in --data-dir in one of the formats {sorted(cs.TASKS)}"
        )
    needs_model = [t for t in request.tasks if t in (*MODEL_TASKS, *commonsense)]
    if (
        needs_model
        and request.model is None
        and not (set(needs_model) <= set(ARCHITECTURE_TASKS) and request.architectures)
    ):
        raise ValueError(f"tasks {needs_model} need a MODEL (a checkpoint folder or Hub id)")
    if request.mad_scale not in mad.MAD_SCALES:
        raise ValueError(f"mad scale {request.mad_scale!r} is not one of {list(mad.MAD_SCALES)}")
    if "mad" in request.tasks and not request.architectures:
        raise ValueError("task mad trains models: give --architectures (e.g. attention,lightning)")
    for architecture in request.architectures:
        mad.architecture_config(architecture, 2, 64)  # an unknown one fails before any training
    if "perplexity" in request.tasks and request.text is None:
        raise ValueError("task perplexity needs --text FILE (.txt or .jsonl)")
    if commonsense and request.data_dir is None:
        raise ValueError("commonsense tasks need --data-dir with <task>.jsonl files")


def run_eval(request: EvalRequest, echo: Callable[[str], None] = print) -> dict[str, Any]:
    _check(request)
    out = request.output
    out.mkdir(parents=True, exist_ok=True)
    scalars: dict[str, dict[str, float]] = {}
    samples: dict[str, int] = {}
    configs: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}

    if request.architectures:
        if "mad" in request.tasks:
            settings = mad.MAD_SCALES["quick" if request.quick else request.mad_scale]
            result = mad.run_mad(request.architectures, settings=settings)
            details["mad"] = result
            (out / "mad.md").write_text(mad.mad_table(result) + "\n")
            mad.mad_plot(result, out / "mad.png")
            for arch, value in result["mad_score"].items():
                scalars[f"mad/{arch}"] = {"mad_score": value}
        if "mqar" in request.tasks and request.model is None:
            settings = retrieval.MQARSettings(**(_QUICK_MQAR if request.quick else {}))
            for arch in request.architectures:
                echo(f"mqar: training {arch} ...")
                result = retrieval.train_mqar(arch, settings)
                details[f"mqar/{arch}"] = result
                scalars[f"mqar/{arch}"] = {
                    "acc": sum(result["accuracy"].values()) / len(result["accuracy"])
                }
            grids = {arch: details[f"mqar/{arch}"]["accuracy"] for arch in request.architectures}
            retrieval.mqar_plot(grids, out / "mqar.png", "MQAR after training")

    if request.model is not None:
        from zoo.modeling import load_pretrained
        from zoo.tokenizer import load_tokenizer

        path = resolve_model_path(request.model)
        model = load_pretrained(path).eval()
        tokenizer = load_tokenizer(path)
        if "mqar" in request.tasks:
            vocab = min(256, model.config.vocab_size)
            # Token ids < V (the byte vocabulary's 256), so L < 256.
            cells = ((32, 4), (64, 8)) if request.quick else ((32, 4), (64, 8), (128, 16))
            grid = retrieval.mqar_grid(model, vocab, cells, 16 if request.quick else 100)
            details["mqar"] = grid
            scalars["mqar"] = {"acc": sum(grid.values()) / len(grid)}
            retrieval.mqar_plot({Path(request.model).name: grid}, out / "mqar.png")
        if "niah" in request.tasks:
            lengths = (64, 128) if request.quick else (128, 256, 512)
            depths = (0.0, 0.5, 1.0) if request.quick else (0.0, 0.25, 0.5, 0.75, 1.0)
            grid = retrieval.niah_grid(
                model,
                tokenizer,
                lengths,
                depths,
                trials=2 if request.quick else 4,
                style=request.niah_style,
            )
            details["niah"] = grid
            scalars["niah"] = {"acc": grid["mean_accuracy"]}
            retrieval.niah_heatmap(grid, out / "niah.png", f"NIAH: {request.model}")
        if "perplexity" in request.tasks:
            from zoo.eval.perplexity import perplexity

            context = min(model.config.max_position_embeddings, 1024)
            scalars["perplexity"] = perplexity(model, tokenizer, request.text, context=context)
        for task in request.tasks:
            if (local := local_task(task)) is not None:
                name, form = local
                file = f"{name}.jsonl"
                examples = cs.load_task(form, request.data_dir / file)
                scalars[name] = cs.score_multiple_choice(model, tokenizer, examples)
                samples[name] = len(examples)
                # The user's own file under its own name: never reported as the real dataset.
                configs[name] = {
                    "dataset_path": file,
                    "test_split": "all lines",
                    "description": f"a local file in {form}'s fields",
                }

    model_name = request.model or ",".join(request.architectures)
    if request.model is not None and Path(model_name).is_absolute():
        model_name = Path(model_name).name  # no local absolute paths in shared results
    payload = lm_eval_layout(scalars, model_name, samples=samples, configs=configs)
    write_json_atomic(out / "results.json", payload)
    if details:
        write_json_atomic(out / "details.json", details)
    (out / "results.md").write_text(results_table(payload) + "\n")
    return payload


_QUICK_MQAR = {
    "vocab_size": 64,
    "width": 32,
    "train_cells": ((32, 4),),
    "num_train": 64,
    "test_cells": ((32, 4),),
    "num_test": 16,
    "epochs": 1,
}
