"""MQAR (Zoology's generator, attention solves it), NIAH prompts and grids, results files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from tests.tiny import tiny_config
from zoo.cli import app
from zoo.eval import retrieval
from zoo.eval.mad import IGNORE
from zoo.eval.runner import EvalRequest, run_eval
from zoo.results import write_json_atomic
from zoo.tokenizer import byte_tokenizer


def test_mqar_layout_matches_zoology():
    x, y = retrieval.multiquery_ar(64, 50, 32, seed=0, num_kv_pairs=4, random_non_queries=False)
    assert x.shape == y.shape == (50, 32)
    for row, labels in zip(x, y, strict=True):
        keys, values = row[0:8:2], row[1:8:2]
        assert len(set(keys.tolist())) == 4 and (keys < 32).all() and (values >= 32).all()
        scored = torch.nonzero(labels != IGNORE).flatten()
        assert len(scored) == 4  # each key queried once, at its query position
        for position in scored:
            key = row[position]
            assert labels[position] == values[keys == key].item()
        queries = row[8:]
        assert ((queries == 0) | torch.isin(queries, keys)).all()  # fillers stay 0
    noisy, _ = retrieval.multiquery_ar(64, 50, 32, seed=0, num_kv_pairs=4)
    assert not (noisy[:, 8:] == 0).all()  # random non-query fillers
    again, _ = retrieval.multiquery_ar(64, 50, 32, seed=0, num_kv_pairs=4)
    assert torch.equal(noisy, again)


def test_mqar_rejects_impossible_settings():
    with pytest.raises(ValueError, match="must exceed input_seq_len"):
        retrieval.multiquery_ar(16, 1, 32, 0)
    with pytest.raises(ValueError, match="num_kv_pairs=16 needs input_seq_len >= 4"):
        retrieval.multiquery_ar(256, 1, 32, 0, num_kv_pairs=16)


def test_attention_solves_small_mqar():
    settings = retrieval.MQARSettings(
        vocab_size=64,
        width=64,
        train_cells=((32, 4),),
        num_train=2048,
        test_cells=((32, 4),),
        num_test=64,
        epochs=12,
    )
    result = retrieval.train_mqar("attention", settings)
    assert result["accuracy"]["L=32,K=4"] > 0.9, result  # chance: 1/32


def test_niah_prompt_places_the_needle_and_is_deterministic():
    tokenizer = byte_tokenizer()
    prompt, key = retrieval.niah_prompt(tokenizer, 300, 0.0, seed=1)
    assert prompt.index(key) < 40 and prompt.endswith("The pass key is")
    late, key2 = retrieval.niah_prompt(tokenizer, 300, 1.0, seed=1)
    assert key2 == key and late.index(key) > 200
    assert retrieval.niah_prompt(tokenizer, 300, 0.5, seed=1) == retrieval.niah_prompt(
        tokenizer, 300, 0.5, seed=1
    )
    assert abs(len(tokenizer(late)["input_ids"]) - 300) <= 2
    with pytest.raises(ValueError, match="unknown NIAH style"):
        retrieval.niah_prompt(tokenizer, 100, 0.5, 0, style="haystack")


def test_niah_grid_and_heatmap(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    grid = retrieval.niah_grid(model, byte_tokenizer(), (64, 96), (0.0, 1.0), trials=1)
    assert len(grid["accuracy"]) == 2 and len(grid["accuracy"][0]) == 2
    assert retrieval.niah_heatmap(grid, tmp_path / "niah.png").stat().st_size > 1000


def test_results_file_is_never_half_written(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"results": {"a": {"acc,none": 0.5}}})

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(OSError):
        write_json_atomic(path, {"results": {"b": {}}})
    monkeypatch.undo()
    assert json.loads(path.read_text())["results"] == {"a": {"acc,none": 0.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_zoo_eval_on_a_training_run_folder(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("tnl"))
    model.save_pretrained(tmp_path / "run" / "final")
    byte_tokenizer().save_pretrained(tmp_path / "run" / "final")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(tmp_path / "run"),
            "--tasks",
            "mqar,niah",
            "--quick",
            "--output",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(payload["results"]) == {"mqar", "niah"}
    assert "acc,none" in payload["results"]["niah"] and (tmp_path / "out" / "niah.png").is_file()
    assert (tmp_path / "out" / "mqar.png").stat().st_size > 1000  # the README promises it
    assert "mqar cells" in result.stderr  # progress while the grid runs
    details = json.loads((tmp_path / "out" / "details.json").read_text())
    assert set(details["mqar"]) == {"L=32,K=4", "L=64,K=8"}


def test_unknown_task_and_missing_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tasks \['trivia'\]"):
        run_eval(EvalRequest(model="x", tasks=["trivia"], output=tmp_path))
    with pytest.raises(ValueError, match="task mad trains models: give --architectures"):
        run_eval(EvalRequest(model=None, tasks=["mad"], output=tmp_path))
    with pytest.raises(ValueError, match="unknown architecture 'rnn'"):
        run_eval(EvalRequest(model=None, tasks=["mad"], architectures=["rnn"], output=tmp_path))
    with pytest.raises(ValueError, match="mad scale 'huge' is not one of"):
        run_eval(EvalRequest(model=None, tasks=["mad"], architectures=["tnl"], mad_scale="huge"))
    with pytest.raises(ValueError, match="perplexity needs --text"):
        run_eval(EvalRequest(model="x", tasks=["perplexity"], output=tmp_path))


def test_architecture_protocols_write_a_table_and_plot(tmp_path):
    request = EvalRequest(
        model=None,
        tasks=["mad", "mqar"],
        architectures=["attention", "lightning"],
        output=tmp_path,
        quick=True,
    )
    payload = run_eval(request, echo=lambda _: None)
    assert {"mad/attention", "mad/lightning", "mqar/lightning"} <= set(payload["results"])
    assert (tmp_path / "mad.png").is_file() and "MAD score" in (tmp_path / "mad.md").read_text()
    assert (tmp_path / "mqar.png").stat().st_size > 1000
