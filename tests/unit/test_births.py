"""Unit tests of `_births` and `_machinery`: where children come from, and what never leaks."""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator

import pytest
from leakkit import ROOT
from leakkit import WAIT
from leakkit import proc
from leakkit import wait_until

from pytest_procsafe import _births
from pytest_procsafe import _machinery
from pytest_procsafe import _proctable
from pytest_procsafe._ledger import Owner
from pytest_procsafe._tracker import Tracker

pytestmark = pytest.mark.skipif(not _proctable.LINUX, reason="procfs and subreaper: Linux")

HERE = os.path.relpath(__file__)


@pytest.fixture
def heard() -> Iterator[list[tuple[int, str | None, bool]]]:
    calls: list[tuple[int, str | None, bool]] = []
    undo = _births.listen(lambda pid, where, direct: calls.append((pid, where, direct)))
    yield calls
    undo()


def _line() -> int:
    return sys._getframe(1).f_lineno


def test_where_is_the_users_line() -> None:
    line = _line() + 1
    assert _births.where(0) == f"{HERE}:{line}"


def test_a_posix_spawn_child_is_a_direct_one_from_this_line(
    heard: list[tuple[int, str | None, bool]],
) -> None:
    line = _line() + 1
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], dict(os.environ))
    try:
        assert (pid, f"{HERE}:{line}", True) in heard
    finally:
        os.waitpid(pid, 0)


def test_a_multiprocessing_start_is_heard_with_its_line(
    heard: list[tuple[int, str | None, bool]],
) -> None:
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    line = _line() + 1
    process.start()
    try:
        assert (process.pid, f"{HERE}:{line}", False) in heard
    finally:
        process.join(WAIT)


def test_the_object_of_a_heard_start_is_known_by_its_pid_while_it_lives(
    heard: list[tuple[int, str | None, bool]],
) -> None:
    process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0,))
    process.start()
    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert _births.started(process.pid or -1) is process
        assert _births.started(popen.pid) is popen
    finally:
        process.join(WAIT)
        popen.wait(WAIT)
    pids = (process.pid or -1, popen.pid)
    del process, popen
    gc.collect()
    assert [_births.started(pid) for pid in pids] == [None, None]  # nothing kept alive


def test_a_direct_child_no_object_knows_is_leaked_not_an_orphan() -> None:
    # os.posix_spawn, multiprocessing.util.spawnv_passfds: a child of ours from the start.
    previous = _proctable.set_subreaper(True)
    tracker = Tracker()
    owner = Owner("t", "test")
    code = "import time; time.sleep(30)"
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", code], dict(os.environ))
    try:
        tracker.observe(owner, "call")
        found = tracker.classify(tracker.take(owner), later=Owner("session", "session"))
        assert [(item.proc.pid, item.kind) for item in found] == [(pid, "leaked")]
        assert str(found[0].created_at).startswith(f"{HERE}:")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        tracker.close()
        _proctable.set_subreaper(bool(previous))


@pytest.mark.parametrize(
    "command",
    [
        "from multiprocessing.resource_tracker import main;main(3)",
        "from multiprocess.resource_tracker import main;main(3)",
        "from loky.backend.resource_tracker import main; main(5, 0)",
        "from billiard.semaphore_tracker import main;main(3)",
        "from joblib.externals.loky.backend.resource_tracker import main; main(16, False)",
    ],
    ids=["multiprocessing", "multiprocess", "loky", "billiard", "vendored-loky"],
)
def test_the_trackers_of_multiprocessings_relatives_are_machinery(command: str) -> None:
    # Whoever started it, even re-parented to us: a tracker is never a leak.
    child = multiprocessing.get_context("fork").Process(
        target=os.execv,
        args=(sys.executable, [sys.executable, "-c", f"{command}\nimport time; time.sleep(30)"]),
    )
    child.start()
    try:
        assert child.pid is not None
        wait_until(
            lambda: command.split()[1] in " ".join(_proctable.cmdline(child.pid or 0)), "exec"
        )
        assert _machinery.is_machinery(proc(child.pid), set(), ROOT)
    finally:
        child.kill()
        child.join(WAIT)


def _start_popen() -> int | None:
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(WAIT)
    return child.pid


def _start_posix_spawn() -> int | None:
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], dict(os.environ))
    os.waitpid(pid, 0)
    return pid


def _start_system() -> int | None:
    os.system("true")
    return None  # the shell: told as NO_PID


def _start_fork() -> int | None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _start_process(method: str) -> int | None:
    process = multiprocessing.get_context(method).Process(  # type: ignore[attr-defined]
        target=time.sleep, args=(0,)
    )
    process.start()
    process.join(WAIT)
    pid = process.pid
    assert isinstance(pid, int)
    return pid


@pytest.mark.parametrize(
    "start",
    [
        _start_popen,
        _start_posix_spawn,
        _start_system,
        _start_fork,
        *(
            pytest.param(lambda m=m: _start_process(m), id=f"process-{m}")
            for m in ("fork", "spawn", "forkserver")
        ),
    ],
)
def test_before_runs_before_the_child_exists(start: Callable[[], int | None]) -> None:
    """What must hold before a first child (the subreaper) is done before it exists."""
    events: list[tuple[str, object]] = []
    undo_listen = _births.listen(lambda pid, where, direct: events.append(("told", pid)))
    undo = _births.before(lambda: events.append(("before", set(_proctable.children(ROOT)))))
    try:
        pid = start()
    finally:
        undo()
        undo_listen()
    kinds = [kind for kind, _ in events]
    assert kinds, "before was not called"
    assert kinds[0] == "before", events
    if pid is not None:
        assert all(
            isinstance(seen, set) and pid not in seen for kind, seen in events if kind == "before"
        )
        if "told" in kinds:  # every launcher but a plain fork tells its listeners
            assert kinds.index("before") < kinds.index("told")
    else:
        assert ("told", _births.NO_PID) in events
    count = len(events)
    start()  # undone: neither is called again
    assert len(events) == count
