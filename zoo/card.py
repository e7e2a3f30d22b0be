"""Model cards: rendered through huggingface_hub's `ModelCard` from `model_card_template.md`.

`render_card(model_dir)` describes a saved model: YAML metadata (license, library_name, tags
with the family and `moe` / `hybrid`, datasets, `model-index` built from an lm-eval-layout eval
JSON when one exists) and a body (per-layer architecture table, parameters total and active,
decode state, FLOPs per token, the training recipe, the eval table, how to load it with and
without `import zoo`, limitations). For a training run folder (`<run>/final` + `<run>/recipe.yaml`
+ `<run>/eval/results.json`) everything is picked up by `card_for_run(run_dir)`.

`write_preset_cards(folder)` generates one card per named size of every family into
`model_cards/`; a test regenerates them and fails when a committed card is stale.
"""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoConfig, AutoModelForCausalLM

import zoo.modeling  # noqa: F401  (registers the families with the Auto classes it uses)
from zoo import registry
from zoo.configuration import ZooConfig
from zoo.flops import model_flops
from zoo.version import __version__


def _millions(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _architecture_table(config: ZooConfig) -> str:
    """Runs of equal layers, one row each."""
    rows = ["| layers | sequence mixer | channel mixer | decode cache |", "|---|---|---|---|"]
    start = 0
    layers = list(zip(config.mixers, config.channel_mixers, config.layer_types, strict=True))
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            span = f"{start}" if i - start == 1 else f"{start}–{i - 1}"
            mixer, channel, cache = layers[start]
            rows.append(f"| {span} | {mixer} | {channel} | {cache} |")
            start = i
    return "\n".join(rows)


def _tags(config: ZooConfig) -> list[str]:
    tags = ["hybrid-zoo", config.model_type, *sorted(set(config.mixers))]
    if config.has_moe:
        tags.append("moe")
    if len(set(config.mixers)) > 1:
        tags.append("hybrid")
    return tags


def eval_results_from_json(payload: dict[str, Any]) -> list[EvalResult]:
    """`model-index` entries from an lm-eval-layout results JSON (scalar metrics, no stderrs)."""
    results = []
    configs = payload.get("configs", {})
    for task, metrics in payload.get("results", {}).items():
        # A local task keeps its own name; its dataset is what its config says it is.
        dataset = configs.get(task, {}).get("dataset_path") or task
        for key, value in metrics.items():
            name = key.split(",")[0]
            if "," not in key or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type=task,
                    dataset_name=dataset,
                    metric_type=name,
                    metric_value=float(value),
                )
            )
    return results


def _eval_table(payload: dict[str, Any] | None) -> str:
    if not payload:
        return "No evaluation results yet: `zoo eval MODEL --tasks ...` writes them."
    from zoo.results import results_table

    return results_table(payload)


