"""The guardian with real processes: who it stops, when, what it says, what it costs."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import final

import pytest
from leakkit import Kids
from leakkit import kids_fixture  # noqa: F401  (the kids fixture)
from leakkit import proc
from leakkit import wait_until

from pytest_procsafe import _guardian
from pytest_procsafe import _guardlink
from pytest_procsafe import _proctable

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the process table is read from procfs"
)

HOST = Path(__file__).with_name("guardian_host.py")
#: The guardian must have stopped everything this long after the host died.
AFTER = 3.0
GRACE = 0.5


def running(pid: int, start: float) -> bool:
    current = _proctable.stat(pid)
    return current is not None and current.start == start and not current.zombie


@final
class Host:
    """A stand-in pytest (`guardian_host`), with its guardian and the processes it left."""

    def __init__(self, tmp_path: Path, *, keep: bool = False) -> None:
        self._err = open(tmp_path / "host-stderr.txt", "wb")  # noqa: SIM115
        self.err_path = tmp_path / "host-stderr.txt"
        self.process = subprocess.Popen(
            [sys.executable, str(HOST), "keep" if keep else "stop", str(GRACE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
        )
        self.pids: dict[str, int] = {}
        self.starts: dict[str, float] = {}
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        data = b""
        deadline = time.monotonic() + 60
        while not data.endswith(b"ready\n"):
            assert time.monotonic() < deadline, f"the host never got ready: {self.stderr}"
            if select.select([fd], [], [], 1.0)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"the host ended early: {self.stderr}"
                data += chunk
        for line in data.decode().splitlines()[:-1]:
            pid, kind = line.split()
            self.pids[kind] = int(pid)
            self.starts[kind] = proc(int(pid)).start

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def alive(self, kind: str) -> bool:
        return running(self.pids[kind], self.starts[kind])

    def wait_guardian_gone(self, within: float) -> bool:
        deadline = time.monotonic() + within
        while self.alive("guardian") and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.alive("guardian")

    def close(self) -> None:
        """Stop whatever is left, by pid and start time (all of it this test's)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(60)
        for kind in self.pids:
            if self.alive(kind):
                os.kill(self.pids[kind], signal.SIGKILL)
        wait_until(lambda: not any(map(self.alive, self.pids)), "the host's processes gone")
        self._err.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    started = Host(tmp_path)
    yield started
    started.close()


@pytest.fixture
def keeping_host(tmp_path: Path) -> Iterator[Host]:
    started = Host(tmp_path, keep=True)
    yield started
    started.close()


LEFT = ("inherits", "replaced", "own", "stubborn", "grandchild")


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_what_a_dead_pytest_left_is_stopped_and_named(host: Host, kids: Kids, how: str) -> None:
    # Same command line, not the run's: never touched.
    bystander = kids.popen("sleep", "300")
    if how == "sigkill":
        host.process.kill()
    else:
        host.tell("exit")
    host.process.wait(60)
    died = time.monotonic()
    deadline = died + AFTER
    while any(host.alive(kind) for kind in LEFT) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not [kind for kind in LEFT if host.alive(kind)], host.stderr
    assert host.wait_guardian_gone(AFTER), host.stderr
    assert bystander.poll() is None
    err = host.stderr
    assert f"pytest (pid {host.process.pid}) ended without procsafe's cleanup" in err
    assert "stopping 5 processes of its run:" in err, err
    for kind in LEFT:
        assert f"  pid {host.pids[kind]}: " in err, err
    # The shell and its child ignore SIGTERM: killed after the grace, and said so.
    assert f"did not exit within the {GRACE:g}s grace after SIGTERM and were killed" in err


def test_done_leaves_alone_and_exits_at_once(host: Host) -> None:
    host.tell("done")
    assert host.process.wait(60) == 0
    # The host reaped its guardian: gone, and it said nothing.
    assert not host.alive("guardian")
    assert host.stderr == ""


def test_a_cleanup_that_did_not_finish_is_finished_by_the_guardian(host: Host) -> None:
    host.tell("close")  # the pipe closes without "done"; the host lives on
    wait_until(lambda: not any(host.alive(kind) for kind in LEFT), "the run's processes gone")
    assert host.process.poll() is None
    assert f"procsafe's cleanup in pytest (pid {host.process.pid}) did not finish" in (host.stderr)


def test_keep_stops_only_procsafe_s_own(keeping_host: Host) -> None:
    keeping_host.process.kill()
    keeping_host.process.wait(60)
    assert keeping_host.wait_guardian_gone(AFTER + GRACE), keeping_host.stderr
    assert not keeping_host.alive("own")
    assert all(keeping_host.alive(kind) for kind in LEFT if kind != "own")
    err = keeping_host.stderr
    assert "stopping 1 process of its run:" in err, err
    assert "4 processes of its run left running under --procsafe-cleanup=keep:" in err, err


@pytest.fixture
def guardian(monkeypatch: pytest.MonkeyPatch) -> Iterator[_guardlink.Guardian]:
    """A guardian of this very process (its token undone afterwards)."""
    monkeypatch.setenv(_guardian.VARIABLE, "")
    started = _guardlink.spawn(grace=GRACE, keep=False)
    assert started is not None
    try:
        yield started
    finally:
        started.close(done=True)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as file:
        fields = file.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_an_idle_guardian_uses_no_cpu(guardian: _guardlink.Guardian) -> None:
    time.sleep(1.0)  # past its start
    before = cpu_ticks(guardian.pid)
    time.sleep(3.0)
    assert cpu_ticks(guardian.pid) == before


def test_the_guardian_outlives_ctrl_c_sigterm_and_hangup(guardian: _guardlink.Guardian) -> None:
    time.sleep(0.3)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(guardian.pid, signum)
    time.sleep(0.3)
    assert not guardian.exited()
    guardian.close(done=True)
    assert guardian.exited()


def test_the_guardian_is_not_the_test_process_s_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """Started in a shell's background: a test that starts nothing still has no child at
    all, which keeps its leak check to one ``waitid`` per phase."""
    monkeypatch.setenv(_guardian.VARIABLE, "")
    previous = _proctable.set_subreaper(False)  # as a pytest not yet checking leaks
    try:
        started = _guardlink.spawn(grace=GRACE, keep=False)
    finally:
        if previous is not None:
            _proctable.set_subreaper(previous)
    assert started is not None
    try:
        assert not started.child
        assert proc(started.pid).ppid != os.getpid()
        assert started.pid not in _proctable.children(os.getpid())
        assert _guardian.MARK in " ".join(_proctable.cmdline(started.pid))
    finally:
        started.close(done=True)
    assert started.exited()


def test_forked_children_drop_the_guardian(guardian: _guardlink.Guardian) -> None:
    monkeypatched = dict(_guardlink._SHARED)
    _guardlink.hook_forks()
    _guardlink._SHARED.update(guardian=guardian, users=1)
    try:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            ok = _guardlink._SHARED["guardian"] is None and not guardian.connected
            os.write(writer, b"1" if ok else b"0")
            os._exit(0)
        os.close(writer)
        assert os.read(reader, 1) == b"1"
        os.close(reader)
        os.waitpid(pid, 0)
        assert guardian.connected  # the parent's end is untouched
    finally:
        _guardlink._SHARED.update(monkeypatched)


def test_members_are_the_run_s_processes_only(kids: Kids) -> None:
    token = f"unit-{os.getpid()}-{time.monotonic_ns()}"
    bare = {"PATH": os.environ["PATH"]}
    marked = subprocess.Popen(["sleep", "300"], env={**bare, _guardian.VARIABLE: token})
    announced = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], env=bare)
    other = subprocess.Popen(["sleep", "300"], env={**bare, _guardian.VARIABLE: "other"})
    reused = subprocess.Popen(["sleep", "300"], env=bare)
    for popen in (marked, announced, other, reused):
        kids.popens.append(popen)
        kids.procs.append(proc(popen.pid))
    wait_until(lambda: len(_proctable.children(announced.pid)) == 1, "the shell's child")
    grandchild = _proctable.children(announced.pid)[0]
    kids.procs.append(proc(grandchild))
    wait_until(lambda: b"300" in Path(f"/proc/{marked.pid}/cmdline").read_bytes(), "exec")
    me = proc(os.getpid())
    run = _guardian.Run(me, token)
    run.feed(f"+ {announced.pid} {proc(announced.pid).start} d\n+ {reused.pid}".encode())
    run.feed(f" {proc(reused.pid).start + 1} o\n".encode())  # another start: a reused pid
    table = {pid: found for pid in (marked.pid, announced.pid, other.pid, reused.pid,
             grandchild, os.getpid()) if (found := _proctable.stat(pid)) is not None}  # fmt: skip
    assert run.members(table) == {marked.pid: False, announced.pid: False, grandchild: False}
    run.feed(b"done\n")
    assert run.done


def test_a_guardian_that_cannot_start_sets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """It starts just before a test's first child: out of file descriptors, that start
    goes on without one, and the run's token is not left behind in the environment."""
    monkeypatch.setattr(
        _guardlink, "_SHARED", {**_guardlink._SHARED, "guardian": None, "users": 0}
    )
    monkeypatch.setenv(_guardian.VARIABLE, "outer-run")

    def no_pipe() -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe", no_pipe)
    assert _guardlink.acquire(grace=0.5, keep=False) is None
    assert os.environ[_guardian.VARIABLE] == "outer-run"
    assert _guardlink._SHARED["guardian"] is None
