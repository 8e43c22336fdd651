"""Unit tests of how a worker's exit is learned (`_exits`): ``result()`` waits for it, and
an exit status collected elsewhere is an exit, not a hang.

Fork and spawn workers are children of the test process, so code in it can take their
exit status (``os.waitpid(-1, ...)``, ``SIGCHLD`` set to ``SIG_IGN``). Forkserver workers
are the server's children: nothing the test process does can take theirs, and they report
their real exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing import connection
from multiprocessing.context import BaseContext

import pytest
from worker_targets import hard_exit
from worker_targets import return_then_hang
from worker_targets import return_then_linger
from worker_targets import spin_forever_in_here
from worker_targets import square

from pytest_procsafe import Channels
from pytest_procsafe import ChannelTimeout
from pytest_procsafe import Worker
from pytest_procsafe import WorkerCrashed
from pytest_procsafe import WorkerGroup
from pytest_procsafe import WorkerTimeout
from pytest_procsafe import _exits
from pytest_procsafe import _owned

WAIT = 60.0  # generous: only a broken worker ever takes this long
#: A bound for "seen at once": far below the 30 s timeout, far above scheduling delays.
PROMPTLY = 5.0
ELSEWHERE = "exited with an unknown status (its exit status was collected elsewhere)"


def _group(context: BaseContext, method: str, owner: str, timeout: float) -> WorkerGroup:
    return WorkerGroup(context, start_method=method, timeout=timeout, kill_grace=0.5, owner=owner)


@pytest.fixture
def hang_group(
    mp_context: BaseContext, mp_start_method: str, request: pytest.FixtureRequest
) -> Iterator[WorkerGroup]:
    """A group with a 1 s timeout; the test closes it and checks what it reports."""
    made = _group(mp_context, mp_start_method, request.node.nodeid, 1.0)
    yield made
    made.close()


# --- result() waits for the exit ----------------------------------------------------------


def test_result_returns_once_the_worker_exited(mp_process: WorkerGroup) -> None:
    worker = mp_process(return_then_linger, 42, 0.5)  # exits half a second after returning
    assert worker.result() == 42
    assert worker.exitcode == 0
    assert not worker.is_alive()


def test_a_worker_that_hands_back_its_result_but_never_exits_is_a_hung_worker(
    hang_group: WorkerGroup, mp_start_method: str
) -> None:
    worker = hang_group(return_then_hang, 7)
    with pytest.raises(WorkerTimeout) as info:
        worker.result()
    assert str(info.value) == (
        f"worker 'return_then_hang-1' (pid {worker.pid}, {mp_start_method}) of "
        f"{hang_group.owner} returned 7 but is still running after 1s "
        "(teardown shows where it is stuck)"
    )

    problems = hang_group.close()

    assert len(problems) == 1
    assert "was still running after the 1s timeout, so it was stopped" in problems[0]
    assert "in linger_forever_in_here" in problems[0]  # the thread that kept it alive
    assert "It had handed back its outcome (returned 7), then hung." in problems[0]
    assert worker.process.exitcode is not None


# --- an exit status collected elsewhere ---------------------------------------------------


def _ours(method: str) -> bool:
    """Whether workers of *method* are children of the test process."""
    return method != "forkserver"


def take_status(worker: Worker, method: str) -> None:
    """Collect the worker's exit status behind multiprocessing's back, as code under test
    would with ``os.waitpid(-1, ...)`` (a no-op under forkserver, whose server is its
    parent). By the worker's own pid: this test process has other children (the guardian,
    what earlier tests left to exit), whose statuses are not this test's to take."""
    if not _ours(method):
        return
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            pid, _ = os.waitpid(worker.pid, 0)
            assert pid == worker.pid
            return
        time.sleep(0.01)
    raise AssertionError(f"worker pid {worker.pid} did not exit within {WAIT}s")


@pytest.fixture
def sigchld_ignored() -> Iterator[None]:
    """``SIGCHLD`` set to ``SIG_IGN``: the kernel discards the exit status of each child."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


@pytest.fixture(params=["waitpid", "SIG_IGN"])
def taker(request: pytest.FixtureRequest, mp_start_method: str) -> Callable[[Worker], None]:
    """How the worker's exit status is taken: ``os.waitpid(-1, ...)`` after it exited,
    or ``SIGCHLD`` ignored from before it started."""
    if request.param == "SIG_IGN":
        request.getfixturevalue("sigchld_ignored")
        return lambda worker: None
    return lambda worker: take_status(worker, mp_start_method)


@pytest.fixture(params=["pidfd", "no pidfd"])
def pidfds(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pidfds where the platform has them, and without (the sentinel and waitid)."""
    if request.param == "no pidfd":
        monkeypatch.setattr(_exits, "_PIDFD_OPEN", None)
    elif _exits._PIDFD_OPEN is None:
        pytest.skip("no pidfd_open here")


def _exited(worker: Worker) -> None:
    assert connection.wait([worker.process.sentinel], WAIT), "the worker did not exit"


