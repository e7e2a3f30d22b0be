"""The rules `lint-imports` cannot state: no module reaches into another's private names, and
the kernels import without the rest of the zoo."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_private_names_across_modules():
    found = []
    for path in sorted((ROOT / "zoo").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zoo"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private and node.module != "zoo.version":
                    where = path.relative_to(ROOT)
                    found.append(f"{where}:{node.lineno}: {private} from {node.module}")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_a_kernel_module_imports_on_its_own():
    result = subprocess.run(
        [sys.executable, "-c", "import zoo.kernels.lightning, zoo.kernels.gla"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
