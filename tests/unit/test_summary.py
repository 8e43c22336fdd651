"""Unit tests of `_summary`: the terminal section fits a screen and ends with a next step."""

from __future__ import annotations

import pytest
from leakkit import record

from pytest_procsafe import _summary
from pytest_procsafe._report import Report


def test_nothing_left_means_no_section() -> None:
    assert _summary.lines(Report(), mode="warn") == []


def test_grouped_by_owner_with_counts_and_a_next_step() -> None:
    report = Report()
    report.add([record(10, 1), record(11, 10, kind="zombie", action="reaped")])
    report.add([record(20, 1, kind="orphan", owner="fixture server", phase="setup")])
    assert _summary.lines(report, mode="warn") == [
        "3 left behind by 2 owners (1 leaked, 1 zombie, 1 orphan)",
        "t.py::t: 1 leaked, 1 zombie",
        "    leaked pid 10 (appeared in call, killed): sleep 10",
        "    └─ zombie pid 11 (appeared in call, reaped): sleep 11",
        "fixture server: 1 orphan",
        "    orphan pid 20 (appeared in setup, killed): sleep 20",
        "next: run with --procsafe-leaks=fail (in CI, say) to make the tests that leak fail; "
        "stop what a test starts in the test or in a fixture's finalizer",
    ]


def test_a_big_run_is_cut_to_a_screen_and_says_where_the_rest_is() -> None:
    report = Report()
    for owner in range(20):
        report.add([record(1000 + owner * 10 + i, 1, owner=f"t.py::t{owner}") for i in range(6)])
    short = _summary.lines(report, mode="fail")
    assert len(short) <= 60
    assert short[0] == "120 left behind by 20 owners (120 leaked)"
    assert "    ... and 3 more of this owner" in short
    assert short[-2] == (
        "... and 10 more owners with 60 more: -v shows them all, and the JSON report "
        "(--procsafe-report=PATH) lists every one"
    )
    assert short[-1].startswith("next: ")
    full = _summary.lines(report, mode="fail", verbose=True)
    assert sum(line.startswith("    leaked pid") for line in full) == 120


def test_a_tree_is_not_cut_in_the_middle() -> None:
    report = Report()
    report.add([record(10, 1), record(11, 1), record(12, 1), record(30, 12), record(13, 1)])
    shown = _summary.lines(report, mode="fail")
    assert "    └─ leaked pid 30 (appeared in call, killed): sleep 30" not in shown
    assert "    ... and 2 more of this owner" in shown


@pytest.mark.parametrize(
    ("cmdline", "pattern"),
    [
        (
            ["python", "-m", "loky.backend.popen_loky_posix", "--process-name", "LokyProcess-1"],
            r"loky\.backend\.popen_loky_posix",
        ),
        (
            ["/usr/bin/python3", "-c", "import time; time.sleep(300)"],
            r"import\ time;\ time\.sleep\(300\)",
        ),
        (["/opt/bin/cache-server", "--port", "80"], r"cache\-server \-\-port"),
        (["/venv/bin/python3", "/venv/bin/pytest", "-x"], None),  # a fork child of pytest
        (["/venv/bin/python3", "-m", "pytest"], None),
    ],
)
def test_an_ignore_pattern_matches_the_command_and_few_others(
    cmdline: list[str], pattern: str | None
) -> None:
    assert _summary.ignore_pattern(cmdline) == pattern


def test_many_of_one_command_suggest_the_pattern_written_out() -> None:
    loky = ["python", "-m", "loky.backend.popen_loky_posix", "--process-name", "LokyProcess-1"]
    records = [record(10 + i, 1, cmdline=loky) for i in range(4)]
    step = _summary.next_step(records, mode="warn")
    assert step.startswith("next: 4 of them run 'python -m loky.backend.popen_loky_posix")
    assert r"--procsafe-ignore='loky\.backend\.popen_loky_posix'" in step


def test_held_pools_say_how_to_stop_or_exempt_them() -> None:
    records = [record(10, 1, owner="session", held_by="test_pools.WORKERS")]
    step = _summary.next_step(records, mode="fail")
    assert step.startswith("next: test_pools.WORKERS hold pools or executors on purpose")
    assert "session fixture's finalizer" in step
    assert "--procsafe-ignore" in step
