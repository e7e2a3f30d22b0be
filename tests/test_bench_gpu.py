"""`make bench-gpu` collects only GPU_TESTS: every file with gpu-marked tests must be listed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu|pytestmark = pytest\.mark\.gpu)", re.MULTILINE)


def test_every_gpu_test_file_is_in_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^GPU_TESTS \?= (.+)$", makefile, re.MULTILINE).group(1).split()
    marked = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "tests").rglob("test_*.py")
        if GPU_MARK.search(path.read_text())
    }
    covered = {
        m
        for m in marked
        if any(m == entry or m.startswith(entry.rstrip("/") + "/") for entry in listed)
    }
    assert marked == covered, f"add to GPU_TESTS in the Makefile: {sorted(marked - covered)}"


def test_benchmark_loop_runs_every_benchmark_and_points_results_at_the_outbox(tmp_path):
    """The loop `make bench-gpu-benchmarks` runs, with a stand-in python: every benchmark runs
    even after one fails, the failed ones are named, and each gets $BENCH_COPY_DIR = $OUT (the
    lent GPU's outbox, where benchmarks/common.py writes a copy of each result)."""
    import os
    import shutil
    import subprocess

    shutil.copy(ROOT / "Makefile", tmp_path)
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'name=$(basename "$1" .py)\n'
        '[ "$name" = broken ] && exit 1\n'
        'echo "{}" > "$BENCH_COPY_DIR/gpu_$name.json"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    make = ["make", "-s", "-o", "gpu-setup", "bench-gpu-benchmarks"]
    result = subprocess.run(
        [*make, f"GPU_PYTHON={fake}", "BENCHMARKS=first broken last"],
        cwd=tmp_path,
        env={**os.environ, "OUT": str(out)},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "benchmarks that failed: broken" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["gpu_first.json", "gpu_last.json"]
