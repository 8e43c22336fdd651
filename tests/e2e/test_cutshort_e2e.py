"""A run cut short stops procsafe's workers at once, and an interrupted teardown still stops them.

Each case drives a real inner pytest whose test has a worker running (a subprocess, so
signals reach it and a debugger reads a closed stdin), with a procsafe timeout far longer
than the bound each case must end within: waiting the timeout out fails the case. Every
inner run is marked so that none of its processes may outlive it (`survivors`).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import e2ekit
from pytest_procsafe import _methods
from survivors import no_survivors

METHODS = _methods.available()
#: The inner runs' join timeout: a run that waited it out would fail every bound below.
TIMEOUT = 60
#: How long an inner run may take to end once cut short: kill grace + 2 s, with room for a
#: loaded machine (far below TIMEOUT).
ENDS_WITHIN = 15.0
OPTIONS = (*e2ekit.PLUGIN, "-p", "no:cacheprovider", f"--procsafe-timeout={TIMEOUT}")

RUNNING = """
    import os
    import signal
    import time

    import pytest


    def work(path, ignore_term):
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(path, "w").close()
        while True:
            time.sleep(0.1)


    def test_running(mp_process, tmp_path):
        mp_process(work, str(tmp_path / "started"), os.environ.get("IGNORE_TERM") == "1")
        while not (tmp_path / "started").exists():
            time.sleep(0.01)
        how = os.environ["HOW"]
        if how == "exit":
            pytest.exit("enough", returncode=3)
        if how == "pdb":
            assert False, "look at me"
        open(os.environ["INNER_MARK"], "w").close()
        time.sleep(300)


    def test_not_reached():
        pass
