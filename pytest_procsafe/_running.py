"""What a test started and is still running, and where each process is: for failures.

When a test fails (pytest-timeout's signal method, an assertion, any exception) while
processes it started still run, its report gets a ``procsafe`` section listing them as a
tree with the Python stack of each (`_reaper.dump_stacks`), before its teardown stops
them: the parent blocked in ``pool.apply()`` is rarely where the problem is. Imports
neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

from pytest_procsafe import _holders
from pytest_procsafe import _proctable
from pytest_procsafe import _reaper
from pytest_procsafe import _report
from pytest_procsafe._ledger import Owner
from pytest_procsafe._proctable import Proc
from pytest_procsafe._tracker import Tracker

_Record = dict[str, Any]


def announce(
    procs: Sequence[Proc],
    tracker: Tracker,
    why: str,
    tell: Callable[[str], None] | None = None,
) -> None:
    """Before stopping *procs* on a way out that leaves no report (SIGTERM to pytest),
    say what each one was doing (with *tell*, else to stderr)."""
    live = [proc for proc in procs if not proc.zombie]
    if not live:
        return
    records = _records(tracker, live, _reaper.dump_stacks(live, tracker.root))
    text = _report.running(records, who="the run", when="now")
    head = f"procsafe: {why}."
    with contextlib.suppress(OSError, ValueError):  # stderr closed: nothing to tell
        if tell is not None:
            tell(f"{head}\n{text}")
        else:
            sys.stderr.write(f"{head}\n{text}\n")
            sys.stderr.flush()


def describe(tracker: Tracker, owner: Owner, phase: str) -> str | None:
    """The section's text, or None when nothing *owner* started still runs."""
    tracker.observe(owner, phase)
    procs = tracker.live(owner)
    if not procs:
        return None
    return _report.running(_records(tracker, procs, _reaper.dump_stacks(procs, tracker.root)))


def _records(tracker: Tracker, procs: Sequence[Proc], stacks: dict[int, str]) -> list[_Record]:
    objects = _holders.objects()  # what each is on the Python side (a failure only)
    records: list[_Record] = []
    for proc in procs:
        seen = tracker.seen.get(proc.pid)
        records.append(
            {
                "kind": "running",
                "pid": proc.pid,
                "ppid": proc.ppid,
                "cmdline": list(_proctable.cmdline(proc.pid)),
                "name": objects.name(proc.pid),
                "phase": seen.phase if seen is not None else "?",
                "action": "",
                "created_at": tracker.created_at(proc.pid),
                "stack": stacks.get(proc.pid),
            }
        )
    return records
