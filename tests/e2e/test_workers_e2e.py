"""End-to-end: mp_process under every start method, through a real inner pytest run."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import pytest

from e2ekit import FAIL_ON_LEAKS
from e2ekit import run
from pytest_procsafe import _methods
from survivors import no_survivors

METHODS = _methods.available()

CONFTEST = """
    import pytest

    def triple(x):
        return 3 * x

    @pytest.fixture
    def conftest_target():
        return triple
"""

OUTCOMES = """
    import os
    import signal
    import time

    import pytest

    from pytest_procsafe import WorkerCrashed, WorkerTimeout


    def square(x):
        return x * x


    def boom():
        raise ValueError("boom in worker")


    def die_by_signal():
        os.kill(os.getpid(), signal.SIGKILL)


    def hard_exit():
        os._exit(3)


    def sleep_long():
        time.sleep(60)


    def test_value(mp_process):
        assert mp_process(square, 6).result() == 36


    def test_exception(mp_process):
        with pytest.raises(ValueError, match="boom in worker"):
            mp_process(boom).result()


    def test_crash_by_signal(mp_process):
        with pytest.raises(WorkerCrashed, match="killed by SIGKILL"):
            mp_process(die_by_signal).result()


    def test_crash_by_exit(mp_process):
        worker = mp_process(hard_exit)
        worker.join()
        assert worker.exitcode == 3


    def test_closure_and_lambda(mp_process):
        base = 5

        def add(x):
            return base + x

        assert mp_process(add, 1).result() == 6
        assert mp_process(lambda: base * 3).result() == 15


    def test_conftest_target(mp_process, conftest_target):
        assert mp_process(conftest_target, 4).result() == 12


    def test_stopped_is_fine(mp_process):
        worker = mp_process(sleep_long)
        with pytest.raises(WorkerTimeout):
            worker.join(timeout=0.1)
        worker.stop()
        assert not worker.is_alive()


    def test_unobserved_raise(mp_process):
        mp_process(boom)


    def test_unobserved_crash(mp_process):
        mp_process(die_by_signal).join()
"""

HANGS = """
    import signal
    import time

    import pytest

    short = pytest.mark.procsafe(timeout=1, kill_grace=0.5)


    def spin_forever_here():
        while True:
            time.sleep(0.01)


    def ignore_sigterm():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(0.01)


    @short
    def test_hung(mp_process):
        mp_process(spin_forever_here)


    @short
    def test_hung_result(mp_process):
        mp_process(spin_forever_here).result()


    @short
    def test_sigterm_ignored(mp_process):
        mp_process(ignore_sigterm)
