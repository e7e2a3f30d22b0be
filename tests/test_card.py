"""Hub readiness: sharded safetensors, model cards (presets in sync), the upload path, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import zoo
from tests.tiny import tiny_config
from zoo.card import card_for_run, preset_cards
from zoo.checkpoint import CheckpointError
from zoo.cli import app
from zoo.hub import push_run, run_files
from zoo.recipe import load_recipe
from zoo.results import lm_eval_layout, write_json_atomic
from zoo.tokenizer import load_tokenizer
from zoo.training import train

ROOT = Path(__file__).resolve().parents[1]


def test_preset_cards_are_generated_and_in_sync():
    committed = {p.name for p in (ROOT / "model_cards").glob("*.md")} - {"README.md"}
    cards = preset_cards()
    assert committed == set(cards), "run: python -m zoo.card model_cards"
    for name, card in cards.items():
        text = (ROOT / "model_cards" / name).read_text()
        assert text == str(card) + "\n", (
            f"model_cards/{name} is stale: python -m zoo.card model_cards"
        )
    moe = ModelCard((ROOT / "model_cards" / "llama-560m-a220m.md").read_text())
    assert "moe" in moe.data.tags and "218.7M active per token" in moe.text


def test_sharded_round_trip_and_device_map(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("hybrid")).eval()
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 256, (2, 11))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    shards[0].write_bytes(shards[0].read_bytes()[:-10])  # tampered shard
    with pytest.raises(CheckpointError, match=shards[0].name):
        zoo.HybridForCausalLM.from_pretrained(tmp_path)


def test_another_librarys_config_and_a_missing_tokenizer_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(
        CheckpointError, match=r"config\.json: model_type='llama' is not a hybrid-zoo"
    ):
        zoo.LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer in this folder"):
        load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny-tnl"
    recipe = load_recipe(
        ROOT / "recipes/configs/tiny-tnl.yaml",
        [f"output_dir={out}", "training.steps=4", "logging.checkpoint_every=null"],
    )
    train(recipe, echo=lambda _: None)
    scores = {"mqar": {"acc": 0.25, "acc_stderr": 0.01}, "niah": {"acc": 0.5}}
    write_json_atomic(out / "eval" / "results.json", lm_eval_layout(scores, str(out)))
    return out


def test_run_card_parses_and_its_model_index_matches_the_eval_json(trained_run):
    path = card_for_run(trained_run, "me/tiny-tnl")
    card = ModelCard(path.read_text())
    assert card.data.library_name == "transformers" and "zoo_tnl" in card.data.tags
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    heldout = json.loads((trained_run / "run.json").read_text())["eval_loss"]
    assert results.pop(("heldout", "loss")) == pytest.approx(heldout)
    assert results.pop(("heldout", "perplexity")) == pytest.approx(math.exp(heldout))
    assert results == {("mqar", "acc"): 0.25, ("niah", "acc"): 0.5}
    assert "tiny-tnl.yaml" in card.text and "lightning:glu*2" in card.text
    # Nothing of this machine's paths: the run lives in an absolute temporary folder.
    assert str(trained_run.parent) not in path.read_text()


def test_a_local_task_keeps_its_name_and_file_in_the_card(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    payload = lm_eval_layout(
        {"my_jars": {"acc": 0.75}}, "run/final", samples={"my_jars": 8},
        configs={"my_jars": {"dataset_path": "my_jars.jsonl", "test_split": "all lines"}},
    )  # fmt: skip
    write_json_atomic(run / "eval" / "results.json", payload)
    card = ModelCard(card_for_run(run, "me/tiny-tnl").read_text())
    entries = {r.dataset_type: r for r in card.data.eval_results}
    assert entries["my_jars"].dataset_name == "my_jars.jsonl"
    assert entries["my_jars"].metric_value == 0.75 and "piqa" not in entries


def test_push_commits_the_run_up_to_the_http_boundary(trained_run, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with (
        mock.patch.object(HfApi, "create_repo") as create_repo,
        mock.patch.object(HfApi, "create_commit") as create_commit,
    ):
        push_run(trained_run, "me/tiny-tnl", api=HfApi(token="hf_fake"))
    create_repo.assert_called_once_with(
        "me/tiny-tnl", private=False, exist_ok=True, repo_type="model"
    )
    operations = create_commit.call_args.kwargs["operations"]
    committed = {op.path_in_repo for op in operations}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "modeling_zoo.py",
        "README.md",
        "training/recipe.yaml",
        "training/metrics.jsonl",
        "training/loss.png",
        "eval/results.json",
    } <= committed
    assert committed == set(run_files(trained_run))
    assert all(Path(op.path_or_fileobj).is_file() for op in operations)


def test_push_refuses_when_offline(trained_run, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = CliRunner().invoke(app, ["push", str(trained_run), "me/tiny-tnl"])
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.output


def test_zoo_card_cli(trained_run):
    result = CliRunner().invoke(app, ["card", str(trained_run)])
    assert result.exit_code == 0, result.output
    assert (trained_run / "final" / "README.md").is_file()
