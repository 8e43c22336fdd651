"""Bad input: every option and ini value malformed every way, bad markers, bad report paths.

Each malformed value stops its inner run with a usage error naming the option, the value
and what is allowed, before any test runs. The many small runs go in parallel, a few at
a time, so the matrix stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

import badvalues
from e2ekit import RUN_LIMIT
from survivors import no_survivors

NEVER_RUNS = "def test_never_runs():\n    raise AssertionError('ran despite bad input')\n"
PARALLEL = 4


class Inner(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_many(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    setups: Sequence[tuple[str, dict[str, str], tuple[str, ...]]],
) -> dict[str, Inner]:
    """Run one inner pytest per ``(name, files, args)``, `PARALLEL` at a time."""
    pending = list(setups)
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    done: dict[str, Inner] = {}
    with no_survivors(monkeypatch):
        try:
            while pending or running:
                while pending and len(running) < PARALLEL:
                    name, files, args = pending.pop(0)
                    where = pytester.path / name
                    where.mkdir()
                    for file, text in files.items():
                        (where / file).write_text(textwrap.dedent(text))
                    process = subprocess.Popen(
                        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                        cwd=where,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                    )
                    running[name] = (process, time.monotonic())
                name = next(iter(running))
                process, started = running.pop(name)
                left = RUN_LIMIT - (time.monotonic() - started)
                out, err = process.communicate(timeout=max(left, 1.0))
                done[name] = Inner(process.returncode, out.decode(), err.decode())
        finally:
            for process, _ in running.values():
                process.kill()
                process.communicate()
    return done


def run_inline(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    setups: Sequence[tuple[str, dict[str, str], tuple[str, ...]]],
) -> dict[str, Inner]:
    """Like `run_many`, in this process: for inputs refused before any test or process
    starts, where a subprocess per case would only cost time."""
    done: dict[str, Inner] = {}
    for name, files, args in setups:
        where = pytester.path / name
        where.mkdir()
        for file, text in files.items():
            (where / file).write_text(textwrap.dedent(text))
        monkeypatch.chdir(where)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", *args)
        done[name] = Inner(int(result.ret), result.stdout.str(), result.stderr.str())
    monkeypatch.chdir(pytester.path)
    return done


class Other(NamedTuple):
    """Malformed input that is no value of a procsafe option: CLI arguments, an ini file's
    body, and what the error says."""

    id: str
    args: tuple[str, ...]
    ini: str
    says: str


OTHERS = [
    # Unknown names: argparse refuses unknown options; --strict-config unknown ini keys.
    Other(
        "cli-unknown-name",
        ("--procsafe-timeot=3",),
        "",
        "unrecognized arguments: --procsafe-timeot=3",
    ),
    Other(
        "ini-unknown-name",
        ("--strict-config",),
        "procsafe_timeot = 3\n",
        "Unknown config option: procsafe_timeot",
    ),
    # The same ini key twice: the ini parser refuses the file.
    Other(
        "ini-duplicate",
        (),
        "procsafe_timeout = 3\nprocsafe_timeout = 4\n",
        "duplicate name 'procsafe_timeout'",
    ),
]


def refused(pytester: pytest.Pytester, name: str, inner: Inner) -> bool:
    """Whether the inner run *name* stopped before any test ran, without a crash, and
    created nothing where a report would go."""
    return (
        inner.returncode == pytest.ExitCode.USAGE_ERROR
        and "ran despite bad input" not in inner.stdout
        and "Traceback" not in inner.stderr
        and not (pytester.path / name / "missing").exists()
    )


def test_every_option_and_ini_value_malformed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every value of the shared table, on the command line and in an ini file.
    cases = [
        (f"{form}-{bad.id}", bad, form)
        for bad in badvalues.BAD_VALUES
        for form in (badvalues.CLI, badvalues.INI)
        if form in bad.forms
    ]
    setups = []
    for name, bad, form in cases:
        files = {"test_bad.py": NEVER_RUNS, badvalues.A_FILE: "not a directory\n"}
        if form == badvalues.INI:
            files["tox.ini"] = "[pytest]\n" + bad.ini_line()
        args = (bad.arg(),) if form == badvalues.CLI else ()
        setups.append((name, files, ("-p", "procsafe", *args)))
    for other in OTHERS:
        files = {"test_bad.py": NEVER_RUNS}
        if other.ini:
            files["tox.ini"] = "[pytest]\n" + other.ini
        setups.append((other.id, files, ("-p", "procsafe", *other.args)))
    results = run_inline(pytester, monkeypatch, setups)
    wrong = []
    for name, bad, form in cases:
        inner = results[name]
        # The usage error is a line of its own, as pytest shows one.
        if not refused(pytester, name, inner) or not bad.refused_in(
            inner.stderr, form, before="ERROR: "
        ):
            wrong.append(f"{name}: {bad}\n  -> {inner}")
    for other in OTHERS:
        inner = results[other.id]
        if not refused(pytester, other.id, inner) or other.says not in inner.stderr:
            wrong.append(f"{other}\n  -> {inner}")
    assert not wrong, "\n".join(wrong)


def test_wrong_types_in_pyproject_toml(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad_values = badvalues.given(badvalues.TOML)
    setups = [
        (
            bad.id,
            {
                "test_bad.py": NEVER_RUNS,
                "pyproject.toml": "[tool.pytest.ini_options]\n" + bad.ini_line(),
            },
            ("-p", "procsafe"),
        )
        for bad in bad_values
    ]
    # A number where seconds are expected is fine: TOML's own type for them.
    setups.append(
        (
            "toml-number",
            {
                "test_ok.py": "def test_ok():\n    pass\n",
                "pyproject.toml": "[tool.pytest.ini_options]\nprocsafe_timeout = 7\n",
            },
            ("-p", "procsafe"),
        )
    )
    # Each in a process of its own: pytest 9 deprecates these types for string options
    # with a warning of its own, which would otherwise land in this run.
    results = run_many(pytester, monkeypatch, setups)
    for bad in bad_values:
        inner = results[bad.id]
        assert inner.returncode == pytest.ExitCode.USAGE_ERROR, (bad, inner)
        assert bad.refused_in(inner.stderr, badvalues.TOML, before="ERROR: "), (bad, inner)
        assert "Traceback" not in inner.stderr, (bad, inner)
    assert results["toml-number"].returncode == pytest.ExitCode.OK, results["toml-number"]
    assert "timeout 7s" in results["toml-number"].stdout


def test_duplicate_cli_options_last_one_wins(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for every pytest option: how addopts and a command line combine.
    setups = [
        (
            "twice",
            {"test_ok.py": "def test_ok():\n    pass\n"},
            (
                "-p",
                "procsafe",
                "--procsafe-leaks=fail",
                "--procsafe-leaks=off",
                "--procsafe-timeout=5",
                "--procsafe-timeout=9",
            ),
        )
    ]
    inner = run_many(pytester, monkeypatch, setups)["twice"]
    assert inner.returncode == pytest.ExitCode.OK, inner
    assert "leaks off; timeout 9s" in inner.stdout, inner


MARKERS = {
    "positional": ('@pytest.mark.procsafe("fail")', "takes keyword arguments only"),
    "unknown": ("@pytest.mark.procsafe(timeot=3)", "unknown keyword 'timeot'"),
    "leaks-wrong-type": ("@pytest.mark.procsafe(leaks=1)", "(leaks=...): invalid value 1"),
    "leaks-unknown": ('@pytest.mark.procsafe(leaks="loud")', "(leaks=...): invalid value 'loud'"),
    "leaks-empty": ('@pytest.mark.procsafe(leaks="")', "(leaks=...): invalid value ''"),
    "timeout-wrong-type": (
        '@pytest.mark.procsafe(timeout="soon")',
        "(timeout=...): invalid value 'soon'",
    ),
    "timeout-string-number": (
        '@pytest.mark.procsafe(timeout="5")',
        "(timeout=...): invalid value '5'; expected a number of seconds > 0 (a number, not",
    ),
    "timeout-infinite": (
        '@pytest.mark.procsafe(timeout=float("inf"))',
        "(timeout=...): invalid value inf; expected a finite number of seconds > 0",
    ),
    "session-only": ('@pytest.mark.procsafe(cleanup="kill")', "unknown keyword 'cleanup'"),
    "timeout-bool": ("@pytest.mark.procsafe(timeout=True)", "(timeout=...): invalid value True"),
    "timeout-none": ("@pytest.mark.procsafe(timeout=None)", "(timeout=...): invalid value None"),
    "timeout-negative": ("@pytest.mark.procsafe(timeout=-1)", "(timeout=...): invalid value -1"),
    "timeout-zero": ("@pytest.mark.procsafe(timeout=0)", "(timeout=...): invalid value 0"),
    "timeout-nan": (
        '@pytest.mark.procsafe(timeout=float("nan"))',
        "(timeout=...): invalid value nan",
    ),
    "kill-grace-negative": (
        "@pytest.mark.procsafe(kill_grace=-0.5)",
        "(kill_grace=...): invalid value -0.5",
    ),
    "kill-grace-list": (
        "@pytest.mark.procsafe(kill_grace=[1])",
        "(kill_grace=...): invalid value [1]",
    ),
    "methods-wrong-type": (
        "@pytest.mark.procsafe(start_methods=3)",
        "(start_methods=...): invalid value 3",
    ),
    "methods-empty": (
        '@pytest.mark.procsafe(start_methods="")',
        "(start_methods=...):",
    ),
    "methods-unknown": (
        '@pytest.mark.procsafe(start_methods="threads")',
        "unknown start method 'threads'",
    ),
    "methods-duplicate": (
        '@pytest.mark.procsafe(start_methods=["spawn", "spawn"])',
        "start method 'spawn' is given twice",
    ),
    "ignore-wrong-type": ("@pytest.mark.procsafe(ignore=5)", "(ignore=...): invalid value 5"),
    "ignore-empty": ('@pytest.mark.procsafe(ignore="")', "invalid pattern ''"),
    "ignore-bad-regex": ('@pytest.mark.procsafe(ignore="(")', "invalid regular expression '('"),
}


def test_every_marker_keyword_malformed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        f"test_{name.replace('-', '_')}.py": (
            f"import pytest\n\n\n{marker}\ndef test_marked(mp_context):\n"
            "    raise AssertionError('ran despite bad input')\n"
        )
        for name, (marker, _) in MARKERS.items()
    }
    # Two markers: the closest one wins, as for any pytest marker; not an error.
    files["test_stacked.py"] = (
        "import pytest\n\npytestmark = pytest.mark.procsafe(timeout=50)\n\n\n"
        "@pytest.mark.procsafe(timeout=2)\ndef test_closest_wins(mp_process):\n"
        "    assert mp_process.timeout == 2\n"
    )
    inner = run_inline(
        pytester,
        monkeypatch,
        [("markers", files, ("-p", "procsafe", "--procsafe-start-methods=fork", "-rN"))],
    )["markers"]
    # Each bad marker is its test's error, once; every module is collected and the test
    # with good stacked markers runs.
    assert inner.returncode == pytest.ExitCode.TESTS_FAILED, inner
    assert f"1 passed, {len(MARKERS)} errors" in inner.stdout, inner.stdout
    assert "ran despite bad input" not in inner.stdout
    assert "ERROR collecting" not in inner.stdout
    for name, (_, says) in MARKERS.items():
        module = f"test_{name.replace('-', '_')}.py"
        report = inner.stdout.split("ERROR at setup of test_marked", 1)
        assert len(report) == 2, (name, inner.stdout)
        line = f"procsafe: bad marker on {module}::test_marked"
        (detail,) = [text for text in inner.stdout.splitlines() if line in text]
        assert f"({module}:4)" in detail, (name, detail)
        assert says in detail, (name, detail)


REPORT_TEST = """
    import os
    import shutil
    import subprocess

    def test_leaks():
        subprocess.Popen(["sleep", "60"])

    def test_maybe_removes_the_report_directory():
        if os.environ.get("REMOVE_DIR"):
            shutil.rmtree(os.environ["REMOVE_DIR"])
