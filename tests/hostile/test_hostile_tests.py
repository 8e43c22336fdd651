"""Hostile tests: whatever a test does to the process it runs in, procsafe keeps its word.

One inner run holds every case (under every start method where the case uses one); each
inner test is then checked on its own, by a parametrized check of its own.
"""

from __future__ import annotations

import pytest
from hostilekit import METHODS
from hostilekit import Expected
from hostilekit import Once
from hostilekit import expect
from hostilekit import param
from hostilekit import run

CONFTEST = """
    pytest_plugins = ["pytester"]
"""

TESTS = """
    import ctypes
    import multiprocessing
    import os
    import shutil
    import threading
    import time

    import pytest

    from pytest_procsafe import ChannelTimeout
    from pytest_procsafe import WorkerError

    SEEN_BY_FORK = []


    def square(x):
        return x * x


    def sees_parent_memory():
        return bool(SEEN_BY_FORK)


    def sleep_forever(path=None):
        if path is not None:
            with open(path, "w"):
                pass
        while True:
            time.sleep(1)


    def wait_for_file(path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "the worker never got ready"
            time.sleep(0.01)


    def slow_value(seconds, value):
        time.sleep(seconds)
        return value


    def test_fork_and_forget(mp_process):
        assert mp_process(square, 4).result() == 16
        pid = os.fork()
        if pid == 0:
            try:
                time.sleep(60)
            finally:
                os._exit(0)


    def test_kill_own_manager(mp_manager):
        shared = mp_manager.dict(a=1)
        assert shared["a"] == 1
        mp_manager._process.kill()
        mp_manager._process.join(10)


    @pytest.mark.procsafe(timeout=1)
    def test_kill_own_queue_feeder(mp_queue):
        mp_queue.put("first")
        assert mp_queue.get() == "first"
        feeder = mp_queue._thread
        # Raise SystemExit inside the feeder thread: it dies at its next bytecode.
        killed = ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(feeder.ident), ctypes.py_object(SystemExit)
        )
        assert killed == 1
        mp_queue.put("never flushed")
        feeder.join(10)
        assert not feeder.is_alive()
        with pytest.raises(ChannelTimeout):
            mp_queue.get()


    def test_change_global_start_method():
        assert multiprocessing.get_start_method(allow_none=True) is None, "procsafe set it"
        multiprocessing.set_start_method("spawn")


    def test_force_global_start_method():
        multiprocessing.set_start_method("forkserver", force=True)
        process = multiprocessing.Process(target=square, args=(3,))
        process.start()
        process.join(60)
        assert process.exitcode == 0


    def test_fixtures_keep_their_method(mp_process, mp_context, mp_start_method):
        assert multiprocessing.get_start_method() == "forkserver"  # the test's choice
        assert mp_context.get_start_method() == mp_start_method
        SEEN_BY_FORK.append(1)
        try:
            assert mp_process(sees_parent_memory).result() == (mp_start_method == "fork")
        finally:
            SEEN_BY_FORK.clear()


    @pytest.mark.procsafe(timeout=1)
    def test_monkeypatched_os_kill(monkeypatch, mp_process, tmp_path):
        calls = []
        monkeypatch.setattr(os, "kill", lambda *args: calls.append(args))
        mp_process(sleep_forever, str(tmp_path / "ready"))
        wait_for_file(tmp_path / "ready")


    def test_chdir_into_removed_directory(mp_process, tmp_path):
        gone = tmp_path / "gone"
        gone.mkdir()
        os.chdir(gone)
        try:
            shutil.rmtree(gone)
            assert mp_process(square, 5).result() == 25
        finally:
            os.chdir(tmp_path)


    def test_mp_process_from_a_thread(mp_process):
        results = []
        thread = threading.Thread(target=lambda: results.append(mp_process(square, 7).result()))
        thread.start()
        thread.join(60)
        assert results == [49]


    @pytest.mark.procsafe(timeout=1)
    def test_hung_worker_from_a_thread(mp_process, tmp_path):
        thread = threading.Thread(target=mp_process, args=(sleep_forever, str(tmp_path / "r")))
        thread.start()
        thread.join(60)
        wait_for_file(tmp_path / "r")


    NESTED = '''
    def square(x):
        return x * x

    def test_nested(mp_process):
        assert mp_process(square, 9).result() == 81
    '''


    def test_nested_pytest(mp_process, pytester, mp_start_method):
        outer = mp_process(slow_value, 1.0, "outer survived")
        pytester.makepyfile(test_inner=NESTED)
        result = pytester.runpytest(
            "-p", "procsafe", "-p", "no:cacheprovider", "--procsafe-leaks=fail",
            f"--procsafe-start-methods={mp_start_method}", "-W", "ignore::DeprecationWarning",
        )
        result.assert_outcomes(passed=1)
        assert outer.result() == "outer survived"
        outer.join()
        assert outer.exitcode == 0
"""


def write_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_tests=TESTS)


@pytest.fixture(scope="module")
def hostile_run() -> Once:
    return Once(write_tests)


def expected_outcomes() -> list[object]:
    """``(inner test, expected)`` for every inner test of `TESTS` and start method."""
    passed = Expected(passed=True)
    stopped = "was still running after the 1s timeout, so it was stopped (terminated)"
    params = [
        param("test_change_global_start_method", passed),
        param("test_force_global_start_method", passed),
    ]
    for method in METHODS:
        if method == "fork":
            chdir = passed
        else:
            chdir = Expected(
                failed=True,
                says=(
                    f"WorkerError: cannot start worker 'square-1' ({method}) of test_tests.py::"
                    f"test_chdir_into_removed_directory[{method}]: the current directory of the "
                    "test process no longer exists",
                ),
            )
        for test, expected in (
            (
                "test_fork_and_forget",
                Expected(error=True, says=("left 1 process behind", "leaked pid")),
            ),
            ("test_kill_own_manager", passed),
            ("test_kill_own_queue_feeder", passed),
            ("test_fixtures_keep_their_method", passed),
            # Patching os.kill must not keep procsafe from stopping its own workers.
            ("test_monkeypatched_os_kill", Expected(error=True, says=(stopped,), within=15)),
            ("test_chdir_into_removed_directory", chdir),
            ("test_mp_process_from_a_thread", passed),
            ("test_hung_worker_from_a_thread", Expected(error=True, says=(stopped,), within=15)),
            ("test_nested_pytest", passed),
        ):
            params.append(param(f"{test}[{method}]", expected))
    return params


def test_hostile_tests_fail_the_run(
    hostile_run: Once, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, _ = hostile_run.run(pytester, monkeypatch)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()


@pytest.mark.parametrize(("name", "expected"), expected_outcomes())
def test_hostile_tests(
    hostile_run: Once,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    expected: Expected,
) -> None:
    _, found = hostile_run.run(pytester, monkeypatch)
    expect(found, name, expected)


MANY = """
    import pytest

    from targets import square  # a small module: spawn children need not import pytest


    @pytest.mark.procsafe(timeout=120)
    def test_200_short_lived_workers(mp_process):
        for batch in range(10):
            workers = [mp_process(square, 20 * batch + i) for i in range(20)]
            assert [w.result() for w in workers] == [(20 * batch + i) ** 2 for i in range(20)]
        assert len(mp_process.workers) == 200
        mp_process.join_all()
        assert all(w.exitcode == 0 for w in mp_process.workers)
"""


def test_200_short_lived_workers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_many=MANY, targets="def square(x):\n    return x * x\n")
    result, found = run(pytester, monkeypatch)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    for method in METHODS:
        expect(found, f"test_200_short_lived_workers[{method}]", Expected(passed=True))
