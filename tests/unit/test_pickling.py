"""Unit tests of `_pickling`, `_picklewalk` and `_picklenote`, with real objects.

The walk must name the innermost part that fails to pickle with multiprocessing's own
pickler, pickle as a start would (locks and queues pickle while a child is launched, not
elsewhere), leave nothing behind (no duplicated descriptor, no resource sharer thread),
stay within its limits, and never run when nothing failed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import io
import os
import pickle
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing import context as mp_context_module
from multiprocessing import reduction
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import pytest

from pytest_procsafe import _payload
from pytest_procsafe import _picklenote
from pytest_procsafe import _picklewalk
from pytest_procsafe import _pickling
from pytest_procsafe._payload import Payload
from pytest_procsafe._payload import PayloadError
from pytest_procsafe._picklewalk import Culprit
from pytest_procsafe._picklewalk import Root
from pytest_procsafe._workers import WorkerGroup

WAIT = 60.0  # generous: only a broken child ever takes this long
SPAWNING = pytest.mark.procsafe(start_methods="spawn forkserver")


def nothing(*args: object, **kwargs: object) -> None:
    """A module-level target: it pickles by reference."""


class Box:
    def __init__(self) -> None:
        self.lock = threading.Lock()


class Holder:
    def __init__(self) -> None:
        self.inner = [1, {"k": Box()}]


class Slotted:
    __slots__ = ("lock", "name")

    def __init__(self) -> None:
        self.name = "slotted"
        self.lock = threading.Lock()


class OwnState:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {"held": self.lock}


class OwnReduce:
    def __init__(self, lock: object) -> None:
        self.lock = lock

    def __reduce__(self) -> tuple[type[OwnReduce], tuple[object]]:
        return (OwnReduce, (self.lock,))


class Cycle:
    def __init__(self) -> None:
        self.me = self
        self.lock = threading.Lock()

    def check(self) -> bool:
        return self.lock.locked()


def flat(text: str) -> str:
    """*text* on one line: a note is wrapped for the terminal."""
    return " ".join(text.split())


def walk(roots: list[Root], *, spawning: bool = True) -> Culprit | None:
    """The walk a failed process start makes, with multiprocessing's pickler."""
    found = _picklewalk.Walk(
        reduction.ForkingPickler, protocol=None, by_value=False, spawning=spawning
    ).first(roots)
    return found


def _local_class_instance() -> object:
    class Local:
        pass

    return Local()


def _generator() -> Iterator[int]:
    yield 1


def _cases() -> list[Any]:
    box = Box()

    def local() -> None:
        pass

    return [
        pytest.param([Root("target", local)], "target", "the local function", id="local"),
        pytest.param(
            [Root("target", lambda: 0)],
            "target",
            "a lambda (_cases.<locals>.<lambda>",
            id="lambda",
        ),
        pytest.param(
            [Root("args[0]", 1), Root("args[1]", box)],
            "args[1].lock",
            "a threading.Lock",
            id="attribute",
        ),
        pytest.param(
            [Root("args[0]", Holder())],
            "args[0].inner[1]['k'].lock",
            "threading.Lock",
            id="nested",
        ),
        pytest.param(
            [Root("kwargs['conn']", sqlite3.connect(":memory:"))],
            "kwargs['conn']",
            "a sqlite3.Connection",
            id="connection",
        ),
        pytest.param([Root("args[0]", Slotted())], "args[0].lock", "threading.Lock", id="slots"),
        pytest.param(
            [Root("args[0]", OwnState())],
            "args[0].__getstate__()['held']",
            "threading.Lock",
            id="getstate",
        ),
        pytest.param(
            [Root("args[0]", OwnReduce(threading.RLock()))],
            f"args[0].__reduce_ex__({pickle.DEFAULT_PROTOCOL})[1][0]",
            "a threading.RLock",
            id="reduce",
        ),
        pytest.param(
            [Root("target", functools.partial(nothing, 1, box))],
            "target.args[1].lock",
            "threading.Lock",
            id="partial",
        ),
        pytest.param(
            [Root("target", Cycle().check)],
            "target.__self__.lock",
            "threading.Lock",
            id="method-and-cycle",
        ),
        pytest.param(
            [Root("args[0]", _local_class_instance())],
            "args[0].__class__",
            "the local class _local_class_instance.<locals>.Local",
            id="local-class",
        ),
        pytest.param([Root("args[0]", io)], "args[0]", "the module io", id="module"),
        pytest.param(
            [Root("args[0]", _generator())], "args[0]", "the generator _generator", id="generator"
        ),
    ]


