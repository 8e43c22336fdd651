"""The ``pytest11`` entry point ``procsafe``: options, marker, fixtures and hook wiring.

This module only wires; the work happens in the private modules, which have unit tests
of their own.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any
from typing import Final

import pytest

from pytest_procsafe import _config
from pytest_procsafe import _cutshort
from pytest_procsafe import _dumps
from pytest_procsafe import _environ
from pytest_procsafe import _imports
from pytest_procsafe import _leakhooks
from pytest_procsafe import _leaks
from pytest_procsafe import _marker
from pytest_procsafe import _methods
from pytest_procsafe import _sigterm
from pytest_procsafe import _testhooks

if TYPE_CHECKING:
    # Imported by the fixtures that need them: a run that starts no worker does not pay
    # for importing the worker and channel machinery (benchmarks/README.md).
    from multiprocessing.context import BaseContext
    from multiprocessing.managers import SyncManager

    from pytest_procsafe._channels import Channels
    from pytest_procsafe._workers import WorkerGroup
    from pytest_procsafe._wrappers import ProcsafeConnection
    from pytest_procsafe._wrappers import ProcsafeQueue


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("procsafe", "process safety (pytest-procsafe)")
    for option in _config.OPTIONS:
        text = option.help_text()
        if option.repeatable:
            group.addoption(
                option.flag,
                action="append",
                dest=option.ini,
                default=None,
                metavar=option.metavar,
                help=text,
            )
            parser.addini(option.ini, text + " (one per line)", type="linelist", default=None)
        else:
            group.addoption(
                option.flag, dest=option.ini, default=None, metavar=option.metavar, help=text
            )
            parser.addini(option.ini, text, type=_ini_type(option), default=None)


def _ini_type(option: _config.Option) -> Any:
    """Seconds may be TOML numbers: pytest 9.2+ takes ``float | str`` for that (a string
    still reaches procsafe's own parser and its messages); older pytest only strings."""
    if option.metavar == "SECONDS" and pytest.version_tuple >= (9, 2):
        return str | float
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "procsafe(leaks=..., start_methods=..., timeout=..., kill_grace=..., ignore=...): "
        "override pytest-procsafe's settings for the marked tests",
    )

    def cli(name: str) -> object:
        return config.getoption("procsafe_" + name)

    def ini(name: str) -> object:
        value: object = config.getini("procsafe_" + name)
        return None if value == [] and name == "ignore" else value

    # xdist workers inherit the controller's options; only the controller writes the
    # report, so only it needs the report path checked.
    config.stash[_config.SETTINGS_KEY] = _config.resolve(
        cli, ini, check_report=not _config.is_xdist_worker(config)
    )
    config.pluginmanager.register(_cutshort.Hooks(config), "procsafe-cutshort")
    _configure_workers(config)
    _configure_leaks(config)
    _testhooks.register(config)  # after: with the checks on, their hooks are in already


def pytest_report_header(config: pytest.Config) -> str:
    return _config.session_settings(config).header()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Iterator[None]:
    # After every other plugin's (one may add markers): the tests with a procsafe marker.
    yield
    _marker.marked(config).note(items)


