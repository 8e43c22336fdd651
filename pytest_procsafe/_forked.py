"""pytest-forked: each test runs in a process forked from pytest, which checks its own.

Under ``--forked`` the test protocol (and with it procsafe's per-test hooks) runs in a
child forked from the pytest process for each test, which reports back and exits with
``os._exit``. Inherited as it is, the tracker would still be rooted at the parent: it would
take the forked test process itself for a leak (and under ``leaks=fail`` signal it), and
what the test really leaked would be reported once in the child, then again by the parent
when it is re-parented there.

So the child re-roots: it tracks its own descendants from the first test hook on, never
itself or its ancestors (`LeakChecks.reroot`). What it found travels back with the
teardown report (``user_properties``, which pytest-forked serializes like pytest-xdist
does): the records, for the parent's summary and JSON report (and warning, in warn mode:
the child's warnings die with it), and the identity (pid, start time) of what it left
running, which the parent then stops at the session's end as its own deferred cleanup,
and never reports again. `ForkedChecks` is that side of
`LeakChecks`. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

from pytest_procsafe import _proctable
from pytest_procsafe import _report
from pytest_procsafe import _segments
from pytest_procsafe._proctable import Proc
from pytest_procsafe._tracker import Tracker

if TYPE_CHECKING:
    from pytest_procsafe._config import Settings

#: The ``user_properties`` key of a forked test process's findings.
KEY: Final = "procsafe-forked"


Running = tuple[int, int, float]  # pid, ppid, start time


def pack(
    records: Sequence[dict[str, object]],
    running: Sequence[Running],
    segments: Sequence[str] = (),
) -> Any:
    """What a forked test process sends back: plain types only (the report is serialized).

    *segments* are the ``/dev/shm`` entries it left for the session's end to unlink."""
    return {
        "records": [dict(record) for record in records],
        "running": [list(p) for p in running],
        "segments": list(segments),
    }


def unpack(value: object) -> tuple[list[dict[str, object]], list[Running], list[str]]:
    """The records, the (pid, ppid, start) of what still runs and the segments to unlink,
    from `pack`'s form."""
    if not isinstance(value, dict):
        return [], [], []
    records = [dict(r) for r in value.get("records", ()) if isinstance(r, dict)]
    running = []
    for item in value.get("running", ()):
        if isinstance(item, (list, tuple)) and len(item) == 3:
            pid, ppid, start = item
            if isinstance(pid, int) and isinstance(ppid, int) and isinstance(start, (int, float)):
                running.append((pid, ppid, float(start)))
    segments = [entry for entry in value.get("segments", ()) if isinstance(entry, str)]
    return records, running, segments


def found_in(user_properties: Sequence[tuple[str, object]]) -> list[object]:
    """The findings a forked test process attached to its report, if any."""
    return [value for key, value in user_properties if key == KEY]


Where = tuple[str, int]


class ForkedChecks:
    """The pytest-forked side of `LeakChecks`: re-rooting in the test process, handing
    its findings over, and the parent taking them in."""

    settings: Settings
    tracker: Tracker | None
    segments: _segments.SegmentWatch | None
    report: _report.Report
    forked: bool
    _subreaper: bool | None
    _deferred: list[tuple[Proc, str]]
    _handoff: list[dict[str, object]]

    if TYPE_CHECKING:  # LeakChecks has it

        def _warn(self, message: str, where: Where | None, *, escalate: bool) -> None: ...

    def reroot(self) -> None:
        """This is a test process forked from the session's (pytest-forked): track its own
        descendants from now on, never itself or its ancestors."""
        old = self.tracker
        if old is not None:
            old.close()  # its copies of the parent's files; the parent keeps its own
        self.tracker = Tracker()
        self._subreaper = _proctable.set_subreaper(True)  # not inherited across fork
        if self.segments is not None:
            self.segments.close()
            self.segments = _segments.SegmentWatch(self.tracker.root)
        self._deferred = []
        self._handoff = []
        self.forked = True

    def handoff(self) -> Any:
        """What this forked test process found, for its parent (`_forked.pack`): the
        records, and what it leaves running for the parent's session end to stop."""
        records, self._handoff = self._handoff, []
        running = [(proc.pid, proc.ppid, proc.start) for proc, _ in self._deferred]
        self._deferred = []
        segments = self.segments.hand_over() if self.segments is not None else []
        if not (records or running or segments):
            return None
        return pack(records, running, segments)

    def receive(self, value: object, where: Where | None) -> None:
        """The parent takes in a forked test process's findings: reports them as its own
        (warning in warn mode: the child's died with it) and stops what still runs at the
        session's end, without reporting it again."""
        records, running, segments = unpack(value)
        if self.segments is not None and self.settings.cleanup != "keep":
            self.segments.take_over(segments)
        if records:
            self.report.add(records)
            by_owner: dict[str, list[dict[str, object]]] = {}
            for record in records:
                by_owner.setdefault(str(record.get("owner")), []).append(record)
            if self.settings.leaks == "warn":
                for owner, group in by_owner.items():
                    text = _report.describe(
                        owner,
                        group,
                        self.settings.cleanup,
                        auto=self.settings.cleanup_auto,
                        mode=self.settings.leaks,
                    )
                    self._warn(text, where, escalate=False)
        tracker = self.tracker
        for pid, ppid, start in running:
            proc = Proc(pid, ppid, start, False)
            if tracker is not None:
                tracker.adopt(proc)
            if self.settings.cleanup != "keep":
                self._deferred.append((proc, "forked"))
