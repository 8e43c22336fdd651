"""End-to-end: shared state from mp_channels, and leaked segments and semaphores.

Each inner run covers every start method at once (the mp_* fixtures parametrize the inner
tests) under ``--procsafe-leaks=fail``; many cases share one run, since each costs about
a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from e2ekit import run
from pytest_procsafe import _methods
from pytest_procsafe import _segments
from survivors import no_survivors

ALL = _methods.available()
N = len(ALL)
linux_only = pytest.mark.skipif(not _segments.LINUX, reason="/dev/shm: Linux")


def report(pytester: pytest.Pytester) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / "report.json").read_text())
    return data


def settled(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[pytest.RunResult, list[str]]:
    """Run, wait until every process of the run has exited (the resource tracker outlives
    pytest briefly), and return what the tracker said on the run's stderr."""
    with no_survivors(monkeypatch):
        # capture=sys: with fd capture the tracker, started during a test, would write
        # into the capture's temporary file instead.
        result = run(pytester, "--capture=sys", *args)
    stderr = (pytester.path / "stderr").read_text()
    return result, [line for line in stderr.splitlines() if "resource_tracker" in line]


PRIMITIVES = """
    import os
    import pickle
    import threading
    from multiprocessing.shared_memory import SharedMemory

    import pytest

    from pytest_procsafe import ChannelTimeout


    def add(lock, counter, times):
        for _ in range(times):
            with lock:
                counter.value += 1


    def reenter(rlock, array):
        with rlock:
            with rlock:
                array[0] = 7


    def take_one(semaphore):
        return semaphore.acquire(timeout=5)


    def wait_for_event(event):
        return event.wait()


    def wait_for_flag(condition, flag):
        with condition:
            return condition.wait_for(lambda: flag.value == 1)


    def meet(barrier):
        return barrier.wait()


    def write(block):
        block.buf[:5] = b"hello"
        block.close()


    def test_lock_and_value(mp_process, mp_channels):
        lock, counter = mp_channels.lock(), mp_channels.value("i", 0)
        workers = [mp_process(add, lock, counter, 50) for _ in range(3)]
        for worker in workers:
            worker.result()
        assert counter.value == 150


    def test_rlock_and_array_in_a_closure(mp_process, mp_channels):
        rlock, array = mp_channels.rlock(), mp_channels.array("i", [0, 0])
        mp_process(lambda: reenter(rlock, array)).result()
        assert array[:] == [7, 0]


    def test_semaphore(mp_process, mp_channels):
        semaphore = mp_channels.semaphore(2)
        assert [mp_process(take_one, semaphore).result() for _ in range(2)] == [True, True]
        assert semaphore.acquire(timeout=0.05) is False  # explicit: the standard answer


    def test_event(mp_process, mp_channels):
        event = mp_channels.event()
        assert event.wait(0.05) is False
        worker = mp_process(wait_for_event, event)
        event.set()
        assert worker.result() is True


    def test_condition(mp_process, mp_channels):
        condition, flag = mp_channels.condition(), mp_channels.value("i", 0)
        worker = mp_process(wait_for_flag, condition, flag)
        with condition:
            assert condition.wait(0.05) is False
            flag.value = 1
            condition.notify_all()
        assert worker.result() is True


    def test_barrier(mp_process, mp_channels):
        barrier = mp_channels.barrier(3)
        workers = [mp_process(meet, barrier) for _ in range(2)]
        indexes = {barrier.wait(), *(worker.result() for worker in workers)}
        assert indexes == {0, 1, 2}
        with pytest.raises(threading.BrokenBarrierError):
            mp_channels.barrier(2).wait(timeout=0.05)


    def test_shared_memory(mp_process, mp_channels):
        block = mp_channels.shared_memory(16)
        mp_process(write, block).result()
        assert bytes(block.buf[:5]) == b"hello"
        assert os.path.exists("/dev/shm/" + block.name) or os.name != "posix"


    def test_locks_still_travel_only_by_inheritance(mp_channels, mp_start_method):
        lock = mp_channels.lock()
        if mp_start_method == "fork":
            pytest.skip("fork: locks are inherited, never pickled")
        with pytest.raises(RuntimeError, match="inheritance"):
            pickle.dumps(lock)


    def test_bad_arguments(mp_channels):
        with pytest.raises(ValueError, match="typecode 'q!'.*allowed"):
            mp_channels.value("q!", 0)
        with pytest.raises(ValueError, match="size must be an int > 0, got 0"):
            mp_channels.shared_memory(0)
        with pytest.raises(ValueError, match="parties must be an int >= 1"):
            mp_channels.barrier(0)
        with pytest.raises(ValueError, match="timeout"):
            mp_channels.lock().acquire(timeout=-1)


    def hold(lock, held):
        lock.acquire()
        held.set()
        os.kill(os.getpid(), 9)


    def acquire_in_worker(lock):
        lock.acquire()


    @pytest.mark.procsafe(timeout=2)
    def test_a_worker_waits_bounded_too(mp_process, mp_channels):
        lock = mp_channels.lock()
        lock.acquire()
        worker = mp_process(acquire_in_worker, lock)
        with pytest.raises(ChannelTimeout, match="acquire.. on lock #1 timed out after 2s"):
            worker.result(timeout=60)
        lock.release()


    def test_a_dead_holder_fails_fast(mp_process, mp_channels):
        lock, held = mp_channels.lock(), mp_channels.event()
        worker = mp_process(hold, lock, held)
        assert held.wait()
        worker.join()
        assert worker.exitcode == -9
        # "gave up", not "timed out": it ends as soon as it sees every worker gone.
        with pytest.raises(ChannelTimeout, match="(?s)gave up.*killed by SIGKILL"):
            lock.acquire()
"""


