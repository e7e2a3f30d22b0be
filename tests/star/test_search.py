"""The STAR search: resumable NSGA-II, training candidates, the report, the CLI and exports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from zoo.cli import app
from zoo.recipe import RecipeError, load_recipe
from zoo.star.genome import Genome, decode
from zoo.star.search import (
    LOG_FILE,
    POPULATION_FILE,
    SearchConfig,
    backbone_of,
    load_search,
    search,
)

TINY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "_tiny.yaml"
BACKBONE = {
    "blocks": 3,
    "hidden_size": 16,
    "num_attention_heads": 4,
    "groups": 2,
    "config": {
        "max_position_embeddings": 64,
        "lightning_chunk_size": 8,
        "hgrn2_chunk_size": 8,
        "mamba_chunk_size": 8,
        "hyena_filter_order": 8,
        "mamba_d_state": 4,
    },
}


def _config(**fields) -> SearchConfig:
    defaults = {
        "base": TINY_RECIPE,
        "backbone": BACKBONE,
        "population": 8,
        "generations": 4,
        "baselines": {"transformer": "attention:swiglu*3"},
    }
    return SearchConfig(**{**defaults, **fields})


def _score(fields: dict) -> float:
    """A deterministic stand-in for training: a hash of the architecture, plus a bonus for
    attention so that selection has something to find."""
    text = json.dumps(fields, sort_keys=True).encode()
    noise = int(hashlib.sha256(text).hexdigest()[:8], 16) / 2**32
    return 2.0 + noise - 0.2 * fields["mixers"].count("attention")


def _quality(todo, done):
    for digest, fields in todo:
        done(digest, _score(fields))


class Killed(Exception):
    pass


def test_killed_search_resumes_to_the_population_of_an_uninterrupted_one(tmp_path):
    config = _config()
    whole = search(config, tmp_path / "whole", quality=_quality, show_progress=False)

    calls = []

    def dies_mid_generation(todo, done):
        for digest, fields in todo:
            calls.append(digest)
            if len(calls) == 13:  # the baseline, 8 of generation 0, then 4 of generation 1
                raise Killed
            done(digest, _score(fields))

    with pytest.raises(Killed):
        search(config, tmp_path / "killed", quality=dies_mid_generation, show_progress=False)
    log = (tmp_path / "killed" / LOG_FILE).read_text().splitlines()
    assert len(log) == 1  # generation 0 finished, generation 1 did not

    trained = []

    def counting(todo, done):
        trained.extend(d for d, _ in todo)
        _quality(todo, done)

    resumed = search(config, tmp_path / "killed", quality=counting, show_progress=False)
    assert resumed == whole
    for name in (LOG_FILE, POPULATION_FILE):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert not set(trained) & set(calls[:12])  # nothing finished before the kill ran again


def test_search_improves_on_its_first_generation(tmp_path):
    search(_config(generations=6), tmp_path, quality=_quality, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert len(records) == 6
    first, last = (min(m["loss"] for m in r["population"]) for r in (records[0], records[-1]))
    assert last < first
    space = backbone_of(_config())
    for member in records[-1]["population"]:
        # params and cache are the decoded model's own
        genome = Genome.parse(member["genome"], space)
        assert member["digest"] == genome.digest(space)
        assert member["params"] > 0 and member["cache"] > 0


def test_a_finished_search_extends_to_more_generations(tmp_path):
    whole = search(
        _config(generations=4), tmp_path / "whole", quality=_quality, show_progress=False
    )
    search(_config(generations=2), tmp_path / "grown", quality=_quality, show_progress=False)
    grown = search(
        _config(generations=4), tmp_path / "grown", quality=_quality, show_progress=False
    )
    assert grown == whole
    with pytest.raises(RecipeError, match="extended, not shortened"):
        search(_config(generations=3), tmp_path / "grown", quality=_quality, show_progress=False)


def test_a_run_folder_refuses_another_search(tmp_path):
    search(_config(generations=1), tmp_path, quality=_quality, show_progress=False)
    with pytest.raises(RecipeError, match="seed differ"):
        search(_config(generations=1, seed=1), tmp_path, quality=_quality, show_progress=False)


def test_search_file_errors_name_the_key(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("base: x.yaml\npopulation: 1\nmutation: 0.1\n")
    with pytest.raises(RecipeError) as error:
        load_search(path)
    assert "population" in str(error.value) and "mutation: unknown key" in str(error.value)
    bad = _config(baselines={"odd": "retnet:swiglu*3"})
    with pytest.raises(RecipeError, match=r"baselines\.odd"):
        search(bad, tmp_path / "run", quality=_quality, show_progress=False)


def _tiny_search_file(tmp_path: Path) -> Path:
    fields = {
        "base": str(TINY_RECIPE),
        "overrides": {
            "training": {"steps": 4, "seq_len": 32, "global_batch_tokens": 128,
                         "micro_batch_size": 4},
            "data": {"synthetic": {"seed": 0, "train_docs": 40, "validation_docs": 8}},
            "logging": {"log_every": 2, "eval_every": None, "eval_batches": 1,
                        "checkpoint_every": None},
        },
        "backbone": {**BACKBONE, "blocks": 2},
        "population": 4,
        "generations": 2,
        "cache_context": 256,
        "baselines": {"transformer": "attention:swiglu*2"},
    }  # fmt: skip
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.slow
def test_cli_search_trains_candidates_then_reports_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    search_file = _tiny_search_file(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["star", "search", str(search_file), "run", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "final population" in result.output
    evals = list((tmp_path / "run" / "evals").glob("*/result.json"))
    assert len(evals) >= 5  # the baseline and the first generation at least
    for path in evals:
        assert json.loads(path.read_text())["eval_loss"] > 0

    result = runner.invoke(app, ["star", "report", "run", "--out", "report"])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report" / "report.md").read_text()
    assert "transformer" in report and "Final first front" in report
    for plot in ("front_params.png", "front_cache.png", "generations.png"):
        assert (tmp_path / "report" / plot).stat().st_size > 0
    best = sorted((tmp_path / "report" / "best").glob("*/config.json"))
    assert best

    population = json.loads((tmp_path / "run" / POPULATION_FILE).read_text())["population"]
    genome = population[0]["genome"]
    result = runner.invoke(
        app, ["star", "export", genome, "--search", str(search_file), "--out", "exported"]
    )
    assert result.exit_code == 0, result.output
    recipe = load_recipe(tmp_path / "exported" / "recipe.yaml")
    space = backbone_of(load_search(search_file))
    assert recipe.build_config().to_dict() == decode(Genome.parse(genome, space), space).to_dict()
    result = runner.invoke(app, ["train", str(tmp_path / "exported" / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    metrics = Path(recipe.output_dir) / "metrics.jsonl"
    assert metrics.is_file() and metrics.read_text().strip()


def test_cli_export_rejects_a_bad_genome(tmp_path):
    search_file = _tiny_search_file(tmp_path)
    result = CliRunner().invoke(
        app,
        ["star", "export", "b1111-11111-11111-11111", "--search", str(search_file),
         "--out", str(tmp_path / "exported")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "error:" in result.output and "outside" in result.output
    assert not (tmp_path / "exported").exists()
