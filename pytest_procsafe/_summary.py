"""The terminal summary's ``procsafe`` section: fits a screen, ends with the next step.

What was left behind is grouped by owner with counts by kind; the first entries of the
first owners are shown in full (trees drawn), the rest are counted with where to find
them (``-v``, the JSON report). The last line says what to do next, fitted to what was
found: held pools (how to stop or exempt them), many processes of one command line (the
``ignore`` pattern that would match them, written out), or the mode (warn: make CI fail
on leaks; fail: where the errors are). Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from typing import Final
from typing import Protocol

from pytest_procsafe._report import Record
from pytest_procsafe._report import Report
from pytest_procsafe._report import command
from pytest_procsafe._report import tree_lines

#: Owners shown in full, and entries shown per owner, unless ``-v``.
OWNERS: Final = 10
ENTRIES: Final = 3
#: How many processes of one command line make an ``ignore`` pattern worth suggesting.
SAME_COMMAND: Final = 3


class Terminal(Protocol):
    """What the summary writes to: pytest's terminal reporter."""

    def section(self, title: str, sep: str = ..., **markup: bool) -> None: ...

    def line(self, msg: str, **markup: bool) -> None: ...


def lines(report: Report, *, mode: str, verbose: bool = False) -> list[str]:
    """The section's lines (none when nothing was left behind)."""
    records = report.records
    if not records:
        return []
    counts = ", ".join(f"{n} {kind}" for kind, n in report.counts().items() if n)
    owners: dict[str, list[Record]] = {}
    for record in records:
        worker = record.get("worker")  # pids only mean something on their own worker
        owner = f"{record['owner']} [{worker}]" if worker else str(record["owner"])
        owners.setdefault(owner, []).append(record)
    who = "1 owner" if len(owners) == 1 else f"{len(owners)} owners"
    out = [f"{len(records)} left behind by {who} ({counts})"]
    shown_owners = list(owners) if verbose else list(owners)[:OWNERS]
    for owner in shown_owners:
        group = owners[owner]
        out.append(f"{owner}: {_kinds(group)}")
        shown = group if verbose else _first(group, ENTRIES)
        out.extend(
            "    " + line for line in tree_lines(shown, stacks="full" if verbose else "trim")
        )
        if len(shown) < len(group):
            out.append(f"    ... and {len(group) - len(shown)} more of this owner")
    hidden = [owner for owner in owners if owner not in shown_owners]
    if hidden:
        count = sum(len(owners[owner]) for owner in hidden)
        out.append(
            f"... and {len(hidden)} more owners with {count} more: -v shows them all, and "
            "the JSON report (--procsafe-report=PATH) lists every one"
        )
    out.append(next_step(records, mode=mode))
    return out


def write(
    terminal: Terminal,
    report: Report,
    *,
    mode: str,
    verbose: bool,
    error: str | None,
    failed: bool,
) -> None:
    """Write the section: nothing at all when the run was clean."""
    found = lines(report, mode=mode, verbose=verbose)
    if not found and error is None:
        return
    terminal.section("procsafe")
    for line in found[:-1]:
        terminal.line(line)
    if error is not None:
        terminal.line(error, red=True)
    if failed:
        terminal.line(
            "procsafe: leaks outside tests (fixtures, the session) fail the run", red=True
        )
    if found:
        terminal.line(found[-1], bold=True)


def next_step(records: Sequence[Record], *, mode: str) -> str:
    """One line: what to do about *records*, the most specific advice first."""
    held = sorted({str(r["held_by"]) for r in records if r.get("held_by")})
    if held:
        names = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        return (
            f"next: {names} hold pools or executors on purpose; they are stopped at the end "
            "of the session. To keep them out of this report, shut them down in a session "
            "fixture's finalizer, or exempt them with --procsafe-ignore=REGEX"
        )
    common = _common_command(records)
    if common is not None:
        count, pattern, text = common
        return (
            f"next: {count} of them run {text!r}; if they are meant to outlive their "
            f"tests, exempt them: --procsafe-ignore={shlex.quote(pattern)} "
            "(or ignore it in the ini file)"
        )
    if mode == "warn":
        return (
            "next: run with --procsafe-leaks=fail (in CI, say) to make the tests that leak "
            "fail; stop what a test starts in the test or in a fixture's finalizer"
        )
    return (
        "next: stop what each of them starts in the test or in a fixture's finalizer, or "
        "exempt a process meant to outlive it with --procsafe-ignore=REGEX"
    )


def ignore_pattern(cmdline: Sequence[str]) -> str | None:
    """A regular expression that matches this command line and few others: the module
    run with ``-m``, the start of a ``-c`` program, else the program's name."""
    args = list(cmdline)
    if not args or _is_pytest(args):
        return None  # a fork child: its command line is pytest's own, nothing to match
    for flag in ("-m", "-c"):
        for index, arg in enumerate(args[:-1]):
            if arg == flag:
                return re.escape(args[index + 1][:40])
            if arg.startswith(flag) and len(arg) > 2 and not arg.startswith("--"):
                return re.escape(arg[2:][:40])
    program = re.escape(os.path.basename(args[0]))
    return f"{program} {re.escape(args[1])}" if len(args) > 1 else program


def _is_pytest(args: Sequence[str]) -> bool:
    names = [os.path.basename(arg) for arg in args[:3]]
    return any(name in ("pytest", "py.test", "-mpytest") for name in names) or (
        "-m" in args[:2] and "pytest" in args[:3]
    )


def _common_command(records: Sequence[Record]) -> tuple[int, str, str] | None:
    by_pattern: dict[str, list[Record]] = {}
    for record in records:
        if record.get("pid") is None:
            continue
        pattern = ignore_pattern(record.get("cmdline") or ())
        if pattern is not None:
            by_pattern.setdefault(pattern, []).append(record)
    if not by_pattern:
        return None
    pattern, group = max(by_pattern.items(), key=lambda item: len(item[1]))
    if len(group) < SAME_COMMAND:
        return None
    return len(group), pattern, command(group[0], 60)


def _kinds(records: Sequence[Record]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        counts[str(record["kind"])] = counts.get(str(record["kind"]), 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _first(records: Sequence[Record], count: int) -> list[Record]:
    """The first *count* entries, and the parents of those that have theirs here (a tree
    is not cut in the middle)."""
    if len(records) <= count:
        return list(records)
    chosen = list(records[:count])
    pids = {r["pid"] for r in records if r.get("pid") is not None}
    by_pid = {r["pid"]: r for r in records if r.get("pid") is not None}
    for record in list(chosen):
        parent = record.get("ppid")
        while parent in pids and by_pid[parent] not in chosen:
            chosen.append(by_pid[parent])
            parent = by_pid[parent].get("ppid")
    return [r for r in records if r in chosen]
