"""Recipes: validation errors that name file and key, schedules, plans, dry runs, FLOPs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import zoo
from zoo.flops import model_flops
from zoo.recipe import RecipeError, load_recipe, lr_factor
from zoo.training import dry_run, main

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
PAPER = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("sl-", "moe-")))

MINIMAL = """
model: {preset: tnl, overrides: {hidden_size: 32, num_hidden_layers: 1}}
training: {steps: 10, global_batch_tokens: 512, micro_batch_size: 2, seq_len: 64}
output_dir: out
"""


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.optimizer.lr == 3e-4 and recipe.schedule.kind == "cosine"
    assert recipe.data.source == "synthetic" and recipe.training.precision == "fp32"
    assert recipe.plan(world_size=2).accumulation == 2  # 512 / (2 · 64 · 2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("training: {stepz: 3}", r"training\.stepz: unknown key"),
        ("optimizer: {lr: fast}", r"optimizer\.lr: Input should be a valid number"),
        ("training: {precision: fp8}", r"training\.precision: Input should be 'fp32'"),
        ("model: {preset: gpt2}", r"model: Value error, preset='gpt2' is not one of"),
        ("colour: red", r"colour: unknown key"),
        ("training: {steps: null}", r"give exactly one of steps and tokens"),
        ("data: {source: files}", r"data: Value error, source: files needs train_files"),
    ],
)
def test_bad_recipe_names_file_and_key(tmp_path, edit, message):
    path = _write(tmp_path, MINIMAL)
    base = _write(tmp_path, f"base: r.yaml\n{edit}\n", "bad.yaml")
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(base)
    assert str(path.parent / "bad.yaml") in str(info.value)


def test_unknown_model_field_names_the_key(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL), ["model.overrides.hiden_size=64"])
    with pytest.raises(
        RecipeError, match=r"model\.overrides\.hiden_size: not a field of TNLConfig"
    ):
        recipe.build_config()
    bad_value = load_recipe(_write(tmp_path, MINIMAL), ["model.overrides.num_attention_heads=5"])
    with pytest.raises(RecipeError, match="num_attention_heads=5 does not divide hidden_size=32"):
        bad_value.build_config()


def test_batch_that_does_not_divide_names_the_keys(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    with pytest.raises(RecipeError, match=r"global_batch_tokens=512 is not a multiple of .* = 384"):
        recipe.plan(world_size=3)


def test_missing_data_file_fails_before_training(tmp_path):
    text = MINIMAL + "data: {source: files, train_files: [nowhere.jsonl]}\n"
    recipe = load_recipe(_write(tmp_path, text), [f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl: no such data file"):
        zoo.training.train(recipe, echo=lambda _: None)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    path = _write(tmp_path, MINIMAL + "logging: {log_evry: 3}\n")
    with pytest.raises(SystemExit) as info:
        main([str(path)])
    assert info.value.code == 2
    assert "logging.log_evry: unknown key" in capsys.readouterr().err


def test_overrides_and_base_merge(tmp_path):
    _write(tmp_path, MINIMAL)
    path = _write(tmp_path, "base: r.yaml\nmodel: {overrides: {hidden_size: 64}}\n", "child.yaml")
    recipe = load_recipe(path, ["optimizer.betas=[0.8, 0.9]", "training.steps=7"])
    assert recipe.model.overrides == {"hidden_size": 64, "num_hidden_layers": 1}
    assert recipe.model.preset == "tnl" and recipe.training.steps == 7
    assert recipe.optimizer.betas == (0.8, 0.9)
    with pytest.raises(RecipeError, match="is not key=value"):
        load_recipe(path, ["training.steps"])
    cycle = _write(tmp_path, "base: cycle.yaml\n", "cycle.yaml")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(cycle)


def _factors(tmp_path, schedule: str, steps: int = 100) -> list[float]:
    recipe = load_recipe(
        _write(tmp_path, MINIMAL),
        [f"training.steps={steps}", f"schedule={schedule}", "schedule.warmup_steps=10"]
        if schedule.startswith("{")
        else [f"training.steps={steps}", f"schedule.kind={schedule}", "schedule.warmup_steps=10"],
    )
    plan = recipe.plan()
    return [lr_factor(step, plan, recipe.schedule) for step in range(steps)]


def test_schedules(tmp_path):
    cosine = _factors(tmp_path, "cosine")
    assert cosine[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert cosine[10] == pytest.approx(1.0) and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(cosine[10:]))
    wsd = _factors(tmp_path, "wsd")  # decay over the last 20% of steps, to 0.1
    assert wsd[10:80] == [1.0] * 70
    assert wsd[-1] == pytest.approx(0.1) and 0.1 < wsd[90] < 1.0
    assert _factors(tmp_path, "constant")[10:] == [1.0] * 90


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe_validates_with_dry_run(name):
    report = dry_run(load_recipe(CONFIGS / name), world_size=8)
    assert report["train_flops"] > 0 and report["plan"]["steps"] > 0
    if name.startswith("sl-"):
        assert report["plan"]["sequences_per_step"] == 480  # 480 × 8192 tokens
    if name.startswith("moe-") and "dense" not in name:
        assert 0.7 < report["sparsity"] < 1


def test_moe_sweep_holds_active_compute_fixed():
    flops = {
        name: dry_run(load_recipe(CONFIGS / name))["train_flops_per_token"]
        for name in PAPER
        if name.startswith("moe-")
    }
    dense = flops.pop("moe-sparsity-dense.yaml")
    # Same active expert width; only the routers (2 · d · E per layer) differ.
    assert all(abs(f - dense) / dense < 0.01 for f in flops.values()), flops


def _hand_count_llama(config: zoo.LlamaConfig, seq_len: int) -> int:
    """Training FLOPs per token of LLaMA by hand: 6 × matmul parameters per token (q, k, v, o,
    the three SwiGLU matrices, the LM head) + 3 × 4·T·d per layer for scores and values."""
    d, layers, g, v = config.hidden_size, config.num_hidden_layers, config.intermediate_size, 259
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * g
    return 6 * (layers * per_layer + d * v) + 3 * layers * 4 * seq_len * d


@pytest.mark.parametrize("size", ["70m", "410m", "7b"])
def test_llama_flops_match_a_hand_count(size):
    config = zoo.LlamaConfig.from_size(size, vocab_size=259, num_key_value_heads=2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ours = model_flops(model, 8192).train_per_token
    assert abs(ours - _hand_count_llama(config, 8192)) / ours < 0.01


def test_flops_follow_each_mixers_scaling():
    """Attention's cost grows with the context, recurrent mixers' does not; MoE counts k of E
    experts; Hyena's FFT grows like log T."""
    configs = {
        "llama": zoo.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
        "tnl": zoo.TNLConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
        "mamba": zoo.MambaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
        "hyena": zoo.HyenaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4),
    }
    counts = {}
    for name, config in configs.items():
        model = AutoModelForCausalLM.from_config(config)
        counts[name] = [model_flops(model, t).mixers[0] for t in (1024, 2048)]
    assert counts["llama"][1] - counts["llama"][0] == 4 * 1024 * 64
    assert counts["tnl"][0] == counts["tnl"][1] and counts["mamba"][0] == counts["mamba"][1]
    assert 0 < counts["hyena"][1] - counts["hyena"][0] < 0.2 * counts["hyena"][0]
    moe = zoo.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        channel_mixers=["moe"],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    )
    report = model_flops(AutoModelForCausalLM.from_config(moe), 128)
    assert report.channel_mixers[0] == 2 * 64 * 8 + 2 * 2 * 3 * 64 * 32
    assert report.train_per_token == 3 * report.forward_per_token
    assert not math.isnan(report.embedding) and report.embedding == 2 * 259 * 64


def test_every_family_counts_its_flops(family):
    from tests.tiny import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(family))
    report = model_flops(model, 64)
    linear = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert all(f > 0 for f in report.mixers)
    # At least every token-wise projection (Hyena's position-only filter MLP aside).
    assert report.forward_per_token > 0.5 * linear


def test_zoo_train_cli_dry_run():
    from typer.testing import CliRunner

    from zoo.cli import app

    result = CliRunner().invoke(
        app, ["train", str(CONFIGS / "sl-tnl-1b.yaml"), "--dry-run", "--world-size", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "TNLForCausalLM" in result.output and "PF-days" in result.output
