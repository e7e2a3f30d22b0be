"""The registry: every mixer keeps its contract, names resolve with clear errors, and a mixer
registered from a module outside the package works in every tool (training, generate, save and
load, MAD)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import zoo
from tests.tiny import tiny_config, tiny_mixer_config
from zoo import registry
from zoo.eval import mad
from zoo.layers import build_channel_mixer, build_sequence_mixer
from zoo.recipe import load_recipe
from zoo.training import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(registry.sequence_mixers()))
def test_every_sequence_mixer_keeps_the_protocol(name):
    entry = registry.sequence_mixer(name)
    assert entry.cache in registry.CACHE_KINDS and entry.doc
    config = tiny_mixer_config(name)
    layer = build_sequence_mixer(config, 1)
    assert isinstance(layer, registry.SequenceMixerLayer), f"{name} misses part of the contract"
    assert layer.state_size(2, 10) >= 0 and layer.flops_per_token(10) > 0
    for key, setting in entry.settings.items():
        assert setting.doc, f"{name}.{key} has no doc"
        value = getattr(config, key)
        assert setting.check is None or setting.check(value) is None, (key, value)
    for key in entry.per_layer:
        assert key in zoo.ZooConfig.field_names(), key


@pytest.mark.parametrize("name", sorted(registry.channel_mixers()))
def test_every_channel_mixer_keeps_the_protocol(name):
    config = zoo.HybridConfig.from_pattern(f"attention:{name}*3", **registry.TINY_BACKBONE)
    layer = build_channel_mixer(config, 0)
    if registry.channel_mixer(name).layer is None:
        assert layer is None
        return
    assert isinstance(layer, registry.ChannelMixerLayer)
    assert layer.flops_per_token(10) > 0


def test_every_family_makes_its_tiny_and_named_models():
    for name, entry in registry.families().items():
        config = entry.tiny_config()
        assert registry.family_of(type(config)) is entry
        assert config.model_type == f"zoo_{name}"
        for size in type(config).named_sizes:
            type(config).from_size(size)


def test_unknown_and_conflicting_names_are_refused():
    with pytest.raises(registry.RegistryError, match=r"'s4' is not a registered sequence mixer"):
        registry.sequence_mixer("s4")
    with pytest.raises(registry.RegistryError, match="already registered"):
        zoo.register_mixer("mamba", "x:Y", cache="linear_attention")
    with pytest.raises(registry.RegistryError, match=r"cache='kv' is not one of"):
        zoo.register_mixer("new_one", "x:Y", cache="kv")
    with pytest.raises(registry.RegistryError, match="'mamba_d_state' is already declared"):
        zoo.register_mixer(
            "new_one",
            "x:Y",
            cache="linear_attention",
            settings={"mamba_d_state": registry.Setting(1, "clash")},
        )
    assert "new_one" not in registry.sequence_mixers()


@pytest.fixture
def toy():
    """The toy mixer of tests/toy_mixer.py, registered by importing it; unregistered after."""
    module = importlib.import_module("tests.toy_mixer")
    if "toy_ema" not in registry.sequence_mixers():
        importlib.reload(module)
    yield module
    registry.unregister_mixer("toy_ema")


def test_a_mixer_from_outside_trains_generates_saves_and_reloads(toy, tmp_path):
    recipe = load_recipe(
        ROOT / "recipes/configs/_tiny.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            "model.imports=[tests.toy_mixer]",
            "model.preset=hybrid",
            "model.pattern=toy_ema:swiglu attention:swiglu",
            "training.steps=60",
            "logging.eval_every=null",
            "logging.checkpoint_every=null",
        ],
    )
    run = train(recipe, echo=lambda _: None)
    records = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # it learns (step 10 vs step 60)

    model = AutoModelForCausalLM.from_pretrained(run.final_dir).eval()
    assert model.config.mixers == ["toy_ema", "attention"]
    assert model.config.layer_types == ["linear_attention", "full_attention"]
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, 200, (2, 9))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False)
    full = model(generated, use_cache=False).logits[:, 8:-1].argmax(-1)
    assert torch.equal(full, generated[:, 9:])  # the cached steps equal the parallel form

    saved = json.loads((run.final_dir / "config.json").read_text())
    assert saved["mixer_modules"] == {"toy_ema": "tests.toy_mixer"}
    # A process that never imported the module is told which one to import.
    script = (
        "import zoo\nfrom transformers import AutoConfig\n"
        f"AutoConfig.from_pretrained({str(run.final_dir)!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode != 0
    assert "registered by module 'tests.toy_mixer'" in result.stderr, result.stderr[-2000:]


def test_a_mixer_from_outside_runs_in_mad_and_layer_overrides(toy):
    assert "toy_ema" in mad.architectures()
    result = mad.train_task("toy_ema", "in_context_recall", mad.MAD_SCALES["quick"])
    assert result["architecture"] == "toy_ema" and 0 <= result["accuracy"] <= 1
    config = zoo.HybridConfig.from_pattern(
        "toy_ema:swiglu*2", hidden_size=32, layer_overrides=[{"toy_ema_expand": 3}, None]
    )
    model = AutoModelForCausalLM.from_config(config)
    assert [block.mixer.width for block in model.model.layers] == [96, 64]


def test_a_family_from_outside_gets_model_classes_and_auto_registration(toy, tmp_path):
    class ToyConfig(zoo.ZooConfig):
        model_type = "zoo_toy"
        default_mixer = "toy_ema"
        default_channel_mixer = "swiglu"

    family = zoo.register_family("toy", ToyConfig, display_name="Toy")
    try:
        config = family.tiny_config()
        model = AutoModelForCausalLM.from_config(config)
        assert type(model).__name__ == "ToyForCausalLM"
        model.save_pretrained(tmp_path)
        assert isinstance(AutoConfig.from_pretrained(tmp_path), ToyConfig)
        assert "toy" in {f.name for f in registry.families().values()}
    finally:
        registry.unregister_family("toy")


def test_bad_layer_override_names_the_layer_and_its_mixers():
    with pytest.raises(ValueError, match=r"layer_overrides\[0\]\.mamba_d_state: not a per-layer"):
        tiny_config("llama", layer_overrides=[{"mamba_d_state": 4}, None, None])
