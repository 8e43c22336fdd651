"""Unit tests of `_afterimport`: a function called on a module once it is imported."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pytest_procsafe import _afterimport


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh module on ``sys.path``, not imported yet (dropped from sys.modules after)."""
    name = f"afterimport_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n'''A module.'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_module_not_imported_yet_is_handed_over_once_it_is(package: str) -> None:
    seen: list[ModuleType] = []
    undo = _afterimport.call(package, seen.append)
    try:
        assert seen == []
        assert package in _afterimport.waiting()
        module = importlib.import_module(package)
        assert seen == [module]
        assert module.VALUE == 1
        importlib.import_module(package)  # already imported: not again
        assert seen == [module]
    finally:
        undo()
    assert package not in _afterimport.waiting()


def test_the_module_keeps_its_real_loader(package: str) -> None:
    undo = _afterimport.call(package, lambda module: None)
    try:
        module = importlib.import_module(package)
    finally:
        undo()
    assert module.__spec__ is not None
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__


def test_an_imported_module_is_handed_over_at_once() -> None:
    seen: list[ModuleType] = []
    undo = _afterimport.call("json", seen.append)
    undo()
    assert seen == [sys.modules["json"]]


def test_every_copy_loaded_while_registered_is_handed_over(package: str) -> None:
    """pytester's in-process runs drop what they imported: the next copy counts too."""
    seen: list[ModuleType] = []
    undo = _afterimport.call(package, seen.append)
    try:
        first = importlib.import_module(package)
        del sys.modules[package]
        second = importlib.import_module(package)
    finally:
        undo()
    assert seen == [first, second]
    assert first is not second


def test_after_the_undo_nothing_is_called_and_the_finder_is_gone(package: str) -> None:
    seen: list[ModuleType] = []
    others = [f for f in sys.meta_path if isinstance(f, _afterimport._Finder)]
    undo = _afterimport.call(package, seen.append)
    undo()
    undo()  # twice: harmless
    importlib.import_module(package)
    assert seen == []
    if not _afterimport.waiting():  # this run's own registrations may still be there
        assert not any(isinstance(f, _afterimport._Finder) for f in sys.meta_path)
    assert len([f for f in sys.meta_path if isinstance(f, _afterimport._Finder)]) <= max(
        len(others), 1
    )


def test_a_name_that_does_not_exist_still_fails_to_import(package: str) -> None:
    undo = _afterimport.call(package + "_missing", lambda module: None)
    try:
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(package + "_missing")
    finally:
        undo()


def test_a_submodule_of_the_standard_library_in_a_fresh_interpreter() -> None:
    """As procsafe uses it: the multiprocessing module is wrapped when first imported,
    its loader is the real one, and nothing imported it before."""
    code = textwrap.dedent(
        """
        import sys
        from pytest_procsafe import _afterimport
        assert "multiprocessing" not in sys.modules
        seen = []
        _afterimport.call("multiprocessing.spawn", lambda module: seen.append(module.__name__))
        assert seen == [] and "multiprocessing" not in sys.modules
        import multiprocessing.spawn
        assert seen == ["multiprocessing.spawn"], seen
        print(type(multiprocessing.spawn.__loader__).__name__)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "SourceFileLoader"


# --- procsafe's wrappers follow a copy of multiprocessing loaded later -------------------


@pytest.fixture
def fresh_copy(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], ModuleType]:
    """Load a second copy of a multiprocessing module, as after pytester's in-process run
    dropped the first from ``sys.modules``; the original is put back afterwards."""

    def load(name: str) -> ModuleType:
        package, _, attribute = name.rpartition(".")
        original = importlib.import_module(name)
        monkeypatch.setitem(sys.modules, name, original)  # put back at the end
        monkeypatch.setattr(sys.modules[package], attribute, original)
        del sys.modules[name]
        return importlib.import_module(name)

    return load


def test_the_start_wrapper_follows_a_new_copy_of_the_process_module(
    fresh_copy: Callable[[str], ModuleType],
) -> None:
    from pytest_procsafe import _births

    undo = _births.listen(lambda pid, where, direct: None)
    try:
        module = fresh_copy("multiprocessing.process")
        assert getattr(module.BaseProcess.start, "_procsafe_births", False)
    finally:
        undo()
    # This run's own leak checks listen too: the copy stays wrapped while they do.


def test_the_preparation_data_wrapper_follows_a_new_copy_of_spawn(
    fresh_copy: Callable[[str], ModuleType], fresh_spawnhook: None
) -> None:
    from pytest_procsafe import _spawnhook

    undo = _spawnhook.carry("probe", lambda: "here")
    try:
        module = fresh_copy("multiprocessing.spawn")
        assert _spawnhook.installed()
        data = module.get_preparation_data("probe")
        assert data[_spawnhook.KEY]["probe"] == "here"
    finally:
        undo()
    assert not isinstance(module.get_preparation_data, _spawnhook._Wrapper)  # undone


def test_the_registrations_follow_a_new_copy_of_the_resource_tracker(
    fresh_copy: Callable[[str], ModuleType],
) -> None:
    from pytest_procsafe import _registrations

    undo = _registrations._listen()
    try:
        module = fresh_copy("multiprocessing.resource_tracker")
        assert getattr(module.register, "_procsafe", False)
    finally:
        undo()
