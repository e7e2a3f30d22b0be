from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_benchmark(tmp_path) -> Callable[[str], dict]:
    """Runs benchmarks/<script> --quick and returns its JSON.

    In a fresh interpreter (the scripts import benchmarks/common.py as `common`), on one thread,
    without the Triton interpreter the test session turns on and without a backend override:
    the scripts must run as a user runs them.
    """

    def run(script: str) -> dict:
        out = tmp_path / f"{Path(script).stem}.json"
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("TRITON_INTERPRET", "ZOO_KERNEL_BACKEND")
        }
        command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--threads", "1"]
        result = subprocess.run(
            [*command, "--repeats", "2", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"wrote {out}" in result.stdout
        return json.loads(out.read_text())

    return run
