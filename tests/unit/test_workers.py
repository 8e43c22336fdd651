from __future__ import annotations

import queue as queue_module
import signal
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

import pytest
import worker_targets
from worker_targets import Oops
from worker_targets import big_result
from worker_targets import block_on_event
from worker_targets import describe
from worker_targets import exit_with
from worker_targets import hard_exit
from worker_targets import ignore_sigterm_and_sleep
from worker_targets import kill_myself
from worker_targets import parent_death_signal
from worker_targets import put_big_item
from worker_targets import raise_keyboard_interrupt
from worker_targets import raise_needs_two_args
from worker_targets import raise_oops
from worker_targets import return_a_lock
from worker_targets import spin_forever_in_here
from worker_targets import square

from pytest_procsafe import Worker
from pytest_procsafe import WorkerCrashed
from pytest_procsafe import WorkerError
from pytest_procsafe import WorkerGroup
from pytest_procsafe import WorkerTimeout
from pytest_procsafe import _owned
from pytest_procsafe import _workers
from pytest_procsafe._worker import RemoteTraceback

WAIT = 60.0  # generous: only a broken worker ever takes this long
TIMEOUT = 1.0  # the groups' timeout in tests about hangs
GRACE = 0.5


# --- fixtures -------------------------------------------------------------------------


def make_group(
    context: BaseContext,
    method: str,
    owner: str,
    *,
    timeout: float = WAIT,
    kill_grace: float = GRACE,
) -> WorkerGroup:
    return WorkerGroup(
        context, start_method=method, timeout=timeout, kill_grace=kill_grace, owner=owner
    )


@pytest.fixture
def group(
    mp_context: BaseContext, mp_start_method: str, request: pytest.FixtureRequest
) -> Iterator[WorkerGroup]:
    """A group whose workers must all be fine at teardown, unless the test closed it."""
    made = make_group(mp_context, mp_start_method, request.node.nodeid)
    yield made
    if not made.closed:
        assert made.close() == []


@pytest.fixture
def hang_group(
    mp_context: BaseContext, mp_start_method: str, request: pytest.FixtureRequest
) -> Iterator[WorkerGroup]:
    """A group with short waits; the test closes it and checks what it reports."""
    made = make_group(mp_context, mp_start_method, request.node.nodeid, timeout=TIMEOUT)
    yield made
    made.close()


# --- values and names -----------------------------------------------------------------


def test_results_args_kwargs_and_names(group: WorkerGroup) -> None:
    first = group(square, 7)
    second = group(square, 8)
    full = group.start(describe, args=[1, 2], kwargs={"name": "n", "daemon": 1}, name="full")
    via_call = group(describe, target="t", name="passed through")

    assert first.result() == 49
    assert second.result() == 64
    assert full.result() == ((1, 2), {"name": "n", "daemon": 1})
    assert via_call.result() == ((), {"target": "t", "name": "passed through"})
    assert [w.name for w in group.workers] == ["square-1", "square-2", "full", "describe-1"]
    assert all(isinstance(w, Worker) for w in group.workers)
    first.join()
    assert first.exitcode == 0
    assert not first.is_alive()
    assert first.process.name == "square-1"
    assert first.pid == first.process.pid


def test_closures_and_lambdas_are_targets(group: WorkerGroup, mp_context: BaseContext) -> None:
    offset = 100
    queue = mp_context.Queue()
    try:

        def closure(x: int) -> int:
            queue.put(x)
            return x + offset

        assert group(closure, 1).result() == 101
        assert group(lambda: offset * 2).result() == 200
        assert queue.get(timeout=WAIT) == 1
    finally:
        queue.close()
        queue.join_thread()


@pytest.mark.procsafe(start_methods="spawn forkserver")  # a fork inherits every module
def test_a_worker_imports_only_what_it_needs(group: WorkerGroup) -> None:
    # Each import here would cost every spawn/forkserver worker 10-100 ms: pytest, the
    # parent side of procsafe, and cloudpickle while nothing travels by value.
    heavy = (
        "pytest",
        "_pytest",
        "pytest_procsafe.plugin",
        "pytest_procsafe._channels",
        "pytest_procsafe._workers",
        "pytest_procsafe._leaks",
        "cloudpickle",
    )
    assert group(worker_targets.imported, *heavy).result() == []
    # A value only cloudpickle can send still comes back.
    assert group(worker_targets.make_adder, 2).result()(3) == 5


