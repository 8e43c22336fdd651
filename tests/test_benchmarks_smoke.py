"""The benchmark runner works: ``benchmarks/run.py --quick`` produces every case.

Only a smoke test: the quick sizes are far too small for the numbers to mean anything,
so no target is checked here (benchmarks/README.md has the recorded results).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
#: The cases whose value is one measurement minus another.
DIFFERENCES = (
    r"procsafe's fixed cost per pytest process, .*",
    r"procsafe's hooks per clean test, .*",
    r"start wrapper, per start",
)

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="the runner measures with os.wait4 (POSIX)"
)


def test_the_quick_run_measures_every_case(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=600,  # generous: about 15 s on an idle 2-core machine
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(output.read_text())
    assert data["quick"] is True
    assert {"date", "cpus", "cpu_model", "python", "pytest"} <= set(data["machine"])
    cases = [result["case"] for result in data["results"]]
    expected = [
        r"\d+ trivial tests, leaks=warn",
        r"\d+ trivial tests, leaks=fail",
        r"\d+ trivial tests, leaks=warn, autoloaded plugins",
        r"\d+ trivial tests, leaks=warn, no bytecode cache",
        r"peak memory, \d+ tests",
        r"\d+ tests under -n 2",
        r"procsafe's hooks per clean test, leaks=warn",
        r"procsafe's hooks per clean test, leaks=fail",
        r"procsafe's fixed cost per pytest process, leaks=warn",
        r"leak scan, 50 live children",
        r"hung worker, .*",
        r"start wrapper, per start",
    ]
    if sys.platform.startswith("linux"):
        expected += [r"guardian start, in the pytest process", r"guardian done, at pytest's exit"]
    if hasattr(signal, "SIGRTMIN"):
        expected += [r"stack-dump handler, per child start"]
    for method in multiprocessing.get_all_start_methods():
        expected += [
            f"worker round trip, {method}",
            rf"\d+ items through mp_queue, {method}",
            rf"\d+ items through mp_pipe, {method}",
            f"mp_pipe reads of waiting items, {method}",
            rf"picklable start \+ join, {method}",
        ]
    for pattern in expected:
        found = [case for case in cases if re.fullmatch(pattern, case)]
        assert len(found) == 1, f"no single {pattern!r} in {cases}"
    for result in data["results"]:
        assert isinstance(result["value"], (int, float)), result
        assert math.isfinite(result["value"]), result
        # A difference of two quick measurements (procsafe's fixed cost is a few ms) may
        # come out at or below zero on a busy machine; every other figure cannot.
        if not any(re.fullmatch(pattern, result["case"]) for pattern in DIFFERENCES):
            assert result["value"] > 0, result
        assert isinstance(result["met"], bool), result
        # Every case says the load around it, and whether that makes it no result.
        assert isinstance(result["load_before"], float), result
        assert isinstance(result["load_after"], float), result
        assert isinstance(result["loaded"], bool), result
        assert isinstance(result["noisy"], bool), result
        assert isinstance(result["bytecode_cached"], bool), result
    cached = {r["case"]: r["bytecode_cached"] for r in data["results"]}
    assert [case for case, yes in cached.items() if not yes] == [
        next(case for case in cached if case.endswith("no bytecode cache"))
    ]
    # The table is printed too, one row per case.
    for case in cases:
        assert case in done.stdout
