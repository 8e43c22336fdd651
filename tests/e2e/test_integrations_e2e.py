"""End-to-end: procsafe under pytest-xdist and under coverage (pytest-cov, coverage run).

Each inner run is a real pytest with real xdist workers or real coverage measurement; the
outer test checks what the user sees: outcomes, the controller's ``procsafe`` summary and
JSON report, the exit status, the coverage report's Missing column, and that nothing of
the run survives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pytest_procsafe
from e2ekit import RUN_LIMIT
from e2ekit import run
from pytest_procsafe import _methods
from survivors import no_survivors

pytest.importorskip("xdist")
pytest.importorskip("pytest_cov")

METHODS = _methods.available()
DOCS = Path(__file__).parents[2] / "docs" / "howto" / "coverage-settings.md"


@pytest.fixture(autouse=True)
def unmeasured_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs must not inherit a measurement of this suite (coverage's subprocess
    patch passes its configuration on in the environment)."""
    for name in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START", "COVERAGE_RCFILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


def literal(text: str) -> str:
    """*text* as an fnmatch pattern that matches only itself (node ids have brackets)."""
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def report(pytester: pytest.Pytester) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((pytester.path / "report.json").read_text())
    return data


# One function per start method and case: the Missing column then says which start
# method lost which lines.
WORK = {
    "child": """
def child_{m}(n):
    total = 0
    for i in range(n):
        if i % 2:
            total += i
    return total
""",
    "hang": """
def hang_{m}(ready, block):
    steps = 0
    for _ in range(3):
        steps += 1
    block(ready)
""",
    "moved": """
def moved_{m}(path):
    os.chdir(path)
    return os.getcwd()
""",
}

# Outside the measured package: whatever a worker does here need not be measured, so a
# worker measured up to ``block`` has run every measured line before it says so.
COVERED_HEAD = """
import time

import pytest

from pkg import work


def block(ready):
    with open(ready, "w") as file:
        file.write("ready")
    while True:
        time.sleep(0.05)
"""

COVERED = {
    "child": """
def test_child(mp_process, mp_start_method):
    assert mp_process(getattr(work, "child_" + mp_start_method), 4).result() == 4
""",
    "moved": """
def test_moved(mp_process, mp_start_method, tmp_path, monkeypatch):
    # Both the test and the worker move: the data still lands where it is combined.
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    monkeypatch.chdir(here)
    worker = mp_process(getattr(work, "moved_" + mp_start_method), str(there))
    assert worker.result() == str(there)
""",
    "hang": """
@pytest.mark.procsafe(timeout=0.5, kill_grace=20)
def test_hang(mp_process, mp_start_method, tmp_path):
    # Still running at teardown: procsafe stops it with SIGTERM.
    ready = tmp_path / "ready"
    mp_process(getattr(work, "hang_" + mp_start_method), str(ready), block)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline, "the worker never started"
        time.sleep(0.01)
""",
}


def make_measured_project(pytester: pytest.Pytester, *cases: str) -> dict[str, int]:
    """A package whose *cases* run only in workers, and their tests; returns the outcomes
    to expect (a hung worker errors its test's teardown after the call passed)."""
    package = pytester.mkpydir("pkg")
    body = "".join(WORK[case].format(m=method) for case in cases for method in METHODS)
    (package / "work.py").write_text("import os\nimport time\n" + body)
    tests = "".join(COVERED[case] for case in cases)
    pytester.makepyfile(test_covered=COVERED_HEAD + tests)
    errors = len(METHODS) if "hang" in cases else 0
    return {"passed": len(cases) * len(METHODS), "errors": errors}


def assert_fully_covered(result: pytest.RunResult, name: str) -> str:
    """The report line of *name*, checked for nothing missed: returns it for messages."""
    lines = [line for line in result.outlines if line.startswith(name + " ")]
    assert lines, f"{name} is not in the coverage report"
    columns = lines[0].split()
    # Name Stmts Miss [Branch BrPart] Cover [Missing]
    branch = len(columns) >= 6 and columns[5].endswith("%")
    cover = 5 if branch else 3
    assert columns[cover] == "100%", f"not all lines ran as measured: {lines[0]}"
    assert len(columns) == cover + 1, f"missing: {' '.join(columns[cover + 1 :])}"
    return lines[0]


