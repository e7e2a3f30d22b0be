"""Every bad input a user can give the `zoo` command line ends as one line on stderr and exit
status 2 (issue 22): bad data, bad configs and recipes, checkpoints that are not what they
claim, paths that do not exist, no network and no login. Each case runs the real console script
in a fresh process, from a folder outside the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_config
from zoo.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ZOO = str(Path(sys.executable).with_name("zoo"))
TINY = str(ROOT / "recipes" / "configs" / "tiny-llama.yaml")
OFFLINE = {"HF_HUB_OFFLINE": "1"}


def _zoo(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE, **(env or {})}
    for key, value in list(full_env.items()):
        if value is None:
            del full_env[key]
    return subprocess.run(
        [ZOO, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def assert_one_line(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and one line on stderr, besides the progress bars (loading weights) before it."""
    lines = [line for line in done.stderr.strip().splitlines() if "%|" not in line]
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Checkpoints that are not what they claim: `zoo generate` and `zoo eval` refuse them.


def _checkpoint(tmp_path: Path, edit: Callable[[dict], dict | str] | None) -> Path:
    folder = tmp_path / "model"
    tokenizer = byte_tokenizer()
    config = tiny_config("llama", vocab_size=len(tokenizer))
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        changed = edit(config)
        text = changed if isinstance(changed, str) else json.dumps(changed)
        (folder / "config.json").write_text(text)
    return folder


def _bert(config: dict) -> dict:
    return {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 259,
            "hidden_size": config["hidden_size"], "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip


def _more_layers(config: dict) -> dict:
    n = config["num_hidden_layers"]
    for key in ("mixers", "channel_mixers", "layer_types"):
        config[key] = config[key] + config[key][-1:]
    return {**config, "num_hidden_layers": n + 1}


BAD_CHECKPOINTS = {
    "bert config": (_bert, ["bert"]),
    "more layers than weights": (_more_layers, ["config.json", "model.layers.3"]),
    "wider than weights": (
        lambda c: {**c, "hidden_size": 2 * c["hidden_size"]},
        ["model.safetensors", "shape"],
    ),
    "larger vocabulary": (
        lambda c: {**c, "vocab_size": c["vocab_size"] + 5},
        ["model.safetensors", "vocabulary"],
    ),
    "config not json": (lambda c: "{ not json", ["config.json"]),
}


def _load(tmp_path: Path, command: str, model: str) -> subprocess.CompletedProcess:
    """`zoo generate MODEL` or `zoo eval MODEL --tasks perplexity` (results in tmp_path/out)."""
    if command == "generate":
        return _zoo(tmp_path, "generate", model, "--max-new-tokens", "2")
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 40)
    return _zoo(tmp_path, "eval", model, "--tasks", "perplexity", "--text",
                str(tmp_path / "text.txt"), "--output", str(tmp_path / "out"))  # fmt: skip


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_checkpoint_that_is_not_what_it_claims_is_refused(tmp_path, command, case):
    edit, needles = BAD_CHECKPOINTS[case]
    done = _load(tmp_path, command, str(_checkpoint(tmp_path, edit)))
    assert not (tmp_path / "out" / "results.json").exists()
    assert_one_line(done, *needles)


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_path_that_does_not_exist_is_named(tmp_path, command):
    missing = str(tmp_path / "no" / "such" / "model")
    assert_one_line(_load(tmp_path, command, missing), missing)