"""


def unwritable_directories() -> list[object]:
    """Directories a report cannot be written to, as pytest params."""
    params: list[object] = [pytest.param("removed", id="removed-during-the-run")]
    # A directory only root can write to, made read-only for everyone else.
    params.append(
        pytest.param(
            "read-only",
            id="read-only",
            marks=pytest.mark.skipif(
                os.geteuid() == 0,
                reason="root writes into a read-only directory anyway; "
                "procfs-virtual covers a directory that refuses even root",
            ),
        )
    )
    if sys.platform.startswith("linux"):
        params.append(pytest.param("procfs-virtual", id="procfs-virtual"))
    return params


@pytest.mark.parametrize("where", unwritable_directories())
def test_report_path_that_cannot_be_written(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = pytester.path / "out"
    out.mkdir()
    report = out / "report.json"
    if where == "removed":
        monkeypatch.setenv("REMOVE_DIR", str(out))
    elif where == "read-only":
        out.chmod(0o555)
    elif where == "procfs-virtual":
        report = Path("/proc/procsafe-report.json")
    files = {"test_report.py": REPORT_TEST, "pytest.ini": "[pytest]\n"}
    inner = run_many(
        pytester,
        monkeypatch,
        [
            (
                "run",
                files,
                (
                    "-p",
                    "procsafe",
                    "--procsafe-leaks=warn",
                    f"--procsafe-report={report}",
                ),
            )
        ],
    )["run"]
    if out.exists():
        out.chmod(0o755)
    if where == "read-only":
        assert inner.returncode == pytest.ExitCode.USAGE_ERROR, inner
        assert "is not writable" in inner.stderr, inner
    else:
        # Found out at the end: the tests ran, the run says why the report is missing and
        # fails, and does not crash.
        assert inner.returncode == pytest.ExitCode.TESTS_FAILED, inner
        assert "2 passed" in inner.stdout, inner
        assert f"procsafe: could not write the JSON report '{report}'" in inner.stdout, inner
        assert "Traceback" not in inner.stdout + inner.stderr, inner
    # No file, and no half-written temporary next to it.
    assert not report.exists()
    if out.exists():
        assert list(out.iterdir()) == []