@pytest.mark.parametrize(("roots", "path", "what"), _cases())
def test_the_walk_names_the_innermost_part_that_fails(
    roots: list[Root], path: str, what: str
) -> None:
    found = walk(roots)
    assert found is not None
    assert found.path == path
    assert what in _picklenote.describe(found.obj)
    assert found.complete


def test_an_open_file_is_named_with_its_path(tmp_path: Path) -> None:
    with open(tmp_path / "data.txt", "w") as file:
        found = walk([Root("args[0]", ["ok", file])])
        assert found is not None
        assert found.path == "args[0][1]"
        note = flat(_picklenote.compose(found, "start", "spawn"))
    assert f"an open file {str(tmp_path / 'data.txt')!r}" in note
    assert "pass the file's path" in note


def test_a_pytest_object_is_named_as_such_not_walked_into(request: pytest.FixtureRequest) -> None:
    found = walk([Root("args[0]", request)])
    assert found is not None
    assert found.path == "args[0]"  # not args[0]._pyfuncitem.session.config...
    note = flat(_picklenote.compose(found, "start", "spawn"))
    assert "a pytest.FixtureRequest (pytest's own)" in note
    assert "pytest's objects stay in the test process" in note


def test_what_pickles_is_never_blamed() -> None:
    assert walk([Root("target", nothing), Root("args[0]", [1, "two", {"three": 3.0}])]) is None


@SPAWNING
def test_while_launching_multiprocessing_locks_and_queues_pickle(mp_context: BaseContext) -> None:
    lock, queue = mp_context.Lock(), mp_context.Queue()
    try:
        roots = [Root("args[0]", lock), Root("args[1]", queue), Root("args[2]", Box())]
        found = walk(roots, spawning=True)
        assert found is not None
        assert found.path == "args[2].lock"
        # Outside a launch (a Pool task) the multiprocessing lock itself is the culprit.
        found = walk(roots, spawning=False)
        assert found is not None
        assert found.path == "args[0]"
        assert "through inheritance" in found.error
        note = flat(_picklenote.compose(found, "task", None))
        assert "reaches a child only as the child starts" in note
    finally:
        queue.close()
        queue.join_thread()


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 lets a fork-context lock into a spawn child"
)
def test_a_lock_of_the_fork_context_is_the_culprit_of_a_spawn_start() -> None:
    lock = mp_context_module._default_context.get_context("fork").Lock()
    found = walk([Root("args[0]", lock)], spawning=True)
    assert found is not None
    assert found.path == "args[0]"
    note = flat(_picklenote.compose(found, "start", "spawn"))
    assert "A SemLock created in a fork context" in note
    assert "make it from the context the process starts with" in note


def test_a_registered_reducer_counts() -> None:
    class Registered:
        lock = threading.Lock()

    reduction.register(Registered, lambda obj: (Box.__new__, (Box,)))
    try:
        found = walk([Root("args[0]", Registered()), Root("args[1]", Box())])
    finally:
        del reduction.ForkingPickler._extra_reducers[Registered]  # type: ignore[attr-defined]
    assert found is not None
    assert found.path == "args[1].lock"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


@pytest.mark.parametrize("spawning", [True, False], ids=["launch", "task"])
def test_the_walk_hands_nothing_on_and_restores_the_launch(
    mp_context: BaseContext, spawning: bool
) -> None:
    left, right = mp_context.Pipe()
    try:
        gc.collect()  # descriptors of earlier tests' garbage close now, not during the walk
        threads, fds = threading.active_count(), _open_fds()
        before = mp_context_module.get_spawning_popen()
        found = walk([Root("args[0]", left), Root("kwargs['x']", Box())], spawning=spawning)
        assert found is not None
        assert found.path == "kwargs['x'].lock"
        assert mp_context_module.get_spawning_popen() is before
        assert threading.active_count() == threads  # no resource sharer thread
        assert _open_fds() <= fds  # no descriptor duplicated
    finally:
        left.close()
        right.close()


def test_a_closed_connection_is_the_culprit(mp_context: BaseContext) -> None:
    left, right = mp_context.Pipe()
    left.close()
    right.close()
    found = walk([Root("args[0]", left)])
    assert found is not None
    assert found.path == "args[0]"


def test_the_walk_stops_at_its_limits() -> None:
    many = [*range(_picklewalk.MAX_PARTS + 50), threading.Lock()]
    found = walk([Root("args[0]", many)])
    assert found is not None
    assert (found.path, found.complete) == ("args[0]", False)
    note = flat(_picklenote.compose(found, "start", "spawn"))
    assert "procsafe stopped looking there" in note

    deep: list[object] = [threading.Lock()]
    for _ in range(_picklewalk.MAX_DEPTH * 2):
        deep = [deep]
    found = walk([Root("args[0]", deep)])
    assert found is not None
    assert not found.complete
    assert found.path.count("[0]") == _picklewalk.MAX_DEPTH + 1