def test_each_primitive_under_every_start_method(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(PRIMITIVES)
    result, complaints = settled(pytester, monkeypatch, "--procsafe-leaks=fail", "-v")
    skipped = 1 if "fork" in ALL else 0
    result.assert_outcomes(passed=11 * N - skipped, skipped=skipped)
    for method in ALL:
        result.stdout.fnmatch_lines([f"*test_barrier[[]{method}[]] PASSED*"])
    assert complaints == []


HANGS = """
    import os
    import signal

    import pytest

    from pytest_procsafe import ChannelTimeout


    def hold_and_die(lock, held):
        lock.acquire()
        held.set()
        os.kill(os.getpid(), signal.SIGKILL)


    def never_arrives(barrier):
        return "gone"


    def test_a_worker_killed_holding_the_lock(mp_process, mp_channels):
        lock, held = mp_channels.lock(name="the lock"), mp_channels.event()
        mp_process.start(hold_and_die, args=(lock, held), name="holder")
        assert held.wait()
        with lock:
            pass


    def test_a_barrier_a_worker_never_reaches(mp_process, mp_channels):
        barrier = mp_channels.barrier(2)
        assert mp_process.start(never_arrives, args=(barrier,), name="absent").result() == "gone"
        try:
            barrier.wait()
        finally:
            assert barrier.broken


    def test_an_event_nobody_sets(mp_process, mp_channels):
        event = mp_channels.event()
        mp_process(os.getpid).result()
        event.wait()


    def test_a_condition_nobody_notifies(mp_process, mp_channels):
        condition = mp_channels.condition()
        mp_process(os.getpid).result()
        with condition:
            condition.wait()
"""


def test_waits_nothing_can_end_fail_fast_with_the_diagnosis(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(HANGS)
    # A 60s timeout: each failure below comes from the early end, not from waiting it out.
    result = run(pytester, "--procsafe-leaks=fail", "--procsafe-timeout=60", "--durations=0")
    # The killed holder also errors its test: nothing read its exit code (DESIGN.md).
    result.assert_outcomes(failed=4 * N, errors=N)
    result.stdout.fnmatch_lines(
        [
            "*ChannelTimeout: acquire() on the lock gave up after *: every worker of this "
            "test has exited and it is still held (by a process that is gone)*",
            "*workers of this test:",
            "*worker 'holder' pid * was killed by SIGKILL*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*ChannelTimeout: wait() on barrier #1 gave up after *nobody is left to notify*",
            "*worker 'absent' pid * returned*",
        ]
    )
    result.stdout.fnmatch_lines(["*ChannelTimeout: wait() on event #1 gave up*"])
    result.stdout.fnmatch_lines(["*ChannelTimeout: wait() on condition #1 gave up*"])
    durations = [line for line in result.outlines if " call " in line]
    assert len(durations) == 4 * N
    assert all(float(line.split("s")[0]) < 30 for line in durations), durations


LEAKS = """
    import multiprocessing
    import os
    from multiprocessing.shared_memory import SharedMemory

    import pytest

    KEPT = []  # alive for the whole session: multiprocessing unlinks it at exit


    def made(name):
        with open("made.txt", "a") as file:
            file.write(name + "\\n")


    def make_a_lock_and_vanish(path):
        lock = multiprocessing.get_context("spawn").Lock()
        with open(path, "a") as file:
            file.write(lock._semlock.name + "\\n")
        os._exit(0)  # no finalizer unlinks it


    @pytest.fixture(scope="module")
    def leaky_fixture():
        block = SharedMemory(create=True, size=8)
        made(block.name)
        yield
        block.close()


    @pytest.fixture(scope="module")
    def tidy_fixture():
        block = SharedMemory(create=True, size=8)
        yield
        block.close()
        block.unlink()


    def test_a_block_never_unlinked():
        block = SharedMemory(create=True, size=64)
        made(block.name)
        block.close()


    def test_a_block_unlinked():
        block = SharedMemory(create=True, size=64)
        block.close()
        block.unlink()


    def test_channels_blocks_are_cleaned_up(mp_channels):
        mp_channels.shared_memory(64).buf[0] = 1
        mp_channels.lock()


    def test_a_lock_alive_in_this_process_is_not_a_leak():
        KEPT.append(multiprocessing.get_context("spawn").Lock())


    def test_a_semaphore_a_worker_leaked(mp_process):
        mp_process(make_a_lock_and_vanish, "made.txt").join()


    def test_uses_the_fixtures(leaky_fixture, tidy_fixture):
        pass
"""


@linux_only
@pytest.mark.parametrize(
    ("mode", "outcomes"),
    [
        pytest.param(["--procsafe-leaks=fail"], {"passed": 4 + 2 * N, "errors": 1 + N}, id="fail"),
        pytest.param(
            ["--procsafe-leaks=warn"], {"passed": 4 + 2 * N, "warnings": 2 + N}, id="warn"
        ),
    ],
)
def test_leaked_segments_are_reported_and_unlinked(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    mode: list[str],
    outcomes: dict[str, int],
) -> None:
    pytester.makepyfile(LEAKS)
    result, complaints = settled(pytester, monkeypatch, *mode, "--procsafe-report=report.json")
    result.assert_outcomes(**outcomes)
    made = (pytester.path / "made.txt").read_text().split()
    assert len(made) == 2 + N
    leaks = report(pytester)["leaks"]
    names = {leak["name"]: leak for leak in leaks}
    assert set(names) == set(made)
    for leak in leaks:
        assert leak["pid"] is None
        assert leak["action"] == "unlinked"
        assert leak["kind"] == ("semaphore" if leak["name"].startswith("/") else "shared_memory")
    assert report(pytester)["counts"]["semaphore"] == N
    assert report(pytester)["counts"]["shared_memory"] == 2
    owners = {leak["owner"] for leak in leaks}
    assert "fixture leaky_fixture" in owners
    assert any(owner.endswith("::test_a_block_never_unlinked") for owner in owners)
    for method in ALL:
        assert any(
            owner.endswith(f"::test_a_semaphore_a_worker_leaked[{method}]") for owner in owners
        )
    result.stdout.fnmatch_lines(
        ["*procsafe*", "*left behind by * (*shared_memory*semaphore*)", "*shared_memory psm_*"]
    )
    # Nothing the run made is left, and multiprocessing's tracker had nothing to complain of.
    left = set(os.listdir(_segments.SHM_DIR))
    assert [name for name in made if entry(name) in left] == []
    assert complaints == []


def entry(name: str) -> str:
    """The /dev/shm entry of a reported name."""
    return _segments.entry_of(name, "semaphore" if name.startswith("/") else "shared_memory")


def test_keep_and_ignore_leave_them_to_the_resource_tracker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    ignored = f"ignored-block-{os.getpid()}"
    pytester.makepyfile(
        f"""
        from multiprocessing.shared_memory import SharedMemory


        def test_leak():
            block = SharedMemory(create=True, size=8)
            open("made.txt", "w").write(block.name)
            block.close()


        def test_ignored():
            SharedMemory(name="{ignored}", create=True, size=8).close()
        """
    )
    result, complaints = settled(
        pytester,
        monkeypatch,
        "--procsafe-leaks=fail",
        "--procsafe-cleanup=keep",
        "--procsafe-ignore=^ignored-block-",
    )
    name = (pytester.path / "made.txt").read_text()
    try:
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(
            [f"*shared_memory {name} (appeared in call, kept)*", "*unlink them yourself*"]
        )
        assert ignored not in result.stdout.str()
        # Left alone by procsafe: multiprocessing's tracker unlinks both at exit, complaining.
        assert any("2 leaked shared_memory objects" in line for line in complaints)
        assert not Path(_segments.SHM_DIR, name).exists()
        assert not Path(_segments.SHM_DIR, ignored).exists()
    finally:
        for leftover in (name, ignored):
            _segments.unlink(_segments.Segment(leftover, "shared_memory", "/" + leftover, "call"))