# --- start methods ----------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    base = _config.session_settings(metafunc.config)
    if "mp_start_method" not in metafunc.fixturenames:
        return
    try:
        _, wanted = _marker.marker_overrides(metafunc.definition.iter_markers("procsafe"), base)
    except _config.SettingError:
        # The test's own error, at its setup (`_marker.check`), and only once: not once
        # per start method, and not the whole module's collection.
        if _methods.who_chooses(metafunc, ours=__name__) is None:
            metafunc.parametrize(
                "mp_start_method", [pytest.param(None, id="bad-marker")], indirect=True
            )
        return
    whose = _methods.who_chooses(metafunc, ours=__name__)
    if whose is not None:
        if wanted is not None:
            metafunc.definition.warn(
                pytest.PytestConfigWarning(
                    f"procsafe: @pytest.mark.procsafe(start_methods=...) on "
                    f"{metafunc.definition.nodeid} has no effect: {whose} chooses its "
                    f"mp_start_method ({', '.join(wanted)} asked for)"
                )
            )
        return
    methods = base.start_methods
    if wanted is not None:
        methods = _methods.intersect(methods, wanted)
    if methods:
        metafunc.parametrize("mp_start_method", methods, indirect=True, ids=list(methods))
        return
    reason = (
        f"procsafe: none of the marker's start methods ({', '.join(wanted or ())}) is "
        f"selected for this run ({', '.join(base.start_methods)})"
    )
    metafunc.parametrize(
        "mp_start_method",
        [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-start-method")],
        indirect=True,
    )


@pytest.fixture
def mp_start_method(request: pytest.FixtureRequest) -> str:
    """The start method this test runs under: ``"fork"``, ``"spawn"`` or ``"forkserver"``.

    Tests that use it, directly or through any ``mp_*`` fixture, are parametrized over the
    selected start methods (``--procsafe-start-methods``). A conftest may define its own
    ``mp_start_method`` fixture to choose differently.
    """
    method = getattr(request, "param", None)
    if method is None:  # requested dynamically, outside our parametrization
        return _config.session_settings(request.config).start_methods[0]
    assert isinstance(method, str)
    return method


@pytest.fixture
def mp_context(mp_start_method: str) -> BaseContext:
    """``multiprocessing.get_context(mp_start_method)``; the global method is never touched."""
    if mp_start_method not in _methods.KNOWN:
        raise pytest.UsageError(
            f"procsafe: mp_start_method returned {mp_start_method!r}; "
            f"allowed: {', '.join(_methods.KNOWN)}"
        )
    import multiprocessing  # here: a run that starts no worker does not import it

    try:
        return multiprocessing.get_context(mp_start_method)
    except ValueError as exc:
        raise pytest.UsageError(
            f"procsafe: start method {mp_start_method!r} is not available on this platform; "
            f"available here: {', '.join(_methods.available())}"
        ) from exc


# --- workers ----------------------------------------------------------------------------


def _configure_workers(config: pytest.Config) -> None:
    # Spawn/forkserver children resolve test modules and conftests to the files this
    # process imported them from, in every import mode, for any multiprocessing use.
    config.add_cleanup(_imports.install())
    # Every multiprocessing child of the run (and every fork) can tell where it is stuck.
    config.add_cleanup(_dumps.activate())
    # Forkserver children get the environment the test process has when they start, not
    # the one the server was started with (issue 18).
    config.add_cleanup(_environ.install())


@pytest.fixture
def mp_process(
    request: pytest.FixtureRequest, mp_context: BaseContext, mp_start_method: str
) -> Iterator[WorkerGroup]:
    """Start worker processes: ``mp_process(target, *args, **kwargs)`` returns a `Worker`.

    ``mp_process.start(target, args=(), kwargs=None, *, name=None, daemon=None)`` is the
    full form. At teardown every worker is joined within the procsafe timeout; one still
    running has its stack shown, is terminated, then killed after the kill grace; a
    worker that hung, or raised or crashed unseen, errors the test.
    """
    from pytest_procsafe._workers import WorkerGroup

    __tracebackhide__ = True  # an error that interrupts the teardown is not ours
    item, settings = _test_and_settings(request)
    group = WorkerGroup(
        mp_context,
        start_method=mp_start_method,
        timeout=settings.timeout,
        kill_grace=settings.kill_grace,
        owner=item.nodeid,
    )
    yield group
    # Cut short (Ctrl-C, pytest.exit(), -x): stop the workers at once, do not join them.
    why = _cutshort.reason(request.session)
    try:
        problems = group.close(now=why)
    except BaseException as exc:  # an outside timer, Ctrl-C: the workers are stopped
        if not _cutshort.absorb(request, exc, why, group.close()):
            raise
        return
    _cutshort.say(request.config, item.nodeid, group.notes)
    if group.interrupted:  # mp_channels' teardown raised what interrupted the join
        _cutshort.section(request, problems)
    elif problems:
        _fail_teardown(request, problems)


_SESSION_ENDING: Final = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    # From here on, fixtures are torn down outside any test: pytest's own sessionfinish
    # tears down what is left (after Ctrl-C, or another plugin's internal error). A flag
    # set once here, rather than a per-test wrapper around every test's protocol.
    session.config.stash[_SESSION_ENDING] = True


def _test_and_settings(request: pytest.FixtureRequest) -> tuple[pytest.Item, _config.Settings]:
    """The test a function-scoped fixture serves, and its settings (marker over options)."""
    item = request.node
    assert isinstance(item, pytest.Item)
    return item, _marker.item_settings(item)


def _fail_teardown(request: pytest.FixtureRequest, problems: list[str]) -> None:
    """Fail the test's teardown with *problems*; say them when no test is running.

    After an internal error (another plugin's hook raised), the session's end tears the
    fixtures down outside any test: raising there turned pytest's INTERNALERROR report and
    exit status into a bare traceback.
    """
    text = "\n\n".join(problems)
    if not request.config.stash.get(_SESSION_ENDING, False):
        pytest.fail(text, pytrace=False)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"procsafe: {request.node.nodeid}: {text}", red=True)
    else:
        sys.stderr.write(f"procsafe: {request.node.nodeid}: {text}\n")


