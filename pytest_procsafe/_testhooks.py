"""Per-test hooks: one plain implementation of each hook procsafe needs around a test.

Every test pays for each implementation pluggy calls, and a wrapper (a generator) costs
several plain calls, so all that procsafe does around a test sits in one plain
implementation per hook, in one of two objects (``plugin.py`` registers `Plain`;
`turn_on` swaps in `Checked` when the leak checks start):

* `Plain` (leak checks off): a bad ``procsafe`` marker fails the test's setup; a failure
  to pickle gets procsafe's note (`_pickling`).
* `Checked` (leak checks on): the same, plus the leak checks' observation at the end of
  each phase (in ``pytest_runtest_makereport``, which pytest calls right after each
  phase), the test's own check after its teardown, what still runs when a test fails, and
  the wider-scoped fixtures' setups and finalizations, whose processes are theirs.

A wider-scoped fixture's setup is entered in ``pytest_fixture_setup`` and known to be over
at the next event (another fixture's setup, the end of the test's setup, a finalization):
its ``cached_result`` is set by then. (So a process a wider fixture starts after asking
for another one with ``request.getfixturevalue`` is that other fixture's: both are
fixtures of the run, never the test.) Two finalizers on the fixture mark its finalization:
one added when its setup starts (it runs last, after the fixture's own teardown: the
fixture is done) and one when its setup is over (it runs first: its finalization starts).
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Final
from typing import final

import pytest

from pytest_procsafe import _forked
from pytest_procsafe import _leaks
from pytest_procsafe import _marker

_PLAIN: Final = "procsafe-tests"
_CHECKED: Final = "procsafe-leak-tests"

# The fixtures pytest makes for xunit-style and unittest setups, and the method each runs
# (compiled at the first wider-scoped fixture: a run with none does not pay for it).
_XUNIT: Final = (
    r"_(?:unittest|xunit)_(setUpClass|setup_class|setup_module|setUpModule)_fixture_(.+)"
)


def register(config: pytest.Config) -> None:
    """The hooks for a run without leak checks (until `turn_on`), unless they are on."""
    manager = config.pluginmanager
    if manager.get_plugin(_CHECKED) is None:
        manager.register(Plain(config), _PLAIN)


def turn_on(config: pytest.Config, checks: _leaks.LeakChecks) -> None:
    """The leak checks start: `Checked` replaces `Plain`."""
    manager = config.pluginmanager
    plain = manager.get_plugin(_PLAIN)
    if plain is not None:
        manager.unregister(plain)
    if manager.get_plugin(_CHECKED) is None:
        manager.register(Checked(checks, config), _CHECKED)


def test_where(item: pytest.Item) -> tuple[str, int]:
    """Where a test's warnings point: its definition."""
    _, lineno, _ = item.location
    return str(item.path), (lineno or 0) + 1


def fixture_owner(fixturedef: pytest.FixtureDef[object]) -> tuple[str, tuple[str, int] | None]:
    """How a wider-scoped fixture reads in reports, and where its warnings point.

    A fixture of the user's is its name and its definition. pytest's own fixtures for
    ``setUpClass``, ``setup_class`` and ``setup_module`` read ``TestX.setUpClass`` (not
    ``_unittest_setUpClass_fixture_TestX``) and point at that method.
    """
    func = fixturedef.func
    match = re.fullmatch(_XUNIT, fixturedef.argname)  # compiled once, then re's cache
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


