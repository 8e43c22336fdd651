"""Hostile workers: whatever a worker does to itself, the run ends, reports it and leaves nothing.

One inner run holds every case under every start method; each inner test is then checked
on its own (outcome, message, time), by a parametrized check of its own.
"""

from __future__ import annotations

import pytest
from hostilekit import METHODS
from hostilekit import Expected
from hostilekit import Once
from hostilekit import expect
from hostilekit import param

WORKERS = """
    import ctypes
    import os
    import pickle
    import resource
    import signal
    import sys
    import threading
    import time

    import pytest

    from pytest_procsafe import WorkerCrashed
    from pytest_procsafe import WorkerError

    HANG = pytest.mark.procsafe(timeout=1)
    # Moving 50-100 MB is not about timeouts: give a loaded machine room.
    BULK = pytest.mark.procsafe(timeout=60)


    def ready(path):
        with open(path, "w"):
            pass


    def wait_ready(path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "the worker never got ready"
            time.sleep(0.01)


    def sleep_forever():
        while True:
            time.sleep(1)


    def fork_sleeper():
        pid = os.fork()
        if pid == 0:
            try:
                sleep_forever()
            finally:
                os._exit(0)
        return pid


    # --- targets ---------------------------------------------------------------------

    def ignore_sigterm(path):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ready(path)
        sleep_forever()


    def block_sigterm_and_sigint(path):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        ready(path)
        sleep_forever()


    def grandchild_then_exit():
        return fork_sleeper()


    def tree_then_hang(path):
        pid = os.fork()
        if pid == 0:
            try:
                fork_sleeper()
                sleep_forever()
            finally:
                os._exit(0)
        ready(path)
        sleep_forever()


    def setsid_then_hang(path):
        os.setsid()
        fork_sleeper()
        ready(path)
        sleep_forever()


    def close_streams():
        sys.stdout.flush()
        sys.stderr.flush()
        os.close(1)
        os.close(2)
        return 42


    def redirect_streams():
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.stdout = sys.stderr = None
        return "redirected"


    def close_streams_then_raise():
        os.close(1)
        os.close(2)
        sys.stdout = sys.stderr = None
        raise ValueError("raised with stdout and stderr closed")


    def flood_stdout():
        chunk = "x" * (1 << 20)
        for _ in range(50):
            sys.stdout.write(chunk)
        sys.stdout.flush()
        return "flooded"


    def segfault():
        ctypes.string_at(0)


    def recurse(depth=0):
        return recurse(depth + 1)


    def exhaust_memory():
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[0])
        limit = pages * resource.getpagesize() + (256 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        hoard = []
        while True:
            hoard.append(bytearray(32 << 20))


    def big_value():
        return b"v" * (100 * 1000 * 1000)


    def unpicklable_value():
        return threading.Lock()


    class CannotPickle(Exception):
        def __reduce__(self):
            raise TypeError("this exception refuses to be pickled")


    class CannotUnpickle(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}+{b}")


    def raise_unpicklable():
        raise CannotPickle("bad exception")


    def raise_unloadable():
        raise CannotUnpickle(1, 2)


    def exit_zero():
        raise SystemExit(0)


    def keyboard_interrupt():
        raise KeyboardInterrupt


    def hard_exit_zero():
        os._exit(0)


    # --- tests -------------------------------------------------------------------------

    @HANG
    def test_ignores_sigterm(mp_process, tmp_path):
        mp_process(ignore_sigterm, str(tmp_path / "ready"))
        wait_ready(tmp_path / "ready")


    @HANG
    def test_blocks_sigterm_and_sigint(mp_process, tmp_path):
        mp_process(block_sigterm_and_sigint, str(tmp_path / "ready"))
        wait_ready(tmp_path / "ready")


    @pytest.mark.procsafe(timeout=20)
    def test_forks_grandchild_and_exits(mp_process):
        worker = mp_process(grandchild_then_exit)
        assert worker.result() > 0
        worker.join()


    @HANG
    def test_tree_three_levels_hangs(mp_process, tmp_path):
        mp_process(tree_then_hang, str(tmp_path / "ready"))
        wait_ready(tmp_path / "ready")


    @HANG
    def test_setsid_then_hangs(mp_process, tmp_path):
        mp_process(setsid_then_hang, str(tmp_path / "ready"))
        wait_ready(tmp_path / "ready")


    def test_closes_stdout_and_stderr(mp_process):
        assert mp_process(close_streams).result() == 42


    def test_redirects_stdout_and_stderr(mp_process):
        assert mp_process(redirect_streams).result() == "redirected"


    def test_closed_streams_then_raise(mp_process):
        with pytest.raises(ValueError, match="raised with stdout and stderr closed"):
            mp_process(close_streams_then_raise).result()


    @BULK
    def test_writes_50mb_to_stdout(mp_process):
        assert mp_process(flood_stdout).result() == "flooded"


    def test_segfault(mp_process):
        with pytest.raises(WorkerCrashed, match="killed by SIGSEGV"):
            mp_process(segfault).result()


    def test_segfault_unobserved(mp_process):
        mp_process(segfault).join()


    def test_recursion_limit(mp_process):
        with pytest.raises(RecursionError):
            mp_process(recurse).result()


    def test_memory_limit(mp_process):
        with pytest.raises(MemoryError):
            mp_process(exhaust_memory).result()


    @BULK
    def test_returns_100mb(mp_process):
        assert len(mp_process(big_value).result()) == 100 * 1000 * 1000


    def test_returns_unpicklable(mp_process):
        with pytest.raises(WorkerError, match="cannot be pickled back"):
            mp_process(unpicklable_value).result()


    def test_exception_pickling_fails(mp_process):
        with pytest.raises(WorkerError, match="could not be brought back") as info:
            mp_process(raise_unpicklable).result()
        assert "CannotPickle: bad exception" in str(info.value.__cause__)


    def test_exception_unpickling_fails(mp_process):
        with pytest.raises(WorkerError, match="could not be brought back") as info:
            mp_process(raise_unloadable).result()
        assert "CannotUnpickle: 1+2" in str(info.value.__cause__)


    def test_exception_pickling_fails_unobserved(mp_process):
        mp_process(raise_unpicklable).join()


    def test_system_exit_zero(mp_process):
        worker = mp_process(exit_zero)
        assert worker.result() is None
        worker.join()
        assert worker.exitcode == 0


    def test_keyboard_interrupt(mp_process):
        with pytest.raises(WorkerError, match="KeyboardInterrupt"):
            mp_process(keyboard_interrupt).result()


    def test_keyboard_interrupt_unobserved(mp_process):
        mp_process(keyboard_interrupt).join()


    def test_os_exit_zero_before_result(mp_process):
        with pytest.raises(WorkerCrashed, match="exited with code 0 before handing back"):
            mp_process(hard_exit_zero).result()
"""


