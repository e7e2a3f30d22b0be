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