"""


def test_outcomes_across_start_methods(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_outcomes=OUTCOMES)
    with no_survivors(monkeypatch):
        result = run(pytester, options=FAIL_ON_LEAKS)

    n = len(METHODS)
    result.assert_outcomes(passed=9 * n, errors=2 * n)
    for method in METHODS:
        where = rf"test_outcomes.py::test_unobserved_raise[[]{method}[]]"
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of test_unobserved_raise[[]{method}[]]*",
                f"*worker 'boom-1' (pid *, {method}) of {where} raised ValueError: boom in "
                "worker, and the test never called result() nor read exitcode. Remote "
                "traceback:",
                "*test_outcomes.py*, line *, in boom",
                '*raise ValueError("boom in worker")',
                "*ValueError: boom in worker",
            ]
        )
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of test_unobserved_crash[[]{method}[]]*",
                f"*worker 'die_by_signal-1' (pid *, {method}) of "
                f"test_outcomes.py::test_unobserved_crash[[]{method}[]] was killed by SIGKILL "
                "before handing back a result, and the test never called result() nor read "
                "exitcode.",
            ]
        )


def test_hung_workers_are_dumped_and_stopped_within_timeout_and_grace(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_hangs=HANGS)
    with no_survivors(monkeypatch):
        result = run(pytester, "--junitxml=junit.xml", options=FAIL_ON_LEAKS)

    n = len(METHODS)
    result.assert_outcomes(passed=2 * n, failed=n, errors=3 * n)
    for method in METHODS:
        for test in ("test_hung", "test_hung_result"):
            result.stdout.fnmatch_lines(
                [
                    f"*ERROR at teardown of {test}[[]{method}[]]*",
                    f"*worker 'spin_forever_here-1' (pid *, {method}) of "
                    f"test_hangs.py::{test}[[]{method}[]] was still running after the 1s "
                    "timeout, so it was stopped (terminated).",
                    "Its Python stack (all threads) when it was stopped:",
                    "*test_hangs.py*, line * in spin_forever_here",
                ]
            )
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of test_sigterm_ignored[[]{method}[]]*",
                f"*worker 'ignore_sigterm-1' (pid *, {method}) of "
                f"test_hangs.py::test_sigterm_ignored[[]{method}[]] was still running after the "
                "1s timeout, so it was stopped (killed after the 0.5s grace).",
                "*test_hangs.py*, line * in ignore_sigterm",
            ]
        )
        result.stdout.fnmatch_lines(
            [
                f"*test_hung_result[[]{method}[]]*",
                f"*WorkerTimeout: worker 'spin_forever_here-1' (pid *, {method}) of "
                f"test_hangs.py::test_hung_result[[]{method}[]] is still running after 1s (teardown shows where it is stuck)",
            ]
        )
    # Each test (setup + call + teardown) takes about timeout + grace, never twice that:
    # generous bounds, since the bound is what is being tested.
    for case in ElementTree.parse(pytester.path / "junit.xml").getroot().iter("testcase"):
        assert float(case.get("time", "inf")) < 1 + 0.5 + 3, case.get("name")


EXITS = """
    import os
    import signal
    import time

    import pytest

    from pytest_procsafe import ChannelTimeout, WorkerCrashed

    ELSEWHERE = "exited with an unknown status (its exit status was collected elsewhere)"
    BOUND = 5  # the procsafe timeout is 30 s: a wait that does not see the exit takes that


    def who():
        return os.getpid()


    def take_status(worker, method):
        # Under forkserver the server, not the test process, is the worker's parent.
        if method != "forkserver":
            assert os.waitpid(-1, 0)[0] == worker.pid


    def expected_code(method):
        return 0 if method == "forkserver" else 255


    def test_exitcode_after_result(mp_process):
        w = mp_process.start(who, name="alpha")
        assert w.result() == w.pid
        assert w.exitcode == 0


    def test_waitpid_took_the_status(mp_process, mp_start_method):
        w = mp_process(who)
        take_status(w, mp_start_method)
        begin = time.monotonic()
        w.join()
        assert time.monotonic() - begin < BOUND
        assert w.result() == w.pid
        assert w.exitcode == expected_code(mp_start_method)


    def test_sigchld_ignored(mp_process, mp_start_method):
        previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        try:
            w = mp_process(who)
            begin = time.monotonic()
            assert w.result() == w.pid
            assert time.monotonic() - begin < BOUND
            assert w.exitcode == expected_code(mp_start_method)
        finally:
            signal.signal(signal.SIGCHLD, previous)


    def test_taken_without_a_result(mp_process, mp_start_method):
        w = mp_process(os._exit, 0)
        take_status(w, mp_start_method)
        if mp_start_method == "forkserver":
            match = "exited with code 0 before handing back a result"
        else:
            match = "its exit status was collected elsewhere"
        with pytest.raises(WorkerCrashed, match=match):
            w.result()


    def test_channel_diagnosis(mp_process, mp_pipe, mp_start_method):
        left, _right = mp_pipe
        w = mp_process(who)
        take_status(w, mp_start_method)
        with pytest.raises(ChannelTimeout, match="every worker of this test has exited") as info:
            left.recv()
        if mp_start_method != "forkserver":
            assert ELSEWHERE in str(info.value)
        assert "still running" not in str(info.value)
        assert w.result() == w.pid


    def test_teardown_sees_it_exited(mp_process, mp_start_method):
        take_status(mp_process(who), mp_start_method)
"""


def test_exit_codes_are_settled_and_a_taken_exit_status_is_an_exit(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_exits=EXITS)
    with no_survivors(monkeypatch):
        result = run(pytester, "-v", "--junitxml=junit.xml", options=FAIL_ON_LEAKS)

    result.assert_outcomes(passed=6 * len(METHODS))
    result.stdout.no_fnmatch_line("*still running*")
    # Each test (setup, call and teardown) ends long before the 30 s timeout: the bound is
    # what is tested, so it is generous.
    for case in ElementTree.parse(pytester.path / "junit.xml").getroot().iter("testcase"):
        assert float(case.get("time", "inf")) < 5, case.get("name")
