"""The run itself under abuse: Ctrl-C in a hung teardown, SIGTERM, -x, --pdb, a broken plugin.

Each case drives a real inner pytest (a subprocess, so signals and a debugger on stdin can
reach it) and checks its exit status, that it ended within a bound, and that none of its
processes outlived it.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hostilekit import METHODS
from hostilekit import OPTIONS
from hostilekit import run

from e2ekit import RUN_LIMIT
from survivors import no_survivors

#: How long an inner run may take to end once it was signalled: far below its own
#: procsafe timeout (60s), so waiting that timeout out would fail the case.
ENDS_WITHIN = 30.0

HUNG = """
    import os
    import subprocess
    import time

    import pytest


    def hang(path):
        open(path, "w").close()
        while True:
            time.sleep(1)


    def test_hangs_in_teardown(mp_process, tmp_path):
        mp_process(hang, str(tmp_path / "ready"))
        subprocess.Popen(["sleep", "60"])  # a leak as well
        while not (tmp_path / "ready").exists():
            time.sleep(0.01)
        open(os.environ["INNER_MARK"], "w").close()  # teardown starts now


    def test_not_reached():
        pass
"""


@contextmanager
def inner(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """An inner pytest with piped stdin and stdout; stopped by pid should the case fail."""
    with no_survivors(monkeypatch):
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", *OPTIONS, *args],
            cwd=pytester.path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate()


def wait_for(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + RUN_LIMIT
    while not path.exists():
        assert process.poll() is None, "the inner run ended early"
        assert time.monotonic() < deadline, "the inner run never got there"
        time.sleep(0.02)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_teardown_of_a_hung_worker(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str, signum: int
) -> None:
    pytester.makepyfile(test_hung=HUNG)
    mark = pytester.path / "in-teardown"
    monkeypatch.setenv("INNER_MARK", str(mark))
    with inner(
        pytester, monkeypatch, f"--procsafe-start-methods={method}", "--procsafe-timeout=60"
    ) as process:
        wait_for(mark, process)
        time.sleep(0.3)  # well inside the teardown's 60s join
        process.send_signal(signum)
        signalled = time.monotonic()
        output, _ = process.communicate(timeout=RUN_LIMIT)
        took = time.monotonic() - signalled
    text = output.decode(errors="replace")
    assert took < ENDS_WITHIN, text
    if signum == signal.SIGINT:
        assert process.returncode == pytest.ExitCode.INTERRUPTED, text
        assert "KeyboardInterrupt" in text
    else:
        assert process.returncode == -signal.SIGTERM, text


X_TESTS = """
    import subprocess
    import time


    def hang():
        while True:
            time.sleep(1)


    def test_leaks_and_fails(mp_process):
        mp_process(hang)
        subprocess.Popen(["sleep", "60"])
        assert False, "first failure"


    def test_not_reached():
        pass
"""


@pytest.mark.parametrize("method", METHODS)
def test_exitfirst_with_leaked_processes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    pytester.makepyfile(test_x=X_TESTS)
    result, found = run(
        pytester, monkeypatch, "-x", f"--procsafe-start-methods={method}", "--procsafe-timeout=1"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    case = found[f"test_leaks_and_fails[{method}]"]
    assert case.failed
    assert case.error
    for phrase in ("first failure", "left 1 process behind", "sleep 60"):
        assert phrase in case.text, case.text
    # -x stops the run: the worker is stopped at once, not joined for the timeout, and it
    # is said, not reported as a hung worker.
    assert "still running after the 1s timeout" not in case.text, case.text
    assert "test_not_reached" not in found
    result.stdout.fnmatch_lines(
        [
            f"procsafe: test_x.py::test_leaks_and_fails[[]{method}[]]: worker 'hang-1' "
            f"(pid *, {method}) of test_x.py::test_leaks_and_fails[[]{method}[]] was still "
            "running when the run was stopping (stopping after 1 failures), so it was "
            "stopped without waiting (terminated).",
            "*stopping after * failures*",
        ]
    )


PLUGIN_ERROR = """
    def pytest_runtest_logreport(report):
        if report.when == "call":
            raise RuntimeError("a broken plugin")
"""


@pytest.mark.parametrize("method", METHODS)
def test_internal_error_in_another_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    pytester.makeconftest(PLUGIN_ERROR)
    pytester.makepyfile(test_x=X_TESTS)
    started = time.monotonic()
    result, _ = run(pytester, monkeypatch, f"--procsafe-start-methods={method}")
    # The session's teardown still joins the hung worker within the timeout (3s), shows
    # its stack and stops it, and stops the leak: bounded, with nothing left behind.
    assert time.monotonic() - started < ENDS_WITHIN
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR, result.stderr.str()
    result.stdout.fnmatch_lines(
        [
            "INTERNALERROR> RuntimeError: a broken plugin",
            f"procsafe: test_x.py::test_leaks_and_fails[[]{method}[]]: worker 'hang-1' (pid *, "
            f"{method}) of test_x.py::test_leaks_and_fails[[]{method}[]] was still running "
            "after the 3s timeout, so it was stopped (terminated).",
        ]
    )
    assert "Traceback" not in result.stderr.str()


PDB_TESTS = """
    import time


    def hang():
        while True:
            time.sleep(1)


    def test_debugged(mp_process):
        worker = mp_process(hang)
        assert False, "look at me in the debugger"
"""


def read_until_prompt(process: subprocess.Popen[bytes], limit: float) -> str:
    """What the inner run printed up to its next ``(Pdb)`` prompt (or its end)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + limit
    while not data.rstrip().endswith(b"(Pdb)"):
        left = deadline - time.monotonic()
        assert left > 0, data.decode(errors="replace")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


def send(process: subprocess.Popen[bytes], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line.encode() + b"\n")
    process.stdin.flush()


def test_pdb_no_timeout_fires_while_the_debugger_is_active(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_pdb=PDB_TESTS)
    timeout = 1.0
    with inner(pytester, monkeypatch, "--pdb", f"--procsafe-timeout={timeout:g}") as process:
        for method in METHODS:
            text = read_until_prompt(process, RUN_LIMIT)
            assert "look at me in the debugger" in text, text
            # Sit in the debugger for well over the timeout: nothing may stop the worker.
            time.sleep(3 * timeout)
            send(process, "p ('alive', worker.is_alive(), worker.exitcode)")
            text = read_until_prompt(process, RUN_LIMIT)
            assert "('alive', True, None)" in text, text
            send(process, "c")
            # Teardown then stops the hung worker and reports it: the debugger again.
            text = read_until_prompt(process, RUN_LIMIT)
            assert f"was still running after the {timeout:g}s timeout" in text, text
            assert method in text, text
            send(process, "c")
        output, _ = process.communicate(timeout=RUN_LIMIT)
    text = output.decode(errors="replace")
    assert process.returncode == pytest.ExitCode.TESTS_FAILED, text
    n = len(METHODS)
    assert f"{n} failed, {n} errors" in text, text