# --- xdist ----------------------------------------------------------------------------------

LEAKY = """
    import subprocess
    import sys
    import time

    import pytest


    def test_mp_leak(mp_context):
        # A started, never joined multiprocessing child under each start method.
        mp_context.Process(target=time.sleep, args=(60,), daemon=True).start()


    def test_popen_leak():
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


    @pytest.mark.parametrize("n", range(4))
    def test_clean(n):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_leaky_suite_under_xdist_errors_exactly_the_leaking_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_leaky=LEAKY)
    with no_survivors(monkeypatch):
        result = run(pytester, "-n", "2", "--procsafe-leaks=fail", "--procsafe-report=report.json")
    leaking = [f"test_leaky.py::test_mp_leak[{m}]" for m in METHODS]
    leaking.append("test_leaky.py::test_popen_leak")
    result.assert_outcomes(passed=len(METHODS) + 5, errors=len(leaking))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    errored = {line.split(" ")[1] for line in result.outlines if line.startswith("ERROR ")}
    assert errored == set(leaking)
    # The controller's summary and report hold every worker's findings, with node ids.
    result.stdout.fnmatch_lines(
        ["*= procsafe =*", f"{len(leaking)} left behind by * owners ({len(leaking)} leaked)"]
    )
    for nodeid in leaking:
        result.stdout.fnmatch_lines([f"{literal(nodeid)} [[]gw[01][]]: 1 leaked"])
    leaks = report(pytester)["leaks"]
    assert sorted(leak["owner"] for leak in leaks) == sorted(leaking)
    assert {leak["worker"] for leak in leaks} <= {"gw0", "gw1"}
    assert {leak["action"] for leak in leaks} == {"killed"}
    assert report(pytester)["counts"] == {"leaked": len(leaking), "zombie": 0, "orphan": 0}


SESSION_LEAK = """
    import subprocess
    import sys

    import pytest


    @pytest.fixture(scope="session")
    def careless():
        yield subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


    @pytest.mark.xdist_group("one")
    def test_uses_it(careless):
        pass


    @pytest.mark.xdist_group("two")
    def test_other():
        pass
"""


def test_a_session_leak_on_a_worker_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_session=SESSION_LEAK)
    with no_survivors(monkeypatch):
        result = run(
            pytester,
            "-n",
            "auto",
            "--dist",
            "loadgroup",
            "--procsafe-leaks=fail",
            "--procsafe-report=report.json",
        )
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*= procsafe =*",
            "fixture careless [[]gw*[]]: 1 leaked",
            "procsafe: leaks outside tests (fixtures, the session) fail the run",
        ]
    )
    assert [leak["owner"] for leak in report(pytester)["leaks"]] == ["fixture careless"]


CLEAN_WORKERS = """
    import os


    def double(x):
        return 2 * x


    def echo(conn):
        conn.send(conn.recv())


    def put(queue):
        queue.put(os.getpid())


    def test_worker(mp_process):
        assert mp_process(double, 21).result() == 42


    def test_pipe(mp_process, mp_pipe):
        left, right = mp_pipe
        worker = mp_process(echo, right)
        left.send("ping")
        assert left.recv() == "ping"
        worker.join()


    def test_queue(mp_process, mp_queue):
        worker = mp_process(put, mp_queue)
        assert mp_queue.get() == worker.pid