def portable(value: Any) -> Any:
    """`value` with every absolute local path cut to its last two parts (`.../data/train.txt`):
    a card or results file shared on the Hub says nothing of the machine it was made on."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] == ":\\"):
        return ".../" + "/".join(Path(value).parts[-2:])
    return value


def heldout_results(run_dir: Path) -> dict[str, Any] | None:
    """The held-out loss and perplexity a finished training run logged, as an eval payload."""
    import math

    from zoo.results import lm_eval_layout
    from zoo.training import FINISHED_FILE

    try:
        record = json.loads((run_dir / FINISHED_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    loss = record.get("eval_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return None
    scores = {"heldout": {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}}
    config = {"heldout": {"dataset_path": "held-out split of the training data",
                          "output_type": "loglikelihood_rolling"}}  # fmt: skip
    return lm_eval_layout(scores, run_dir.name, configs=config)


def _training(recipe: dict[str, Any] | None, released: str | None = None) -> str:
    if released:
        return (
            f"Trained by its authors and released as `{released}` (their own format); the zoo "
            f"reads it exactly: `zoo convert {released} DIR` writes this model's checkpoint "
            "(the weights are fetched through huggingface_hub once config.json is accepted)."
        )
    if not recipe:
        return "Not trained: this card describes the architecture of a named size."
    t, data, opt = recipe["training"], recipe.get("data", {}), recipe.get("optimizer", {})
    budget = f"{t['steps']:,} steps" if t.get("steps") else f"{t['tokens']:,} tokens"
    source = data.get("source", "synthetic")
    return (
        f"Trained with `zoo.training` from `{recipe.get('source')}`: {budget} of "
        f"{t['global_batch_tokens']:,} tokens, sequence length {t['seq_len']}, "
        f"{t.get('precision', 'fp32')}, AdamW (lr {opt.get('lr')}, weight decay "
        f"{opt.get('weight_decay')}), {recipe.get('schedule', {}).get('kind', 'cosine')} "
        f"schedule, data: {source}.\n\n```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```"
    )


def render_card(
    config: ZooConfig,
    repo_id: str,
    *,
    eval_results: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    summary: str | None = None,
    released: str | None = None,
) -> ModelCard:
    """The card of a model with `config` (built on the meta device to count, nothing loaded)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    datasets = []
    if recipe and recipe.get("data", {}).get("source") == "hf":
        datasets = [recipe["data"]["hf"]["path"]]
    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=_tags(config),
        datasets=datasets or None,
        model_name=repo_id,
        eval_results=eval_results_from_json(eval_results) if eval_results else None,
    )
    counts = Counter(config.mixers)
    mix = ", ".join(f"{n} × {registry.sequence_mixer(m).display_name}" for m, n in counts.items())
    default_summary = (
        f"A {_millions(model.num_parameters())}-parameter causal language model from "
        f"hybrid-zoo: {config.num_hidden_layers} "
        f"blocks ({mix}) of the `{config.model_type}` family."
    )
    moe = ""
    if config.has_moe:
        moe = (
            f"{config.channel_mixers.count('moe')} MoE layers, {config.num_experts} experts of "
            f"width {config.moe_intermediate_size}, top-{config.num_experts_per_tok}, "
            f"sparsity 1 − k/E = {config.sparsity:.3f}"
        )
    state_1k, state_8k = model.state_size(1, 1024), model.state_size(1, 8192)
    grows = "grows with the context" if state_8k > state_1k else "constant in the context"
    flops = model_flops(model, min(config.max_position_embeddings, 8192))
    template = files("zoo").joinpath("model_card_template.md").read_text()
    limitations = "A research checkpoint: no instruction tuning, no safety tuning. " + (
        "Untrained named size: load it to train, not to generate."
        if recipe is None
        else "Small models trained on small data recall and reason poorly; compare "
        "architectures at equal budgets only."
    )
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=repo_id,
        summary=summary or default_summary,
        architecture_table=_architecture_table(config),
        pattern=config.layer_pattern,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        vocab_size=f"{config.vocab_size:,}",
        params_total=_millions(model.num_parameters()),
        params_active=_millions(model.num_parameters(active=True)),
        params_non_embedding=_millions(model.num_parameters(exclude_embeddings=True)),
        moe=moe,
        state=f"{state_1k:,} elements per sequence at 1K tokens, {state_8k:,} at 8K ({grows})",
        flops=f"{flops.train_per_token / 1e9:.3f} GFLOPs at context {flops.seq_len}",
        training=_training(recipe, released),
        evaluation=_eval_table(eval_results),
        repo_id=repo_id,
        limitations=limitations,
        zoo_version=__version__,
    )


def card_for_run(run_dir: str | Path, repo_id: str | None = None) -> Path:
    """Render the card of a training run (or of a bare model folder) into its model folder's
    README.md; returns that path. Picks up `recipe.yaml` and `eval/results.json` beside it."""
    run_dir = Path(run_dir)
    model_dir = run_dir / "final" if (run_dir / "final" / "config.json").is_file() else run_dir
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'config.json'}: no model to describe")
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, ZooConfig):
        raise ValueError(
            f"{model_dir / 'config.json'}: model_type {config.model_type!r} is not zoo's"
        )
    recipe_path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.is_file() else None
    eval_path = run_dir / "eval" / "results.json"
    eval_results = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    heldout = heldout_results(run_dir)
    if heldout is not None:  # the run's own held-out loss, unless an eval already has one
        if eval_results is None:
            eval_results = heldout
        else:
            for key in ("results", "configs"):
                for task, value in heldout[key].items():
                    eval_results.setdefault(key, {}).setdefault(task, value)
    recipe = portable(recipe) if recipe else recipe
    eval_results = portable(eval_results) if eval_results else eval_results
    card = render_card(
        config,
        repo_id or run_dir.name,
        eval_results=eval_results,
        recipe=recipe,
    )
    out = model_dir / "README.md"
    card.save(out)
    return out


def preset_cards() -> dict[str, ModelCard]:
    """file name -> card of every named size of every family."""
    cards = {}
    for family, entry in registry.families().items():
        cls = entry.config_class()
        for size, row in cls.named_sizes.items():
            # A released model keeps its own vocabulary; the others are counted with the card's.
            vocab = {} if "vocab_size" in (row.settings or {}) else {"vocab_size": entry.card_vocab}
            config = cls.from_size(size, **vocab)
            name = f"{family}-{size}"
            cards[f"{name}.md"] = render_card(config, f"hybrid-zoo/{name}", released=row.released)
    return cards


def write_preset_cards(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, card in preset_cards().items():
        path = folder / name
        path.write_text(str(card) + "\n")
        paths.append(path)
    return paths


if __name__ == "__main__":  # python -m zoo.card model_cards
    import sys

    for written in write_preset_cards(sys.argv[1] if len(sys.argv) > 1 else "model_cards"):
        print(written)
