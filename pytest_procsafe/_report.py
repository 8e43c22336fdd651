"""What the leak checks found, for people and for tools: messages, summary, JSON report.

Records are plain dicts (the JSON report's ``leaks`` entries: owner, kind, pid, ppid,
cmdline, phase, action) so they travel from xdist workers to the controller as they are:
each worker puts `worker_output` into ``config.workeroutput`` (JSON-able, so a worker on
another interpreter or machine works too) and the controller reads it back with
`from_worker`, adding ``worker`` (the xdist worker id) to each record. Leaked process
trees are drawn as trees. A shared memory segment or semaphore has its ``name``
instead, with ``pid`` and ``ppid`` None and an empty ``cmdline``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import Final
from typing import final

VERSION: Final = 1
KINDS: Final = ("leaked", "zombie", "orphan")
#: The key of an xdist worker's ``config.workeroutput`` that carries its findings.
WORKER_KEY: Final = "procsafe"
#: Counted only in a report that has any (the version 1 shape is otherwise unchanged).
SEGMENT_KINDS: Final = ("shared_memory", "semaphore")
#: Longest command line shown in messages and the summary (the JSON report has it all).
WIDTH: Final = 160

Record = Mapping[str, Any]


def where_of(records: Sequence[Record]) -> tuple[str, int] | None:
    """Where a warning about *records* should point: the holder's definition, or the line
    that started the first of them."""
    for record in records:
        place = _holder_place(record.get("held_by"))
        if place is not None:
            return place
    for record in records:
        created = record.get("created_at")
        if isinstance(created, str) and ":" in created:
            path, _, line = created.rpartition(":")
            if line.isdigit():
                return path, int(line)
    return None


def _holder_place(held_by: object) -> tuple[str, int] | None:
    """The file and line where ``module.attr`` (or ``Class.attr``) is assigned."""
    if not isinstance(held_by, str):
        return None
    parts = held_by.split("[", 1)[0].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            return path, _assignment_line(path, parts[cut])
    return None


def _assignment_line(path: str, name: str) -> int:
    pattern = re.compile(rf"^\s*(?:{re.escape(name)}\s*[:=]|(?:def|class)\s+{re.escape(name)}\b)")
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, 1):
                if pattern.match(line):
                    return number
    except OSError:
        pass
    return 1


_WHEN: Final = {
    "killed": "stopped",
    "reaped": "reaped",
    "kept": "kept (--procsafe-cleanup=keep)",
    "unlinked": "unlinked",
}
_NOUNS: Final = {
    "shared_memory": ("shared memory segment", "shared memory segments"),
    "semaphore": ("semaphore", "semaphores"),
}


def command(record: Record, width: int = WIDTH) -> str:
    """The record's command line joined with spaces, shortened to *width*."""
    text = " ".join(record["cmdline"]) or "?"
    return text if len(text) <= width else text[: width - 3] + "..."


def _line(record: Record, action: bool) -> str:
    done = f", {record['action']}" if action else ""
    if record["pid"] is None:  # a segment or semaphore: its name says what it is
        return f"{record['kind']} {record['name']} (appeared in {record['phase']}{done})"
    facts = [f"appeared in {record['phase']}"]
    if record.get("created_at"):
        facts.append(f"created at {record['created_at']}")
    if record.get("held_by"):
        facts.append(f"held by {record['held_by']}")
    name = record.get("name")
    what = f" {name}" if name else ""
    return (
        f"{record['kind']} pid {record['pid']}{what} ({', '.join(facts)}{done}): {command(record)}"
    )


def running(
    records: Sequence[Record], *, who: str = "this test", when: str = "after its teardown"
) -> str:
    """What *who* started and still runs, each with where it is (its stack)."""
    noun = "process" if len(records) == 1 else "processes"
    verb = "is" if len(records) == 1 else "are"
    head = f"{len(records)} {noun} {who} started {verb} still running (stopped {when}):"
    return "\n".join([head, *tree_lines(records, action=False, note=True)])


def tree_lines(
    records: Sequence[Record], *, action: bool = True, stacks: str = "trim", note: bool = False
) -> list[str]:
    """One line per record, children under their parent with ``├─``/``└─`` guides."""
    from pytest_procsafe import _stacks  # what reports leaks: a clean run has none

    by_pid = {record["pid"]: record for record in records if record["pid"] is not None}
    kids: dict[int, list[Record]] = {}
    roots = []
    for record in records:
        if record["ppid"] in by_pid and record["ppid"] != record["pid"]:
            kids.setdefault(record["ppid"], []).append(record)
        else:
            roots.append(record)
    lines: list[str] = []

    def draw(record: Record, lead: str, guide: str, depth: int) -> None:
        lines.append(lead + guide + _line(record, action))
        stack = record.get("stack")
        pad = lead + ("   " if guide else "") + "    "
        if isinstance(stack, str) and stack.strip() and stacks != "none":
            text = _stacks.trim(stack) if stacks == "trim" else stack.rstrip()
            lines.extend(pad + line for line in text.splitlines())
        elif note and record.get("kind") in ("leaked", "orphan", "running"):
            # No dump: not a multiprocessing child (a Popen), not Python, or its code
            # replaced the handler.
            lines.append(f"{pad}({_stacks.NO_STACK})")
        below = kids.get(record["pid"], [])
        if depth > len(records):  # a ppid cycle cannot happen, but never loop
            return
        inner = lead + ("   " if guide == "└─ " else "│  " if guide else "")
        for index, child in enumerate(below):
            draw(child, inner, "└─ " if index == len(below) - 1 else "├─ ", depth + 1)

    for record in roots:
        draw(record, "", "", 0)
    return lines


