"""Which process is stuck, and where: stacks of every multiprocessing child of the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from e2ekit import FAIL_ON_LEAKS
from e2ekit import RUN_LIMIT
from e2ekit import run
from pytest_procsafe import _methods
from pytest_procsafe import _stacks
from survivors import no_survivors

pytestmark = pytest.mark.skipif(_stacks.SIGNAL is None, reason="no signal for stack dumps")

METHODS = _methods.available()

LEAKED = """
import multiprocessing
import time

import pytest


def nap_in_a_named_function():
    time.sleep(60)


@pytest.mark.parametrize("method", {methods!r})
def test_leaks_a_sleeping_process(method):
    context = multiprocessing.get_context(method)
    process = context.Process(target=nap_in_a_named_function)
    process.start()
    time.sleep(1.0)  # it is inside its target by now
"""

STUCK_POOL = """
import multiprocessing
import time


def task_that_never_ends():
    while True:
        time.sleep(0.05)


def test_times_out_in_apply():
    pool = multiprocessing.get_context("forkserver").Pool(1)
    pool.apply(task_that_never_ends)
"""

NOT_PYTHON = """
import subprocess
import time


def test_fails_while_a_shell_runs():
    subprocess.Popen(["sleep", "60"])
    time.sleep(0.2)
    assert False, "on purpose"
"""


def test_a_leaked_process_shows_where_it_sleeps(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_leaked=LEAKED.format(methods=list(METHODS)))
    report = pytester.path / "leaks.json"
    with no_survivors(monkeypatch):
        result = run(pytester, f"--procsafe-report={report}", options=FAIL_ON_LEAKS)
    result.assert_outcomes(passed=len(METHODS), errors=len(METHODS))
    leaks = json.loads(report.read_text())["leaks"]
    assert len(leaks) == len(METHODS), leaks
    for leak in leaks:
        assert "in nap_in_a_named_function" in (leak["stack"] or ""), leak
    # ... and the terminal shows it under the entry.
    result.stdout.fnmatch_lines(
        ["*hread 0x* (most recent call first):", "*in nap_in_a_named_function"]
    )


@pytest.mark.skipif("forkserver" not in METHODS, reason="needs forkserver")
def test_a_timeout_in_pool_apply_shows_the_workers_task(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(test_stuck=STUCK_POOL)
    with no_survivors(monkeypatch):
        result = run(pytester, "--timeout=3", "--timeout-method=signal", options=FAIL_ON_LEAKS)
    result.assert_outcomes(failed=1, errors=1)
    output = result.stdout.str()
    # pytest-timeout shows the test process, blocked in apply(); procsafe shows the worker.
    assert "procsafe: still running" in output, output
    section = output.split("procsafe: still running", 1)[1]
    assert "in task_that_never_ends" in section, section


def test_a_process_that_is_not_python_has_no_stack_and_no_hang(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_shell=NOT_PYTHON)
    with no_survivors(monkeypatch):
        result = run(pytester, options=FAIL_ON_LEAKS)
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*procsafe: still running*",
            "1 process this test started is still running (stopped after its teardown)*",
            "running pid * (appeared in call, created at test_shell.py:*): sleep 60",
            f"    ({_stacks.NO_STACK})",
        ]
    )


SIGNALLED = """
import multiprocessing
import os
import pathlib
import time


def nap_in_a_named_function():
    time.sleep(60)


def test_waits_for_a_signal():
    process = multiprocessing.get_context("fork").Process(target=nap_in_a_named_function)
    process.start()
    time.sleep(0.5)
    pathlib.Path("started").write_text(str(process.pid))
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_a_signalled_run_says_what_each_process_was_doing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    pytester.makepyfile(test_signalled=SIGNALLED)
    started = pytester.path / "started"
    with no_survivors(monkeypatch):
        inner = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "procsafe", "-p", "no:cacheprovider"],
            cwd=pytester.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + RUN_LIMIT
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            inner.send_signal(getattr(signal, how))
            output, _ = inner.communicate(timeout=RUN_LIMIT)
        finally:
            if inner.poll() is None:
                inner.kill()
                inner.wait()
    text = output.decode(errors="replace")
    # SIGTERM: the emergency stop tells first; Ctrl-C: the session's end reports the test.
    if how == "SIGTERM":
        assert "procsafe: pytest was sent SIGTERM." in text, text
    assert "in nap_in_a_named_function" in text, text


PYTHON_POPEN = """
import subprocess
import sys
import time

CODE = (
    "def churn_in_a_popen():\\n"
    "    while True:\\n"
    "        sum(range(1000))\\n"
    "churn_in_a_popen()\\n"
)


def test_leaks_a_python_popen():
    subprocess.Popen([sys.executable, "-c", CODE])
    time.sleep(0.5)
"""


@pytest.mark.parametrize("way", ["py-spy", "remote_exec"])
def test_a_python_popen_has_a_stack_where_another_way_exists(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    # Not a multiprocessing child, so no procsafe handler: py-spy, or Python 3.14's
    # sys.remote_exec, can still say where it is.
    if way == "py-spy" and shutil.which("py-spy") is None:
        pytest.skip("py-spy is not installed")
    if way == "remote_exec":
        if not hasattr(sys, "remote_exec"):
            pytest.skip("sys.remote_exec is Python 3.14+")
        monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))  # no py-spy
    pytester.makepyfile(test_popen=PYTHON_POPEN)
    assert "churn_in_a_popen" in _the_one_leaks_stack(pytester, monkeypatch)