"""


def inner_run(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    *args: str,
    session: bool = False,
) -> e2ekit.Inner:
    pytester.makepyfile(test_cut=RUNNING)
    monkeypatch.setenv("HOW", how)
    monkeypatch.setenv("INNER_MARK", str(pytester.path / "in-call"))
    return e2ekit.Inner(pytester, *args, options=OPTIONS, session=session)


@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_in_a_terminal_ends_the_run_at_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # A terminal's Ctrl-C reaches the whole job: pytest and its workers alike. The
    # workers' own KeyboardInterrupt is that Ctrl-C, not a failure to report.
    with (
        no_survivors(monkeypatch),
        inner_run(
            pytester, monkeypatch, "sigint", f"--procsafe-start-methods={method}", session=True
        ) as inner,
    ):
        inner.wait_for(pytester.path / "in-call")
        os.killpg(inner.process.pid, signal.SIGINT)
        signalled = time.monotonic()
        code = inner.end()
    took = time.monotonic() - signalled
    assert took < ENDS_WITHIN, inner.text()
    assert code == pytest.ExitCode.INTERRUPTED, inner.text()
    assert "KeyboardInterrupt" in inner.stdout
    assert "never called result()" not in inner.stdout, inner.text()
    assert "Traceback" not in inner.text(), inner.text()


@pytest.mark.parametrize("leaks", ["warn", "fail"])
@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_stops_a_running_worker_at_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str, leaks: str
) -> None:
    with no_survivors(monkeypatch), inner_run(
        pytester, monkeypatch, "sigint", f"--procsafe-start-methods={method}",
        f"--procsafe-leaks={leaks}",
    ) as inner:  # fmt: skip
        inner.wait_for(pytester.path / "in-call")
        inner.process.send_signal(signal.SIGINT)  # to pytest alone (kill -INT)
        signalled = time.monotonic()
        code = inner.end()
    took = time.monotonic() - signalled
    assert took < ENDS_WITHIN, inner.text()
    assert code == pytest.ExitCode.INTERRUPTED, inner.text()
    out = inner.stdout
    assert "KeyboardInterrupt" in out
    # What was stopped is said, with where it was, as a note: not an error after Ctrl-C.
    assert (
        "was still running when the run was interrupted (KeyboardInterrupt), so it was "
        "stopped without waiting (terminated)." in out
    ), inner.text()
    assert "in work" in out, out
    assert "Traceback" not in inner.stderr, inner.text()


@pytest.mark.parametrize("method", METHODS)
def test_a_second_ctrl_c_ends_the_run_without_a_procsafe_traceback(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # The worker ignores SIGTERM and the grace is long: after the first Ctrl-C the run
    # waits out the grace; the second one kills at once.
    monkeypatch.setenv("IGNORE_TERM", "1")
    with no_survivors(monkeypatch), inner_run(
        pytester, monkeypatch, "sigint", f"--procsafe-start-methods={method}",
        f"--procsafe-kill-grace={TIMEOUT}",
    ) as inner:  # fmt: skip
        inner.wait_for(pytester.path / "in-call")
        inner.process.send_signal(signal.SIGINT)
        time.sleep(2.0)  # inside the grace
        assert inner.process.poll() is None, inner.text()
        inner.process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        code = inner.end()
    took = time.monotonic() - signalled
    assert took < ENDS_WITHIN, inner.text()
    assert code == pytest.ExitCode.INTERRUPTED, inner.text()
    assert "a second Ctrl-C" in inner.stdout, inner.text()
    for text in (inner.stdout, inner.stderr):
        assert "Traceback" not in text, inner.text()
        assert "pytest_procsafe" not in text, inner.text()


@pytest.mark.parametrize("method", METHODS)
def test_pytest_exit_stops_a_running_worker_at_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    started = time.monotonic()
    with (
        no_survivors(monkeypatch),
        inner_run(pytester, monkeypatch, "exit", f"--procsafe-start-methods={method}") as inner,
    ):
        code = inner.end()
    # The whole run, start-up included, against a join that would take 60 s.
    assert time.monotonic() - started < 2 * ENDS_WITHIN, inner.text()
    assert code == 3, inner.text()
    assert "the run was stopped (pytest.exit: enough)" in inner.stdout, inner.text()


@pytest.mark.parametrize("method", METHODS)
def test_quitting_pdb_stops_a_running_worker_at_once(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    # stdin at end of file: the debugger quits as soon as it starts.
    started = time.monotonic()
    with (
        no_survivors(monkeypatch),
        inner_run(
            pytester, monkeypatch, "pdb", "--pdb", f"--procsafe-start-methods={method}"
        ) as inner,
    ):
        code = inner.end()
    assert time.monotonic() - started < 2 * ENDS_WITHIN, inner.text()
    out = inner.stdout
    assert code == pytest.ExitCode.INTERRUPTED, inner.text()
    assert "look at me" in out
    assert "the run was stopped (pytest.exit: Quitting debugger)" in out, inner.text()


TIMEOUT_TESTS = """
    import os
    import time

    import pytest


    def hang(path):
        open(path, "w").close()
        while True:
            time.sleep(0.1)


    def started(path):
        while not os.path.exists(path):
            time.sleep(0.01)


    def test_times_out_in_call(mp_process, tmp_path):
        mp_process(hang, str(tmp_path / "call"))
        started(str(tmp_path / "call"))
        (tmp_path.parent / "pid-call").write_text(str(mp_process.workers[0].pid))
        time.sleep(300)


    def test_times_out_in_teardown(mp_process, tmp_path):
        mp_process(hang, str(tmp_path / "teardown"))
        started(str(tmp_path / "teardown"))
        (tmp_path.parent / "pid-teardown").write_text(str(mp_process.workers[0].pid))


    @pytest.mark.parametrize("which", ["call", "teardown"])
    def test_next_sees_no_worker(tmp_path, which):
        pid = (tmp_path.parent / f"pid-{which}").read_text()
        assert not os.path.exists(f"/proc/{pid}"), f"the worker {pid} still exists"
