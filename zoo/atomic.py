"""Files written whole or not at all: a temporary file beside the target, then a rename.

A run killed mid-write leaves the previous file (or none), never half of one; resumable sweeps
read these files to decide what is finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    """`payload` as indented JSON (numbers that json does not know, e.g. numpy, as floats)."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=float) + "\n")
