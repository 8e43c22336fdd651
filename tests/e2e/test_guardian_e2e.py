"""The guardian: nothing of a run outlives a pytest that died without procsafe's cleanup.

Each inner run leaks what real suites leak (a ``Popen``, a spawn ``Process``, a fork
``Process``, a forkserver pool, an orphaned grandchild, and from an earlier fixture a
process with a replaced environment) and then dies the way pytest dies in the field:
pytest-timeout's thread method (``os._exit``), ``os._exit`` in a test, SIGKILL, a segfault.
Three seconds after the inner pytest is gone, none of its processes may run
(`survivors`), and its stderr says what the guardian stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

import e2ekit
import survivors
from pytest_procsafe import _guardian
from survivors import no_survivors

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the survivors check reads procfs"
)

#: No process of the run may be left this long after pytest is gone.
AFTER = 3.0
OPTIONS = (*e2ekit.PLUGIN, "-p", "no:cacheprovider", "--procsafe-kill-grace=0.5")

DIES = """
    import ctypes
    import multiprocessing
    import os
    import signal
    import subprocess
    import time

    import pytest


    def record(pid, kind="sleeps"):
        with open(os.environ["INNER_PIDS"], "a") as file:
            file.write(f"{pid} {kind}\\n")


    def sleep_long():
        time.sleep(300)


    @pytest.fixture(scope="session")
    def replaced_env():
        # No token in its environment: the guardian knows it because the leak checks saw
        # it when this fixture's setup ended (its finalizer never runs: pytest dies).
        popen = subprocess.Popen(["sleep", "300"], env={"PATH": os.environ["PATH"]})
        record(popen.pid)
        return popen


    def test_dies(replaced_env):
        record(subprocess.Popen(["sleep", "300"]).pid)
        spawned = multiprocessing.get_context("spawn").Process(target=sleep_long)
        spawned.start()
        forked = multiprocessing.get_context("fork").Process(target=sleep_long)
        forked.start()
        pool = multiprocessing.get_context("forkserver").Pool(2)
        pool.apply_async(time.sleep, (300,))
        orphan = subprocess.run(
            ["sh", "-c", "sleep 300 > /dev/null 2>&1 & echo $!"],
            check=True,
            capture_output=True,
            text=True,
        )
        for pid in (spawned.pid, forked.pid, int(orphan.stdout)):
            record(pid)
        for worker in pool._pool:
            record(worker.pid, "pool")  # may end by itself once pytest is gone
        how = os.environ["HOW"]
        open(os.environ["INNER_MARK"], "w").close()
        if how == "thread":
            time.sleep(300)  # pytest-timeout's thread method ends it with os._exit(1)
        elif how == "os_exit":
            os._exit(3)
        elif how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "segfault":
            ctypes.string_at(0)
"""

#: How each way of dying ends the inner pytest.
CODES = {"thread": 1, "os_exit": 3, "sigkill": -signal.SIGKILL, "segfault": -signal.SIGSEGV}


def start_times(pids: list[int]) -> dict[int, int]:
    """Each pid's start time now (those that exist)."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                found[pid] = int(file.read().rsplit(b")", 1)[1].split()[19])
        except (OSError, IndexError):
            continue
    return found


def still_running(before: dict[int, int]) -> list[int]:
    """Those of *before* (pid: start time) that still run as the same process."""
    now = start_times(list(before))
    left = []
    for pid, start in now.items():
        if start == before[pid]:
            with open(f"/proc/{pid}/stat", "rb") as file:
                if file.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                    left.append(pid)
    return left


