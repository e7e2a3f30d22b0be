"""`zoo eval`'s results.json has the layout of the file lm-eval 0.4.13 itself writes: the test
scores one local multiple-choice file with lm-eval (through the zoo's model class) and with
`zoo eval`, then compares keys and nesting. A local task keeps the name the user gave it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.tiny import tiny_config
from zoo.eval.runner import EvalRequest, run_eval
from zoo.tokenizer import byte_tokenizer

lm_eval = pytest.importorskip("lm_eval")


def _shape(value, depth: int = 0):
    """Keys and value kinds of a nested mapping (the layout, not the numbers)."""
    if isinstance(value, dict) and depth < 3:
        return {k: _shape(v, depth + 1) for k, v in value.items()}
    return "dict" if isinstance(value, dict) else "value"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    tokenizer = byte_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tokenizer)))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"goal": f"to open jar {i}", "sol1": "twist", "sol2": "wait", "label": i % 2}
            for i in range(6)]  # fmt: skip
    (root / "data").mkdir()
    (root / "data" / "my_jars.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_results_json_has_lm_evals_keys_and_nesting(fixture, monkeypatch):
    from lm_eval.loggers import EvaluationTracker

    import zoo.eval.lm_eval_adapter  # noqa: F401 (registers the "zoo" model class)

    monkeypatch.chdir(fixture)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = {
        "task": "my_jars",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "data/my_jars.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    out = lm_eval.simple_evaluate(
        model="zoo", model_args="pretrained=model", tasks=[task], batch_size=2, device="cpu"
    )
    samples = out.pop("samples", None)
    EvaluationTracker(output_path="lm-eval-out").save_results_aggregated(
        results=out, samples=samples
    )
    (theirs_path,) = Path("lm-eval-out").rglob("results_*.json")
    theirs = json.loads(theirs_path.read_text())

    ours = run_eval(
        EvalRequest(
            model="model", tasks=["my_jars:piqa"], data_dir=Path("data"), output=Path("zoo-out")
        )
    )
    written = json.loads(Path("zoo-out/results.json").read_text())
    assert written.keys() == theirs.keys()
    for key in ("results", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert _shape(written[key]) == _shape(theirs[key]), key
    assert set(written["configs"]["my_jars"]) <= set(theirs["configs"]["my_jars"])
    assert {"model", "model_args"} <= set(written["config"])
    # The same items, the same scores: acc and acc_norm agree with lm-eval's.
    for metric in ("acc,none", "acc_norm,none"):
        assert written["results"]["my_jars"][metric] == pytest.approx(
            theirs["results"]["my_jars"][metric]
        ), metric
    assert ours["results"]["my_jars"]["sample_len"] == 6
    assert written["configs"]["my_jars"]["dataset_path"] == "my_jars.jsonl"
    assert str(fixture) not in Path("zoo-out/results.json").read_text()