def _the_one_leaks_stack(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test files made, with leaks failing: the stack of its one leak."""
    report = pytester.path / "leaks.json"
    with no_survivors(monkeypatch):
        result = run(pytester, f"--procsafe-report={report}", options=FAIL_ON_LEAKS)
    result.assert_outcomes(passed=1, errors=1)
    (leak,) = json.loads(report.read_text())["leaks"]
    return str(leak["stack"] or "")


PLAIN_FORK = """
import os
import sys
import time


def nap_in_a_forked_child():
    time.sleep(60)


def test_forks_a_child_that_naps():
    assert "multiprocessing" not in sys.modules  # the run's first child is this fork
    pid = os.fork()
    if pid == 0:
        try:
            nap_in_a_forked_child()
        finally:
            os._exit(0)
    time.sleep(1.0)  # it is inside its function by now
"""


def test_a_plain_fork_as_the_runs_first_child_has_a_stack(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fork child gets the handler through an at-fork callback: a run that never imports
    # multiprocessing has it too.
    pytester.makepyfile(test_fork=PLAIN_FORK)
    assert "in nap_in_a_forked_child" in _the_one_leaks_stack(pytester, monkeypatch)


PROFILED_CONFTEST = """
import json
import sys

import pytest

RAN = set()


def _profile(frame, event, arg):
    if event == "call":
        name = frame.f_globals.get("__name__")
        if isinstance(name, str) and name.startswith("pytest_procsafe"):
            RAN.add(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    sys.setprofile(_profile)  # every Python call of the test's protocol, hooks included
    try:
        return (yield)
    finally:
        sys.setprofile(None)


def pytest_sessionfinish(session):
    with open("ran.json", "w") as file:
        json.dump(sorted(RAN), file)


def pytest_unconfigure(config):  # after procsafe's own end: the sweep, the guardian
    with open("modules.json", "w") as file:
        json.dump(sorted(sys.modules), file)
"""

CLEAN_TESTS = """
import pytest


@pytest.fixture(scope="module")
def shared():
    return {}


@pytest.mark.parametrize("i", range(20))
def test_clean(i, shared, tmp_path):
    shared[i] = tmp_path
"""

#: Diagnosis runs only for something to explain: never in a clean test's protocol.
DIAGNOSIS: frozenset[str] = frozenset(
    {
        "pytest_procsafe._stacks",
        "pytest_procsafe._dumps",
        "pytest_procsafe._running",
        "pytest_procsafe._pickling",
        "pytest_procsafe._picklewalk",
        "pytest_procsafe._picklenote",
        "pytest_procsafe._holders",
        "pytest_procsafe._reaper",
    }
)


#: What only a run with something to report or stop needs: a clean run never imports it
#: (the stack-dump handler's `_dumps` and `_stacks` are set up for every child at startup).
LEAKS_ONLY: frozenset[str] = (
    DIAGNOSIS - {"pytest_procsafe._dumps", "pytest_procsafe._stacks"}
) | {
    "pytest_procsafe._machinery",
    "pytest_procsafe._leaked",  # the record of a leak
    "pytest_procsafe._warnings",  # the warning of one
    "pytest_procsafe._summary",  # the terminal section, which a clean run does not have
    "pytest_procsafe._escalate",  # stopping a process
    "pytest_procsafe._guardian",  # the guardian's own module runs in the guardian only
}

#: What only a run that starts processes needs: multiprocessing is wrapped once the run
#: imports it, the subreaper set (through ctypes) before its first child.
PROCESSES_ONLY: tuple[str, ...] = ("multiprocessing", "pickle", "_pickle", "ctypes", "_ctypes")


@pytest.mark.parametrize("mode", ["warn", "fail"])
def test_a_clean_test_runs_no_diagnosis(pytester: pytest.Pytester, mode: str) -> None:
    """No stack, holder, pickling or "still running" code runs around a clean test: the
    leak checks' own observation does (so the profile sees procsafe at all). Nor does a
    clean run import what only explaining or stopping a leak needs (the fixed cost of a
    pytest process)."""
    pytester.makeconftest(PROFILED_CONFTEST)
    pytester.makepyfile(test_clean=CLEAN_TESTS)
    result = run(pytester, f"--procsafe-leaks={mode}")
    result.assert_outcomes(passed=20)
    ran = set(json.loads((pytester.path / "ran.json").read_text()))
    assert "pytest_procsafe._leaks" in ran, ran
    assert ran.isdisjoint(DIAGNOSIS), sorted(ran & DIAGNOSIS)
    modules = set(json.loads((pytester.path / "modules.json").read_text()))
    assert "pytest_procsafe._leaks" in modules, modules
    assert modules.isdisjoint(LEAKS_ONLY), sorted(modules & LEAKS_ONLY)
    started = [name for name in modules if name.partition(".")[0] in PROCESSES_ONLY]
    assert not started, started
