"""The words and the JSON of the leak report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from leakkit import record

from pytest_procsafe import LeakedProcess
from pytest_procsafe import _report
from pytest_procsafe._report import Report


def test_trees_are_drawn_as_trees() -> None:
    records = [record(10, 1), record(11, 10), record(12, 11), record(13, 10), record(20, 1)]
    assert _report.tree_lines(records) == [
        "leaked pid 10 (appeared in call, killed): sleep 10",
        "├─ leaked pid 11 (appeared in call, killed): sleep 11",
        "│  └─ leaked pid 12 (appeared in call, killed): sleep 12",
        "└─ leaked pid 13 (appeared in call, killed): sleep 13",
        "leaked pid 20 (appeared in call, killed): sleep 20",
    ]


@pytest.mark.parametrize(
    ("cleanup", "auto", "action", "tail", "shown"),
    [
        (
            "kill",
            False,
            "killed",
            "they were stopped right away (--procsafe-cleanup=kill)",
            "(appeared in call, killed)",
        ),
        (
            "kill",
            True,
            "reaped",
            "they were reaped right away: fail mode stops leaks at once, so the next test "
            "starts clean",
            "(appeared in call, reaped)",
        ),
        (
            "session",
            False,
            "killed",
            "they are still running; stopped at the end of the session "
            "(--procsafe-cleanup=session)",
            "(appeared in call)",
        ),
        (
            "session",
            True,
            "killed",
            "they are still running: warn mode leaves them until the end of the session, so "
            "the suite behaves as without procsafe (--procsafe-cleanup=kill: stopped right "
            "away)",
            "(appeared in call)",
        ),
        (
            "keep",
            False,
            "kept",
            "they were kept running (--procsafe-cleanup=keep); stop them yourself",
            "(appeared in call, kept)",
        ),
    ],
    ids=["kill", "kill-auto", "session", "session-auto", "keep"],
)
def test_describe_says_what_was_done_and_why(
    cleanup: str, auto: bool, action: str, tail: str, shown: str
) -> None:
    text = _report.describe("t.py::t", [record(10, 1, action=action)], cleanup, auto=auto)
    head, line, last = text.splitlines()
    assert head == "procsafe: t.py::t left 1 process behind:"
    assert line == f"  leaked pid 10 {shown}: sleep 10"
    assert last == tail


def test_describe_counts_and_mixed_actions() -> None:
    records = [record(10, 1), record(11, 1, kind="zombie", action="reaped")]
    text = _report.describe("fixture server", records, "kill")
    assert text.splitlines()[0] == "procsafe: fixture server left 2 processes behind:"
    assert (
        text.splitlines()[-1] == "they were reaped / stopped right away (--procsafe-cleanup=kill)"
    )


def test_describe_says_a_held_process_is_no_tests_leak() -> None:
    held = record(10, 1, owner="session", held_by="reuse._executor")
    text = _report.describe("session", [held], "kill", auto=True)
    assert "(appeared in call, held by reuse._executor, killed)" in text
    assert text.splitlines()[-1] == (
        "held on purpose by reuse._executor, so no test's leak; stopped at the end of the session"
    )


def test_long_command_lines_are_shortened_for_people_only() -> None:
    long = record(10, 1, cmdline=["python", "-c", "x" * 500])
    assert len(_report.command(long)) == _report.WIDTH
    assert _report.command(long).endswith("...")
    assert _report.command(record(10, 1, cmdline=[])) == "?"


def test_set_action_records_what_session_cleanup_did() -> None:
    report = Report()
    report.add([record(10, 1, action="killed"), record(10, 1, owner="other", action="killed")])
    report.set_action("t.py::t", 10, "reaped")
    assert [r["action"] for r in report.records] == ["reaped", "killed"]


def test_json_report_shape_and_atomic_write(tmp_path: Path) -> None:
    leak = LeakedProcess(
        pid=10,
        ppid=1,
        cmdline=("sleep", "10"),
        kind="orphan",
        owner="t.py::t",
        phase="teardown",
        action="killed",
        name="ForkPoolWorker-1 of a multiprocessing.pool.Pool",
        held_by=None,
        created_at="t.py:3",
    )
    report = Report()
    report.add([leak.as_dict()])
    path = tmp_path / "report.json"
    path.write_text("old")
    report.write(path)
    assert json.loads(path.read_text()) == {
        "version": 1,
        "leaks": [
            {
                "owner": "t.py::t",
                "kind": "orphan",
                "pid": 10,
                "ppid": 1,
                "cmdline": ["sleep", "10"],
                "name": "ForkPoolWorker-1 of a multiprocessing.pool.Pool",
                "phase": "teardown",
                "action": "killed",
                "held_by": None,
                "created_at": "t.py:3",
                "stack": None,
            }
        ],
        "counts": {"leaked": 0, "zombie": 0, "orphan": 1},
    }
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    report = Report()
    report.add([record(10, 1)])
    path = tmp_path / "report.json"
    path.mkdir()  # os.replace cannot put a file there
    with pytest.raises(OSError, match="directory"):
        report.write(path)
    assert os.listdir(tmp_path) == ["report.json"]
    assert path.is_dir()


def test_worker_findings_travel_as_json_and_are_marked_with_the_worker() -> None:
    records = [record(10, 1, owner="t.py::a"), record(11, 1, owner="session")]
    # Through JSON: what a worker sends must survive any transport, any interpreter.
    output = json.loads(json.dumps(_report.worker_output(records, True)))
    got, failed = _report.from_worker("gw3", output)
    assert failed is True
    assert got == [{**records[0], "worker": "gw3"}, {**records[1], "worker": "gw3"}]
    report = Report()
    report.add(got)
    assert report.as_json()["leaks"][0]["worker"] == "gw3"


@pytest.mark.parametrize(
    "output",
    [None, {}, "junk", {"version": 99, "leaks": [{}], "failed": True}, {"version": 1}],
)
def test_a_worker_that_sent_nothing_usable_adds_nothing(output: object) -> None:
    assert _report.from_worker("gw0", output) == ([], False)


def segment(name: str, kind: str, action: str = "unlinked") -> dict[str, Any]:
    return {
        "owner": "t.py::t",
        "kind": kind,
        "name": name,
        "pid": None,
        "ppid": None,
        "cmdline": [],
        "phase": "call",
        "action": action,
    }


def test_segments_are_named_counted_and_say_what_was_done() -> None:
    records = [
        record(10, 1),
        segment("psm_1", "shared_memory"),
        segment("/mp-2", "semaphore"),
        segment("/mp-3", "semaphore"),
    ]
    text = _report.describe("t.py::t", records, "kill")
    assert text.splitlines()[:4] == [
        "procsafe: t.py::t left 1 process and 1 shared memory segment and 2 semaphores behind:",
        "  leaked pid 10 (appeared in call, killed): sleep 10",
        "  shared_memory psm_1 (appeared in call, unlinked)",
        "  semaphore /mp-2 (appeared in call, unlinked)",
    ]
    assert text.endswith("they were stopped / unlinked right away (--procsafe-cleanup=kill)")
    deferred = _report.describe("t.py::t", records[1:2], "session")
    assert deferred.endswith(
        "they are still there; unlinked at the end of the session (--procsafe-cleanup=session)"
    )
    kept = _report.describe("t.py::t", [segment("psm_1", "shared_memory", "kept")], "keep")
    assert kept.endswith("they were kept (--procsafe-cleanup=keep); unlink them yourself")
    report = Report()
    report.add(records)
    report.set_action("t.py::t", None, "kept", "/mp-3")
    assert [r["action"] for r in report.records] == ["killed", "unlinked", "unlinked", "kept"]
    counts = report.as_json()["counts"]
    assert (counts["shared_memory"], counts["semaphore"], counts["leaked"]) == (1, 2, 1)