LOCK = threading.Lock()


def test_by_value_the_walk_looks_into_closures_globals_and_defaults() -> None:
    lock = threading.Lock()

    def closure() -> bool:
        return lock.locked()

    def uses_global() -> bool:
        return LOCK.locked()

    def defaults(held: object = lock) -> object:
        return held

    _, launches = _payload._picklers()
    for target, path, hint in [
        (closure, "target.__closure__[0].cell_contents", "the closure variable 'lock'"),
        (uses_global, "target.__globals__['LOCK']", "the global 'LOCK' it uses"),
        (defaults, "target.__defaults__[0]", None),
    ]:
        walker = _picklewalk.Walk(
            launches, protocol=pickle.HIGHEST_PROTOCOL, by_value=True, spawning=True
        )
        found = walker.first([Root("target", target)])
        assert found is not None
        assert (found.path, found.hint) == (path, hint)


@SPAWNING
def test_a_failed_start_carries_the_note(mp_context: BaseContext, mp_start_method: str) -> None:
    def local_function() -> None:
        pass

    process = mp_context.Process(target=local_function)  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="local_function") as info:
        process.start()
    notes = [n for n in getattr(info.value, "__notes__", []) if n.startswith("procsafe: ")]
    assert len(notes) == 1
    note = flat(notes[0])
    assert note.startswith(
        "procsafe: target cannot be pickled: the local function "
        "test_a_failed_start_carries_the_note.<locals>.local_function"
    )
    assert f"under {mp_start_method}, a process starts as a fresh interpreter" in note
    assert "fork copies the parent's memory" in note
    assert "Python 3.14 made forkserver" in note
    assert "define it at the top level of a module" in note
    assert "mp_process" in note
    # Asked again (as the report hook does), it is not added twice.
    assert _pickling.explain(info.value) is None
    notes = getattr(info.value, "__notes__", [])
    assert len([n for n in notes if n.startswith("procsafe: ")]) == 1


def test_explain_start_under_fork_adds_nothing() -> None:
    fork = mp_context_module._default_context.get_context("fork")
    process = fork.Process(target=nothing)
    exc = pickle.PicklingError("cannot pickle it")
    _pickling.explain_start(process, exc)
    assert not getattr(exc, "__notes__", None)


def test_a_pool_initializer_is_named_as_such() -> None:
    from multiprocessing import pool

    spawn = mp_context_module._default_context.get_context("spawn")
    process = spawn.Process(
        target=pool.worker,  # type: ignore[attr-defined]  # not in the stubs
        args=(None, None, lambda: None, (1, threading.Lock()), None, False),
    )
    found = walk(_pickling._process_roots(process))
    assert found is not None
    assert (found.path, found.hint) == ("initializer", "the initializer of a Pool")


def _noop_worker(payload: Payload) -> None:
    pass


@SPAWNING
def test_a_worker_payload_explains_itself(mp_context: BaseContext) -> None:
    lock = threading.Lock()

    def holds_a_lock() -> bool:
        return lock.locked()

    process = mp_context.Process(target=_noop_worker, args=(Payload(holds_a_lock),))  # type: ignore[attr-defined]
    with pytest.raises(PayloadError) as info:
        process.start()
    assert info.value.procsafe_note is not None
    note = flat(info.value.procsafe_note)
    assert note.startswith(
        "procsafe: target.__closure__[0].cell_contents cannot be pickled: a threading.Lock "
        "(the closure variable 'lock')"
    )
    assert "with cloudpickle: closures, lambdas and local functions travel" in note
    # The start wrapper leaves a payload's failure to its owner: no second note.
    assert not getattr(info.value, "__notes__", None)


def _notes(call: Callable[[], object]) -> list[str]:
    """The procsafe notes on what *call* raises, once `_pickling.explain` has looked."""
    with pytest.raises(Exception) as info:  # noqa: PT011  # whatever the pickler raised
        call()
    exc = info.value
    assert _pickling.explain(exc) is None  # shown as a note (3.11+, the 3.10 backport)
    notes = [flat(n) for n in getattr(exc, "__notes__", []) if n.startswith("procsafe: ")]
    # A pool's result (a future) and its exception's traceback hold each other: break the
    # cycle, or the pool's semaphores outlive the test until the next collection.
    exc.__traceback__ = None
    return notes


