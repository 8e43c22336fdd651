"""Unit tests of `_spawnhook`: the one wrapper of ``spawn.get_preparation_data``."""

from __future__ import annotations

import multiprocessing
import sys
import types
from multiprocessing import spawn
from typing import Any

import pytest

from pytest_procsafe import _spawnhook


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch, fresh_spawnhook: None) -> Any:
    """A stand-in for the original: what it returns is what a real parent would send."""

    def get_preparation_data(name: str) -> dict[str, Any]:
        return {"name": name, "init_main_from_path": "/somewhere/main.py"}

    monkeypatch.setattr(spawn, "get_preparation_data", get_preparation_data)
    return get_preparation_data


def test_riders_travel_under_one_key_and_undo_restores_the_original(base: Any) -> None:
    undo_a = _spawnhook.carry("a", lambda: "A")
    undo_b = _spawnhook.carry("b", lambda: None)  # nothing to carry this time
    try:
        data = spawn.get_preparation_data("x")
        assert data[_spawnhook.KEY] == {"a": "A"}
        assert data["name"] == "x"
        assert spawn.get_preparation_data is not base
    finally:
        undo_b()
        undo_a()
    assert spawn.get_preparation_data is base


def test_one_wrapper_however_many_parts_carry(base: Any) -> None:
    undo_a = _spawnhook.carry("a", lambda: 1)
    wrapper = spawn.get_preparation_data
    undo_b = _spawnhook.carry("b", lambda: 2)
    try:
        assert spawn.get_preparation_data is wrapper
        assert getattr(wrapper, "wrapped", None) is base
        assert spawn.get_preparation_data("y")[_spawnhook.KEY] == {"a": 1, "b": 2}
    finally:
        undo_a()
        undo_b()


def test_a_nested_run_hands_the_outer_rider_back(base: Any) -> None:
    def outer() -> str:
        return "outer"

    def inner() -> str:
        return "inner"

    undo_outer = _spawnhook.carry("log", outer)
    undo_inner = _spawnhook.carry("log", inner)
    assert spawn.get_preparation_data("z")[_spawnhook.KEY] == {"log": "inner"}
    undo_inner()
    assert spawn.get_preparation_data("z")[_spawnhook.KEY] == {"log": "outer"}
    undo_outer()
    assert spawn.get_preparation_data is base


def test_under_a_later_wrapper_ours_stays_and_passes_data_through(
    base: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    undo = _spawnhook.carry("a", lambda: "A")
    ours = spawn.get_preparation_data

    def later(name: str) -> dict[str, Any]:  # coverage wraps the same way
        data = ours(name)
        data["later"] = True
        return data

    monkeypatch.setattr(spawn, "get_preparation_data", later)
    undo()

    data = spawn.get_preparation_data("y")
    assert data["later"] is True
    assert _spawnhook.KEY not in data
    assert data["init_main_from_path"] == "/somewhere/main.py"  # no session: untouched
    # A later session finds ours in the chain and does not wrap again.
    undo_again = _spawnhook.carry("a", lambda: "again")
    try:
        assert spawn.get_preparation_data is later
        assert spawn.get_preparation_data("y")[_spawnhook.KEY] == {"a": "again"}
    finally:
        undo_again()


def _fake_main(
    monkeypatch: pytest.MonkeyPatch, entry_module: str | None, entry: str = "console_main"
) -> None:
    main = types.ModuleType("__main__")
    main.__file__ = "/venv/bin/pytest"
    main.__spec__ = None
    if entry_module is not None:

        def console_main() -> int:
            return 0

        console_main.__module__ = entry_module
        console_main.__name__ = entry
        setattr(main, entry, console_main)
    monkeypatch.setitem(sys.modules, "__main__", main)


@pytest.mark.parametrize(
    ("entry_module", "entry"),
    [("_pytest.config", "console_main"), ("_pytest.config", "_console_main")],
    ids=["pytest-8", "pytest-9"],
)
def test_children_do_not_rerun_the_pytest_console_script(
    base: Any, monkeypatch: pytest.MonkeyPatch, entry_module: str, entry: str
) -> None:
    _fake_main(monkeypatch, entry_module, entry)
    undo = _spawnhook.carry("a", lambda: "A")
    try:
        assert "init_main_from_path" not in spawn.get_preparation_data("x")
    finally:
        undo()


@pytest.mark.parametrize("entry_module", [None, "mytool.cli"], ids=["a-script", "another-tool"])
def test_another_main_script_is_still_rerun(
    base: Any, monkeypatch: pytest.MonkeyPatch, entry_module: str | None
) -> None:
    # A user's own script that calls pytest.main() may define what its children need.
    _fake_main(monkeypatch, entry_module)
    undo = _spawnhook.carry("a", lambda: "A")
    try:
        assert spawn.get_preparation_data("x")["init_main_from_path"] == "/somewhere/main.py"
    finally:
        undo()


@pytest.mark.usefixtures("fresh_spawnhook")
def test_the_global_start_method_stays_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real get_preparation_data asks for the start method, which fixes it for good.
    monkeypatch.setattr(multiprocessing.context._default_context, "_actual_context", None)
    undo = _spawnhook.carry("a", lambda: "A")
    try:
        data = spawn.get_preparation_data("x")
        assert data["start_method"] is not None
        assert multiprocessing.get_start_method(allow_none=True) is None
    finally:
        undo()