def test_a_big_result_does_not_deadlock_join(group: WorkerGroup) -> None:
    worker = group(big_result, 16 * 1024 * 1024)  # far beyond any pipe buffer
    worker.join()  # the child can only exit once the parent read its result
    assert len(worker.result()) == 16 * 1024 * 1024


def test_names_must_be_unique_strings(group: WorkerGroup) -> None:
    group.start(square, (1,), name="w")
    with pytest.raises(ValueError, match="a worker named 'w' already exists"):
        group.start(square, (2,), name="w")
    with pytest.raises(TypeError, match="a worker name must be a non-empty string"):
        group.start(square, (2,), name="")
    group.workers[0].result()


def test_bad_arguments_are_refused_clearly(group: WorkerGroup, mp_context: BaseContext) -> None:
    with pytest.raises(TypeError, match="a worker target must be callable, got 3"):
        group(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="kwargs must be a mapping or None"):
        group.start(square, (), [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds > 0, got 0"):
        make_group(mp_context, "spawn", "x", timeout=0)
    with pytest.raises(ValueError, match=r"kill_grace must be a number of seconds >= 0"):
        make_group(mp_context, "spawn", "x", kill_grace=-1)
    worker = group(square, 2)
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0, got -1"):
        worker.result(timeout=-1)
    assert worker.result() == 4
    assert group.workers == (worker,)


# --- exceptions -----------------------------------------------------------------------


def test_the_childs_own_exception_is_reraised_with_the_remote_traceback(
    group: WorkerGroup,
) -> None:
    worker = group(raise_oops)
    with pytest.raises(Oops, match="from the worker") as info:
        worker.result()
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in raise_oops" in str(cause)
    assert f'File "{worker_targets.__file__}"' in str(cause)
    with pytest.raises(Oops):  # and again, as often as asked
        worker.result()
    worker.join()
    assert worker.exitcode == 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (
            raise_needs_two_args,
            r"raised .*NeedsTwoArgs: a\+b \(the exception could not be brought back",
        ),
        (raise_keyboard_interrupt, r"raised KeyboardInterrupt \(not re-raised here"),
        (return_a_lock, r"the return value of 'return_a_lock' cannot be pickled back"),
    ],
)
def test_what_cannot_come_back_is_a_worker_error_with_the_text(
    group: WorkerGroup, target: Callable[[], object], message: str
) -> None:
    worker = group(target)
    with pytest.raises(WorkerError, match=message) as info:
        worker.result()
    assert type(info.value) is WorkerError
    assert f"worker '{worker.name}' (pid {worker.pid}, {group.start_method})" in str(info.value)
    if target is not return_a_lock:
        assert f"in {target.__name__}" in str(info.value.__cause__)


def test_system_exit_0_is_a_clean_exit_without_a_result(group: WorkerGroup) -> None:
    assert group(exit_with, 0).result() is None
    assert group(exit_with, None).result() is None


@pytest.mark.parametrize(
    ("target", "arg", "message"),
    [
        (exit_with, 3, r"exited with code 3: SystemExit\(3\)"),
        (hard_exit, 3, r"exited with code 3 before handing back a result$"),
        (hard_exit, 0, r"exited with code 0 before handing back a result \(did the target"),
        (kill_myself, signal.SIGKILL, "was killed by SIGKILL before handing back a result"),
        (kill_myself, signal.SIGSEGV, "was killed by SIGSEGV before handing back a result"),
    ],
)
def test_a_death_without_outcome_is_worker_crashed(
    group: WorkerGroup, target: Callable[[int], None], arg: int, message: str
) -> None:
    worker = group(target, arg)
    with pytest.raises(WorkerCrashed, match=message):
        worker.result()


def test_timeouts_raise_worker_timeout_and_stop_is_not_a_failure(
    group: WorkerGroup, mp_context: BaseContext
) -> None:
    event = mp_context.Event()
    worker = group(block_on_event, event)
    with pytest.raises(WorkerTimeout, match=r"is still running after 0.2s") as info:
        worker.result(timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, WorkerError)
    with pytest.raises(WorkerTimeout):
        worker.join(timeout=0)
    with pytest.raises(WorkerTimeout, match=r"1 of 1 workers .* still running after 0.1s"):
        group.join_all(timeout=0.1)
    worker.stop()
    assert worker.exitcode == -signal.SIGTERM
    assert not worker.is_alive()
    with pytest.raises(WorkerCrashed, match="SIGTERM after the test stopped it"):
        worker.result()


