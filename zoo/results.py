"""Eval results in lm-eval's layout, written atomically, and read back as markdown tables.

One JSON per run, shaped like lm-eval's `results_*.json` so model cards and tables read either:
`{"results": {task: {"<metric>,none": value, "<metric>_stderr,none": ..., "alias": task}},
"config": {"model": ..., "model_args": ...}, "versions": {...}, "date": ..., ...}`. Non-scalar
results (MAD runs, MQAR and NIAH grids) go under `"details"`. The file is written to a
temporary name and renamed, so a crash never leaves half a results file.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import torch
import transformers

from zoo import atomic
from zoo.version import __version__


def lm_eval_layout(
    scalars: dict[str, dict[str, float]], model: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`scalars[task][metric]` → lm-eval's `results` mapping (`"acc,none"` keys) + metadata."""
    results = {
        task: {**{f"{name},none": value for name, value in metrics.items()}, "alias": task}
        for task, metrics in scalars.items()
    }
    return {
        "results": results,
        "versions": dict.fromkeys(scalars, "zoo-" + __version__),
        "config": {"model": "zoo", "model_args": f"pretrained={model}"},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__},
        "details": details or {},
    }


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: written as "N/A", as lm-eval does for an undefined stderr."""
    if isinstance(value, float) and not math.isfinite(value):
        return "N/A"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically, NaN/inf as "N/A" (lm-eval's results files)."""
    return atomic.write_json_atomic(path, _json_safe(payload))


def results_table(payload: dict[str, Any]) -> str:
    """Markdown: one row per task and metric, as lm-eval prints."""
    lines = ["| task | metric | value | stderr |", "|---|---|---:|---:|"]
    for task, metrics in payload["results"].items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr" in key:
                continue
            name = key.split(",")[0]
            stderr = metrics.get(f"{name}_stderr,none")
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {task} | {name} | {shown} | {err} |")
    return "\n".join(lines)
