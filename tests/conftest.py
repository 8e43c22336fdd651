from __future__ import annotations

import pytest

from pytest_procsafe import _spawnhook

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _not_on_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs print as on a terminal everywhere: on CI (``CI``, ``BUILD_NUMBER`` set)
    pytest stops shortening its summary lines, and the tests read those lines."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)


@pytest.fixture
def fresh_spawnhook(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_spawnhook` as in a process with no procsafe session (this run has one)."""
    monkeypatch.setattr(_spawnhook, "_RIDERS", {})
    monkeypatch.setattr(_spawnhook, "_STATE", {"wrapper": None, "module": None})
    monkeypatch.setattr(_spawnhook, "_WAIT", [])