def test_public_exceptions_live_in_the_package() -> None:
    for exc in (WorkerError, WorkerCrashed, WorkerTimeout):
        assert exc.__module__ == "pytest_procsafe"
    assert issubclass(WorkerTimeout, TimeoutError)


# --- teardown: unobserved failures and hangs ------------------------------------------


def test_close_reports_unobserved_failures_only(
    mp_context: BaseContext, mp_start_method: str
) -> None:
    group = make_group(mp_context, mp_start_method, "test_x.py::test_y")
    unseen_raise = group(raise_oops)
    unseen_crash = group(hard_exit, 3)
    unseen_exit = group(exit_with, 4)
    group(hard_exit, 0)  # exit 0 without a result: not a failure
    group(square, 2)  # a value nobody asked for: fine too
    seen_raise = group(raise_oops)
    seen_crash = group(hard_exit, 5)
    with pytest.raises(Oops):
        seen_raise.result()
    seen_crash.join()
    assert seen_crash.exitcode == 5

    problems = group.close()

    where = f"(pid {unseen_raise.pid}, {mp_start_method}) of test_x.py::test_y"
    assert len(problems) == 3
    assert problems[0].startswith(f"worker 'raise_oops-1' {where} raised ")
    assert "Oops: from the worker" in problems[0]
    assert "in raise_oops" in problems[0]
    assert f"worker 'hard_exit-1' (pid {unseen_crash.pid}" in problems[1]
    assert "exited with code 3 before handing back a result" in problems[1]
    assert f"worker 'exit_with-1' (pid {unseen_exit.pid}" in problems[2]
    assert "exited with code 4 (SystemExit(4))" in problems[2]
    assert all("the test never called result() nor read exitcode" in p for p in problems)
    assert group.close() == problems  # idempotent
    with pytest.raises(WorkerError, match="already torn down"):
        group(square, 1)


def test_a_hung_worker_is_dumped_stopped_and_reported(
    hang_group: WorkerGroup, mp_start_method: str
) -> None:
    worker = hang_group(spin_forever_in_here)
    begin = time.monotonic()

    problems = hang_group.close()

    elapsed = time.monotonic() - begin
    assert worker.process.exitcode == -signal.SIGTERM
    assert len(problems) == 1
    report = problems[0]
    assert report.startswith(
        f"worker 'spin_forever_in_here-1' (pid {worker.pid}, {mp_start_method}) of "
        f"{hang_group.owner} was still running after the 1s timeout"
    )
    assert "stopped (terminated)" in report
    assert "in spin_forever_in_here" in report
    assert "most recent call first" in report
    assert elapsed < TIMEOUT + GRACE + 5  # generous: the bound is the point
    assert not {w.pid for w in hang_group.workers} & _owned.pids()


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace(hang_group: WorkerGroup) -> None:
    worker = hang_group(ignore_sigterm_and_sleep)
    begin = time.monotonic()

    problems = hang_group.close()

    assert time.monotonic() - begin < TIMEOUT + GRACE + 5
    assert worker.process.exitcode == -signal.SIGKILL
    assert len(problems) == 1
    assert "stopped (killed after the 0.5s grace)" in problems[0]
    assert "in ignore_sigterm_and_sleep" in problems[0]


def test_a_wait_that_used_up_the_timeout_is_not_repeated_at_teardown(
    hang_group: WorkerGroup,
) -> None:
    hang_group(spin_forever_in_here)
    begin = time.monotonic()
    with pytest.raises(WorkerTimeout):
        hang_group.workers[0].result()

    problems = hang_group.close()

    # One timeout, not two: the worker already had its time in result().
    assert time.monotonic() - begin < 2 * TIMEOUT
    assert "in spin_forever_in_here" in problems[0]


# --- pumps, diagnosis, ownership ------------------------------------------------------


def test_pumps_run_while_waiting_so_a_blocked_writer_can_exit(
    group: WorkerGroup, mp_context: BaseContext
) -> None:
    queue = mp_context.Queue()
    received: list[int] = []

    def drain() -> None:
        try:
            while True:
                received.append(len(queue.get_nowait()))
        except queue_module.Empty:
            pass

    try:
        worker = group(put_big_item, queue, 4 * 1024 * 1024)
        group.add_pump(drain)
        worker.join()  # without the pump this would wait for ever: the feeder is blocked
        assert received == [4 * 1024 * 1024]
        assert worker.exitcode == 0
    finally:
        queue.close()
        queue.join_thread()


