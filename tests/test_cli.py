"""The `zoo` command line: convert and generate, with their errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from zoo.cli import app
from zoo.tokenizer import byte_tokenizer

runner = CliRunner()


# zoo family -> the transformers model_type it converts to.
CONVERTIBLE = {"llama": "llama", "mamba": "mamba"}


def test_convert_round_trip_and_generate(family, tiny_model, tmp_path):
    if family not in CONVERTIBLE:
        result = runner.invoke(app, ["convert", str(tmp_path / "missing"), str(tmp_path / "x")])
        assert result.exit_code == 2 and "config.json" in result.output
        return
    src, hf, back = tmp_path / "zoo", tmp_path / "hf", tmp_path / "back"
    tiny_model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    assert runner.invoke(app, ["convert", str(src), str(hf)]).exit_code == 0
    hf_type = CONVERTIBLE[family]
    assert json.loads((hf / "config.json").read_text())["model_type"] == hf_type
    result = runner.invoke(app, ["convert", str(hf), str(back)])
    assert result.exit_code == 0, result.output
    assert f"{hf_type}->zoo_{family}" in result.output
    result = runner.invoke(app, ["generate", str(back), "--prompt", "copy: ab |"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("copy: ab |")


def test_convert_names_an_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "gpt2" in result.output
