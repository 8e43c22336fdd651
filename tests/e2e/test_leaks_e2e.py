"""End-to-end: leak checks through real inner pytest runs.

Each inner run leaks real processes (or deliberately does not) and the outer test checks
what the user sees: outcomes, the ``procsafe`` summary, warnings, the JSON report, the
exit status, and that nothing of the run survives it unless it was meant to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from e2ekit import RUN_LIMIT
from e2ekit import run
from pytest_procsafe import _methods
from pytest_procsafe import _proctable
from pytest_procsafe import _reaper
from survivors import no_survivors

pytestmark = pytest.mark.skipif(not _proctable.LINUX, reason="zombies and orphans: Linux")

METHODS = _methods.available()
WAIT = 60.0


def report(pytester: pytest.Pytester) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / "report.json").read_text())
    return data


def gone(pids: list[int]) -> bool:
    return all(_proctable.stat(pid) is None for pid in pids)


@pytest.fixture
def adopted() -> Iterator[list[int]]:
    """Pids an inner run deliberately left running: this test stops them (as orphans of
    the inner pytest they are re-parented to this process, a subreaper)."""
    pids: list[int] = []
    yield pids
    procs = [p for p in map(_proctable.stat, pids) if p is not None]
    _reaper.stop(procs, 0.5, os.getpid())


# --- every kind, fail mode -----------------------------------------------------------------

KINDS_CONFTEST = """
    import subprocess
    import sys

    import pytest


    @pytest.fixture(scope="session")
    def server():
        # Long-lived and properly finalized: never a leak.
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        yield process
        process.terminate()
        process.wait()


    @pytest.fixture(scope="module")
    def careless_server():
        # No finalizer: its process is the fixture's leak, not a test's.
        yield subprocess.Popen(["sleep", "61"])
"""

KINDS = """
    import concurrent.futures
    import multiprocessing
    import os
    import subprocess
    import threading
    import time

    import pytest

    METHODS = METHODS_HERE


    def nap():
        time.sleep(60)


    def square(x):
        return x * x


    @pytest.mark.parametrize("method", METHODS)
    def test_process(method):
        multiprocessing.get_context(method).Process(target=nap).start()


    def test_popen():
        subprocess.Popen(["sleep", "60"])


    def test_from_thread():
        thread = threading.Thread(target=lambda: subprocess.Popen(["sleep", "60"]))
        thread.start()
        thread.join()


    def test_zombie():
        if os.fork() == 0:
            os._exit(0)


    def test_orphan():
        child = os.fork()
        if child == 0:
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        os.waitpid(child, 0)


    def test_tree():
        shell = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 61 & wait"])
        children = f"/proc/{shell.pid}/task/{shell.pid}/children"
        while len(open(children).read().split()) < 2:  # the tree is the point
            time.sleep(0.01)


    @pytest.mark.parametrize("method", METHODS)
    def test_clean_users(method, server):
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(2) as pool:
            assert pool.map(square, range(4)) == [0, 1, 4, 9]
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as executor:
            assert list(executor.map(square, range(3))) == [0, 1, 4]
        process = ctx.Process(target=square, args=(2,))
        process.start()
        process.join()
        assert server.poll() is None


    def test_careless_fixture_user(careless_server):
        assert careless_server.poll() is None