def test_a_failing_pump_is_reported_and_dropped(
    mp_context: BaseContext, mp_start_method: str
) -> None:
    group = make_group(mp_context, mp_start_method, "owner")
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("pump broke")

    group.add_pump(broken)
    group(square, 3).result()
    problems = group.close()

    assert calls == [1]
    assert len(problems) == 1
    assert "while waiting for the workers of owner, the pump" in problems[0]
    assert "RuntimeError: pump broke" in problems[0]
    with pytest.raises(TypeError, match="a pump must be callable"):
        group.add_pump(None)  # type: ignore[arg-type]


def test_diagnose_says_what_each_worker_is_doing(
    group: WorkerGroup, mp_context: BaseContext
) -> None:
    assert group.diagnose() == ""
    event = mp_context.Event()
    done = group(square, 4)
    raised = group(raise_oops)
    crashed = group(hard_exit, 2)
    running = group(block_on_event, event)
    done.join()
    raised.join()
    crashed.join()

    lines = group.diagnose().splitlines()

    assert lines == [
        f"worker 'square-1' pid {done.pid} returned 16 and exited with code 0",
        f"worker 'raise_oops-1' pid {raised.pid} raised worker_targets.Oops: from the worker "
        "and exited with code 1",
        f"worker 'hard_exit-1' pid {crashed.pid} exited with code 2 before handing back a result",
        f"worker 'block_on_event-1' pid {running.pid} is still running",
    ]
    assert {done.pid, raised.pid, crashed.pid, running.pid} <= _owned.pids(_owned.WORKER)
    event.set()
    running.join()
    with pytest.raises(Oops):
        raised.result()
    assert crashed.exitcode == 2


def test_stop_all_stops_every_live_group(mp_context: BaseContext, mp_start_method: str) -> None:
    first = make_group(mp_context, mp_start_method, "a", timeout=WAIT)
    second = make_group(mp_context, mp_start_method, "b", timeout=WAIT)
    workers = [first(ignore_sigterm_and_sleep), second(spin_forever_in_here)]
    deadline = time.monotonic() + WAIT
    while not _ignores_sigterm(workers[0].pid) and time.monotonic() < deadline:
        time.sleep(0.01)

    _workers.stop_all(GRACE)

    assert [w.process.exitcode for w in workers] == [-signal.SIGKILL, -signal.SIGTERM]
    assert first.close() == []  # stopped by procsafe: not a crash
    assert second.close() == []
    assert first not in _workers._LIVE
    assert second not in _workers._LIVE


def _ignores_sigterm(pid: int) -> bool:
    if not sys.platform.startswith("linux"):
        time.sleep(0.5)
        return True
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")
@pytest.mark.procsafe(start_methods="spawn forkserver")  # no fork from a second thread
def test_the_parent_death_signal_follows_the_starting_thread(
    group: WorkerGroup, mp_start_method: str
) -> None:
    from_main = group(parent_death_signal)
    started: list[Worker] = []
    thread = threading.Thread(target=lambda: started.append(group(parent_death_signal)))
    thread.start()
    thread.join(WAIT)

    assert from_main.result() == signal.SIGKILL
    # A forkserver worker's parent is the server, which outlives any thread of ours.
    expected = signal.SIGKILL if mp_start_method == "forkserver" else 0
    assert started[0].result() == expected


def test_a_start_interrupted_after_the_child_exists_leaves_no_child(
    mp_context: BaseContext, mp_start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while a spawn child is being launched: the child exists, the start never
    # returned. It is procsafe's, so it must not be left to the leak checks as an orphan.
    started: list[BaseProcess] = []
    original = BaseProcess.start

    def start_then_interrupt(self: BaseProcess) -> None:
        original(self)
        started.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(BaseProcess, "start", start_then_interrupt)
    group = make_group(mp_context, mp_start_method, "test_interrupted_start")
    try:
        with pytest.raises(KeyboardInterrupt):
            group(square, 3)
    finally:
        monkeypatch.undo()
        assert group.close() == []
    (process,) = started
    assert process.exitcode is not None  # stopped and reaped before the error went on
    assert group.workers == ()
    assert process.pid not in _owned.pids()
