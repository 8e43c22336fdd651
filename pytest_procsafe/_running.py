"""What a test started and is still running, and where each process is: for failures.

When a test fails (pytest-timeout's signal method, an assertion, any exception) while
processes it started still run, its report gets a ``procsafe`` section listing them as a
tree with the Python stack of each (`_reaper.dump_stacks`), before its teardown stops
them: the parent blocked in ``pool.apply()`` is rarely where the problem is. Imports
neither pytest nor the plugin.
"""

from __future__ import annotations

from pytest_procsafe import _proctable
from pytest_procsafe import _reaper
from pytest_procsafe import _report
from pytest_procsafe._ledger import Owner
from pytest_procsafe._tracker import Tracker


def describe(tracker: Tracker, owner: Owner, phase: str) -> str | None:
    """The section's text, or None when nothing *owner* started still runs."""
    tracker.observe(owner, phase)
    procs = tracker.live(owner)
    if not procs:
        return None
    stacks = _reaper.dump_stacks(procs, tracker.root)
    records = []
    for proc in procs:
        seen = tracker.seen.get(proc.pid)
        records.append(
            {
                "kind": "running",
                "pid": proc.pid,
                "ppid": proc.ppid,
                "cmdline": list(_proctable.cmdline(proc.pid)),
                "phase": seen.phase if seen is not None else "?",
                "action": "",
                "created_at": tracker.created_at(proc.pid),
                "stack": stacks.get(proc.pid),
            }
        )
    return _report.running(records)
