"""The leak checks' pytest hooks: they tell `LeakChecks` where the run is, nothing more.

`SessionHooks` is registered in every mode (under ``leaks=off`` procsafe still stops its own
workers at the end); `PerTestHooks` only while checks are on, so ``off`` costs nothing per test.
`Guard` starts the guardian (`_guardlink`) with the checks, tells it about every process
the checks see, and tells it "done" once the checks' final sweep has finished.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Generator
from typing import Any
from typing import Final
from typing import final

import pytest

from pytest_procsafe import _cutshort
from pytest_procsafe import _forked
from pytest_procsafe import _guardlink
from pytest_procsafe import _leaks
from pytest_procsafe import _marker
from pytest_procsafe import _owned
from pytest_procsafe import _report
from pytest_procsafe import _summary

_GUARD: Final = pytest.StashKey["Guard"]()


def start(config: pytest.Config, checks: _leaks.LeakChecks) -> None:
    """Turn the per-test checks on (and the guardian with them)."""
    checks.activate()
    config.pluginmanager.register(PerTestHooks(checks), "procsafe-leak-tests")
    # pytest-forked (its entry point's name): each test may run in a forked process.
    if any(config.pluginmanager.has_plugin(name) for name in ("pytest_forked", "forked")):
        config.pluginmanager.register(ForkedHooks(checks), "procsafe-leak-forked")
    guard = config.stash.get(_GUARD, None)
    if guard is not None:
        guard.start()


@final
class Guard:
    """The run's guardian, and the final sweep it waits for (see the module docstring)."""

    def __init__(self, config: pytest.Config, checks: _leaks.LeakChecks) -> None:
        self._config = config
        self._checks = checks
        self._guardian: _guardlink.Guardian | None = None
        self._swept = False
        config.stash[_GUARD] = self

    def start(self) -> None:
        tracker = self._checks.tracker
        if self._guardian is not None or tracker is None:
            return
        settings = self._checks.settings
        guardian = _guardlink.acquire(grace=settings.kill_grace, keep=settings.cleanup == "keep")
        if guardian is None:  # no guardian on this platform: the checks still run
            return
        self._guardian = guardian
        _owned.add_pid(guardian.pid, _owned.GUARDIAN)
        tracker.exempt.add(guardian.pid)  # never in the final sweep
        tracker.inert.add(guardian.pid)  # childless: the clean test's check stays cheap
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
        if guardian is None:
            return
        if _guardlink.release(guardian, done=self._swept):  # else an outer run's, still used
            _owned.discard_pid(guardian.pid)


def _test_where(item: pytest.Item) -> tuple[str, int]:
    _, lineno, _ = item.location
    return str(item.path), (lineno or 0) + 1


# The fixtures pytest makes for xunit-style and unittest setups, and the method each runs.
_XUNIT: Final = re.compile(
    r"_(?:unittest|xunit)_(setUpClass|setup_class|setup_module|setUpModule)_fixture_(.+)"
)


def fixture_owner(fixturedef: pytest.FixtureDef[object]) -> tuple[str, tuple[str, int] | None]:
    """How a wider-scoped fixture reads in reports, and where its warnings point.

    A fixture of the user's is its name and its definition. pytest's own fixtures for
    ``setUpClass``, ``setup_class`` and ``setup_module`` read ``TestX.setUpClass`` (not
    ``_unittest_setUpClass_fixture_TestX``) and point at that method.
    """
    func = fixturedef.func
    match = _XUNIT.fullmatch(fixturedef.argname)
    if match is None:
        code = getattr(func, "__code__", None)
        where = None if code is None else (code.co_filename, code.co_firstlineno)
        return fixturedef.argname, where
    method, holder = match.groups()
    where = None
    for cell in getattr(func, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            value = cell.cell_contents
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None and code.co_name == method:
                where = (code.co_filename, code.co_firstlineno)
                break
    return f"{holder}.{method}", where


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
        _summary.write(
            terminalreporter,
            checks.report,
            mode=checks.settings.leaks,
            verbose=terminalreporter.verbosity > 0,
            error=checks.report_error,
            failed=checks.failed,
        )


@final
class PerTestHooks:
    """Per-test leak hooks: registered only when checks are on (off costs nothing)."""

    def __init__(self, checks: _leaks.LeakChecks) -> None:
        self.checks = checks

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self) -> None:
        self.checks.collection_done()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.checks.test_start(item.nodeid, lambda: _test_where(item))

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self) -> None:
        self.checks.advance("call")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        __tracebackhide__ = True  # a teardown's error shows the teardown, not this wrapper
        self.checks.advance("teardown")
        try:
            result = yield
        except (KeyboardInterrupt, pytest.exit.Exception):
            raise  # the session's end checks this test
        except BaseException:
            message = self._test_end(item)
            if message:  # keep the teardown's own error; show the leaks with it
                item.add_report_section("teardown", "procsafe", message)
            raise
        message = self._test_end(item)
        if message:
            pytest.fail(message, pytrace=False)
        return result

    def _test_end(self, item: pytest.Item) -> str | None:
        message = self.checks.test_end(lambda: _marker.item_settings(item))
        if self.checks.forked:  # pytest-forked's test process: the parent takes over
            found = self.checks.handoff()
            if found is not None:
                item.user_properties.append((_forked.KEY, found))
        return message

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> None:
        # A test that failed (a timeout, an assertion) while what it started still runs:
        # show where each of those processes is, before its teardown stops them. A plain
        # hook (a passing phase pays one check): the section is added before the report.
        excinfo = call.excinfo
        if call.when != "call" or excinfo is None:
            return
        if excinfo.errisinstance((pytest.skip.Exception, pytest.xfail.Exception)):
            return
        text = self.checks.still_running()
        if text:
            item.add_report_section("call", "procsafe: still running", text)

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[object]
    ) -> Generator[None, object, object]:
        if fixturedef.scope == "function":
            return (yield)
        self.checks.fixture_enter(fixturedef, *fixture_owner(fixturedef))
        try:
            result = yield
        finally:
            self.checks.fixture_exit(fixturedef)
        # Finalizers run last-in first-out: this one runs before the fixture's own
        # teardown, so what that teardown leaves is the fixture's, not the test's.
        fixturedef.addfinalizer(functools.partial(self.checks.fixture_finalizing, fixturedef))
        return result

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[object]) -> None:
        if fixturedef.scope != "function":
            self.checks.fixture_done(fixturedef)


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
