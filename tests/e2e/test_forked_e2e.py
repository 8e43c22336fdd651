"""pytest-forked: each forked test process checks its own descendants, once.

pytest-forked needs pytest < 9, so these runs use a virtualenv of their own with
pytest 8 and pytest-forked, and this checkout on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from e2ekit import RUN_LIMIT
from pytest_procsafe import _proctable
from survivors import no_survivors

pytestmark = pytest.mark.skipif(not _proctable.LINUX, reason="pytest-forked forks: Linux here")

ROOT = Path(__file__).resolve().parents[2]

SUITE = """
import multiprocessing
import subprocess
import sys

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_clean():
    pass


def test_leaks_a_popen():
    subprocess.Popen(SLEEP)


def test_uses_a_pool_properly():
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(abs, (-1,)) == 1


def test_uses_a_worker(mp_process):
    assert mp_process(abs, -2).result() == 2
"""


@pytest.fixture(scope="module")
def forked_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python with pytest 8 and pytest-forked (pytest-forked does not support pytest 9)."""
    venv = tmp_path_factory.mktemp("forked") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=RUN_LIMIT)
    python = venv / "bin" / "python"
    wanted = ["pytest>=8,<9", "pytest-forked", "pluggy>=1.5", "cloudpickle>=2.2"]
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *wanted],
        capture_output=True,
        check=False,
        text=True,
        timeout=RUN_LIMIT,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot install {' '.join(wanted)} here:\n{done.stderr[-2000:]}")
    return python


@pytest.mark.parametrize("mode", ["fail", "warn"])
def test_each_forked_test_checks_its_own_descendants(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, forked_python: Path, mode: str
) -> None:
    pytester.makepyfile(test_forked=SUITE)
    report = pytester.path / "leaks.json"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    with no_survivors(monkeypatch):
        result = pytester.run(
            str(forked_python),
            "-m",
            "pytest",
            "-p",
            "pytest_procsafe.plugin",
            "--forked",
            f"--procsafe-leaks={mode}",
            f"--procsafe-report={report}",
            "--procsafe-start-methods=fork",
            timeout=RUN_LIMIT,
        )
    output = result.stdout.str()
    assert "CRASHED" not in output, output
    if mode == "fail":
        result.assert_outcomes(passed=4, errors=1)
        result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_popen*"])
    else:
        result.assert_outcomes(passed=4, warnings=1)
    records = json.loads(report.read_text())["leaks"]
    # Reported once, by the test that leaked it; never the forked test process itself.
    assert [(r["owner"], r["kind"]) for r in records] == [
        ("test_forked.py::test_leaks_a_popen", "leaked")
    ], records
    assert records[0]["cmdline"][-1] == "import time; time.sleep(60)"
