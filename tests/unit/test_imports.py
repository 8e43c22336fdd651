from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import os
import pickle
import sys
import textwrap
import types
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing import spawn
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import pytest

from pytest_procsafe import _imports
from pytest_procsafe import _spawnhook
from pytest_procsafe._imports import Entry

WAIT = 60.0  # generous: only a broken child ever takes this long
children_only = pytest.mark.procsafe(start_methods="spawn forkserver")

HELPER = """\
import os


def whoami(tag):
    return (tag, __name__, os.path.basename(__file__))


def nested(method):
    # A child starting its own child: the map must travel one generation further.
    import multiprocessing

    with multiprocessing.get_context(method).Pool(1) as pool:
        return pool.apply(whoami, ("grandchild",))
"""


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


# --- collecting the map -----------------------------------------------------------------


def test_collect_maps_files_outside_stdlib_and_site_packages(tmp_path: Path) -> None:
    plain = tmp_path / "plain_mod.py"
    plain.write_text("")
    init = tmp_path / "pkg" / "__init__.py"
    init.parent.mkdir()
    init.write_text("")
    modules: dict[str, types.ModuleType | None] = {
        "plain_mod": _module("plain_mod", __file__=str(plain)),
        "pkg": _module("pkg", __file__=str(init), __path__=[str(init.parent)]),
        "os": os,
        "pytest": pytest,
        "ns": _module("ns", __file__=None, __path__=[str(tmp_path / "ns")]),
        "ns_elsewhere": _module("ns_elsewhere", __file__=None, __path__=list(pytest.__path__)),
        "gone": _module("gone", __file__=str(tmp_path / "deleted.py")),
        "broken": None,
        "__main__": _module("__main__", __file__=str(plain)),
    }

    entries = _imports.collect(modules)

    assert entries == {
        "plain_mod": Entry(str(plain), None),
        "pkg": Entry(str(init), (str(init.parent),)),
        "ns": Entry(None, (str(tmp_path / "ns"),)),
    }


def test_collect_skips_aliases_and_fills_in_placeholder_parents(tmp_path: Path) -> None:
    leaf = tmp_path / "leaf.py"
    leaf.write_text("")
    real = _module("deep.er.leaf", __file__=str(leaf))
    real.__spec__ = importlib.util.spec_from_file_location("deep.er.leaf", leaf)
    alias = _module("alias", __file__=str(leaf))
    alias.__spec__ = real.__spec__
    # pytest's importlib mode creates parents like this one: no file, no __path__.
    placeholder = _module("deep.er")

    entries = _imports.collect({"deep.er.leaf": real, "deep.er": placeholder, "alias": alias})

    assert entries == {
        "deep.er.leaf": Entry(str(leaf), None),
        "deep.er": Entry(None, ()),
        "deep": Entry(None, ()),
    }


def test_collect_never_shadows_a_real_parent_package() -> None:
    child = _module("pytest.procsafe_extra", __file__=__file__)
    entries = _imports.collect({"pytest": pytest, "pytest.procsafe_extra": child})
    assert entries == {"pytest.procsafe_extra": Entry(__file__, None)}


def test_collect_includes_this_test_module_but_not_stdlib_or_site_packages() -> None:
    entries = _imports.collect()
    assert entries[__name__] == Entry(__file__, None)
    assert "os" not in entries
    assert "pytest" not in entries
    assert "cloudpickle" not in entries


# --- the finder -------------------------------------------------------------------------


