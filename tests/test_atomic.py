"""Atomic writes: a failed write keeps the previous file whole and leaves no temporary file."""

from __future__ import annotations

import json

import pytest

from zoo.atomic import write_json_atomic, write_text_atomic


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "sub" / "result.json", {"eval_loss": 1.5})
    assert json.loads(path.read_text()) == {"eval_loss": 1.5}

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "half")
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"eval_loss": 1.5}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
