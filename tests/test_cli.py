"""The `zoo` command line: convert and generate, with their errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.tiny import FAMILIES
from zoo.cli import app
from zoo.tokenizer import byte_tokenizer

runner = CliRunner()


# zoo family -> the transformers model_type it converts to.
CONVERTIBLE = {"llama": "llama", "mamba": "mamba", "mamba2": "mamba2"}


def _saved(model, folder):
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in CONVERTIBLE])
def test_convert_round_trip_and_generate(family, tiny_model, tmp_path):
    src, hf, back = _saved(tiny_model, tmp_path / "zoo"), tmp_path / "hf", tmp_path / "back"
    assert runner.invoke(app, ["convert", str(src), str(hf)]).exit_code == 0
    hf_type = CONVERTIBLE[family]
    assert json.loads((hf / "config.json").read_text())["model_type"] == hf_type
    result = runner.invoke(app, ["convert", str(hf), str(back)])
    assert result.exit_code == 0, result.output
    assert f"{hf_type}->zoo_{family}" in result.output
    result = runner.invoke(app, ["generate", str(back), "--prompt", "copy: ab |"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("copy: ab |")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in CONVERTIBLE])
def test_convert_refuses_a_family_without_a_counterpart(family, tiny_model, tmp_path):
    src, out = _saved(tiny_model, tmp_path / "zoo"), tmp_path / "out"
    result = runner.invoke(app, ["convert", str(src), str(out)])
    assert result.exit_code == 2
    assert f"model_type='{tiny_model.config.model_type}'" in result.output
    assert "has no converter" in result.output and not out.exists()


def test_convert_names_a_missing_checkpoint(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "config.json" in result.output


def test_convert_names_an_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "gpt2" in result.output


def test_describe_a_pattern_counts_total_and_active_parameters(tmp_path):
    result = runner.invoke(
        app,
        [
            "describe",
            "(lightning:moe*3 attention:moe)*2",
            "--hidden-size",
            "64",
            "--save",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "lightning:moe*3 attention:moe lightning:moe*3 attention:moe" in result.output
    assert "sparsity 1 - k/E = 0.750" in result.output
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "zoo_hybrid"
    assert saved["channel_mixers"] == ["moe"] * 8


def test_describe_a_named_size():
    result = runner.invoke(
        app, ["describe", "llama", "--size", "560m-a220m", "--vocab-size", "100280"]
    )
    assert result.exit_code == 0, result.output
    assert "558.40M total, 218.67M active" in result.output


def test_describe_names_a_bad_pattern():
    result = runner.invoke(app, ["describe", "attention:mlp"])
    assert result.exit_code != 0
    # typer boxes and wraps the message: compare without the frame.
    text = " ".join(result.output.replace("│", " ").split())
    assert "'mlp' is not a channel mixer" in text
