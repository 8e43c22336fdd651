"""Owners, kinds, modes and cleanup policies of the leak checks, with real processes.

The trackers made here are nested in the one checking this suite: processes that
already ran when they were made belong to the outer run, as in pytester's inline mode.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from leakkit import ROOT
from leakkit import WAIT
from leakkit import Kids
from leakkit import kids_fixture  # noqa: F401  (the kids fixture)
from leakkit import proc
from leakkit import sleep_forever
from leakkit import wait_until

from pytest_procsafe import LeakedProcess
from pytest_procsafe import ProcessLeakWarning
from pytest_procsafe import _guardian
from pytest_procsafe import _guardlink
from pytest_procsafe import _holders
from pytest_procsafe import _owned
from pytest_procsafe import _proctable
from pytest_procsafe import _sigterm
from pytest_procsafe import _tracker
from pytest_procsafe._config import Settings
from pytest_procsafe._leaks import LeakChecks
from pytest_procsafe._ledger import Owner
from pytest_procsafe._tracker import Tracker

pytestmark = pytest.mark.skipif(not _proctable.LINUX, reason="zombies and orphans: Linux")


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    tracker = Tracker()
    yield tracker
    tracker.close()


def settings(**changes: object) -> Settings:
    values: dict[str, object] = {
        "leaks": "fail",
        "start_methods": ("fork",),
        "timeout": 30.0,
        "kill_grace": 0.5,
        "cleanup": "kill",
        "ignore": (),
        "report": None,
    }
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


class Hooks:
    """Stands in for ``config.hook``: records the leaks, asks *ignore* about candidates."""

    def __init__(self, ignore: Callable[[LeakedProcess], bool | None] | None = None) -> None:
        self.reported: list[tuple[str, list[LeakedProcess]]] = []
        self._ignore = ignore

    def pytest_procsafe_ignore(self, process: LeakedProcess) -> bool | None:
        return self._ignore(process) if self._ignore else None

    def pytest_procsafe_leaks(self, owner: str, leaks: list[LeakedProcess]) -> None:
        self.reported.append((owner, leaks))


@pytest.fixture
def make_checks() -> Iterator[Callable[..., LeakChecks]]:
    made: list[LeakChecks] = []

    def make(
        hooks: Hooks | None = None, *, write_report: bool = False, **changes: object
    ) -> LeakChecks:
        checks = LeakChecks(
            settings(**changes),
            hooks or Hooks(),
            write_report=write_report,
            where_of=lambda test: (__file__, 1),
            settings_of=lambda test: test or checks.settings,
        )
        checks.activate()
        checks.collection_done()
        made.append(checks)
        return checks

    yield make
    for checks in made:
        checks.close()


def run_test(
    checks: LeakChecks, start: Callable[[], object], test_settings: Settings | None = None
) -> str | None:
    """One test's protocol as the plugin's hooks drive it; *start* runs in its call."""
    checks.test_start("test_x.py::test_x", test_settings)
    checks.phase_end("setup", then="call")
    start()
    checks.phase_end("call", then="teardown")
    return checks.test_end()


# --- the tracker: owners and kinds --------------------------------------------------------


def test_each_process_belongs_to_the_owner_it_was_first_seen_under(
    kids: Kids, tracker: Tracker
) -> None:
    test, fixture = Owner("t", "test"), Owner("fixture f", "fixture")
    first = kids.sleeper()
    tracker.observe(test, "call")
    second = kids.sleeper()
    tracker.observe(fixture, "setup")
    tracker.observe(test, "teardown")  # nothing new: nothing changes hands
    assert [entry.proc.pid for entry in tracker.take(test)] == [first.pid]
    assert [(e.proc.pid, e.phase) for e in tracker.take(fixture)] == [(second.pid, "setup")]
    assert tracker.take(test) == []  # each owner is checked once


def test_another_run_s_guardian_sent_here_is_nobody_s_and_reaped(tracker: Tracker) -> None:
    """A pytest run inside this one starts its guardian in the background: re-parented
    to this subreaper, it is never a leak nor swept, and is reaped once it exits."""
    previous = _proctable.set_subreaper(True)
    try:
        started = _guardlink._detached(
            [sys.executable, "-c", f"import time; time.sleep(60)  # {_guardian.MARK}"],
            {"stdin": subprocess.DEVNULL, "start_new_session": True},
        )
        assert started is not None
        try:
            assert proc(started.pid).ppid == ROOT  # the shell has exited: re-parented here
            test = Owner("t", "test")
            tracker.observe(test, "call")
            assert tracker.take(test) == []
            assert started.pid not in [p.pid for p in tracker.leftovers()]
        finally:
            os.kill(started.pid, signal.SIGKILL)
        wait_until(lambda: proc(started.pid).zombie, "the guardian stand-in exited")
        tracker.observe(Owner("t2", "test"), "call")
        assert _proctable.stat(started.pid) is None  # reaped by the observation
    finally:
        if previous is not None:
            _proctable.set_subreaper(previous)


def test_a_nested_tracker_leaves_what_ran_before_it_alone(kids: Kids) -> None:
    before = kids.sleeper()
    with_outer = Tracker()
    try:
        assert with_outer.nested  # this suite's own tracker is the outer one
        inner = Tracker()
        try:
            inner.observe(Owner("t", "test"), "call")
            assert inner.owners() == []
            assert before.pid in inner.exempt
        finally:
            inner.close()
    finally:
        with_outer.close()


def test_kinds_of_leaks(kids: Kids, tracker: Tracker) -> None:
    owner = Owner("t", "test")
    leaked = kids.sleeper().pid
    zombie = kids.zombie()
    orphan = kids.orphan()
    tracker.observe(owner, "call")
    found = tracker.classify(tracker.take(owner), later=Owner("session", "session"))
    assert {item.proc.pid: item.kind for item in found} == {
        leaked: "leaked",
        zombie: "zombie",
        orphan: "orphan",
    }
    assert {item.proc.pid: item.cmdline[0] for item in found}[leaked] == sys.executable


def test_a_tree_is_leaked_below_its_root_and_a_thread_child_is_seen(
    kids: Kids, tracker: Tracker
) -> None:
    owner = Owner("t", "test")
    shell = kids.popen("sh", "-c", "sleep 60 & wait")
    thread = threading.Thread(target=kids.sleeper)
    thread.start()
    thread.join(WAIT)
    wait_until(lambda: bool(_proctable.children(shell.pid)), "the shell's child started")
    tracker.observe(owner, "call")
    found = tracker.classify(tracker.take(owner), later=Owner("session", "session"))
    kinds = sorted((item.kind, item.proc.ppid == ROOT) for item in found)
    assert kinds == [("leaked", False), ("leaked", True), ("leaked", True)]


def test_what_is_not_a_leak(kids: Kids, tracker: Tracker) -> None:
    owner, later = Owner("t", "test"), Owner("session", "session")
    # An orphan that finished, a multiprocessing child terminated but never joined, the
    # forkserver, and a manager procsafe's fixtures still own.
    done = kids.orphan(seconds=0)
    process = multiprocessing.get_context("fork").Process(target=sleep_forever)
    process.start()
    process.terminate()
    pid = process.pid
    assert pid is not None
    # Exited but not reaped: on a busy machine SIGTERM may take longer than the grace.
    wait_until(lambda: getattr(_proctable.stat(pid), "zombie", True), "its exit")
    ctx = multiprocessing.get_context("forkserver")
    joined = ctx.Process(target=int)
    joined.start()
    joined.join(WAIT)
    owned = kids.sleeper().pid
    _owned.add_pid(owned, _owned.MANAGER)
    try:
        tracker.observe(owner, "call")
        assert tracker.classify(tracker.take(owner), later=later) == []
        assert _proctable.stat(done) is None  # reaped, quietly
        assert process.exitcode == -signal.SIGTERM  # multiprocessing reaped its own
        assert [entry.proc.pid for entry in tracker.take(later)] == [owned]
    finally:
        _owned.discard_pid(owned)


# --- one session's checks: modes, cleanup, reports ----------------------------------------


def test_fail_mode_fails_the_test_and_kills_its_leaks(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    hooks = Hooks()
    checks = make_checks(hooks)
    started: list[int] = []
    message = run_test(checks, lambda: started.append(kids.sleeper().pid))
    assert message is not None
    assert message.startswith("procsafe: test_x.py::test_x left 1 process behind:")
    assert f"leaked pid {started[0]} (appeared in call, created at " in message
    assert "killed): " in message
    assert message.endswith("they were stopped right away (--procsafe-cleanup=kill)")
    assert _proctable.stat(started[0]) is None
    [(owner, [leak])] = hooks.reported
    assert owner == "test_x.py::test_x"
    assert (leak.pid, leak.ppid, leak.kind, leak.phase) == (started[0], ROOT, "leaked", "call")
    assert checks.report.records == [{**leak.as_dict(), "action": "killed"}]
    assert not checks.failed  # the test's own error says it


def test_warn_mode_warns_and_session_cleanup_stops_at_the_end(
    kids: Kids, make_checks: Callable[..., LeakChecks], tmp_path: Path
) -> None:
    report = tmp_path / "leaks.json"
    checks = make_checks(leaks="warn", cleanup="session", report=report, write_report=True)
    started: list[int] = []
    with pytest.warns(
        ProcessLeakWarning, match=r"still running; stopped at the end of the session"
    ):
        assert run_test(checks, lambda: started.append(kids.sleeper().pid)) is None
    assert proc(started[0])  # still running: warn mode does not change what the suite does
    checks.session_end()
    assert _proctable.stat(started[0]) is None
    data = json.loads(report.read_text())
    assert data["counts"] == {"leaked": 1, "zombie": 0, "orphan": 0}
    [record] = data["leaks"]
    assert record["action"] == "killed"
    assert record["cmdline"][0] == sys.executable


def test_keep_cleanup_leaves_the_leak_running(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    checks = make_checks(cleanup="keep")
    process = multiprocessing.get_context("fork").Process(target=sleep_forever)
    message = run_test(checks, process.start)
    assert message is not None
    assert "they were kept running (--procsafe-cleanup=keep)" in message
    checks.session_end()
    checks.close()
    assert process.is_alive()
    # Detached: multiprocessing's exit handler would join it with no timeout.
    assert process not in multiprocessing.active_children()
    assert process.pid is not None
    kids.adopt(process.pid)  # this test stops what was kept


def test_ignored_processes_are_neither_reported_nor_stopped(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    hooks = Hooks(ignore=lambda process: True if "61" in process.cmdline else None)
    checks = make_checks(hooks, ignore=(re.compile(r"sleep 60"),))
    started: list[int] = []

    def start() -> None:
        started.append(kids.popen("sleep", "60").pid)
        started.append(kids.popen("sleep", "61").pid)

    assert run_test(checks, start) is None
    assert hooks.reported == []
    assert all(proc(pid) for pid in started)
    # Not reported, and left running until the session ends; then stopped like anything
    # else the run started (unless cleanup=keep).
    checks.session_end()
    assert all(proc(pid) for pid in started)
    checks.close()
    for pid in started:
        left = _proctable.stat(pid)
        assert left is None or left.zombie, f"pid {pid} outlived the session"


def test_a_marker_turning_the_checks_off(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    checks = make_checks()
    started: list[int] = []
    off = settings(leaks="off")
    assert run_test(checks, lambda: started.append(kids.sleeper().pid), off) is None
    checks.session_end()
    assert proc(started[0])  # not this run's business


def _asked(checks: LeakChecks, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What *checks* asks the kernel from now on: ``waitid``, ``fstat`` of ``/dev/shm``,
    ``last_pid`` (with what it read), ``walk`` (a read of the whole tree)."""
    tracker, segments = checks.tracker, checks.segments
    assert tracker is not None
    asked: list[str] = []
    table = tracker.table
    quiet, last_pid, tree = table.quiet, table.last_pid, table.tree

    def counted_quiet() -> bool:
        asked.append("waitid")
        return quiet()

    def counted_last_pid() -> bytes | None:
        stamp = last_pid()
        asked.append(f"last_pid {stamp!r}")
        return stamp

    def counted_tree(prune: Collection[int] = ()) -> dict[int, int]:
        asked.append("walk")
        return tree(prune)

    monkeypatch.setattr(table, "quiet", counted_quiet)
    monkeypatch.setattr(table, "last_pid", counted_last_pid)
    monkeypatch.setattr(table, "tree", counted_tree)
    if segments is not None:
        changed = segments.changed

        def counted_changed() -> bool:
            asked.append("fstat")
            return changed()

        monkeypatch.setattr(segments, "changed", counted_changed)
    return asked


