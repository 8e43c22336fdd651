"""Unit tests of `_holders`: which Python objects stand for processes, and who holds them.

The holders are real: modules made for the test (registered in ``sys.modules`` for its
duration), real pools and ``Popen`` objects, each stopped by the test.
"""

from __future__ import annotations

import gc
import multiprocessing
import subprocess
import sys
import types
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_procsafe import _holders

WAIT = 30.0
SLEEP = [sys.executable, "-c", "import time; time.sleep(30)"]


class Thing:
    pass


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A user's module, as ``sys.modules`` holds it."""
    made = types.ModuleType("procsafe_holders_probe")
    monkeypatch.setitem(sys.modules, made.__name__, made)
    return made


@pytest.fixture
def popen() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(SLEEP)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait(WAIT)


def test_objects_finds_processes_by_what_they_stand_for(
    popen: Callable[[], subprocess.Popen[bytes]],
) -> None:
    process = popen()
    pool = multiprocessing.get_context("fork").Pool(1)
    try:
        found = _holders.objects()
        assert found.processes[process.pid] is process
        (worker,) = pool._pool  # type: ignore[attr-defined]
        assert found.processes[worker.pid] is worker
        assert pool in found.pools
        assert found.name(worker.pid) == f"{worker.name} of a multiprocessing.pool.Pool"
        assert found.name(process.pid) is None  # a Popen: its args are its command line
    finally:
        pool.terminate()
        pool.join()


def test_a_dead_weak_proxy_does_not_break_either_walk(
    module: types.ModuleType, popen: Callable[[], subprocess.Popen[bytes]]
) -> None:
    # Common in real code: isinstance() on a dead proxy raises ReferenceError.
    thing = Thing()
    proxies = [weakref.proxy(thing)]
    setattr(module, "PROXIES", proxies)  # noqa: B010
    del thing
    with pytest.raises(ReferenceError):
        isinstance(proxies[0], subprocess.Popen)  # what a naive walk trips over
    process = popen()
    setattr(module, "PROCESS", process)  # noqa: B010
    assert _holders.objects().processes[process.pid] is process
    assert _holders.holders({"p": process}) == {"p": "procsafe_holders_probe.PROCESS"}


#: Each way a user's module or class holds a process, and the holder's name for it.
HOLDS = pytest.mark.parametrize(
    ("hold", "name"),
    [
        (lambda m, p: setattr(m, "SERVER", p), "procsafe_holders_probe.SERVER"),
        (lambda m, p: setattr(m, "LAZY", {"p": p}), "procsafe_holders_probe.LAZY['p']"),
        (lambda m, p: setattr(m, "ALL", [Thing(), [p]]), "procsafe_holders_probe.ALL[1][0]"),
        (lambda m, p: setattr(m, "box", _box(p)), "procsafe_holders_probe.box"),
        (lambda m, p: setattr(m, "run", _closure(p)), "procsafe_holders_probe.run"),
        (lambda m, p: setattr(_Holder, "kept", p), "_Holder.kept"),
    ],
    ids=["attribute", "dict", "nested-list", "instance", "closure", "class"],
)


@HOLDS
def test_a_holder_is_named_as_a_user_writes_it(
    module: types.ModuleType,
    popen: Callable[[], subprocess.Popen[bytes]],
    hold: Callable[[types.ModuleType, Any], None],
    name: str,
) -> None:
    process = popen()
    hold(module, process)
    try:
        assert _holders.holders({"p": process}) == {"p": name}
    finally:
        _Holder.kept = None


class _Holder:
    kept: Any = None


@HOLDS
def test_the_next_process_a_holder_keeps_is_found_without_a_walk_up(
    module: types.ModuleType,
    popen: Callable[[], subprocess.Popen[bytes]],
    hold: Callable[[types.ModuleType, Any], None],
    name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reusable executor starts new processes in later tests: the holder found for the
    first is looked under first for the next, and names it the same way."""
    hints = _holders.Hints()
    try:
        hold(module, popen())
        first = _held(module)
        assert _holders.holders({"p": first}, hints=hints) == {"p": name}
        hold(module, popen())  # the holder's next process replaces the first
        assert _held(module) is not first
        walks: list[int] = []
        get_referrers = gc.get_referrers

        def counted(*objs: Any) -> list[Any]:
            walks.append(len(objs))
            return get_referrers(*objs)

        monkeypatch.setattr(gc, "get_referrers", counted)
        assert _holders.holders({"p": _held(module)}, hints=hints) == {"p": name}
        assert walks == []
        # A hint whose attribute is gone finds nothing: the walk up runs and finds nothing.
        for attr in ("SERVER", "LAZY", "ALL", "box", "run"):
            if hasattr(module, attr):
                delattr(module, attr)
        orphan = popen()
        _Holder.kept = None
        assert _holders.holders({"p": orphan}, hints=hints) == {}
        assert walks != []
    finally:
        _Holder.kept = None


def _held(module: types.ModuleType) -> Any:
    """The process *module* (or `_Holder`) keeps, however it keeps it."""
    for attr in ("SERVER", "LAZY", "ALL", "box", "run"):
        value = getattr(module, attr, None)
        if attr == "SERVER" and value is not None:
            return value
        if attr == "LAZY" and value is not None:
            return value["p"]
        if attr == "ALL" and value is not None:
            return value[1][0]
        if attr == "box" and value is not None:
            return value.value
        if attr == "run" and value is not None:
            return value()
    return _Holder.kept


def _box(value: object) -> Thing:
    box = Thing()
    box.value = value  # type: ignore[attr-defined]
    return box


def _closure(value: object) -> Callable[[], object]:
    def run() -> object:
        return value

    return run


def test_what_the_runner_and_a_failure_keep_holds_nothing(
    popen: Callable[[], subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    process = popen()
    local_only = process  # a frame (a failing test's traceback keeps it alive)
    try:
        raise RuntimeError(process)
    except RuntimeError as exc:
        monkeypatch.setattr(sys, "last_value", exc, raising=False)  # the interpreter's
    monkeypatch.setattr(multiprocessing, "_procsafe_probe", [process], raising=False)  # stdlib
    assert _holders.holders({"p": local_only}) == {}


def test_a_cache_saves_a_second_search() -> None:
    cache: dict[Any, str | None] = {("p", 1.0): "mod.attr"}
    assert _holders.held_by({"p": object()}, cache, key=lambda k: (k, 1.0)) == {"p": "mod.attr"}


def test_a_managers_proxy_uses_it_without_holding_it(module: types.ModuleType) -> None:
    # joblib's tests pass manager.dict() to loky, which keeps the arguments of its last
    # executor in a module global: the test that started the manager still leaked it.
    manager = multiprocessing.get_context("fork").Manager()
    try:
        setattr(module, "LAST_KWARGS", {"initargs": (manager.dict(),)})  # noqa: B010
        process = manager._process  # type: ignore[attr-defined]
        assert _holders.holders({"m": process}) == {}
        setattr(module, "MANAGER", manager)  # noqa: B010  # holding the manager itself does
        assert _holders.holders({"m": process}) == {"m": "procsafe_holders_probe.MANAGER"}
    finally:
        manager.shutdown()