def test_an_intact_checkpoint_generates_and_a_foreign_tokenizer_is_refused(tmp_path):
    """The control: the same command on the unedited checkpoint succeeds; with a tokenizer
    whose ids the model has no embedding for, it refuses."""
    folder = _checkpoint(tmp_path, None)
    done = _zoo(tmp_path, "generate", str(folder), "--max-new-tokens", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((folder / "config.json").read_text())
    smaller = tiny_config("llama", vocab_size=100)
    AutoModelForCausalLM.from_config(smaller).save_pretrained(folder)
    assert (
        json.loads((folder / "config.json").read_text())["vocab_size"]
        == 100
        != config["vocab_size"]
    )
    assert_one_line(_zoo(tmp_path, "generate", str(folder)), "259", "vocab_size=100")


# ---------------------------------------------------------------------------------------------
# Data and recipes a run cannot train on.


def _data(tmp_path: Path, kind: str) -> Path:
    if kind == "empty folder":
        (tmp_path / "data").mkdir()
        return tmp_path / "data"
    if kind == "binary file":
        path = tmp_path / "data.bin"
        path.write_bytes(bytes(range(256)) * 8)
        return path
    if kind == "csv file":
        path = tmp_path / "data.csv"
        path.write_text("text,label\nhello,1\n")
        return path
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n')
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("empty folder", "data"), ("binary file", "data.bin"), ("csv file", "data.csv"),
     ("malformed jsonl", "data.jsonl:2")],
)  # fmt: skip
def test_data_that_cannot_be_trained_on_is_named(tmp_path, kind, needle):
    data = _data(tmp_path, kind)
    done = _zoo(tmp_path, "train", TINY, "data.source=files", f"data.train_files=[{data}]",
                f"data.cache_dir={tmp_path / 'cache'}", "output_dir=run")  # fmt: skip
    assert_one_line(done, needle)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["model.overrides.hidden_size=36", "model.overrides.num_attention_heads=4"],
         ["odd head size 9"]),
        (["optimizer.lr=.inf"], ["optimizer.lr"]),
        (["model.preset=hybrid", "model.pattern=attention*1000000"], ["1,000,000 layers"]),
        (["model.preset=hybrid", "model.pattern=(attention mamba)*600000"], ["600,000 layers"]),
    ],
)  # fmt: skip
def test_recipes_that_cannot_run_are_refused(tmp_path, overrides, needles):
    assert_one_line(_zoo(tmp_path, "train", TINY, *overrides, "output_dir=run"), *needles)


def test_a_diverging_run_names_its_step(tmp_path):
    done = _zoo(tmp_path, "train", TINY, "optimizer.lr=1e3", "training.steps=30",
                "logging.checkpoint_every=1", "output_dir=run")  # fmt: skip
    lines = done.stderr.strip().splitlines()  # the progress bar precedes the error
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith("error: ") and "step " in lines[-1]


def test_a_sweep_size_name_cannot_leave_the_sweep_folder(tmp_path):
    sweep = {
        "base": str(ROOT / "recipes" / "configs" / "_tiny.yaml"),
        "families": ["llama"],
        "budgets": [8e9],
        "sizes": {"/../../escape": {"hidden_size": 32}},
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    done = _zoo(tmp_path, "scaling", "plan", str(tmp_path / "sweep.yaml"), str(tmp_path / "p"))
    assert_one_line(done, "/../../escape", "cannot name a run folder")
    assert not (tmp_path.parent.parent / "escape").exists() and not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------
# The Hub without a network or a login.


def test_push_offline_and_without_a_token(tmp_path):
    folder = _checkpoint(tmp_path, None)
    offline = _zoo(tmp_path, "push", str(folder), "someone/model")
    assert_one_line(offline, "offline")
    no_login = _zoo(
        tmp_path,
        "push",
        str(folder),
        "someone/model",
        env={"HF_HUB_OFFLINE": None, "HF_TOKEN": None, "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line(no_login, "not logged in", "HF_TOKEN")


@pytest.mark.parametrize("command", ["generate", "eval"])
@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_damaged_weights_are_named(tmp_path, command, damage):
    folder = _checkpoint(tmp_path, None)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    assert_one_line(_load(tmp_path, command, str(folder)), "model.safetensors")


def test_a_full_disk_while_checkpointing_is_one_line(tmp_path, monkeypatch):
    """ENOSPC from the checkpoint writer (simulated: no test fills a real disk)."""
    import errno

    from typer.testing import CliRunner

    from zoo import train_state
    from zoo.cli import app

    def full(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(train_state, "save", full)
    result = CliRunner().invoke(
        app,
        ["train", TINY, "training.steps=2", "logging.checkpoint_every=1",
         f"output_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last
    assert "model.safetensors" in last and not isinstance(result.exception, OSError)
