"""Real processes for the leak-check unit tests, each stopped and reaped by its test.

Not a test module: `Kids` is what the tests use to start children, zombies and orphans
and to be sure none of them outlives the test (the suite runs with leak checks on).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import final

import pytest

from pytest_procsafe import _proctable
from pytest_procsafe import _reaper
from pytest_procsafe._proctable import Proc

ROOT = os.getpid()
WAIT = 30.0  # generous: only a broken helper ever waits this long


def proc(pid: int) -> Proc:
    """The process *pid* as it is now (it must exist)."""
    found = _proctable.stat(pid)
    assert found is not None, f"pid {pid} does not exist"
    return found


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {WAIT:g}s")
        time.sleep(0.005)


@final
class Kids:
    """Processes a test started: every one is stopped and reaped at teardown."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.popens: list[subprocess.Popen[bytes]] = []

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        popen = subprocess.Popen(args)
        self.popens.append(popen)
        self.procs.append(proc(popen.pid))
        return popen

    def sleeper(self, seconds: float = 60) -> subprocess.Popen[bytes]:
        return self.popen(sys.executable, "-c", f"import time; time.sleep({seconds})")

    def fork(self, child: Callable[[], object] = lambda: None) -> int:
        """Fork a child that runs *child* then exits; it is not waited for."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                child()
                code = 0
            finally:
                os._exit(code)
        self.procs.append(proc(pid))
        return pid

    def zombie(self) -> int:
        """A child that exited and that nobody waited for."""
        pid = self.fork()
        wait_until(lambda: proc(pid).zombie, f"pid {pid} a zombie")
        return pid

    def orphan(self, seconds: float = 60) -> int:
        """A grandchild whose parent exited (re-parented to us: we are a subreaper)."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(read)
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(write)
                    time.sleep(seconds)
                    os._exit(0)
                os.write(write, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            grandchild = int(pipe.read())
        os.waitpid(pid, 0)
        self.adopt(grandchild)
        wait_until(lambda: proc(grandchild).ppid == ROOT, f"pid {grandchild} re-parented")
        return grandchild

    def adopt(self, pid: int) -> None:
        found = _proctable.stat(pid)
        if found is not None:
            self.procs.append(found)

    def __enter__(self) -> Kids:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop what the test started with everything below it, and reap it."""
        below: dict[int, int] = {}
        with contextlib.closing(_proctable.ProcTable()) as table:
            tree = table.tree()
        started = {child.pid for child in self.procs}
        for pid in tree:
            ancestor: int | None = pid
            while ancestor is not None and ancestor not in started:
                ancestor = tree.get(ancestor)
            if ancestor is not None:
                below[pid] = ancestor
        targets = [p for p in map(_proctable.stat, below) if p is not None]
        _reaper.stop(targets, 0.0, ROOT)
        for popen in self.popens:
            popen.wait(WAIT)


@pytest.fixture(name="kids")
def kids_fixture() -> Iterator[Kids]:
    """A `Kids` whose processes are all stopped and reaped when the test ends."""
    with Kids() as started:
        yield started


def sleep_forever() -> None:
    """A child's target that outlives any test that forgets it (bounded by `WAIT`)."""
    time.sleep(WAIT)


def record(
    pid: int, ppid: int, *, kind: str = "leaked", owner: str = "t.py::t", **more: Any
) -> dict[str, Any]:
    """One leak report record, as the tracker writes it (the report and summary tests)."""
    base: dict[str, Any] = {
        "owner": owner,
        "kind": kind,
        "pid": pid,
        "ppid": ppid,
        "cmdline": ["sleep", str(pid)],
        "phase": "call",
        "action": "killed",
    }
    base.update(more)
    return base
