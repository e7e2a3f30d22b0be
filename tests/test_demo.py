"""The demo's whole path (train, evaluate, save, reload in a fresh process, generate), briefly."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from zoo.cli import app
from zoo.demo import DemoSettings, demo_config, run_demo


def test_demo_saves_hub_folders_that_reload_and_generate(tmp_path):
    settings = DemoSettings(steps=3, batch_size=2, seq_len=32, hidden_size=32, eval_windows=2)
    results = run_demo(tmp_path, settings, ["llama", "tnl"], echo=lambda _: None)
    assert [r.family for r in results] == ["llama", "tnl"]
    for result in results:
        folder = tmp_path / result.family / "final"
        assert result.path == str(folder)
        for name in (
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "modeling_zoo.py",
        ):
            assert (folder / name).is_file(), name
        assert result.generated.startswith("recall: ka=17 mo=3 zu=88 ; mo?")
        assert result.heldout_loss > 0 and result.train_tokens_per_s > 0
    llama, tnl = results
    # Keys and values (2) x 4 layers x width 32 x 4 bytes (fp32) per context token.
    assert llama.cache_bytes_per_token_2k == 2 * 4 * 32 * 4
    assert tnl.cache_bytes_per_token_2k < llama.cache_bytes_per_token_2k / 10
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["steps"] == 3 and len(summary["results"]) == 2


def test_hybrid_demo_config_is_a_stripe():
    config = demo_config("hybrid", DemoSettings())
    assert config.mixers == ["lightning", "lightning", "lightning", "attention"]
    assert config.channel_mixers == ["moe"] * 4 and config.sparsity == 0.5
    # Iso-active: two experts of half the dense width.
    dense = demo_config("llama", DemoSettings())
    assert 2 * config.moe_intermediate_size == dense.intermediate_size
    assert demo_config("mamba", DemoSettings()).num_hidden_layers == 8


def test_demo_cli_rejects_unknown_family():
    result = CliRunner().invoke(app, ["demo", "--families", "llama,gpt2"])
    assert result.exit_code != 0
    assert "gpt2" in result.output