def test_a_pool_task_is_explained_from_its_traceback(mp_context: BaseContext) -> None:
    def local_task() -> None:
        pass

    with mp_context.Pool(1) as pool:
        applied = _notes(lambda: pool.apply_async(local_task).get(WAIT))
        mapped = _notes(lambda: pool.map(nothing, [1, 2, Box(), 4], chunksize=2))
        pool.close()
        pool.join()
    (note,) = applied
    assert note.startswith("procsafe: func cannot be pickled: the local function")
    assert "tasks are pickled under every start method, fork included" in note
    assert "a pool cannot carry closures or lambdas" in note
    (note,) = mapped
    assert note.startswith(
        "procsafe: item.lock cannot be pickled: a threading.Lock (in item: an item of the "
        "iterable given to map (chunk 1, position 0))"
    )


def test_an_executor_task_is_explained_from_its_traceback(mp_context: BaseContext) -> None:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp_context) as executor:
        notes = _notes(lambda: executor.submit(nothing, 1, lock=threading.Lock()).result(WAIT))
    (note,) = notes
    assert note.startswith("procsafe: kwargs['lock'] cannot be pickled: a threading.Lock")


def test_other_failures_get_no_note() -> None:
    for exc in (ValueError("no"), TypeError("cannot pickle it"), KeyError("pickle")):
        assert _pickling.explain(exc) is None
        assert not getattr(exc, "__notes__", None)


def _module_level_square(x: int) -> int:
    return x * x


@SPAWNING
def test_nothing_is_walked_when_nothing_failed(
    mp_context: BaseContext, mp_process: WorkerGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[object] = []
    monkeypatch.setattr(_picklewalk.Walk, "first", lambda *args: walked.append(args))
    process = mp_context.Process(target=time.sleep, args=(0,))  # type: ignore[attr-defined]
    process.start()
    process.join(WAIT)
    assert process.exitcode == 0
    assert mp_process(_module_level_square, 7).result() == 49
    assert walked == []


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="Python 3.11+ always shows notes")
def test_on_310_a_note_the_traceback_would_not_show_is_handed_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import traceback

    def local_function() -> None:
        pass

    spawn = mp_context_module._default_context.get_context("spawn")
    with pytest.raises(Exception, match="local_function") as info:
        spawn.Process(target=local_function).start()
    # As when another excepthook kept the exceptiongroup backport from patching traceback.
    monkeypatch.setattr(
        traceback, "format_exception_only", lambda kind, value: [f"{kind.__name__}: {value}\n"]
    )
    shown = _pickling.explain(info.value)
    assert shown is not None
    assert flat(shown).startswith("procsafe: target cannot be pickled: the local function")


@SPAWNING
def test_a_payload_no_part_of_which_is_named_gets_no_second_guess(
    mp_context: BaseContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the start wrapper to walk the process object itself, it would blame the
    # payload (args[0]), which is procsafe's own, not the user's.
    monkeypatch.setattr(_pickling, "worker_note", lambda *args: None)
    lock = threading.Lock()
    payload = Payload(lock.locked)
    process = mp_context.Process(target=_noop_worker, args=(payload,))  # type: ignore[attr-defined]
    with pytest.raises(PayloadError) as info:
        process.start()
    assert info.value.procsafe_note is None
    assert not getattr(info.value, "__notes__", None)
    assert _pickling.explain(info.value) is None
    assert not getattr(info.value, "__notes__", None)


def _rebound() -> None:
    pass


_original_rebound = _rebound


def _rebound() -> None:  # type: ignore[no-redef]  # the name now means another function
    pass


@SPAWNING
def test_a_local_process_class_and_a_rebound_function_are_named(mp_context: BaseContext) -> None:
    class LocalProcess(mp_context.Process):  # type: ignore[misc,name-defined]
        pass

    with pytest.raises(Exception, match="LocalProcess") as info:
        LocalProcess(target=nothing).start()
    (note,) = (flat(n) for n in getattr(info.value, "__notes__", []))
    assert note.startswith(
        "procsafe: type(process) cannot be pickled: the local class "
        "test_a_local_process_class_and_a_rebound_function_are_named.<locals>.LocalProcess "
        "(the class of the process object)"
    )
    process = mp_context.Process(target=_original_rebound)  # type: ignore[attr-defined]
    with pytest.raises(pickle.PicklingError) as caught:
        process.start()
    (note,) = (flat(n) for n in getattr(caught.value, "__notes__", []))
    assert note.startswith(f"procsafe: target cannot be pickled: the function {__name__}._rebound")
    assert f"make {__name__}._rebound name this very object" in note