"""


def test_fail_mode_errors_exactly_the_leaking_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(KINDS_CONFTEST)
    pytester.makepyfile(test_kinds=KINDS.replace("METHODS_HERE", repr(list(METHODS))))
    with no_survivors(monkeypatch):
        result = run(pytester, "--procsafe-leaks=fail", "--procsafe-report=report.json")

    n = len(METHODS)
    leaking = 5 + n
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=leaking + n + 1, errors=leaking)
    data = report(pytester)
    kinds: dict[str, list[str]] = {}
    for leak in data["leaks"]:
        kinds.setdefault(leak["owner"], []).append(leak["kind"])
        assert leak["action"] == ("reaped" if leak["kind"] == "zombie" else "killed")
        assert leak["phase"] == ("setup" if leak["owner"].startswith("fixture") else "call")
    assert kinds == {
        **{f"test_kinds.py::test_process[{method}]": ["leaked"] for method in METHODS},
        "test_kinds.py::test_popen": ["leaked"],
        "test_kinds.py::test_from_thread": ["leaked"],
        "test_kinds.py::test_zombie": ["zombie"],
        "test_kinds.py::test_orphan": ["orphan"],
        "test_kinds.py::test_tree": ["leaked", "leaked", "leaked"],
        "fixture careless_server": ["leaked"],
    }
    assert data["counts"] == {"leaked": 5 + n + 1, "zombie": 1, "orphan": 1}
    assert gone([leak["pid"] for leak in data["leaks"]])
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_orphan*",
            "procsafe: test_kinds.py::test_orphan left 1 process behind:",
            "  orphan pid * (appeared in call, killed): *",
            "they were stopped right away: fail mode stops leaks at once, so the next test "
            "starts clean",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*= procsafe =*",
            f"{len(data['leaks'])} left behind by * owners ({5 + n + 1} leaked, 1 zombie, 1 orphan)",
            "test_kinds.py::test_tree: 3 leaked",
            "    leaked pid * (appeared in call, created at *, killed): sh -c sleep 60 & sleep 61 & wait",
            "    ├─ leaked pid * (appeared in call, killed): sleep 6*",
            "    └─ leaked pid * (appeared in call, killed): sleep 6*",
            "fixture careless_server: 1 leaked",
            "    leaked pid * (appeared in setup, created at *, killed): sleep 61",
            "procsafe: leaks outside tests (fixtures, the session) fail the run",
        ]
    )


# --- warn mode: the suite runs as it would without procsafe -----------------------------

REUSABLE_POOL = """
    import multiprocessing

    _POOL = None


    def pool():
        # Made by the first test that needs it, reused by the next: like joblib/loky.
        global _POOL
        if _POOL is None:
            _POOL = multiprocessing.get_context("fork").Pool(2)
        return _POOL


    def square(x):
        return x * x


    def test_first():
        assert pool().map(square, [1, 2]) == [1, 4]


    def test_second():
        assert pool().map(square, [3]) == [9]
"""


@pytest.mark.parametrize("escalate", [False, True], ids=["warn", "W-error"])
def test_a_reusable_pool_is_held_not_a_tests_leak(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, escalate: bool
) -> None:
    pytester.makepyfile(test_pool=REUSABLE_POOL)
    args = ["--procsafe-report=report.json"]
    if escalate:
        args += ["-W", "error::pytest_procsafe.ProcessLeakWarning"]
    with no_survivors(monkeypatch):
        result = run(pytester, *args)

    data = report(pytester)
    # Held by the module global that made it: the session's, told once at its end.
    assert {(leak["owner"], leak["held_by"]) for leak in data["leaks"]} == {
        ("session", "test_pool._POOL")
    }
    assert data["counts"] == {"leaked": 2, "zombie": 0, "orphan": 0}
    assert all(leak["action"] == "killed" for leak in data["leaks"])  # at the session's end
    assert gone([leak["pid"] for leak in data["leaks"]])
    if escalate:  # -W error: the session's warning fails the run, no test errors
        result.assert_outcomes(passed=2)
        assert result.ret == pytest.ExitCode.TESTS_FAILED
    else:
        assert result.ret == pytest.ExitCode.OK
        result.assert_outcomes(passed=2, warnings=1)
        result.stdout.fnmatch_lines(
            [
                "*test_pool.py:*: ProcessLeakWarning: procsafe: session left 2 processes behind:",
                "*leaked pid * ForkPoolWorker-* of a multiprocessing.pool.Pool (appeared in "
                "call, created at test_pool.py:*, held by test_pool._POOL, killed): *",
                "*held on purpose by test_pool._POOL, so no test's leak; stopped at the end of "
                "the session",
            ]
        )


# --- what is exempt, what is kept ---------------------------------------------------------

EXEMPT_CONFTEST = """
    def pytest_procsafe_ignore(process):
        if "hook-ignored" in process.cmdline:
            return True
        return None


    def pytest_procsafe_leaks(owner, leaks):
        with open("leaks.log", "a") as log:
            for leak in leaks:
                log.write(f"{owner} {leak.kind} {leak.pid} {leak.action}\\n")