def _in_a_fresh_child(kids: Kids, work: Callable[[], object]) -> Any:
    """Run *work* in a forked child, a subreaper with no child of its own (this process
    may have some: a resource tracker), and return what it returned (as JSON)."""
    read, write = os.pipe()

    def child() -> None:
        os.close(read)
        _proctable.set_subreaper(True)
        os.write(write, json.dumps(work()).encode())

    pid = kids.fork(child)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = json.loads(pipe.read() or b"null")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return result


def test_a_clean_test_asks_the_kernel_once(
    kids: Kids, make_checks: Callable[..., LeakChecks], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing known and nothing started: the phases' ends look at nothing, the test's
    end is one ``waitid`` and one ``fstat`` of ``/dev/shm``."""

    def work() -> list[list[str]]:
        checks = make_checks()
        asked = _asked(checks, monkeypatch)
        rounds = []
        for _ in range(3):
            asked.clear()
            assert run_test(checks, lambda: None) is None
            rounds.append(sorted(asked))
        return rounds

    expected = ["fstat", "waitid"] if _segments_watched() else ["waitid"]
    assert _in_a_fresh_child(kids, work) == [expected] * 3


def _segments_watched() -> bool:
    return os.name == "posix"


def test_with_processes_known_the_tree_is_walked_only_after_a_birth(
    kids: Kids, make_checks: Callable[..., LeakChecks], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived child (a resource tracker, a held pool) makes every phase an
    observation: one ``last_pid`` read, and a walk only when a pid was handed out since."""
    checks = make_checks()
    asked = _asked(checks, monkeypatch)
    kids.sleeper()  # known from here on: the session's
    checks.collection_done()
    for _ in range(3):
        assert run_test(checks, lambda: None) is None
    stamps = [entry for entry in asked if entry.startswith("last_pid")]
    if stamps[0] == "last_pid None":
        pytest.skip("no ns_last_pid here: every observation walks")
    previous = None
    for index, entry in enumerate(asked):
        if entry.startswith("last_pid"):
            walked = asked[index + 1 : index + 2] == ["walk"]
            assert walked == (entry != previous), asked  # a walk exactly when it moved
            if walked:
                previous = entry
    # Known children (from the first walk on): busy without asking. Before it, a test
    # process with no child yet asked once (run alone; in a suite, a resource tracker or
    # a forkserver of an earlier test may already be known).
    assert "waitid" not in asked[asked.index("walk") :]


def test_a_last_pid_that_does_not_follow_births_is_given_up(
    kids: Kids, tracker: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An emulated ``/proc`` whose ``ns_last_pid`` never moves would hide every new
    descendant of a known process: the first child started here shows it, and every look
    walks from then on."""
    monkeypatch.setattr(tracker.table, "last_pid", lambda: b"1\n")
    owner = Owner("t", "test")
    first = kids.sleeper()
    tracker.observe(owner, "call")
    tracker.observe(owner, "call")  # the stuck value is the last walk's by now
    second = kids.sleeper()  # a birth this process saw; the stuck file did not move
    tracker.observe(owner, "call")
    assert {first.pid, second.pid} <= set(tracker.seen)
    monkeypatch.undo()
    assert tracker.table.last_pid() is None  # given up for good
    tracker.take(owner)


@pytest.mark.parametrize("phase", ["setup", "call"])
def test_a_child_this_process_starts_is_seen_at_the_end_of_its_phase(
    kids: Kids, make_checks: Callable[..., LeakChecks], phase: str
) -> None:
    checks = make_checks()
    checks.test_start("test_x.py::test_t")
    if phase == "setup":
        kids.sleeper()
    checks.phase_end("setup", then="call")
    if phase == "call":
        kids.sleeper()
    checks.phase_end("call", then="teardown")
    assert checks.test_end() is not None
    (record,) = checks.report.records
    assert record["phase"] == phase


def test_what_os_system_leaves_in_the_background_is_seen_in_its_phase(
    kids: Kids, make_checks: Callable[..., LeakChecks], tmp_path: Path
) -> None:
    """``os.system`` has reaped its shell when it returns; what the shell left running
    (re-parented here) is found at the end of the phase that called it."""
    checks = make_checks()
    pidfile = tmp_path / "pid"
    checks.test_start("test_x.py::test_t")
    checks.phase_end("setup", then="call")
    assert os.system(f"sleep 60 & echo $! > {pidfile}") == 0
    orphan = int(pidfile.read_text())
    kids.adopt(orphan)
    wait_until(lambda: proc(orphan).ppid == ROOT, f"pid {orphan} re-parented")
    checks.phase_end("call", then="teardown")
    assert checks.test_end() is not None
    (record,) = checks.report.records
    assert (record["pid"], record["kind"], record["phase"]) == (orphan, "orphan", "call")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libc's system() via ctypes")
def test_a_child_no_python_launcher_started_is_first_seen_at_the_test_s_end(
    kids: Kids, make_checks: Callable[..., LeakChecks], tmp_path: Path
) -> None:
    """A C library's fork under a test with nothing else running tells nobody: the test's
    end finds it, and its phase says when it was first seen (documented)."""
    import ctypes

    pidfile = tmp_path / "pid"

    def work() -> tuple[object, ...]:
        checks = make_checks()
        checks.test_start("test_x.py::test_t")
        checks.phase_end("setup", then="call")
        libc = ctypes.CDLL(None)
        assert libc.system(f"sleep 60 & echo $! > {pidfile}".encode()) == 0
        orphan = int(pidfile.read_text())
        wait_until(lambda: proc(orphan).ppid == os.getpid(), f"pid {orphan} re-parented")
        checks.phase_end("call", then="teardown")
        assert checks.test_end() is not None  # fail mode: it is killed
        (record,) = checks.report.records
        return record["owner"], record["pid"], record["phase"], _proctable.stat(orphan)

    owner, pid, phase, after = _in_a_fresh_child(kids, work)
    assert (owner, phase, after) == ("test_x.py::test_t", "teardown", None)
    assert pid > 0


def test_a_process_first_seen_at_the_end_of_the_teardown_is_the_test_s(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    """Nothing seen before (no owner made yet): a process a function-scoped fixture's
    teardown started is still the test's, in its teardown."""
    checks = make_checks()
    checks.test_start("test_x.py::test_t")
    checks.phase_end("setup", then="call")
    checks.phase_end("call", then="teardown")
    started = kids.sleeper().pid  # as a fixture's teardown would
    message = checks.test_end()
    assert message is not None
    assert str(started) in message
    (record,) = checks.report.records
    assert (record["owner"], record["phase"], record["pid"]) == (
        "test_x.py::test_t",
        "teardown",
        started,
    )
    assert _proctable.stat(started) is None  # killed, as fail mode does


def test_fixture_owned_leaks_fail_the_run_not_the_test(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    checks = make_checks()
    fixture = object()
    started: list[int] = []

    def start() -> None:
        checks.fixture_enter(fixture, "server", None)
        started.append(kids.sleeper().pid)
        checks.fixture_exit(fixture)

    assert run_test(checks, start) is None  # the fixture's process is not the test's
    assert proc(started[0])
    checks.fixture_done(fixture)
    assert checks.failed
    assert _proctable.stat(started[0]) is None
    assert checks.report.records[0]["owner"] == "fixture server"
    assert checks.report.records[0]["phase"] == "setup"


def test_escalated_warnings_outside_tests_fail_the_run(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    checks = make_checks(leaks="warn")
    started = kids.sleeper().pid  # outside any test: the session's
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProcessLeakWarning)
        checks.session_end()
    assert checks.failed
    assert checks.report.records[0]["owner"] == "session"
    assert checks.report.records[0]["phase"] == "session"
    assert _proctable.stat(started) is None


def test_close_stops_what_no_check_reached(
    kids: Kids, make_checks: Callable[..., LeakChecks]
) -> None:
    checks = make_checks()
    checks.test_start("test_x.py::test_interrupted")
    started = kids.sleeper().pid
    checks.close()  # as at unconfigure after an internal error: no session end
    assert _proctable.stat(started) is None


# --- SIGTERM ------------------------------------------------------------------------------


def test_sigterm_runs_the_cleanup_and_chains_the_previous_handler() -> None:
    calls: list[str] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append("previous")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        undo = _sigterm.on_sigterm(lambda: calls.append("cleanup"))
        try:
            # A forked child gets the previous disposition back, not the cleanup.
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                os._exit(0 if signal.getsignal(signal.SIGTERM) is previous else 1)
            assert os.waitpid(pid, 0)[1] == 0
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(lambda: len(calls) == 2, "the handler run")
            assert calls == ["cleanup", "previous"]
            assert signal.getsignal(signal.SIGTERM) is previous  # a second one: as before
        finally:
            undo()
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_a_held_processs_later_children_are_held_too(
    kids: Kids, tracker: Tracker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reusable executor's worker that runs a nested executor of its own: its children
    # appear in a later test, and they are the holder's, not that test's.
    flag = tmp_path / "go"
    shell = kids.popen("sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.02; done; sleep 60 & wait")
    holder = types.ModuleType("procsafe_nested_holder")
    holder.EXECUTOR = shell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    session = Owner("session", "session")
    first, second = Owner("t1", "test"), Owner("t2", "test")
    tracker.observe(first, "call")
    assert tracker.classify(tracker.take(first), later=session) == []  # held
    flag.touch()

    def nested() -> list[int]:  # the loop's own short sleeps come and go meanwhile
        return [
            pid
            for pid in _proctable.children(shell.pid)
            if _proctable.cmdline(pid) == ("sleep", "60")
        ]

    wait_until(lambda: bool(nested()), "the nested child")
    tracker.observe(second, "call")
    assert tracker.classify(tracker.take(second), later=session) == []
    assert {entry.held_by for entry in tracker.take(session)} == {
        "procsafe_nested_holder.EXECUTOR"
    }


# --- the exit grace -------------------------------------------------------------------------


@pytest.fixture
def long_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """A grace far longer than any of these tests may take: only `IDLE` can end it early."""
    monkeypatch.setattr(_tracker, "EXIT_GRACE", 3 * WAIT)
    return 3 * WAIT


def _classify_timed(tracker: Tracker, owner: Owner) -> tuple[list[int], float]:
    start = time.monotonic()
    found = tracker.classify(tracker.take(owner), later=Owner("session", "session"))
    return [item.proc.pid for item in found], time.monotonic() - start


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="no schedstat")
def test_an_idle_candidate_is_a_leak_without_the_whole_grace(
    kids: Kids, tracker: Tracker, long_grace: float
) -> None:
    owner = Owner("t", "test")
    idle = kids.sleeper().pid
    wait_until(lambda: _proctable.cmdline(idle)[-1:] == ("import time; time.sleep(60)",), "up")
    tracker.observe(owner, "call")
    found, took = _classify_timed(tracker, owner)
    assert found == [idle]
    assert took < long_grace / 3  # IDLE after its start, not the grace


def test_a_candidate_on_its_way_out_gets_the_grace(tracker: Tracker, long_grace: float) -> None:
    owner = Owner("t", "test")
    process = multiprocessing.get_context("fork").Process(target=_naps)
    process.start()
    try:
        tracker.observe(owner, "call")
        found, _ = _classify_timed(tracker, owner)
    finally:
        process.join(WAIT)
    assert found == []  # gone within the grace (multiprocessing reaps its own)


def _naps() -> None:
    """Wakes every 10 ms for half a second, then exits: never idle for `IDLE`."""
    for _ in range(50):
        time.sleep(0.01)


def test_a_candidate_this_process_is_still_stopping_gets_the_grace(
    tracker: Tracker, long_grace: float
) -> None:
    # An executor shut down without waiting: a thread of this process is still busy
    # telling its worker to go, and the worker, asleep until then, is not a leak.
    owner = Owner("t", "test")
    worker = multiprocessing.get_context("fork").Process(target=sleep_forever)
    worker.start()
    pid = worker.pid
    assert pid is not None
    wait_until(lambda: _proctable.activity(pid) is not None, "asleep")

    def stop_soon() -> None:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        worker.terminate()

    thread = threading.Thread(target=stop_soon)
    tracker.observe(owner, "call")
    thread.start()
    try:
        found, _ = _classify_timed(tracker, owner)
    finally:
        thread.join(WAIT)
        worker.kill()
        worker.join(WAIT)
    assert found == []


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="no schedstat")
def test_the_idle_window_keeps_running_when_a_candidate_is_handed_on(kids: Kids) -> None:
    """The window starts before the holder search: a candidate found held (no longer
    one to wait for) does not restart it; a new one to wait for does."""
    first, second, third = (kids.sleeper().pid for _ in range(3))
    wait_until(
        lambda: all(_proctable.activity(p) is not None for p in (first, second, third)), "asleep"
    )

    def found(*pids: int) -> list[Any]:
        return [types.SimpleNamespace(proc=proc(pid)) for pid in pids]

    idle = _tracker._Idle(root=-1)  # no root: this process's own threads are left aside
    assert not idle.settled(found(first, second))  # the window starts
    time.sleep(_tracker.IDLE * 0.6)
    assert not idle.settled(found(first))  # *second* handed on: too early, not restarted
    time.sleep(_tracker.IDLE * 0.6)
    assert idle.settled(found(first))
    assert idle.settled(found(first, second))  # asleep all along: still nothing moved
    assert not idle.settled(found(first, third))  # a new one to wait for: it restarts
    assert 0 < idle.left() <= _tracker.IDLE


def test_a_held_process_is_found_held_without_walking_every_object(
    tracker: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    process = multiprocessing.get_context("fork").Process(target=sleep_forever)
    holder = types.ModuleType("procsafe_registry_holder")
    holder.WORKER = process  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, holder.__name__, holder)
    process.start()
    try:

        def no_walk() -> None:
            raise AssertionError("the heard start knows the object")

        monkeypatch.setattr(_holders, "objects", no_walk)
        owner, session = Owner("t", "test"), Owner("session", "session")
        tracker.observe(owner, "call")
        assert tracker.classify(tracker.take(owner), later=session) == []
        assert [entry.held_by for entry in tracker.take(session)] == [
            "procsafe_registry_holder.WORKER"
        ]
    finally:
        process.kill()
        process.join(WAIT)