def write_workers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_workers=WORKERS)


@pytest.fixture(scope="module")
def workers_run() -> Once:
    return Once(write_workers)


def expected_outcomes() -> list[object]:
    """``(inner test, expected)`` for every inner test of `WORKERS` and start method."""
    stopped = "so it was stopped (killed after the 0.5s grace)"
    hung = "was still running after the 1s timeout, so it was stopped"
    passed = Expected(passed=True)
    params = []
    for method in METHODS:
        for test, expected in (
            # Hangs are stopped within timeout + stack wait + grace, generously bounded.
            ("test_ignores_sigterm", Expected(error=True, says=(stopped,), within=15)),
            ("test_blocks_sigterm_and_sigint", Expected(error=True, says=(stopped,), within=15)),
            # The grandchild holds the worker's exit sentinel: waits must still see it exit.
            (
                "test_forks_grandchild_and_exits",
                Expected(error=True, says=("left 1 process behind", "orphan pid"), within=10),
            ),
            (
                "test_tree_three_levels_hangs",
                Expected(error=True, says=(hung, "left 2 processes behind"), within=15),
            ),
            (
                "test_setsid_then_hangs",
                Expected(error=True, says=(hung, "left 1 process behind"), within=15),
            ),
            ("test_closes_stdout_and_stderr", passed),
            ("test_redirects_stdout_and_stderr", passed),
            ("test_closed_streams_then_raise", passed),
            ("test_writes_50mb_to_stdout", passed),
            ("test_segfault", passed),
            ("test_recursion_limit", passed),
            ("test_memory_limit", passed),
            ("test_returns_100mb", passed),
            ("test_returns_unpicklable", passed),
            ("test_exception_pickling_fails", passed),
            ("test_exception_unpickling_fails", passed),
            ("test_system_exit_zero", passed),
            ("test_keyboard_interrupt", passed),
            ("test_os_exit_zero_before_result", passed),
            (
                "test_segfault_unobserved",
                Expected(error=True, says=("was killed by SIGSEGV before handing back a result",)),
            ),
            (
                "test_exception_pickling_fails_unobserved",
                Expected(
                    error=True,
                    says=(
                        "raised test_workers.CannotPickle: bad exception",
                        "refuses to be pickled",
                    ),
                ),
            ),
            (
                "test_keyboard_interrupt_unobserved",
                Expected(error=True, says=("raised KeyboardInterrupt",)),
            ),
        ):
            params.append(param(f"{test}[{method}]", expected))
    return params


def test_hostile_workers_fail_the_run(
    workers_run: Once, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, _ = workers_run.run(pytester, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()


def test_worker_output_goes_to_the_capture(
    workers_run: Once, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The 50 MB went to the capture, not to the terminal: only failures show output.
    result, _ = workers_run.run(pytester, monkeypatch)
    assert "x" * 1000 not in result.stdout.str()


@pytest.mark.parametrize(("name", "expected"), expected_outcomes())
def test_hostile_workers(
    workers_run: Once,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    expected: Expected,
) -> None:
    _, found = workers_run.run(pytester, monkeypatch)
    expect(found, name, expected)