"""

EXEMPT = """
    import multiprocessing
    import os
    import subprocess
    import sys
    import time

    import pytest


    def sleeper(tag):
        # Kept processes must not hold the inner run's output pipe: pytester reads it
        # to the end.
        process = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)", tag],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(f"{tag}.pid", "w") as file:
            file.write(str(process.pid))


    def nap():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        time.sleep(60)


    def test_ignored_by_option():
        sleeper("option-ignored")


    def test_ignored_by_hook():
        sleeper("hook-ignored")


    @pytest.mark.procsafe(leaks="off")
    def test_marker_off():
        sleeper("marker-off")


    def test_kept():
        sleeper("kept")


    def test_kept_non_daemon_child():
        process = multiprocessing.get_context("fork").Process(target=nap)
        process.start()
        with open("kept-mp.pid", "w") as file:
            file.write(str(process.pid))
"""


def test_ignored_marker_off_and_kept_processes_survive_the_run(
    pytester: pytest.Pytester, adopted: list[int]
) -> None:
    pytester.makeconftest(EXEMPT_CONFTEST)
    pytester.makepyfile(test_exempt=EXEMPT)
    started = time.monotonic()
    result = run(
        pytester,
        "--procsafe-leaks=fail",
        "--procsafe-cleanup=keep",
        # Forked children carry pytest's command line: a pattern must not match itself.
        "--procsafe-ignore=option-ignore[d]",
        "--procsafe-report=report.json",
    )
    tags = ["option-ignored", "hook-ignored", "marker-off", "kept", "kept-mp"]
    pids = {tag: int((pytester.path / f"{tag}.pid").read_text()) for tag in tags}
    adopted.extend(pids.values())

    # A kept non-daemon multiprocessing child does not hang the interpreter's exit
    # (multiprocessing's exit handler would join it with no timeout).
    assert time.monotonic() - started < WAIT
    result.assert_outcomes(passed=5, errors=2)
    for tag, pid in pids.items():
        assert _proctable.stat(pid) is not None, f"{tag} was stopped"
    log = (pytester.path / "leaks.log").read_text().splitlines()
    assert sorted(log) == [
        f"test_exempt.py::test_kept leaked {pids['kept']} kept",
        f"test_exempt.py::test_kept_non_daemon_child leaked {pids['kept-mp']} kept",
    ]
    assert [leak["action"] for leak in report(pytester)["leaks"]] == ["kept", "kept"]
    result.stdout.fnmatch_lines(
        ["*they were kept running (--procsafe-cleanup=keep); stop them yourself*"]
    )


REGISTERED = """
    def pytest_plugin_registered(plugin, manager):
        name = manager.get_name(plugin) or ""
        if name.startswith("procsafe"):
            with open("registered.txt", "a") as file:
                file.write(name + "\\n")
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("off", ["procsafe", "procsafe-cutshort", "procsafe-leak-session", "procsafe-tests"]),
        (
            "warn",
            ["procsafe", "procsafe-cutshort", "procsafe-leak-session", "procsafe-leak-tests"],
        ),
        (
            "fail",
            ["procsafe", "procsafe-cutshort", "procsafe-leak-session", "procsafe-leak-tests"],
        ),
    ],
)
def test_each_mode_registers_its_per_test_hooks_once(
    pytester: pytest.Pytester, mode: str, expected: list[str]
) -> None:
    """Each registration costs pluggy and pytest's fixture parsing: the per-test hooks of
    a run with leak checks are registered once, not the unchecked ones first."""
    pytester.makeconftest(REGISTERED)
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    run(pytester, f"--procsafe-leaks={mode}").assert_outcomes(passed=1)
    assert sorted((pytester.path / "registered.txt").read_text().split()) == expected


OFF = """
    import subprocess

    import pytest


    def test_unchecked(request):
        registered = request.config.pluginmanager.has_plugin("procsafe-leak-tests")
        assert registered == MARKED
        with open("unchecked.pid", "w") as file:
            file.write(str(subprocess.Popen(["sleep", "60"]).pid))
"""

MARKED = """

    @pytest.mark.procsafe(leaks="fail")
    def test_checked_by_its_marker():
        subprocess.Popen(["sleep", "61"])
"""


