"""The leak checks' pytest hooks: they tell `LeakChecks` where the run is, nothing more.

`SessionHooks` is registered in every mode (under ``leaks=off`` procsafe still stops its own
workers at the end); the per-test hooks (`_testhooks`) check only while checks are on:
under ``off`` a test pays only for the marker check and the pickling note's hook.
`Guard` starts the guardian (`_guardlink`) just before the run's first child (a run that
starts no process leaves nothing for it to stop), tells it about every process the checks
see, and tells it "done" once the checks' final sweep has finished.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any
from typing import Final
from typing import final

import pytest

from pytest_procsafe import _births
from pytest_procsafe import _cutshort
from pytest_procsafe import _forked
from pytest_procsafe import _guardlink
from pytest_procsafe import _leaks
from pytest_procsafe import _owned
from pytest_procsafe import _report
from pytest_procsafe import _testhooks

_GUARD: Final = pytest.StashKey["Guard"]()


def start(config: pytest.Config, checks: _leaks.LeakChecks) -> None:
    """Turn the per-test checks on (and the guardian with them, at the first child)."""
    checks.activate()
    guard = config.stash.get(_GUARD, None)
    if guard is not None:
        checks.on_first_child = guard.start
    _testhooks.turn_on(config, checks)
    # pytest-forked (its entry point's name): each test may run in a forked process.
    if any(config.pluginmanager.has_plugin(name) for name in ("pytest_forked", "forked")):
        config.pluginmanager.register(ForkedHooks(checks), "procsafe-leak-forked")


@final
class Guard:
    """The run's guardian, and the final sweep it waits for (see the module docstring)."""

    def __init__(self, config: pytest.Config, checks: _leaks.LeakChecks) -> None:
        self._config = config
        self._checks = checks
        self._guardian: _guardlink.Guardian | None = None
        self._swept = False
        config.stash[_GUARD] = self
        # The guardian starts mid-test, while pytest's capture may hold fd 2: it writes to
        # the stderr of now (configure, capture suspended), as when it started here.
        try:
            self._stderr = os.dup(2)
        except OSError:  # no stderr at all
            self._stderr = -1

    def start(self) -> None:
        """Start (or share) the guardian: `LeakChecks` calls this once, just before this
        process's first child, and before it becomes a subreaper (or the guardian, started
        in a shell's background, would come back as its child)."""
        if self._guardian is not None:
            return
        settings = self._checks.settings
        with _births.unheard():  # the guardian's shell is procsafe's, not a test's child
            guardian = _guardlink.acquire(
                grace=settings.kill_grace,
                keep=settings.cleanup == "keep",
                stderr=self._stderr if self._stderr >= 0 else None,
            )
        if guardian is None:  # no guardian on this platform: the checks still run
            return
        self._guardian = guardian
        _owned.add_pid(guardian.pid, _owned.GUARDIAN)
        self._attach()

    def _attach(self) -> None:
        """Tell the guardian of every process the checks see from now on."""
        guardian, tracker = self._guardian, self._checks.tracker
        if guardian is None or tracker is None:
            return
        if guardian.child:  # started without a shell: never in the final sweep
            tracker.exempt.add(guardian.pid)
        # One write per new process (none for a test that starts none): the guardian then
        # knows processes whose environment does not carry the run's token.
        tracker.on_new = lambda proc: guardian.announce(
            proc.pid, proc.start, own=proc.pid in _owned.pids()
        )

    def sweep(self) -> None:
        """Unconfigure: the checks' final sweep. A second Ctrl-C there kills what it was
        stopping (the escalation does) and leaves the rest to the guardian."""
        try:
            self._checks.close()
        except KeyboardInterrupt:
            if not _cutshort.interrupted(self._config):
                raise
            return
        self._swept = True

    def close(self) -> None:
        """Last: "done" when the sweep finished; otherwise the guardian stops what is left."""
        guardian, self._guardian = self._guardian, None
        if self._stderr >= 0:
            with contextlib.suppress(OSError):
                os.close(self._stderr)
            self._stderr = -1
        if guardian is None:
            return
        if _guardlink.release(guardian, done=self._swept):  # else an outer run's, still used
            _owned.discard_pid(guardian.pid)


@final
class SessionHooks:
    """Session-level leak hooks: registered in every mode (off still stops our workers)."""

    def __init__(self, checks: _leaks.LeakChecks) -> None:
        self.checks = checks

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        # Under leaks=off, a marker may still turn the checks on for some tests.
        if self.checks.tracker is None and any(
            mark.kwargs.get("leaks") in ("warn", "fail")
            for item in items
            for mark in item.iter_markers("procsafe")
        ):
            start(config, self.checks)

    @pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        try:
            self.checks.session_end()
        except KeyboardInterrupt:
            if _cutshort.reason(session) is None:
                raise
            # A second Ctrl-C: what was being stopped is killed; the final sweep (or the
            # guardian) stops the rest.
            _cutshort.say(session.config, "", ["a second Ctrl-C: the leak checks stop here"])
        # An xdist worker hands its findings to the controller, which reports them all and
        # sets the run's exit status (xdist sends workeroutput after this hook).
        workeroutput = getattr(session.config, "workeroutput", None)
        if isinstance(workeroutput, dict):
            workeroutput[_report.WORKER_KEY] = self.checks.worker_output()
        failed = self.checks.failed or self.checks.report_error is not None
        if failed and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: only the controller calls it
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        workerinput = getattr(node, "workerinput", None) or {}
        worker = str(workerinput.get("workerid", "?"))
        output = (getattr(node, "workeroutput", None) or {}).get(_report.WORKER_KEY)
        self.checks.add_worker_output(worker, output)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        checks = self.checks
        if not checks.report.records and checks.report_error is None:
            return  # a clean run has no section (`_summary.write`): nothing to import
        from pytest_procsafe import _summary

        _summary.write(
            terminalreporter,
            checks.report,
            mode=checks.settings.leaks,
            verbose=terminalreporter.verbosity > 0,
            error=checks.report_error,
            failed=checks.failed,
        )


@final
class ForkedHooks:
    """The parent's side under pytest-forked (registered only when that plugin is)."""

    def __init__(self, checks: _leaks.LeakChecks) -> None:
        self.checks = checks

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown" or self.checks.forked:
            return
        for found in _forked.found_in(report.user_properties):
            path, line, _ = report.location
            self.checks.receive(found, (path, (line or 0) + 1))
