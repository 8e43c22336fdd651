"""Leak checks for one session: owners' checks, modes, cleanup policies, every way out.

`LeakChecks` is what the plugin's hooks call (and all they do): it moves the owner along
(session, test phases, wider-scoped fixtures), checks each owner when it ends, reports
(`ProcessLeakWarning`, a test failure, the summary and JSON report) and cleans up under
the cleanup policy. `_tracker` does the observing and classifying, `_reaper` the
signalling and reaping, `_report` the words.

Every way a run ends goes through `LeakChecks.session_end` (normal end, ``-x``, Ctrl-C,
an internal error), `LeakChecks.close` (unconfigure: the safety net) or `on_sigterm`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import final

from pytest_procsafe import _births
from pytest_procsafe import _forked
from pytest_procsafe import _owned
from pytest_procsafe import _proctable
from pytest_procsafe import _registrations
from pytest_procsafe import _report
from pytest_procsafe import _segments
from pytest_procsafe._ledger import Found
from pytest_procsafe._ledger import Owner
from pytest_procsafe._proctable import Proc
from pytest_procsafe._tracker import Tracker

if TYPE_CHECKING:
    from pytest_procsafe._config import Settings
    from pytest_procsafe._leaked import LeakedProcess

Where = tuple[str, int]


@final
class LeakChecks(_forked.ForkedChecks):
    """One session's leak checks; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        hook: Any,
        *,
        write_report: bool,
        tell: Callable[[str], None] | None = None,
        where_of: Callable[[Any], Where] | None = None,
        settings_of: Callable[[Any], Settings] | None = None,
    ) -> None:
        self.settings = settings
        # Asked about a test (the object `test_start` was given) only when it has leaks.
        self._where_of = where_of
        self._settings_of = settings_of
        #: Writes to the real stderr, for what a way out without a report must say.
        self.tell = tell
        self.report = _report.Report()
        #: Leaks outside tests in fail mode, or escalated warnings: the run fails.
        self.failed = False
        self.tracker: Tracker | None = None
        self._hook = hook  # config.hook: pytest_procsafe_ignore, pytest_procsafe_leaks
        self._write_report = write_report
        self._session = Owner("session", "session")
        self._test: Owner | None = None  # made only once the running test has a process
        self._running: tuple[str, Any] | None = None  # the running test: nodeid, object
        self._phase = "collection"
        self._stack: list[Owner] = []  # wider-scoped fixtures being set up
        self._fixtures: dict[object, Owner] = {}
        self._deferred: list[tuple[Proc, str]] = []  # stopped at session end
        self.segments: _segments.SegmentWatch | None = None
        self._subreaper: bool | None = None  # what it was before the checks set it
        self._unhook_first: Callable[[], None] | None = None
        self._first_lock = threading.Lock()  # two threads may start the first children
        #: Called once, just before this process's first child: the guardian starts there.
        self.on_first_child: Callable[[], None] | None = None
        self._ended = False
        #: Why the JSON report could not be written (the run then fails), if it could not.
        self.report_error: str | None = None
        # Workers made before this session are not its own (it runs nested in a test).
        self._since = time.monotonic()
        #: This is a test process pytest-forked forked from the session's (`reroot`).
        self.forked = False
        self._handoff: list[dict[str, object]] = []  # its records, for the parent
        self._signal = 0  # births + registrations at the last observation
        #: The pids the last process check reported, by owner: their segments go with them.
        self._leaking: dict[Owner, set[int]] = {}

    def activate(self) -> None:
        """Start tracking (not under ``leaks=off``: off costs nothing, changes nothing)."""
        if self.tracker is None:
            self.tracker = Tracker()
            # Just before this process's first child, not now: a run that starts none has
            # nothing to adopt or guard (and does not load ctypes, nor start a guardian).
            self._unhook_first = _births.before(self._first_child)
            if os.name == "posix":
                self.segments = _segments.SegmentWatch(self.tracker.root)

    def _first_child(self) -> None:
        """Once, before the first child: `on_first_child` (the guardian), then this process
        becomes a subreaper (orphaned grandchildren come back to it), unless nested."""
        with self._first_lock:
            unhook, self._unhook_first = self._unhook_first, None
            if unhook is None:
                return
            unhook()
            if self.on_first_child is not None:
                self.on_first_child()
            tracker = self.tracker
            if tracker is not None and not tracker.nested:
                self._subreaper = _proctable.set_subreaper(True)

    def _current(self) -> Owner:
        if self._stack:
            return self._stack[-1]
        return self._test_owner() or self._session

    def _test_owner(self) -> Owner | None:
        """The running test's owner, made on first use: a clean test never needs one."""
        if self._test is None and self._running is not None:
            nodeid, test = self._running
            where_of = self._where_of
            where = None if where_of is None else (lambda: where_of(test))
            self._test = Owner(nodeid, "test", where)
        return self._test

    def _observe(self, owner: Owner | None, phase: str, *, always: bool = True) -> Tracker | None:
        """One observation: a ``waitid`` (and an ``fstat``) when nothing changed, and no
        owner made then; the walks otherwise. Unless *always*, ``/dev/shm`` is looked at
        only when something could have made an entry: a process of this tree, or a start
        or registration of this process's (`_births`, `_registrations`) since the last
        look; the test's end always looks."""
        tracker = self.tracker
        if tracker is None:
            return None
        signal = tracker.births + _registrations.changes
        news = signal != self._signal
        self._signal = signal
        busy = tracker.busy()
        if busy:
            if self._unhook_first is not None:  # a child no wrapper saw start (C code)
                self._first_child()
            tracker.observe(owner or self._current(), phase)
        segments = self.segments
        if segments is not None and (always or busy or news) and segments.changed():
            segments.observe(owner or self._current(), phase)
        return tracker

    # --- the hooks' entry points ----------------------------------------------------------

    def collection_done(self) -> None:
        self._observe(self._session, "collection")
        self._phase = "session"

    @property
    def testing(self) -> bool:
        """Whether a test started and has not been checked yet."""
        return self._running is not None

    def test_start(self, nodeid: str, test: object = None) -> None:
        """A test's setup starts; *test* is what ``where_of`` and ``settings_of`` are
        asked about, if it leaks."""
        tracker = self.tracker
        if tracker is not None and _proctable.SELF[0] != tracker.root:
            self.reroot()
        self._test = None
        self._running = (nodeid, test)
        self._phase = "setup"

    def phase_end(self, phase: str, *, then: str) -> None:
        """The test's *phase* ended (*then* starts: ``call`` or ``teardown``).

        Looked at only when something may have appeared in it: a process of this tree is
        known, or this process started a child (any launcher `_births` wraps, or a fork)
        or registered a segment since the last look. A clean test's phases cost nothing
        then, and its end is its one observation; a child started otherwise (a C
        library's ``fork``) under a test that had none is first seen at that end.
        """
        tracker = self.tracker
        if tracker is not None and (
            tracker.seen or tracker.births + _registrations.changes != self._signal
        ):
            self._observe(None, phase, always=False)
        self._phase = then

    def test_end(self) -> str | None:
        """Check the test that just tore down; the failure text under ``leaks=fail``."""
        running, tracker = self._running, self.tracker
        if running is None or tracker is None:
            self._running = None
            return None
        self._observe(None, self._phase)  # while it runs: what appeared now is the test's
        self._running = None
        owner, self._test = self._test, None
        phase, self._phase = self._phase, "session"
        if owner is None:  # nothing was ever seen under it
            return None
        settings = self.settings if self._settings_of is None else self._settings_of(running[1])
        message = None
        if tracker.has_candidates(owner):
            message = self._check(owner, settings, test=True)
        # After the processes' cleanup: a leaked child killed now leaves its semaphores.
        if self.segments is not None:
            self.segments.observe(owner, phase)
            if self.segments.has_candidates(owner):
                more = self._check_segments(owner, settings, test=True)
                message = "\n\n".join(text for text in (message, more) if text) or None
        return message

    def fixture_enter(self, key: object, name: str, where: Where | None) -> None:
        """A wider-scoped fixture's setup starts (*name*: ``mp_pool``, ``TestX.setUpClass``)."""
        self._observe(self._current(), self._phase)
        owner = Owner(f"fixture {name}", "fixture", where)
        self._fixtures[key] = owner
        self._stack.append(owner)

    def fixture_exit(self, key: object) -> None:
        """A wider-scoped fixture's setup ended (or failed)."""
        owner = self._fixtures.get(key)
        if owner is not None and self._stack and self._stack[-1] is owner:
            self._observe(owner, "setup")
            self._stack.pop()

    def fixture_finalizing(self, key: object) -> None:
        """A wider-scoped fixture's finalization starts: what appears now is its own, not
        the test's in whose teardown it runs."""
        owner = self._fixtures.get(key)
        if owner is None:
            return
        self._observe(self._current(), self._phase)
        self._stack.append(owner)

    def fixture_done(self, key: object) -> None:
        """A wider-scoped fixture was finalized: check what its setup and its finalizers
        started."""
        owner = self._fixtures.pop(key, None)
        if owner is None:
            return
        finalizing = bool(self._stack) and self._stack[-1] is owner
        tracker = self._observe(self._current(), "teardown" if finalizing else self._phase)
        if finalizing:
            self._stack.pop()
        if tracker is not None and tracker.has_candidates(owner):
            self._check(owner, self.settings, test=False)
            if self.segments is not None:  # what its processes left as they were stopped
                self.segments.observe(owner, "teardown")
        self._check_segments(owner, self.settings, test=False)

    def session_end(self) -> None:
        """After the session's fixtures: check every owner left, clean up, write the report."""
        self._ended = True
        # procsafe's own workers first: whatever the fixtures still hold is not a leak.
        _owned.stop(self.settings.kill_grace, self._since)
        tracker = self._observe(self._current(), self._phase)
        if tracker is not None:
            for owner in tracker.owners():
                self._check(owner, self.settings, test=False)
            self._stop_deferred()
            if self.segments is not None:
                self.segments.observe(self._current(), self._phase)
                for segment_owner in self.segments.owners():
                    assert isinstance(segment_owner, Owner)
                    self._check_segments(segment_owner, self.settings, test=False)
                self._unlink_deferred()
        path = self.settings.report
        if self._write_report and path is not None:
            try:
                self.report.write(path)
            except OSError as exc:
                # Checked at startup, yet the directory may have gone or refuse files
                # (removed meanwhile, a read-only or virtual file system): say so, do not
                # crash the run's end with a traceback.
                self.report_error = (
                    f"procsafe: could not write the JSON report {str(path)!r}: "
                    f"{exc.strerror or exc}"
                )

    def worker_output(self) -> dict[str, Any]:
        """An xdist worker's findings for its controller (after `session_end`)."""
        return _report.worker_output(self.report.records, self.failed)

    def add_worker_output(self, worker: str, output: object) -> None:
        """The controller takes in what an xdist worker found (see `worker_output`)."""
        records, failed = _report.from_worker(worker, output)
        self.report.add(records)
        self.failed = self.failed or failed

    def close(self) -> None:
        """Unconfigure: the safety net for runs that never reached `session_end`."""
        try:
            if not self._ended:
                _owned.stop(self.settings.kill_grace, self._since)
            if self.tracker is not None:
                if self.settings.cleanup != "keep":
                    self._stop_deferred()
                    leftovers = self.tracker.leftovers()
                    if leftovers:
                        from pytest_procsafe import _reaper

                        _reaper.stop(leftovers, self.settings.kill_grace, self.tracker.root)
                    self._unlink_deferred()
                self.tracker.close()
            if self.segments is not None:
                self.segments.close()
        finally:
            if self._unhook_first is not None:
                self._unhook_first()
                self._unhook_first = None
            if self._subreaper is not None:
                _proctable.set_subreaper(self._subreaper)
                self._subreaper = None

    def still_running(self) -> str | None:
        """What the running test started and is still running, with stacks: for a test
        that failed (a timeout, an assertion) while its children ran."""
        from pytest_procsafe import _running

        if self.tracker is None or self._test is None:
            return None  # nothing was ever seen under the running test
        return _running.describe(self.tracker, self._test, self._phase)

    def emergency(self) -> None:
        """SIGTERM: stop procsafe's workers and (unless keep) everything that leaked, now."""
        from pytest_procsafe import _reaper
        from pytest_procsafe import _running

        _owned.stop(self.settings.kill_grace, self._since)
        tracker = self.tracker
        if tracker is not None and self.settings.cleanup != "keep":
            procs = tracker.leftovers() + [proc for proc, _ in self._deferred]
            _running.announce(procs, tracker, "pytest was sent SIGTERM", self.tell)
            # No pool.terminate() here: it joins threads, from inside a signal handler.
            _reaper.stop(procs, self.settings.kill_grace, tracker.root, pools=False)
            self._unlink_deferred()

    # --- checking one owner ---------------------------------------------------------------

    def _check(self, owner: Owner, settings: Settings, *, test: bool) -> str | None:
        from pytest_procsafe import _reaper
        from pytest_procsafe._machinery import detach

        tracker = self.tracker
        assert tracker is not None
        entries = tracker.take(owner)
        if settings.leaks == "off":  # a marker turned the checks off for this test
            for entry in entries:  # swept at the end, unless the session's mode is off
                if self.settings.leaks == "off":
                    tracker.exempt.add(entry.proc.pid)
                else:
                    tracker.spare(entry.proc)
            detach(entry.proc for entry in entries)  # exempt never means pytest waits at exit
            return None
        session = owner is self._session
        # What an outliving object holds moves to the session, which reports it at the
        # end if it is still running then (and does not look for its holder again).
        found = tracker.classify(entries, later=self._session, find_holders=not session)
        from pytest_procsafe._leaked import LeakedProcess  # made for candidates only

        cleanup = self.settings.cleanup
        leaks: list[tuple[Found, LeakedProcess]] = []
        for item in found:
            record = LeakedProcess(
                pid=item.proc.pid,
                ppid=item.proc.ppid,
                cmdline=item.cmdline,
                kind=item.kind,
                owner=owner.label,
                phase=item.seen.phase,
                action="kept" if cleanup == "keep" else "reaped" if item.proc.zombie else "killed",
                name=item.name,
                held_by=item.seen.held_by,
                created_at=item.created_at,
            )
            if self._ignored(record, settings):
                tracker.spare(item.proc)
                detach([item.proc])  # exempt never means pytest waits for it at exit
            else:
                leaks.append((item, record))
        if not leaks:
            return None
        # What each live one was doing, asked before anything is stopped.
        stacks = _reaper.dump_stacks([item.proc for item, _ in leaks], tracker.root)
        records = [
            dataclasses.replace(record, stack=stacks.get(record.pid)) for _, record in leaks
        ]
        self._hook.pytest_procsafe_leaks(owner=owner.label, leaks=list(records))
        procs = [item.proc for item, _ in leaks]
        if cleanup == "kill":
            actions = _reaper.stop(procs, settings.kill_grace, tracker.root)
            records = [
                dataclasses.replace(r, action=actions.get(r.pid, r.action)) for r in records
            ]
        elif cleanup == "session":
            self._deferred.extend((proc, owner.label) for proc in procs)
        else:
            detach(procs)
            tracker.exempt.update(proc.pid for proc in procs)
        self._leaking = {owner: {record.pid for record in records}}
        dicts = [record.as_dict() for record in records]
        self.report.add(dicts)
        if self.forked:
            self._handoff.extend(dicts)
        held = [d for d in dicts if d["held_by"] is not None]
        loose = [d for d in dicts if d["held_by"] is None]
        message = None
        if loose:
            where = owner.where or _report.where_of(loose)
            message = self._deliver(self._words(owner, loose), owner, settings, test, where=where)
        if held:  # held on purpose, still running at the end: told, never a failure
            self._warn(self._words(owner, held), _report.where_of(held), escalate=False)
        return message

    def _words(self, owner: Owner, records: Sequence[Mapping[str, object]]) -> str:
        settings = self.settings
        return _report.describe(
            owner.label,
            records,
            settings.cleanup,
            auto=settings.cleanup_auto,
            mode=settings.leaks,
        )

    def _deliver(
        self,
        message: str,
        owner: Owner,
        settings: Settings,
        test: bool,
        *,
        where: Where | Callable[[], Where] | None = None,
    ) -> str | None:
        """Warn, or fail: the failure text for a test, the run's status otherwise."""
        if settings.leaks == "fail":
            if test:
                return message
            self.failed = True
            return None
        where = where or owner.where
        self._warn(message, where() if callable(where) else where, escalate=test)
        return None

    def _check_segments(self, owner: Owner, settings: Settings, *, test: bool) -> str | None:
        """Check the segments and semaphores *owner* left behind (after its processes)."""
        watch, tracker = self.segments, self.tracker
        if watch is None or tracker is None or not watch.has_candidates(owner):
            return None
        # Mappings count in this tree only, not in xdist workers' (pruned) subtrees.
        leaking = self._leaking.get(owner, set())

        def tree() -> set[int]:
            return set(tracker.table.tree(tracker.prune)) - tracker.prune

        found = watch.take(
            owner,
            tree,
            later=self._session,
            spare=lambda: tree() - leaking if owner is not self._session else set(),
        )
        if settings.leaks == "off":
            return None
        found = [s for s in found if not any(p.search(s.name) for p in settings.ignore)]
        if not found:
            return None
        records = watch.settle(found, owner.label, self.settings.cleanup)
        self.report.add(records)
        if self.forked:
            self._handoff.extend(records)
        return self._deliver(self._words(owner, records), owner, settings, test)

    def _unlink_deferred(self) -> None:
        if self.segments is not None:
            for owner, name in self.segments.unlink_deferred():
                self.report.set_action(owner, None, "kept", name)

    def _ignored(self, record: LeakedProcess, settings: Settings) -> bool:
        text = " ".join(record.cmdline)
        if any(pattern.search(text) for pattern in settings.ignore):
            return True
        return self._hook.pytest_procsafe_ignore(process=record) is True

    def _warn(self, message: str, where: Where | None, *, escalate: bool) -> None:
        from pytest_procsafe import _warnings  # a leak to warn of: a clean run never does

        if not _warnings.warn(message, where, escalate=escalate):
            self.failed = True  # escalated by -W error outside a test: the run fails

    def _stop_deferred(self) -> None:
        tracker = self.tracker
        if not self._deferred or tracker is None:
            return
        from pytest_procsafe import _reaper

        deferred, self._deferred = self._deferred, []
        actions = _reaper.stop(
            [proc for proc, _ in deferred], self.settings.kill_grace, tracker.root
        )
        for proc, owner in deferred:
            self.report.set_action(owner, proc.pid, actions.get(proc.pid, "reaped"))