def _explain_pickling(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """A failure to pickle a start, a pool's task or a message gets a note saying which
    part, why and what to do (a start notes itself as it fails, in `_births`; this notes
    what failed in a pool's thread, seen only by get() or result())."""
    assert call.excinfo is not None
    from pytest_procsafe import _pickling

    unshown = _pickling.explain(call.excinfo.value)
    if unshown is not None:  # Python 3.10 without the notes backport's formatting
        item.add_report_section(call.when, "procsafe", unshown)


@final
class Plain:
    """Per-test hooks without leak checks; see the module docstring."""

    def __init__(self, config: pytest.Config) -> None:
        self._marked = _marker.marked(config)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        _marker.check(item, self._marked)  # a bad procsafe marker is this test's error

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> None:
        if call.excinfo is not None:
            _explain_pickling(item, call)


@final
class Checked:
    """Per-test hooks with leak checks; see the module docstring."""

    def __init__(self, checks: _leaks.LeakChecks, config: pytest.Config) -> None:
        self.checks = checks
        # --setup-only: no call phase follows a setup.
        self._calls = not config.getoption("setuponly", False)
        self._wide: dict[pytest.FixtureDef[object], bool] = {}  # fixture -> wider scope
        self._opening: list[pytest.FixtureDef[object]] = []  # wider setups not seen over
        self._marked = _marker.marked(config)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self) -> None:
        self.checks.collection_done()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.checks.test_start(item.nodeid, item)
        _marker.check(item, self._marked)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> None:
        checks, when, excinfo = self.checks, call.when, call.excinfo
        if when == "setup":
            if self._opening:
                self._settle()
            passed = excinfo is None
            checks.phase_end("setup", then="call" if passed and self._calls else "teardown")
        elif when == "call":
            checks.phase_end("call", then="teardown")
        elif excinfo is not None and checks.testing:
            # The teardown raised before `pytest_runtest_teardown` below could check:
            # keep its own error, and show the leaks with it.
            message = self._test_end(item)
            if message:
                item.add_report_section("teardown", "procsafe", message)
        if excinfo is None:
            return
        if when == "call" and not excinfo.errisinstance(
            (pytest.skip.Exception, pytest.xfail.Exception)
        ):
            # A test that failed (a timeout, an assertion) while what it started still
            # runs: where each of those processes is, before its teardown stops them.
            text = checks.still_running()
            if text:
                item.add_report_section("call", "procsafe: still running", text)
        _explain_pickling(item, call)

    @pytest.hookimpl(trylast=True)  # after pytest's own: the fixtures are torn down
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        message = self._test_end(item)
        if message:
            pytest.fail(message, pytrace=False)

    def _test_end(self, item: pytest.Item) -> str | None:
        checks = self.checks
        message = checks.test_end()
        if checks.forked:  # pytest-forked's test process: the parent takes over
            found = checks.handoff()
            if found is not None:
                item.user_properties.append((_forked.KEY, found))
        return message

    @pytest.hookimpl(tryfirst=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[object]) -> None:
        if self._opening:
            self._settle()
        wide = self._wide.get(fixturedef)
        if wide is None:
            wide = self._wide[fixturedef] = fixturedef.scope != "function"
        if not wide:
            return
        checks = self.checks
        checks.fixture_enter(fixturedef, *fixture_owner(fixturedef))
        self._opening.append(fixturedef)
        # Finalizers run last-in first-out: this one runs after the fixture's own teardown.
        fixturedef.addfinalizer(functools.partial(self._done, fixturedef))

    def _settle(self) -> None:
        """Close the wider-scoped setups that are over (their ``cached_result`` is set);
        one still running has a nested setup inside it (``getfixturevalue``)."""
        opening = self._opening
        while opening and opening[-1].cached_result is not None:
            fixturedef = opening.pop()
            self.checks.fixture_exit(fixturedef)
            # This one runs before the fixture's own teardown: what that teardown leaves
            # is the fixture's, not the test's in whose teardown it runs.
            fixturedef.addfinalizer(functools.partial(self._finalizing, fixturedef))

    def _finalizing(self, fixturedef: pytest.FixtureDef[object]) -> None:
        self._settle()
        self.checks.fixture_finalizing(fixturedef)

    def _done(self, fixturedef: pytest.FixtureDef[object]) -> None:
        self._settle()
        if fixturedef in self._opening:  # its setup never ended (a Ctrl-C inside it)
            self._opening.remove(fixturedef)
        self.checks.fixture_done(fixturedef)