"""

CLEAN_MANAGER = """
    import subprocess
    import sys


    def fill(shared):
        shared.append(1)


    def test_manager(mp_process, mp_manager):
        shared = mp_manager.list()
        mp_process(fill, shared).join()
        assert list(shared) == [1]


    def test_subprocess():
        subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_clean_suite_with_channels_and_workers_under_xdist_reports_nothing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also measured: each xdist worker measures its own procsafe workers."""
    outcomes = make_measured_project(pytester, "child")
    pytester.makepyfile(test_workers=CLEAN_WORKERS, test_manager=CLEAN_MANAGER)
    with no_survivors(monkeypatch):
        result = run(
            pytester,
            "-n",
            "2",
            "--dist",
            "loadfile",
            "--procsafe-leaks=fail",
            "--procsafe-report=report.json",
            "--cov=pkg",
            "--cov-report=term-missing",
        )
    result.assert_outcomes(passed=4 * len(METHODS) + 1 + outcomes["passed"])
    assert_fully_covered(result, os.path.join("pkg", "work.py"))
    assert result.ret == pytest.ExitCode.OK
    assert "= procsafe =" not in result.stdout.str()
    assert "ProcessLeakWarning" not in result.stdout.str()
    assert report(pytester) == {
        "version": 1,
        "leaks": [],
        "counts": {"leaked": 0, "zombie": 0, "orphan": 0},
    }


# A worker on another interpreter: xdist replaces a local (popen) worker's sys.path with
# the controller's (pytest-xdist issue #1049), so a worker on another Python version would
# import the controller's standard library. This shim, seen only by the other interpreter,
# keeps its own standard library first and lends it the controller's pure-Python packages
# (pytest, execnet, cloudpickle, ...) so that it can start at all.
SHIM = """
    import importlib.machinery
    import os
    import sys

    _SITE = os.environ.get("PROCSAFE_E2E_SITE")
    _HOST = os.environ.get("PROCSAFE_E2E_HOST")
    if _SITE and _HOST and "{}.{}".format(*sys.version_info[:2]) != _HOST:
        _OWN = [entry for entry in sys.path if entry and "-packages" not in entry]

        class _OwnStandardLibrary:
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if path is None and name in sys.stdlib_module_names:
                    return importlib.machinery.PathFinder.find_spec(name, _OWN)
                return None

        sys.meta_path.insert(0, _OwnStandardLibrary)
        sys.path.extend(_SITE.split(os.pathsep))
"""

OTHER_INTERPRETER = """
    import subprocess
    import sys


    def version():
        return sys.version_info[:2]


    def test_worker(mp_process):
        assert mp_process(version).result() == sys.version_info[:2]


    def test_leak():
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


    def test_interpreter():
        assert sys.version_info[:2] == (3, 12)
"""


def test_a_worker_on_another_interpreter(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = shutil.which("python3.12")
    if other is None:
        pytest.skip("no python3.12 on PATH to run an xdist worker on")
    shim = pytester.mkdir("shim")
    (shim / "sitecustomize.py").write_text(textwrap.dedent(SHIM).lstrip())
    source = str(Path(pytest_procsafe.__file__).parents[1])
    paths = [source, str(shim), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("PROCSAFE_E2E_SITE", sysconfig.get_paths()["purelib"])
    monkeypatch.setenv("PROCSAFE_E2E_HOST", "{}.{}".format(*sys.version_info[:2]))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # no 3.12 caches in shared trees
    probe = subprocess.run(
        [other, "-c", "import pytest, execnet, cloudpickle, pytest_procsafe"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[0]  # one line: "-ra" shows it
        pytest.skip(f"python3.12 cannot import what a worker needs: {last}")
    pytester.makepyfile(test_other=OTHER_INTERPRETER)
    with no_survivors(monkeypatch):
        result = run(
            pytester,
            "-d",
            "--tx",
            "popen//python=python3.12",
            "--max-worker-restart=0",
            "--procsafe-leaks=fail",
            "--procsafe-report=report.json",
        )
    result.assert_outcomes(passed=len(METHODS) + 2, errors=1)
    result.stdout.fnmatch_lines(["test_other.py::test_leak [[]gw0[]]"])
    assert [leak["owner"] for leak in report(pytester)["leaks"]] == ["test_other.py::test_leak"]


# --- coverage: pytest-cov, coverage run, coverage's own configuration -------------------------------------------------------------------------------


def test_cov_measures_workers_under_every_start_method(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No coverage configuration at all: a worker's lines are covered, including a worker
    stopped at teardown and one that changed directory; branch data combines."""
    outcomes = make_measured_project(pytester, "child", "moved", "hang")
    with no_survivors(monkeypatch):
        result = run(pytester, "--cov=pkg", "--cov-branch", "--cov-report=term-missing")
    result.assert_outcomes(**outcomes)
    line = assert_fully_covered(result, os.path.join("pkg", "work.py"))
    assert len(line.split()) == 6  # the branch columns are there
    assert not list(pytester.path.glob(".coverage.*")), "data files were left uncombined"


