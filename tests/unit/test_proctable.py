"""The process table and the reaper, against real children, zombies and orphans."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leakkit import ROOT
from leakkit import WAIT
from leakkit import Kids
from leakkit import kids_fixture  # noqa: F401  (the kids fixture)
from leakkit import proc
from leakkit import sleep_forever
from leakkit import wait_until

from pytest_procsafe import _escalate
from pytest_procsafe import _proctable
from pytest_procsafe import _reaper
from pytest_procsafe._proctable import ProcTable

pytestmark = pytest.mark.skipif(not _proctable.LINUX, reason="procfs and subreaper: Linux")


@pytest.fixture
def table() -> Iterator[ProcTable]:
    table = ProcTable()
    yield table
    table.close()


def exit_with(code: int) -> None:
    sys.exit(code)


# --- reading ----------------------------------------------------------------------------


def test_tree_holds_children_and_grandchildren(kids: Kids, table: ProcTable) -> None:
    assert table.fast, "this kernel has /proc/<pid>/task/<tid>/children"
    before = table.tree()  # multiprocessing's forkserver, say, if a test started it
    shell = kids.popen("sh", "-c", "sleep 60 & sleep 61; :")
    # Both sleeps forked and exec'd: a fork of sh still carries sh's command line.
    wait_until(
        lambda: (
            sorted(_proctable.cmdline(pid) for pid in _proctable.children(shell.pid))
            == [("sleep", "60"), ("sleep", "61")]
        ),
        "both sleeps started",
    )
    tree = table.tree()
    assert set(tree) - set(before) == {shell.pid, *_proctable.children(shell.pid)}
    assert tree[shell.pid] == ROOT
    grandchildren = [pid for pid, ppid in tree.items() if ppid == shell.pid]
    assert sorted(_proctable.cmdline(pid) for pid in grandchildren) == [
        ("sleep", "60"),
        ("sleep", "61"),
    ]
    # Pruned subtrees are not walked; the pruned process itself is still listed.
    assert set(table.tree(prune={shell.pid})) == {*before, shell.pid}
    # The fallback for kernels without children files sees the same tree.
    assert table._tree_scan(()) == tree


def test_the_psutil_table_sees_the_same_tree(kids: Kids, table: ProcTable) -> None:
    pytest.importorskip("psutil", reason="psutil is a dependency off Linux only")
    shell = kids.popen("sh", "-c", "sleep 60 & sleep 61; :")
    wait_until(lambda: len(_proctable.children(shell.pid)) == 2, "both sleeps started")
    assert table._tree_psutil(()) == table.tree()


def test_children_of_a_running_thread_are_seen(kids: Kids, table: ProcTable) -> None:
    started = threading.Event()
    release = threading.Event()
    popens: list[subprocess.Popen[bytes]] = []

    def start_one() -> None:
        popens.append(kids.sleeper())
        started.set()
        release.wait(WAIT)

    thread = threading.Thread(target=start_one)
    thread.start()
    try:
        assert started.wait(WAIT)
        # The child belongs to the thread's task until the thread ends.
        assert popens[0].pid in table.tree()
    finally:
        release.set()
        thread.join(WAIT)
    # Right after the join the OS thread may still exist, holding the child, or be moving
    # it to the main thread (one read can fall between the two lists): the child is seen,
    # under the lingering thread or under the main one, within a few reads.
    deadline = time.monotonic() + WAIT
    while popens[0].pid not in table.tree():
        assert time.monotonic() < deadline, "the child of a finished thread is never seen"
        time.sleep(0.01)


def _quiet_only_without_children() -> None:
    """Runs in a fresh fork, which starts with no child at all."""
    table = ProcTable()
    assert table.quiet()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert not table.quiet()  # running, then a zombie: a child either way
    wait_until(lambda: proc(pid).zombie, "a zombie")
    assert not table.quiet()
    assert proc(pid).zombie, "quiet() only peeks: the zombie is not reaped"
    os.waitpid(pid, 0)
    assert table.quiet()
    # A child started by another thread counts too.
    popens: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: popens.append(subprocess.Popen(["sleep", "60"])))
    thread.start()
    thread.join()
    assert not table.quiet()
    popens[0].kill()
    popens[0].wait()
    assert table.quiet()


def test_quiet_means_no_child_at_all(kids: Kids) -> None:
    pid = kids.fork(_quiet_only_without_children)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_known_descendant_that_starts_threads_is_read_task_by_task(
    kids: Kids, table: ProcTable, tmp_path: Path
) -> None:
    gate = tmp_path / "go"
    # A single-threaded child first (read through its cached files), which then starts a
    # grandchild from a second thread: that grandchild is listed under the thread's task.
    script = (
        "import os, subprocess, threading, time\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.005)\n"
        "def run():\n"
        "    subprocess.Popen(['sleep', '60'])\n"
        "    time.sleep(60)\n"
        "threading.Thread(target=run).start()\n"
    )
    child = kids.popen(sys.executable, "-c", script)
    wait_until(lambda: child.pid in table.tree(), "the child seen")
    gate.touch()
    wait_until(
        lambda: child.pid in table.tree().values(), "the grandchild of the child's thread seen"
    )


def test_descendants_files_stay_open_within_the_cap_and_close_when_they_end(
    kids: Kids, table: ProcTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    monkeypatch.setattr(_proctable, "CACHED", 2)
    table.tree()
    cached = len(table._below)  # earlier tests' helpers (a forkserver, say) may hold slots
    baseline = open_fds()
    sleepers = [kids.popen("sleep", "60") for _ in range(4)]
    tree = table.tree()
    assert {s.pid for s in sleepers} <= set(tree)
    # Two fds per cached descendant, two descendants at most: the others are read by path.
    assert len(table._below) == 2
    assert open_fds() == baseline + 2 * (2 - cached)
    assert table.tree() == tree  # the cached and the uncached read the same
    kids.close()
    wait_until(lambda: not set(table.tree()) & {s.pid for s in sleepers}, "the sleepers gone")
    assert open_fds() == baseline


def test_stat_tells_zombies_and_start_times(kids: Kids) -> None:
    zombie = kids.zombie()
    found = proc(zombie)
    assert found.zombie
    assert found.ppid == ROOT
    assert _proctable.cmdline(zombie)[0].startswith("[")  # no command line left
    sleeper = kids.sleeper()
    running = proc(sleeper.pid)
    assert not running.zombie
    assert running.start >= found.start
    assert _proctable.same(running) == running
    assert _proctable.same(running._replace(start=running.start + 1)) is None
    assert _proctable.stat(2**22 + 1) is None  # above the kernel's pid_max


def test_descends_follows_the_parent_chain(kids: Kids) -> None:
    shell = kids.popen("sh", "-c", "sleep 60 & wait")
    wait_until(lambda: bool(_proctable.children(shell.pid)), "the grandchild started")
    grandchild = proc(_proctable.children(shell.pid)[0])
    assert _proctable.descends(grandchild, ROOT)
    assert _proctable.descends(grandchild, shell.pid)
    assert not _proctable.descends(proc(ROOT), ROOT)
    assert not _proctable.descends(proc(os.getppid()), ROOT)


def test_subreaper_adopts_orphans(kids: Kids) -> None:
    previous = _proctable.set_subreaper(True)
    assert previous is not None
    try:
        assert _proctable.set_subreaper(True) is True  # it reports the previous value
        orphan = kids.orphan()
        assert proc(orphan).ppid == ROOT
    finally:
        _proctable.set_subreaper(previous)


# --- acting -----------------------------------------------------------------------------


def test_send_signals_only_the_same_descendant(kids: Kids) -> None:
    sleeper = kids.sleeper()
    found = proc(sleeper.pid)
    # A reused pid (another start time) or a process that is no descendant: no signal.
    assert not _reaper.send(found._replace(start=found.start + 1), signal.SIGTERM, ROOT)
    assert not _reaper.send(found, signal.SIGTERM, root=found.pid)
    assert sleeper.poll() is None
    assert _reaper.dies_on_sigterm(sleeper.pid)
    assert _reaper.send(found, signal.SIGTERM, ROOT)
    assert sleeper.wait(WAIT) == -signal.SIGTERM
    assert not _reaper.send(found, signal.SIGTERM, ROOT)  # gone: nothing to signal


def test_reap_takes_only_the_zombies_asked_for(kids: Kids) -> None:
    first, second = kids.zombie(), kids.zombie()
    _reaper.reap([proc(first)], ROOT)
    assert _proctable.stat(first) is None
    assert proc(second).zombie


def test_reap_leaves_multiprocessing_and_subprocess_their_statuses(kids: Kids) -> None:
    process = multiprocessing.get_context("fork").Process(target=exit_with, args=(3,))
    process.start()
    popen = kids.popen("sh", "-c", "exit 5")
    assert process.pid is not None
    found = [proc(process.pid), proc(popen.pid)]
    pids = (process.pid, popen.pid)
    wait_until(lambda: all(proc(pid).zombie for pid in pids), "both exited")
    _reaper.reap(found, ROOT, {popen.pid: popen})
    process.join(WAIT)
    assert process.exitcode == 3
    assert popen.returncode == 5


def test_stop_takes_children_before_parents_and_kills_after_the_grace(kids: Kids) -> None:
    # Once its children are killed the shell must not exit by itself before its own
    # SIGKILL: it becomes a sleep (same pid and start time, SIGTERM still ignored).
    shell = kids.popen("sh", "-c", "trap '' TERM; sleep 60 & sleep 61 & wait; exec sleep 62")
    wait_until(lambda: len(_proctable.children(shell.pid)) == 2, "both sleeps started")
    tree = [proc(shell.pid), *map(proc, _proctable.children(shell.pid))]
    assert _escalate.depth_order(tree)[-1].pid == shell.pid
    # The shell ignores SIGTERM, and so do the children it started after the trap.
    assert not any(_reaper.dies_on_sigterm(p.pid) for p in tree)
    started = time.monotonic()
    actions = _reaper.stop(tree, 0.2, ROOT)
    # The shell ignores SIGTERM: it is killed after the grace, not after KILL_WAIT.
    assert time.monotonic() - started < _escalate.KILL_WAIT
    assert actions == dict.fromkeys((p.pid for p in tree), "killed")
    assert shell.wait(WAIT) == -signal.SIGKILL
    assert all(_proctable.same(p) is None for p in tree)


def test_stop_reaps_zombies_and_orphans(kids: Kids) -> None:
    zombie, orphan = kids.zombie(), kids.orphan()
    actions = _reaper.stop([proc(zombie), proc(orphan)], 1.0, ROOT)
    assert actions == {zombie: "reaped", orphan: "killed"}
    assert _proctable.stat(zombie) is None
    assert _proctable.stat(orphan) is None


def test_stop_terminates_the_pool_that_would_respawn_its_workers() -> None:
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(2)
    try:
        workers = [proc(p.pid) for p in multiprocessing.active_children() if p.pid]
        assert len(workers) == 2
        _reaper.stop(workers, 1.0, ROOT)
        with pytest.raises(ValueError, match="Pool not running"):
            pool.apply(sleep_forever)
        assert multiprocessing.active_children() == []
    finally:
        pool.terminate()
        pool.join()


def test_python_children_knows_multiprocessing_and_popen_objects(kids: Kids) -> None:
    process = multiprocessing.get_context("fork").Process(target=sleep_forever)
    process.start()
    try:
        popen = kids.sleeper()
        assert process.pid in _reaper.python_children()
        assert popen.pid not in _reaper.python_children()  # held by the test: deep scan
        assert _reaper.python_children(deep=True)[popen.pid] is popen
    finally:
        process.kill()
        process.join(WAIT)


def _settled(pid: int) -> tuple[object, ...]:
    """*pid*'s marks once two looks 50 ms apart agree (its start is over)."""
    marks = [_proctable.activity(pid)]

    def same() -> bool:
        time.sleep(0.05)
        marks.append(_proctable.activity(pid))
        return marks[-2] is not None and marks[-1] == marks[-2]

    wait_until(same, f"pid {pid} asleep")
    assert marks[-1] is not None
    return marks[-1]


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="no schedstat")
def test_activity_changes_only_when_a_thread_runs(kids: Kids, tmp_path: Path) -> None:
    idle = kids.sleeper().pid
    busy = kids.popen(sys.executable, "-c", "while True: pass").pid
    # Asleep: the same marks, look after look (once its start is over).
    _settled(idle)
    # Running (or waiting for a CPU) right now: busy, never idle.
    assert _proctable.activity(busy) is None
    # One that woke up and went back to sleep has new marks; one gone has none.
    ready = tmp_path / "ready"
    code = (
        "import signal, pathlib; signal.signal(signal.SIGUSR1, lambda *_: None); "
        f"pathlib.Path({str(ready)!r}).touch()\nwhile True: signal.pause()"
    )
    pausing = kids.popen(sys.executable, "-c", code).pid
    wait_until(ready.exists, "its handler installed")
    before = _settled(pausing)
    os.kill(pausing, signal.SIGUSR1)  # its handler runs, and it pauses again
    wait_until(lambda: _proctable.activity(pausing) not in (None, before), "woken")
    assert _proctable.activity(2**22 + 1) is None


def test_activity_leaves_out_the_callers_thread() -> None:
    me, mine = os.getpid(), threading.get_native_id()
    assert _proctable.activity(me) is None  # this thread is running
    wait_until(lambda: _proctable.activity(me, skip=mine) is not None, "the others asleep")
    marks = _proctable.activity(me, skip=mine) or ()
    assert mine not in [mark[0] for mark in marks if isinstance(mark, tuple)]


@pytest.mark.skipif(
    not os.path.exists(_proctable.LAST_PID), reason="no ns_last_pid (Linux 3.3+ only)"
)
def test_last_pid_moves_with_every_birth_and_only_then(kids: Kids) -> None:
    with contextlib.closing(_proctable.ProcTable()) as table:
        before = table.last_pid()
        assert before is not None
        assert int(before) > 0
        kids.sleeper()
        after = table.last_pid()
        assert after is not None
        assert after != before  # a pid was handed out since


def test_last_pid_is_none_where_it_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_proctable, "LAST_PID", "/nonexistent/ns_last_pid")
    with contextlib.closing(_proctable.ProcTable()) as table:
        assert table.last_pid() is None
        assert table.last_pid() is None  # and it does not try again