@pytest.mark.parametrize("marked", [False, True], ids=["off", "marker-on"])
def test_off_checks_nothing_unless_a_marker_asks(
    pytester: pytest.Pytester, adopted: list[int], marked: bool
) -> None:
    source = OFF.replace("MARKED", repr(marked)) + (MARKED if marked else "")
    pytester.makepyfile(test_off=source)
    result = run(pytester, "--procsafe-leaks=off")
    unchecked = int((pytester.path / "unchecked.pid").read_text())
    adopted.append(unchecked)
    assert "test_off.py::test_unchecked" not in result.stdout.str()
    assert _proctable.stat(unchecked) is not None  # off: not this run's business
    if not marked:
        # No per-test hooks at all: off costs nothing.
        result.assert_outcomes(passed=1)
        assert "procsafe" not in result.stdout.str().split("collected")[-1]
        return
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_checked_by_its_marker*",
            "*= procsafe =*",
            "test_off.py::test_checked_by_its_marker: 1 leaked",
        ]
    )


# --- every way a run ends -------------------------------------------------------------

ENDINGS_CONFTEST = """
    import os

    import pytest


    def pytest_runtest_logreport(report):
        if os.environ.get("BREAK_PYTEST") and report.when == "call":
            raise RuntimeError("an internal error")
"""

ENDINGS = """
    import multiprocessing
    import subprocess
    import time


    def nap():
        time.sleep(60)


    def test_leaks_then_waits():
        process = multiprocessing.get_context("fork").Process(target=nap)  # non-daemon
        process.start()
        popen = subprocess.Popen(["sleep", "60"])
        with open("started", "w") as file:
            file.write(f"{process.pid} {popen.pid}")
        time.sleep(float(__import__("os").environ.get("WAIT_IN_TEST", "0")))


    def test_fails():
        assert False


    def test_not_reached_with_x():
        pass
"""


@pytest.mark.parametrize("ending", ["SIGINT", "SIGTERM", "-x", "internal-error"])
def test_no_process_outlives_the_run_however_it_ends(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, adopted: list[int], ending: str
) -> None:
    pytester.makeconftest(ENDINGS_CONFTEST)
    pytester.makepyfile(test_endings=ENDINGS)
    signalled = ending.startswith("SIG")
    monkeypatch.setenv("WAIT_IN_TEST", str(WAIT) if signalled else "0")
    if ending == "internal-error":
        monkeypatch.setenv("BREAK_PYTEST", "1")
    args = ["-x"] if ending == "-x" else []
    started = pytester.path / "started"
    with no_survivors(monkeypatch):
        inner = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "procsafe", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + WAIT
            while signalled and not started.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if signalled:
                inner.send_signal(getattr(signal, ending))
            output, _ = inner.communicate(timeout=RUN_LIMIT)
        finally:
            if inner.poll() is None:
                inner.kill()
                inner.wait()
        pids = [int(pid) for pid in started.read_text().split()]
        adopted.extend(pids)  # stopped by this test should the run have left them
    text = output.decode(errors="replace")
    expected = {
        "SIGINT": pytest.ExitCode.INTERRUPTED,
        "SIGTERM": -signal.SIGTERM,
        "-x": pytest.ExitCode.TESTS_FAILED,
        "internal-error": pytest.ExitCode.INTERNAL_ERROR,
    }[ending]
    assert inner.returncode == expected, text
    assert gone(pids), text


# --- the subreaper: set before the run's first child, not at startup --------------------

FIRST_CHILD = """
    import subprocess


    def test_1_clean_run_so_far():
        import ctypes

        value = ctypes.c_int(-1)
        assert ctypes.CDLL(None).prctl(37, ctypes.byref(value), 0, 0, 0) == 0  # GET
        assert value.value == 0, "a subreaper before any child"


    def test_2_first_child_leaves_an_orphan():
        # The shell exits at once; its background sleep must come back to pytest.
        subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 &"], check=True)
"""


def test_the_run_becomes_a_subreaper_before_its_first_child(pytester: pytest.Pytester) -> None:
    """A run that starts no child is no subreaper (nor loads ctypes for it); its first
    child's orphan still comes back to it, and is reported and stopped."""
    pytester.makepyfile(test_first=FIRST_CHILD)
    result = run(pytester, "--procsafe-leaks=fail", "--procsafe-report=report.json")
    result.assert_outcomes(passed=2, errors=1)
    data = report(pytester)
    assert [(leak["owner"], leak["kind"]) for leak in data["leaks"]] == [
        ("test_first.py::test_2_first_child_leaves_an_orphan", "orphan")
    ]
    assert gone([leak["pid"] for leak in data["leaks"]])