@pytest.mark.usefixtures("pidfds")
def test_a_taken_exit_status_is_an_exit_with_the_result_kept(
    mp_process: WorkerGroup, mp_start_method: str, taker: Callable[[Worker], None]
) -> None:
    worker = mp_process(square, 3)
    _exited(worker)
    taker(worker)
    begin = time.monotonic()

    worker.join()  # the default timeout is 30 s: this must not wait it out

    assert time.monotonic() - begin < PROMPTLY
    expected = _exits.UNKNOWN if _ours(mp_start_method) else 0
    assert worker.exitcode == expected
    assert worker.process.exitcode == expected
    assert not worker.is_alive()
    assert worker.process not in multiprocessing.active_children()
    assert worker.result() == 9
    status = ELSEWHERE if _ours(mp_start_method) else "exited with code 0"
    assert worker.diagnosis() == f"worker 'square-1' pid {worker.pid} returned 9 and {status}"
    assert mp_process.close() == []
    assert worker.pid not in _owned.pids()


@pytest.mark.usefixtures("pidfds")
def test_without_a_result_a_taken_exit_status_is_a_crash_saying_so(
    mp_process: WorkerGroup, mp_start_method: str, taker: Callable[[Worker], None]
) -> None:
    worker = mp_process(hard_exit, 0)
    _exited(worker)
    taker(worker)
    with pytest.raises(WorkerCrashed) as info:
        worker.result()
    label = f"worker 'hard_exit-1' (pid {worker.pid}, {mp_start_method})"
    if _ours(mp_start_method):
        assert str(info.value) == (
            f"{label} exited before handing back a result, and its exit status was "
            "collected elsewhere (os.wait(), os.waitpid(-1, ...) or SIGCHLD set to SIG_IGN "
            "in the test process), so how it ended is unknown"
        )
    else:
        assert str(info.value).startswith(f"{label} exited with code 0 before handing back")


def test_teardown_reports_an_unseen_worker_with_a_taken_status_as_a_crash(
    mp_context: BaseContext, mp_start_method: str, request: pytest.FixtureRequest
) -> None:
    group = _group(mp_context, mp_start_method, request.node.nodeid, WAIT)
    worker = group(hard_exit, 0)
    _exited(worker)
    take_status(worker, mp_start_method)
    begin = time.monotonic()

    problems = group.close()

    assert time.monotonic() - begin < PROMPTLY
    if _ours(mp_start_method):
        assert problems == [
            f"{worker.label()} of {group.owner} {ELSEWHERE} before handing back a result, "
            "and the test never called result() nor read exitcode."
        ]
    else:
        assert problems == []  # exit code 0 without a result: os._exit(0), no failure


def test_stopping_a_worker_whose_status_was_taken_signals_nothing(
    mp_process: WorkerGroup, mp_start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = mp_process(square, 2)
    _exited(worker)
    take_status(worker, mp_start_method)
    sent: list[int] = []

    def recording(send: Callable[[int, int], None]) -> Callable[[int, int], None]:
        def record(target: int, signum: int) -> None:
            sent.append(signum)
            send(target, signum)

        return record

    monkeypatch.setattr(_exits, "_KILL", recording(os.kill))
    if _exits._PIDFD_SEND is not None:
        monkeypatch.setattr(_exits, "_PIDFD_SEND", recording(_exits._PIDFD_SEND))

    worker.stop()

    assert [signum for signum in sent if signum != 0] == []  # 0 only asks whether it lives
    assert worker.result() == 4


def test_a_channel_read_says_the_worker_exited_with_an_unknown_status(
    mp_process: WorkerGroup, mp_channels: Channels, mp_start_method: str
) -> None:
    left, _right = mp_channels.pipe()
    worker = mp_process(square, 5)  # never writes to the pipe
    _exited(worker)
    take_status(worker, mp_start_method)
    begin = time.monotonic()

    with pytest.raises(ChannelTimeout) as info:
        left.recv(timeout=WAIT)

    assert time.monotonic() - begin < PROMPTLY
    message = str(info.value)
    assert "every worker of this test has exited" in message
    status = ELSEWHERE if _ours(mp_start_method) else "exited with code 0"
    assert f"worker 'square-1' pid {worker.pid} returned 25 and {status}" in message
    assert "still running" not in message
    assert worker.result() == 25


# --- the watch itself -----------------------------------------------------------------------


@pytest.mark.procsafe(start_methods="fork spawn")
def test_a_worker_gone_before_the_watch_opened_is_settled(
    mp_context: BaseContext, mp_start_method: str, sigchld_ignored: None
) -> None:
    process = mp_context.Process(target=hard_exit, args=(0,))  # type: ignore[attr-defined]
    process.start()
    assert connection.wait([process.sentinel], WAIT)
    deadline = time.monotonic() + WAIT
    while os.path.exists(f"/proc/{process.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)  # the kernel removes it once it exited: SIGCHLD is ignored

    watch = _exits.ExitWatch(process, mp_start_method)

    assert watch.exitcode() == _exits.UNKNOWN
    assert watch.collected_elsewhere
    assert watch.status(_exits.UNKNOWN) == ELSEWHERE
    process.join(WAIT)  # multiprocessing's own join returns too
    assert process.exitcode == _exits.UNKNOWN


def test_a_running_worker_is_not_taken_for_gone(
    mp_context: BaseContext, mp_start_method: str, request: pytest.FixtureRequest
) -> None:
    group = _group(mp_context, mp_start_method, request.node.nodeid, 0.3)
    worker = group(spin_forever_in_here)
    with pytest.raises(WorkerTimeout):
        worker.join()
    assert worker.exitcode is None
    assert "is still running" in worker.diagnosis()
    problems = group.close()
    assert len(problems) == 1
    assert "was still running after the 0.3s timeout" in problems[0]
    assert worker.exitcode == -signal.SIGTERM  # a real exit code, not UNKNOWN
