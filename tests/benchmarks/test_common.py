"""benchmarks/common.py: a hung first call is recorded and the run goes on; partial results last."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from tests.benchmarks.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import common


def test_time_limit_stops_a_slow_python_loop():
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"0\.2 s"), common.time_limit(0.2):
        while True:  # a first call stuck in Python (compiling, autotuning) checks the alarm
            time.sleep(0.01)
    assert time.perf_counter() - start < 2.0
    with common.time_limit(None):  # no limit is no limit
        time.sleep(0.01)


def test_measure_records_a_timeout_and_goes_on(capsys):
    x = {"a": torch.randn(4, requires_grad=True)}
    calls = {"n": 0}

    def slow_backward(inputs):
        calls["n"] += 1
        if torch.is_grad_enabled():  # the fwd_bwd mode hangs, the forward alone does not
            time.sleep(5)
        return inputs["a"] * 2

    out = common.measure_fwd_bwd(
        slow_backward, x, torch.ones(4), torch.device("cpu"), 2, time_limit_s=0.3, label="toy"
    )
    assert out["fwd"]["ms"] > 0
    assert out["fwd_bwd"] == {"error": "TimeoutError: over the time limit of 0.3 s"}
    assert x["a"].grad is None  # cleared for the next implementation
    err = capsys.readouterr().err
    assert "toy fwd: first call" in err and "toy fwd_bwd: TimeoutError" in err


def test_checkpoint_then_finish(tmp_path):
    path = tmp_path / "r.json"
    result = {"device": {"type": "cpu", "threads": 1, "loadavg_start": None}, "rows": [1]}
    common.checkpoint(result, path)
    assert json.loads(path.read_text()) == {**result, "partial": True}
    result["rows"].append(2)
    common.finish(result, path, lambda r: "table")
    written = json.loads(path.read_text())
    assert "partial" not in written and written["rows"] == [1, 2]


def test_results_are_copied_into_bench_copy_dir(tmp_path, monkeypatch):
    """On a lent GPU only its outbox comes back: each write, partial or whole, lands there too."""
    out = tmp_path / "results/gpu_toy.json"
    out.parent.mkdir()
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    result = {"rows": [1], "device": {}}
    common.checkpoint(result, out)  # no BENCH_COPY_DIR: the results folder only
    assert not any(outbox.iterdir())
    monkeypatch.setenv("BENCH_COPY_DIR", str(outbox))
    common.checkpoint(result, out)
    assert json.loads((outbox / "gpu_toy.json").read_text())["partial"] is True
    common.finish(result, out, lambda r: "table")
    assert json.loads((outbox / "gpu_toy.json").read_text()) == json.loads(out.read_text())
    assert "partial" not in json.loads(out.read_text())
