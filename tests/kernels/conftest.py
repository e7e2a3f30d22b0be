from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest


@pytest.fixture
def ran(monkeypatch) -> tuple[list[str], Callable[[ModuleType, str, str], None]]:
    """(calls, spy): `spy(module, name, label)` wraps `module.name` so that each call appends
    `label` to `calls` before running it; which implementation an op took can then be asserted,
    not inferred from outputs that every implementation shares."""
    calls: list[str] = []

    def spy(module: ModuleType, name: str, label: str) -> None:
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    return calls, spy