def describe(
    owner: str,
    records: Sequence[Record],
    cleanup: str,
    *,
    auto: bool = False,
    mode: str = "warn",
) -> str:
    """The warning / failure text for one owner's leaks: what was left, what was done
    about it and why, in the user's terms (*auto*: ``cleanup`` is what ``auto`` chose)."""
    head = f"procsafe: {owner} left {_counted(records)} behind:"
    deferred = cleanup == "session"
    body = "\n".join(
        "  " + line for line in tree_lines(records, action=not deferred or owner == "session")
    )
    actions = {str(record["action"]) for record in records}
    segments = all(record["pid"] is None for record in records)
    done = "unlinked" if segments else "stopped"
    if deferred and owner != "session" and actions & {"killed", "reaped", "unlinked"}:
        still = "still there" if segments else "still running"
        if auto:
            tail = (
                f"they are {still}: {mode} mode leaves them until the end of the session, so "
                f"the suite behaves as without procsafe (--procsafe-cleanup=kill: {done} "
                "right away)"
            )
        else:
            tail = (
                f"they are {still}; {done} at the end of the session (--procsafe-cleanup=session)"
            )
    elif actions == {"kept"} and segments:
        tail = "they were kept (--procsafe-cleanup=keep); unlink them yourself"
    elif actions == {"kept"}:
        tail = "they were kept running (--procsafe-cleanup=keep); stop them yourself"
    else:
        what = " / ".join(sorted(_WHEN[action] for action in actions))
        if owner == "session":
            why = "at the end of the session"
        elif auto:
            why = "right away: fail mode stops leaks at once, so the next test starts clean"
        else:
            why = "right away (--procsafe-cleanup=kill)"
        tail = f"they were {what} {why}"
    if records and all(record.get("held_by") for record in records):
        holders = ", ".join(sorted({str(record["held_by"]) for record in records}))
        tail = (
            f"held on purpose by {holders}, so no test's leak; {tail.removeprefix('they were ')}"
            if tail.startswith("they were ")
            else f"held on purpose by {holders}, so no test's leak; {tail}"
        )
    return f"{head}\n{body}\n{tail}"


def worker_output(records: Iterable[Record], failed: bool) -> dict[str, Any]:
    """What an xdist worker sends its controller: its records and whether the run fails."""
    return {"version": VERSION, "leaks": [dict(record) for record in records], "failed": failed}


def from_worker(worker: str, output: object) -> tuple[list[dict[str, Any]], bool]:
    """The records (each marked with *worker*) and the failed flag in a worker's output.

    A worker that sent nothing (it crashed, or runs without procsafe) contributes nothing.
    """
    if not isinstance(output, Mapping) or output.get("version") != VERSION:
        return [], False
    leaks = output.get("leaks")
    records = [
        {**record, "worker": worker}
        for record in (leaks if isinstance(leaks, list) else [])
        if isinstance(record, Mapping)
    ]
    return records, output.get("failed") is True


def _counted(records: Sequence[Record]) -> str:
    """``2 processes``, ``1 process and 1 semaphore``."""
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        noun = _NOUNS.get(record["kind"], ("process", "processes"))
        counts[noun] = counts.get(noun, 0) + 1
    parts = [f"{n} {noun[0] if n == 1 else noun[1]}" for noun, n in counts.items()]
    return " and ".join(parts)


@final
class Report:
    """Every leak of the run, in the order found (xdist: every worker's too)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, records: Iterable[Record]) -> None:
        self.records.extend(dict(record) for record in records)

    def set_action(
        self, owner: str, pid: int | None, action: str, name: str | None = None
    ) -> None:
        """Record what was done in the end (session cleanup acts after the report)."""
        for record in reversed(self.records):
            if record["owner"] == owner and record["pid"] == pid and record.get("name") == name:
                record["action"] = action
                return

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(KINDS, 0)
        if any(record["kind"] in SEGMENT_KINDS for record in self.records):
            counts.update(dict.fromkeys(SEGMENT_KINDS, 0))
        for record in self.records:
            counts[record["kind"]] = counts.get(record["kind"], 0) + 1
        return counts

    def as_json(self) -> dict[str, Any]:
        return {"version": VERSION, "leaks": self.records, "counts": self.counts()}

    def write(self, path: Path) -> None:
        """Write the JSON report atomically: readers never see half a file."""
        data = json.dumps(self.as_json(), indent=2) + "\n"
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(data)
            os.chmod(temp, 0o644)  # mkstemp's 0600 is for the temporary name only
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
