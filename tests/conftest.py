from __future__ import annotations

import pytest

from pytest_procsafe import _spawnhook

pytest_plugins = ["pytester"]


@pytest.fixture
def fresh_spawnhook(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_spawnhook` as in a process with no procsafe session (this run has one)."""
    monkeypatch.setattr(_spawnhook, "_RIDERS", {})
    monkeypatch.setattr(_spawnhook, "_STATE", {"wrapper": None})