def test_the_finder_builds_specs_for_modules_packages_and_namespaces(tmp_path: Path) -> None:
    (tmp_path / "mod.py").write_text("VALUE = 'module'\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("VALUE = 'package'\n")
    finder = _imports.Finder(
        {
            "m": Entry(str(tmp_path / "mod.py"), None),
            "p": Entry(str(tmp_path / "pkg" / "__init__.py"), (str(tmp_path / "pkg"),)),
            "n": Entry(None, (str(tmp_path),)),
        }
    )

    assert finder.find_spec("unknown") is None
    for name, kind in [("m", "module"), ("p", "package")]:
        spec = finder.find_spec(name)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert (name, module.VALUE) == (name, kind)
    package = finder.find_spec("p")
    assert package is not None
    assert package.submodule_search_locations == [str(tmp_path / "pkg")]
    namespace = finder.find_spec("n")
    assert namespace is not None
    assert namespace.loader is None
    assert namespace.submodule_search_locations == [str(tmp_path)]


# --- preparation data -------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_spawnhook")
def test_install_adds_a_stowaway_and_uninstall_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    def base(name: str) -> dict[str, Any]:
        return {"name": name}

    monkeypatch.setattr(spawn, "get_preparation_data", base)
    uninstall = _imports.install()
    data = spawn.get_preparation_data("x")
    assert data["name"] == "x"
    state = data[_spawnhook.KEY][_imports.RIDER].__getstate__()
    assert state["entries"][__name__] == (__file__, None)

    uninstall()

    assert spawn.get_preparation_data is base


def test_the_stowaway_is_cheap_until_pickled_and_unpickles_into_a_finder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed: list[dict[str, Entry]] = []
    monkeypatch.setattr(_imports, "install_finder", installed.append)
    carried: list[str] = []
    monkeypatch.setattr(_imports, "install", lambda: carried.append("again"))
    stowaway = _imports._Stowaway()

    pickle.loads(pickle.dumps(stowaway))

    assert installed[0][__name__] == Entry(__file__, None)
    assert carried == ["again"]  # the child passes it on to its own children


# --- real children ----------------------------------------------------------------------


@pytest.fixture
def outside_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], types.ModuleType]]:
    """Import modules from a directory that is not on sys.path (in parent nor child)."""
    before = set(sys.modules)
    root = tmp_path / "outside"
    root.mkdir()
    # A namespace package with a plain module inside, named uniquely per test.
    package = f"procsafe_ns_{os.getpid()}_{id(root)}"
    (root / package).mkdir()
    (root / package / "helper.py").write_text(textwrap.dedent(HELPER))

    def load(name: str) -> types.ModuleType:
        sys.path.insert(0, str(root))
        try:
            importlib.invalidate_caches()
            return importlib.import_module(f"{package}.{name}")
        finally:
            sys.path.remove(str(root))

    yield load
    for name in set(sys.modules) - before:
        if name.startswith(package):
            monkeypatch.delitem(sys.modules, name)


@children_only
def test_a_plain_process_finds_modules_from_outside_sys_path(
    mp_context: BaseContext, outside_sys_path: Callable[[str], types.ModuleType]
) -> None:
    helper = outside_sys_path("helper")
    queue = mp_context.Queue()
    process = mp_context.Process(target=_put_result, args=(queue, helper.whoami, "child"))  # type: ignore[attr-defined]
    process.start()
    try:
        assert queue.get(timeout=WAIT) == ("child", helper.__name__, "helper.py")
    finally:
        process.join(WAIT)
        queue.close()
        queue.join_thread()
    assert process.exitcode == 0


def _put_result(queue: Any, function: Callable[[str], object], tag: str) -> None:
    queue.put(function(tag))


@children_only
def test_pool_and_process_pool_executor_find_them_too(
    mp_context: BaseContext, outside_sys_path: Callable[[str], types.ModuleType]
) -> None:
    helper = outside_sys_path("helper")
    expected = ("pool", helper.__name__, "helper.py")
    with mp_context.Pool(1) as pool:
        assert pool.apply(helper.whoami, ("pool",)) == expected
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp_context) as executor:
        assert executor.submit(helper.whoami, "pool").result(WAIT) == expected
        # ... and one generation further: the worker's own pool resolves the module too.
        # (A spawn pool: a forkserver one would leave its server orphaned by the worker.)
        nested = executor.submit(helper.nested, "spawn").result(WAIT)
    assert nested == ("grandchild", helper.__name__, "helper.py")