"""


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="pytest-timeout's signal method")
@pytest.mark.parametrize("method", METHODS)
def test_pytest_timeout_signal_method_in_call_and_in_procsafe_teardown(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    pytester.makepyfile(test_timeouts=TIMEOUT_TESTS)
    # pytest-timeout's timer covers setup, call and teardown; procsafe's join (3 s in the
    # call case, 60 s in the other) is what its Timeout interrupts in the teardown case.
    with no_survivors(monkeypatch):
        result = e2ekit.run(
            pytester,
            "-p",
            "timeout",
            "--timeout=4",
            "--timeout-method=signal",
            f"--procsafe-start-methods={method}",
            "--procsafe-timeout=3",
            "-k",
            "call",
            "-p",
            "no:randomly",
        )
        later = e2ekit.run(
            pytester,
            "-p",
            "timeout",
            "--timeout=4",
            "--timeout-method=signal",
            f"--procsafe-start-methods={method}",
            f"--procsafe-timeout={TIMEOUT}",
            "-k",
            "teardown",
        )
    text = result.stdout.str()
    # In the call: the test fails with the Timeout; its teardown then stops the worker.
    result.assert_outcomes(failed=1, errors=1, passed=1)
    assert "Timeout" in text
    assert "was still running after the 3s timeout, so it was stopped" in text, text
    # In procsafe's teardown: the error is the Timeout, with the worker's stack beside it.
    text = later.stdout.str()
    later.assert_outcomes(passed=2, errors=1)
    later.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_times_out_in_teardown*",
            "*Failed: Timeout*4.0s*",
            "*Captured procsafe teardown*",
            f"worker 'hang-1' (pid *, {method}) of *test_times_out_in_teardown* was still "
            "running when its teardown was interrupted (Failed: Timeout*4.0s*), so it was "
            "stopped without waiting (terminated).",
        ]
    )
    assert "in hang" in text, text
    # pytest-timeout's error, where the wait was: no procsafe frame in its traceback.
    error = text.split("ERROR at teardown", 1)[1].split("Captured procsafe teardown")[0]
    assert "pytest_procsafe" not in error, error


EXEMPT = """
    import multiprocessing
    import os
    import time

    import pytest


    def sleep_long():
        time.sleep(300)


    def start(method):
        process = multiprocessing.get_context(method).Process(target=sleep_long)
        process.start()
        with open(os.environ["INNER_PIDS"], "a") as file:
            file.write(f"{process.pid}\\n")


    @pytest.mark.procsafe(leaks="off")
    def test_marker_off(mp_start_method):
        start(mp_start_method)


    def test_hook(mp_start_method):
        start(mp_start_method)


    def test_pattern():
        start("spawn")  # its command line says so: the pattern matches it
"""

EXEMPT_HOOK = """
    import os

    import pytest


    @pytest.hookimpl(optionalhook=True)
    def pytest_procsafe_ignore(process):
        with open(os.environ["INNER_PIDS"]) as file:
            pids = {int(line) for line in file if line.strip()}
        return True if process.pid in pids and "pattern" not in process.owner else None
"""


@pytest.mark.parametrize("leaks", ["warn", "fail"])
def test_exempt_children_never_make_pytest_wait_at_exit(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, leaks: str
) -> None:
    pytester.makepyfile(test_exempt=EXEMPT)
    pytester.makeconftest(EXEMPT_HOOK)
    pids = pytester.path / "pids.txt"
    pids.touch()
    monkeypatch.setenv("INNER_PIDS", str(pids))
    started = time.monotonic()
    try:
        result = e2ekit.run(
            pytester,
            f"--procsafe-leaks={leaks}",
            "--procsafe-ignore=multiprocessing.spawn",
            "-p",
            "no:randomly",
        )
        took = time.monotonic() - started
        children = [int(line) for line in pids.read_text().split()]
        # Exempt: not reported, and multiprocessing's exit handler no longer joins them:
        # pytest did not wait for them; its final sweep stopped them (nothing outlives it).
        alive = [pid for pid in children if _running(pid)]
    finally:
        for pid in [int(line) for line in pids.read_text().split()]:
            _stop(pid)
    result.assert_outcomes(passed=1 + 2 * len(METHODS))
    assert took < ENDS_WITHIN * 2, result.stdout.str()
    assert children, result.stdout.str()
    assert alive == [], result.stdout.str()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _stop(pid: int) -> None:
    """Stop an exempt child of the finished inner run (re-parented to this process, a
    subreaper: its pid stays its own until this process reaps it)."""
    if _running(pid):
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
