"""Eval results in lm-eval's layout, written atomically, and read back as markdown tables.

One JSON per run with the keys and nesting of lm-eval 0.4.13's `results_*.json` (a test runs
lm-eval itself and compares), so model cards, tables and lm-eval's own tools read either:
`{"results": {task: {"name", "alias", "sample_len", "<metric>,none", ...}}, "configs",
"versions", "n-shot", "higher_is_better", "n-samples", "config", "date", ...}`. Non-scalar
results (MAD runs, MQAR and NIAH grids) go to `details.json` beside it. Files are written to a
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

# Metrics where lower is better; every other metric of the zoo's tasks is an accuracy or a score.
_LOWER_IS_BETTER = ("perplexity", "loss", "bits_per_byte", "byte_perplexity", "word_perplexity")


def lm_eval_layout(
    scalars: dict[str, dict[str, float]],
    model: str,
    *,
    samples: dict[str, int] | None = None,
    configs: dict[str, dict[str, Any]] | None = None,
    model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`scalars[task][metric]` in the layout of the results file lm-eval 0.4.13 writes: the
    same top-level keys and, per task, `results` (`"acc,none"` keys with name, alias and
    sample_len), `configs` (task, dataset, split, output type, metrics), `versions`, `n-shot`,
    `higher_is_better` and `n-samples`. `samples[task]` is the number of items scored;
    `configs[task]` adds to or replaces the task's config (a local file's own name and split).
    `model` is written as given: pass a name or a relative path, never an absolute one."""
    samples = samples or {}
    configs = configs or {}
    results, task_configs, higher = {}, {}, {}
    for task, metrics in scalars.items():
        entry: dict[str, Any] = {"name": task, "alias": task}
        if task in samples:
            entry["sample_len"] = samples[task]
        entry.update({f"{name},none": value for name, value in metrics.items()})
        results[task] = entry
        scores = [m for m in metrics if not m.endswith("_stderr")]
        higher[task] = {m: not m.startswith(_LOWER_IS_BETTER) for m in scores}
        task_configs[task] = {
            "task": task,
            "num_fewshot": 0,
            "output_type": "multiple_choice",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": higher[task][m]}
                for m in scores
            ],
            "metadata": {"version": 1.0},
            **configs.get(task, {}),
        }
    return {
        "results": results,
        "group_subtasks": {},
        "configs": task_configs,
        "versions": {task: task_configs[task]["metadata"]["version"] for task in scalars},
        "n-shot": dict.fromkeys(scalars, 0),
        "higher_is_better": higher,
        "n-samples": {
            task: {"original": samples[task], "effective": samples[task]}
            for task in scalars
            if task in samples
        },
        "config": {"model": "zoo", "model_args": f"pretrained={model}", **(model_info or {})},
        "git_hash": None,
        "date": dt.datetime.now(dt.timezone.utc).timestamp(),
        "pretty_env_info": f"hybrid-zoo {__version__}; PyTorch version: {torch.__version__}",
        "transformers_version": transformers.__version__,
        "lm_eval_version": None,
        "upper_git_hash": None,
        "tokenizer_pad_token": None,
        "tokenizer_eos_token": None,
        "tokenizer_bos_token": None,
        "eot_token_id": None,
        "max_length": None,
        "task_hashes": {},
        "model_source": "zoo",
        "model_name": model,
        "model_name_sanitized": model.replace("/", "__"),
        "system_instruction": None,
        "system_instruction_sha": None,
        "fewshot_as_multiturn": None,
        "chat_template": None,
        "chat_template_sha": None,
        "total_evaluation_time_seconds": None,
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
            if "," not in key or "_stderr" in key:  # name, alias, sample_len
                continue
            name = key.split(",")[0]
            stderr = metrics.get(f"{name}_stderr,none")
            err = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {task} | {name} | {shown} | {err} |")
    return "\n".join(lines)