# --- channels ---------------------------------------------------------------------------


@pytest.fixture
def mp_channels(
    request: pytest.FixtureRequest, mp_context: BaseContext, mp_process: WorkerGroup
) -> Iterator[Channels]:
    """Channels bound to ``mp_context``: ``.pipe(duplex=True)``, ``.queue(maxsize=0)``,
    ``.joinable_queue(maxsize=0)``, ``.manager()``; shared state: ``.lock()``,
    ``.rlock()``, ``.semaphore(value=1)``, ``.event()``, ``.condition()``,
    ``.barrier(parties)``, ``.value(typecode, value)``,
    ``.array(typecode, size_or_initializer)``, ``.shared_memory(size)``.

    Blocking reads, acquires and waits default to the procsafe timeout and raise
    `ChannelTimeout`, saying what the workers are doing. At teardown what the test did not
    read is drained while the workers are joined, then everything is closed: queues with
    their feeder threads joined, pipes, managers (terminated, then killed, if they do not
    stop), shared memory blocks (closed and unlinked).
    """
    from pytest_procsafe._channels import Channels

    __tracebackhide__ = True  # an error that interrupts the teardown is not ours
    _, settings = _test_and_settings(request)
    channels = Channels(
        mp_context,
        timeout=settings.timeout,
        kill_grace=settings.kill_grace,
        diagnose=mp_process.diagnose,
        workers_done=mp_process.all_exited,
    )
    yield channels
    why = _cutshort.reason(request.session)
    try:
        problems = channels.teardown(mp_process, now=why)
    except BaseException as exc:  # everything is closed; the workers' problems come next
        if not _cutshort.absorb(request, exc, why, channels.close()):
            raise
        return
    if problems:
        _fail_teardown(request, problems)


@pytest.fixture
def mp_pipe(mp_channels: Channels) -> tuple[ProcsafeConnection, ProcsafeConnection]:
    """A duplex pipe ``(left, right)`` bound to ``mp_context``; see ``mp_channels``."""
    return mp_channels.pipe(name="mp_pipe")


@pytest.fixture
def mp_queue(mp_channels: Channels) -> ProcsafeQueue:
    """A Queue bound to ``mp_context``; see ``mp_channels``."""
    return mp_channels.queue(name="mp_queue")


@pytest.fixture
def mp_manager(mp_channels: Channels) -> SyncManager:
    """A started ``SyncManager`` bound to ``mp_context``, shut down at teardown."""
    return mp_channels.manager(name="mp_manager")


# --- leak checks ------------------------------------------------------------------------


_LEAKS_KEY: Final = pytest.StashKey[_leaks.LeakChecks]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_procsafe import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def _teller(config: pytest.Config) -> Callable[[str], None]:
    """Write to the real stderr, even while pytest captures the test's output (as
    pytest-timeout does): for what must be said on a way out that leaves no report."""

    def tell(text: str) -> None:
        capman = config.pluginmanager.getplugin("capturemanager")
        suspended = getattr(capman, "global_and_fixture_disabled", None)
        with suspended() if callable(suspended) else contextlib.nullcontext():
            sys.stderr.write(text if text.endswith("\n") else text + "\n")
            sys.stderr.flush()

    return tell


def _configure_leaks(config: pytest.Config) -> None:
    settings = _config.session_settings(config)
    checks = _leaks.LeakChecks(
        settings,
        config.hook,
        write_report=not _config.is_xdist_worker(config),
        tell=_teller(config),
        where_of=_testhooks.test_where,
        settings_of=_marker.item_settings,
    )
    config.stash[_LEAKS_KEY] = checks
    # Cleanups run last registered first: the guardian is told "done" only after the
    # checks' final sweep has finished.
    guard = _leakhooks.Guard(config, checks)
    config.add_cleanup(guard.close)
    config.add_cleanup(guard.sweep)
    # Whatever the mode: procsafe's own workers must not outlive a SIGTERMed pytest.
    config.add_cleanup(_sigterm.on_sigterm(checks.emergency))
    config.pluginmanager.register(_leakhooks.SessionHooks(checks), "procsafe-leak-session")
    if settings.leaks != "off":
        _leakhooks.start(config, checks)
