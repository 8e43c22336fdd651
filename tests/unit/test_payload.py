from __future__ import annotations

import functools
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

import pytest

from pytest_procsafe import _payload
from pytest_procsafe._payload import Payload
from pytest_procsafe._payload import PayloadError

WAIT = 60.0  # generous: only a broken child ever takes this long


def _run(payload: Payload, out: Connection) -> None:
    """Child: load the payload, call it, send back what it returned."""
    target, args, kwargs = payload.load()
    out.send(target(*args, **kwargs))
    out.close()


def _run_catching_load_errors(payload: Payload, out: Connection) -> None:
    """Child: report a failed load instead of dying of it."""
    try:
        target, args, kwargs = payload.load()
    except ImportError as exc:
        out.send(("load failed", f"{type(exc).__name__}: {exc}"))
    else:
        out.send(("loaded", target(*args, **kwargs)))
    out.close()


class Children:
    """Starts children for a test and stops every one of them at teardown."""

    def __init__(self, context: BaseContext) -> None:
        self.context = context
        self.started: list[BaseProcess] = []

    def run(self, payload: Payload, runner: object = _run) -> object:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(target=runner, args=(payload, writer))  # type: ignore[attr-defined]
        try:
            process.start()
            self.started.append(process)
        finally:
            writer.close()
        try:
            assert reader.poll(WAIT), "the child sent nothing"
            return reader.recv()
        finally:
            reader.close()
            process.join(WAIT)

    def stop_all(self) -> None:
        for process in self.started:
            if process.exitcode is None:
                process.kill()
            process.join(WAIT)


@pytest.fixture
def children(mp_context: BaseContext) -> Iterator[Children]:
    made = Children(mp_context)
    yield made
    made.stop_all()


def test_fork_pickles_nothing_spawn_refuses_unpicklable_targets_clearly(
    children: Children, mp_start_method: str
) -> None:
    lock = threading.Lock()

    def holds_a_lock() -> bool:
        return lock.locked()

    payload = Payload(holds_a_lock)
    if mp_start_method == "fork":
        assert children.run(payload) is False
        return
    with pytest.raises(PayloadError) as info:
        children.run(payload)
    message = str(info.value)
    assert "holds_a_lock" in message
    assert "spawn/forkserver" in message
    assert "lock" in message


def test_closures_lambdas_partials_and_local_functions_travel(children: Children) -> None:
    base = 10

    def add(x: int, *, extra: int = 0) -> int:
        return base + x + extra

    assert children.run(Payload(add, (5,), {"extra": 1})) == 16
    assert children.run(Payload(lambda: base * 2)) == 20
    assert children.run(Payload(functools.partial(add, 1), (), {"extra": 2})) == 13


def test_queues_pipes_and_manager_proxies_in_a_closure_travel(
    children: Children, mp_context: BaseContext
) -> None:
    queue = mp_context.Queue()
    left, right = mp_context.Pipe()
    manager = mp_context.Manager()
    try:
        shared = manager.list()

        def talk() -> str:
            queue.put("via queue")
            right.send("via pipe")
            shared.append("via manager")
            return "done"

        assert children.run(Payload(talk)) == "done"
        assert queue.get(timeout=WAIT) == "via queue"
        assert left.poll(WAIT)
        assert left.recv() == "via pipe"
        assert list(shared) == ["via manager"]
    finally:
        manager.shutdown()
        queue.close()
        queue.join_thread()
        left.close()
        right.close()


@pytest.mark.procsafe(start_methods="spawn forkserver")
def test_the_child_loads_the_target_lazily(
    children: Children, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that exists only in this process: the child can unpickle the process
    # object, and only the payload's own load() meets the missing module.
    ghost = types.ModuleType("procsafe_ghost_module")
    exec("def haunt():\n    return 'boo'\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, "procsafe_ghost_module", ghost)

    reply = children.run(Payload(ghost.haunt), runner=_run_catching_load_errors)

    assert reply == (
        "load failed",
        "ModuleNotFoundError: No module named 'procsafe_ghost_module'",
    )


def test_a_payload_only_pickles_while_a_child_is_launched() -> None:
    def target() -> None:
        return None

    with pytest.raises(PayloadError, match=r"'.*target' can only be pickled while"):
        pickle.dumps(Payload(target))


def test_code_objects_keep_their_file_and_line() -> None:
    def local() -> int:
        return 1

    clone = pickle.loads(_payload.dumps(local))

    assert clone() == 1
    assert clone.__code__.co_filename == __file__
    assert clone.__code__.co_firstlineno == local.__code__.co_firstlineno


def test_connections_cannot_be_sent_back_from_a_worker(mp_context: BaseContext) -> None:
    # Outside a launch a connection cannot travel: plain pickling would send a bare
    # descriptor number, multiprocessing's reducer a resource-sharer thread.
    left, right = mp_context.Pipe()
    try:
        with pytest.raises(TypeError, match="Connection can only reach a worker as it starts"):
            _payload.dumps({"end": left})
    finally:
        left.close()
        right.close()


def test_a_target_must_be_callable() -> None:
    with pytest.raises(TypeError, match="a worker target must be callable, got 42"):
        Payload(42)  # type: ignore[arg-type]


class _Callable:
    def __call__(self) -> None:
        return None


@pytest.mark.parametrize(
    ("target", "name"),
    [
        (len, "len"),
        (lambda: None, "<lambda>"),
        (functools.partial(pickle.dumps, 1), "dumps"),
        (_Callable(), "_Callable"),
        (test_a_target_must_be_callable, "test_a_target_must_be_callable"),
    ],
)
def test_describe_names_targets_briefly(target: object, name: str) -> None:
    assert _payload.describe(target).rpartition(".")[2] == name