def test_coverage_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes = make_measured_project(pytester, "child")
    with no_survivors(monkeypatch):
        ran = pytester.run(
            sys.executable, "-m", "coverage", "run", "-m", "pytest", "-p", "procsafe",
            timeout=RUN_LIMIT,
        )  # fmt: skip
    ran.assert_outcomes(**outcomes)
    combined = pytester.run(
        sys.executable, "-m", "coverage", "combine", "--append", timeout=RUN_LIMIT
    )
    assert combined.ret == 0, combined.stderr.str()
    result = pytester.run(
        sys.executable, "-m", "coverage", "report", "-m", "--include=pkg/*", timeout=RUN_LIMIT
    )
    assert_fully_covered(result, os.path.join("pkg", "work.py"))


# Plain multiprocessing and subprocess children, which procsafe does not start: the
# settings the how-to recommends measure them, and procsafe then leaves its own workers
# to coverage too.
PLAIN = """
def plain_{m}(n):
    return n + 1


def stopped_{m}(ready, block):
    steps = 0
    for _ in range(3):
        steps += 1
    block(ready)
"""

PLAIN_TESTS = """
    import multiprocessing
    import signal
    import subprocess
    import sys
    import time

    from pkg import plain


    def block(ready):
        with open(ready, "w") as file:
            file.write("ready")
        while True:
            time.sleep(0.05)


    def test_plain_process(mp_start_method, tmp_path):
        context = multiprocessing.get_context(mp_start_method)
        process = context.Process(target=getattr(plain, "plain_" + mp_start_method), args=(1,))
        process.start()
        process.join(60)
        assert process.exitcode == 0


    def test_terminated_process(mp_start_method, tmp_path):
        context = multiprocessing.get_context(mp_start_method)
        ready = tmp_path / "ready"
        target = getattr(plain, "stopped_" + mp_start_method)
        process = context.Process(target=target, args=(str(ready), block))
        process.start()
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.01)
        process.terminate()
        process.join(60)
        assert process.exitcode == -signal.SIGTERM


    def test_subprocess():
        subprocess.run([sys.executable, "-c", "import pkg.plain; pkg.plain.run()"], check=True)


    def handler():
        return getattr(signal.getsignal(signal.SIGTERM), "__qualname__", None)


    def test_procsafe_adds_nothing(mp_process):
        # Coverage's own SIGTERM handler, not one procsafe put in front of it.
        assert mp_process(handler).result() == "Coverage._on_sigterm"
"""


def recommended_settings() -> str:
    text = DOCS.read_text()
    blocks: list[str] = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, f"{DOCS.name} should show one toml block"
    return blocks[0]


def test_recommended_settings_measure_plain_children(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makefile(".toml", pyproject=recommended_settings())
    package = pytester.mkpydir("pkg")
    body = "".join(PLAIN.format(m=method) for method in METHODS)
    run_def = "\n\ndef run():\n    return 'ran'\n"
    (package / "plain.py").write_text("import time\n\n" + body + run_def)
    pytester.makepyfile(test_plain=PLAIN_TESTS)
    with no_survivors(monkeypatch):
        result = run(pytester, "--cov=pkg", "--cov-report=term-missing")
    result.assert_outcomes(passed=3 * len(METHODS) + 1)
    assert_fully_covered(result, os.path.join("pkg", "plain.py"))
