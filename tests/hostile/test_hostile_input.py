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
from hostilekit import RUN_LIMIT

from survivors import no_survivors

NEVER_RUNS = "def test_never_runs():\n    raise AssertionError('ran despite bad input')\n"
PARALLEL = 4


class Inner(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


class Bad(NamedTuple):
    """One malformed input: CLI arguments, an ini file's body, and the message expected
    (the option as named in it, and what it says)."""

    id: str
    args: tuple[str, ...]
    ini: str
    says: str
    names: str = ""


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


def option_cases() -> list[Bad]:
    """Every option, given on the CLI and in the ini file, malformed every way."""
    seconds = "expected a number of seconds"
    values = {
        "leaks": [
            ("empty", "", "invalid value ''; allowed: fail, warn, off"),
            ("unknown", "loud", "invalid value 'loud'; allowed: fail, warn, off"),
            ("number", "1", "invalid value '1'; allowed: fail, warn, off"),
        ],
        "start_methods": [
            ("empty", "", "no start method given; allowed: fork, spawn, forkserver, all"),
            ("unknown", "threads", "unknown start method 'threads'"),
            ("duplicate", "fork,fork", "start method 'fork' is given twice"),
            (
                "separators-only",
                ", ,",
                "no start method given; allowed: fork, spawn, forkserver, all",
            ),
        ],
        "timeout": [
            ("empty", "", f"invalid value ''; {seconds} > 0"),
            ("wrong-type", "soon", f"invalid value 'soon'; {seconds} > 0"),
            ("negative", "-1", f"invalid value '-1'; {seconds} > 0"),
            ("zero", "0", f"invalid value '0'; {seconds} > 0"),
            ("nan", "nan", f"invalid value 'nan'; {seconds} > 0"),
            ("infinite", "inf", f"invalid value 'inf'; {seconds} > 0"),
        ],
        "kill_grace": [
            ("empty", "", f"invalid value ''; {seconds} >= 0"),
            ("wrong-type", "a bit", f"invalid value 'a bit'; {seconds} >= 0"),
            ("negative", "-0.5", f"invalid value '-0.5'; {seconds} >= 0"),
            ("nan", "nan", f"invalid value 'nan'; {seconds} >= 0"),
        ],
        "cleanup": [
            ("empty", "", "invalid value ''; allowed: auto, kill, session, keep"),
            ("unknown", "never", "invalid value 'never'; allowed: auto, kill, session, keep"),
        ],
        "ignore": [
            ("bad-regex", "(unclosed", "invalid regular expression '(unclosed'"),
        ],
        "report": [
            ("empty", "", "invalid value ''; expected the path of a JSON file"),
            ("directory", ".", "is a directory; expected the path of a JSON file"),
            ("missing-dir", "missing/report.json", "does not exist"),
            (
                "parent-is-a-file",
                "a-file/report.json",
                "of 'a-file/report.json' is not a directory",
            ),
        ],
    }
    cases = []
    for name, malformed in values.items():
        flag = "--procsafe-" + name.replace("_", "-")
        for how, value, says in malformed:
            cases.append(Bad(f"cli-{name}-{how}", (f"{flag}={value}",), "", says, f"{flag}: "))
            if name == "ignore":  # ini: one pattern per line
                ini = f"procsafe_ignore =\n    {value}\n"
            else:
                ini = f"procsafe_{name} = {value}\n"
            cases.append(Bad(f"ini-{name}-{how}", (), ini, says, f"procsafe_{name} (ini): "))
    # An empty --procsafe-ignore would match every process: refused too.
    cases.append(
        Bad(
            "cli-ignore-empty",
            ("--procsafe-ignore=",),
            "",
            "--procsafe-ignore: invalid pattern ''",
        )
    )
    # Unknown names: argparse refuses unknown options; --strict-config unknown ini keys.
    cases.append(
        Bad(
            "cli-unknown-name",
            ("--procsafe-timeot=3",),
            "",
            "unrecognized arguments: --procsafe-timeot=3",
        )
    )
    cases.append(
        Bad(
            "ini-unknown-name",
            ("--strict-config",),
            "procsafe_timeot = 3\n",
            "Unknown config option: procsafe_timeot",
        )
    )
    # The same ini key twice: the ini parser refuses the file.
    cases.append(
        Bad(
            "ini-duplicate",
            (),
            "procsafe_timeout = 3\nprocsafe_timeout = 4\n",
            "duplicate name 'procsafe_timeout'",
        )
    )
    return cases


OPTION_CASES = option_cases()


def test_every_option_and_ini_value_malformed(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    setups = []
    for case in OPTION_CASES:
        files = {"test_bad.py": NEVER_RUNS, "a-file": "not a directory\n"}
        if case.ini:
            files["tox.ini"] = "[pytest]\n" + case.ini
        setups.append((case.id, files, ("-p", "procsafe", *case.args)))
    results = run_inline(pytester, monkeypatch, setups)
    wrong = []
    for case in OPTION_CASES:
        inner = results[case.id]
        if (
            inner.returncode != pytest.ExitCode.USAGE_ERROR
            or case.says not in inner.stderr
            or (case.names and f"ERROR: procsafe: {case.names}" not in inner.stderr)
            or "ran despite bad input" in inner.stdout
            or "Traceback" in inner.stderr
            or (pytester.path / case.id / "missing").exists()
        ):
            wrong.append(f"{case}\n  -> {inner}")
    assert not wrong, "\n".join(wrong)


TOML = [
    ("toml-list", "procsafe_timeout = [1, 2]", "procsafe_timeout (ini): invalid value"),
    ("toml-bool", "procsafe_leaks = true", "procsafe_leaks (ini): invalid value"),
    ("toml-table", "procsafe_cleanup = {a = 1}", "procsafe_cleanup (ini): invalid value"),
]


def test_wrong_types_in_pyproject_toml(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    setups = [
        (
            name,
            {"test_bad.py": NEVER_RUNS, "pyproject.toml": f"[tool.pytest.ini_options]\n{line}\n"},
            ("-p", "procsafe"),
        )
        for name, line, _ in TOML
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
    results = run_inline(pytester, monkeypatch, setups[:-1])
    results.update(run_many(pytester, monkeypatch, setups[-1:]))
    for name, line, says in TOML:
        inner = results[name]
        assert inner.returncode == pytest.ExitCode.USAGE_ERROR, (line, inner)
        assert says in inner.stderr, (line, inner)
        assert "Traceback" not in inner.stderr, (line, inner)
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
    assert inner.returncode == pytest.ExitCode.INTERRUPTED, inner
    assert f"{len(MARKERS)} errors" in inner.stdout, inner.stdout
    assert "ran despite bad input" not in inner.stdout
    for name, (_, says) in MARKERS.items():
        module = f"test_{name.replace('-', '_')}.py"
        report = inner.stdout.split(f"ERROR collecting {module}", 1)
        assert len(report) == 2, (name, inner.stdout)
        body = report[1].split("\n___", 1)[0]
        assert says in body, (name, body)
    # The stacked markers' module collected fine (the run stopped before running it).
    assert "ERROR collecting test_stacked.py" not in inner.stdout


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