def wait_gone(before: dict[int, int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := still_running(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def leaked_pids(path: Path, kind: str | None = None) -> list[int]:
    """The pids the inner run recorded (of one *kind*: "sleeps" or "pool")."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [
        int(line.split()[0])
        for line in lines
        if line.strip() and kind in (None, *line.split()[1:])
    ]


@pytest.mark.parametrize("leaks", ["warn", "fail"])
@pytest.mark.parametrize("how", list(CODES))
def test_nothing_outlives_a_pytest_that_died(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str, leaks: str
) -> None:
    pytester.makepyfile(test_dies=DIES)
    pids = pytester.path / "pids.txt"
    monkeypatch.setenv("HOW", how)
    monkeypatch.setenv("INNER_PIDS", str(pids))
    monkeypatch.setenv("INNER_MARK", str(pytester.path / "dying"))
    args = [f"--procsafe-leaks={leaks}"]
    if how == "thread":
        args += ["-p", "timeout", "--timeout=8", "--timeout-method=thread"]
    before: dict[int, int] = {}
    try:
        with no_survivors(monkeypatch, settle=AFTER), e2ekit.Inner(
            pytester, *args, options=OPTIONS
        ) as inner:  # fmt: skip
            inner.wait_for(pytester.path / "dying")
            before = start_times(leaked_pids(pids))
            code = inner.end()
        # The replaced environment escapes the survivors' variable: checked by pid.
        left = wait_gone(before, 1.0)
    finally:
        _stop_left(before)
    assert code == CODES[how], inner.text()
    assert not left, f"still running: {left}\n{inner.text()}"
    err = inner.stderr
    assert "ended without procsafe's cleanup" in err, inner.text()
    for pid in leaked_pids(pids, "sleeps"):  # they would run on: the guardian names them
        assert f"  pid {pid}: " in err, inner.text()
    assert ": sleep 300" in err, inner.text()
    # ... and what the multiprocessing children were doing: their stacks (`_dumps`).
    assert "in sleep_long" in err, inner.text()


def _stop_left(before: dict[int, int]) -> None:
    """Should the guardian have failed: stop what the inner run left, by pid and start
    time (they are this run's processes: the inner run's, re-parented to it)."""
    for pid in still_running(before):
        os.kill(pid, signal.SIGKILL)


KEEP = """
    import os
    import subprocess

    import pytest


    @pytest.fixture
    def manager(mp_channels):
        return mp_channels.manager()  # procsafe's own: stopped even under keep


    def test_dies(manager):
        popen = subprocess.Popen(["sleep", "300"])
        with open(os.environ["INNER_PIDS"], "w") as file:
            file.write(f"{popen.pid}\\n")
        os._exit(3)
"""


def test_cleanup_keep_leaves_the_run_s_leaks_running(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_keep=KEEP)
    pids = pytester.path / "pids.txt"
    monkeypatch.setenv("INNER_PIDS", str(pids))
    mark = f"keep-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv(survivors.VARIABLE, mark)
    before: dict[int, int] = {}
    try:
        with e2ekit.Inner(
            pytester, "--procsafe-cleanup=keep", "--procsafe-start-methods=spawn", options=OPTIONS
        ) as inner:
            code = inner.end()
        before = start_times(leaked_pids(pids))
        # Until the guardian is done: only the kept process is left of the run.
        deadline = time.monotonic() + 10
        while len(survivors.marked(mark)) > len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = survivors.marked(mark)
        kept = still_running(before)
    finally:
        _stop_left(before)
    assert code == 3, inner.text()
    assert kept == list(before), inner.text()
    assert len(left) == len(before), left
    err = inner.stderr
    assert "left running under --procsafe-cleanup=keep" in err, inner.text()
    assert "stopping 1 process of its run" in err, inner.text()  # the manager


XDIST = """
    import multiprocessing
    import os
    import signal
    import subprocess
    import time

    import pytest


    def sleep_long():
        time.sleep(300)


    @pytest.mark.parametrize("n", range(4))
    def test_fine(n):
        time.sleep(0.2)


    def test_worker_killed():
        subprocess.Popen(["sleep", "300"])
        multiprocessing.get_context("spawn").Process(target=sleep_long).start()
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_xdist_worker_killed_leaves_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_xdist=XDIST)
    with no_survivors(monkeypatch, settle=AFTER), e2ekit.Inner(
        pytester, "-n", "2", "--procsafe-leaks=fail", options=OPTIONS
    ) as inner:  # fmt: skip
        code = inner.end()
    text = inner.text()
    assert code == pytest.ExitCode.TESTS_FAILED, text
    assert "crashed" in text, text
    assert "4 passed" in inner.stdout, text
    # The killed worker's guardian said what it stopped, on the worker's stderr (the run's).
    assert "ended without procsafe's cleanup" in inner.stderr, text
    assert ": sleep 300" in inner.stderr, text


GUARDED = f"""
    import os
    import subprocess


    def children():
        out = []
        for task in os.listdir(f"/proc/{{os.getpid()}}/task"):
            with open(f"/proc/{{os.getpid()}}/task/{{task}}/children") as file:
                out.extend(file.read().split())
        return out


    def command(pid):
        try:
            with open(f"/proc/{{pid}}/cmdline", "rb") as file:
                return file.read().replace(b"\\0", b" ").decode()
        except OSError:
            return ""


    def test_guardians():
        if os.environ["START"] == "1":  # the guardian starts with the run's first child
            subprocess.run(["true"], check=True)
        # Its own token (the outer run's is inherited): "<pid>-<random>".
        token = os.environ.get("{_guardian.VARIABLE}", "")
        own = token.startswith(f"{{os.getpid()}}-")
        # Its guardian's command line carries the run's token.
        guardians = [
            pid for pid in os.listdir("/proc")
            if pid.isdigit() and {_guardian.MARK!r} in command(pid) and token in command(pid)
        ] if own else []
        assert len(guardians) == int(os.environ["GUARDIANS"]), guardians
        assert own == (guardians != [])
        # Started in a shell's background: not this process's child.
        assert not [pid for pid in children() if {_guardian.MARK!r} in command(pid)]
"""


@pytest.mark.parametrize(
    ("options", "start", "guardians"),
    [
        pytest.param((*OPTIONS, "--procsafe-leaks=fail"), True, 1, id="leak-checks"),
        # Nothing to stop if pytest dies: no guardian (nor its start's cost).
        pytest.param((*OPTIONS, "--procsafe-leaks=fail"), False, 0, id="no-child"),
        pytest.param((*OPTIONS, "--procsafe-leaks=off"), True, 0, id="leaks-off"),
        pytest.param(("-p", "no:procsafe"), True, 0, id="no-procsafe"),
    ],
)
def test_one_guardian_per_pytest_process_with_leak_checks_and_children_never_a_leak(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    options: tuple[str, ...],
    start: bool,
    guardians: int,
) -> None:
    pytester.makepyfile(test_guarded=GUARDED)
    monkeypatch.setenv("GUARDIANS", str(guardians))
    monkeypatch.setenv("START", "1" if start else "0")
    report = pytester.path / "report.json"
    extra = [f"--procsafe-report={report}"] if guardians else []
    with no_survivors(monkeypatch):
        result = e2ekit.run(pytester, *extra, options=options)
    result.assert_outcomes(passed=1)
    if guardians:  # not a leak, not in the report
        assert '"leaks": []' in report.read_text()
        assert "procsafe: pytest" not in result.stderr.str()
