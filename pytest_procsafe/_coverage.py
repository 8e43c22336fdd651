"""Coverage in workers: only what coverage's own configuration does not already do.

pytest-cov 7 no longer measures child processes itself, and coverage measures them
only when configured to (``[run] patch = subprocess, fork, _exit``, ``sigterm = true`` or
``concurrency = multiprocessing``). When the test run is being measured and that
configuration is missing for a start method, the parent hands the worker a `Plan` and the
worker's bootstrap starts a parallel-mode `coverage.Coverage` with the parent's exact
configuration, saving its data on a normal end and on SIGTERM (the path procsafe takes to
stop a worker at teardown). The data files land next to the parent's data file, where
``coverage combine`` and pytest-cov's combine step pick them up.

Runs inside workers: imports neither pytest nor the plugin, and imports coverage only when
the parent is measuring.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any
from typing import Final
from typing import NamedTuple

_DATA_PREFIX: Final = ":data:"  # coverage's marker for a serialized config (7.10+)


class Plan(NamedTuple):
    """What a worker must do for coverage; pickles into spawn/forkserver children."""

    #: "start": start a Coverage of our own; "sigterm": coverage's own configuration
    #: starts one, we only make sure a SIGTERM saves its data.
    action: str
    #: coverage's serialized configuration (7.10+), or None for older versions.
    config: str | None
    #: Constructor arguments when ``config`` is None.
    kwargs: dict[str, Any]
    #: The absolute base name of the parent's data file: the worker's parallel data file
    #: goes next to it (where the combine step looks), whatever either process's working
    #: directory is by then. None for "sigterm".
    data_file: str | None = None


def plan(start_method: str) -> Plan | None:
    """Called in the parent when a worker starts: None unless coverage is measuring."""
    coverage = sys.modules.get("coverage")
    if coverage is None:
        return None
    cov = coverage.Coverage.current()
    if cov is None:
        return None
    config = cov.config
    if _coverage_measures_children(start_method, config):
        if getattr(config, "sigterm", False):
            return None  # coverage does all of it
        return Plan("sigterm", None, {})
    data_file = _data_file(cov, config)
    serialize = getattr(config, "serialize", None)
    if callable(serialize):
        return Plan("start", _DATA_PREFIX + serialize(), {}, data_file)
    return Plan(
        "start",
        None,
        {
            "data_file": data_file,
            "config_file": config.config_file or False,
            "branch": config.branch,
            "source": [_abs_if_exists(s) for s in config.source] if config.source else None,
            "include": list(config.run_include) or None,
            "omit": list(config.run_omit) or None,
        },
        data_file,
    )


def _data_file(cov: Any, config: Any) -> str:
    """Where the parent's data really goes: its data object resolved the name when the
    measurement started (pytest-cov starts it in the rootdir), and a test may have changed
    the working directory since."""
    data = getattr(cov, "_data", None)
    base = getattr(data, "base_filename", None)
    if callable(base):
        name = base()
        if isinstance(name, str) and name:
            return name
    return os.path.abspath(str(config.data_file))


def _coverage_measures_children(start_method: str, config: Any) -> bool:
    if "multiprocessing" in getattr(config, "concurrency", ()):
        return True  # coverage patches multiprocessing's bootstrap for every method
    patch = set(getattr(config, "patch", ()))
    # fork children (and forkserver's) leave through os._exit: without the _exit patch
    # coverage never saves them.
    forked = {"fork", "_exit"} <= patch
    if start_method == "fork":
        return forked
    if start_method == "spawn":
        return "subprocess" in patch
    return "subprocess" in patch and forked


def _abs_if_exists(path: str) -> str:
    return os.path.abspath(path) if os.path.exists(path) else path


def start(the_plan: Plan) -> Callable[[], None]:
    """Called first thing in the worker; returns ``finish`` (stop and save, idempotent).

    Also saves on SIGTERM, then dies of SIGTERM as it would have without us.
    """
    import coverage

    if the_plan.action == "sigterm":
        # coverage's own configuration started a Coverage here and saves it at exit; only
        # a SIGTERM would lose its data.
        own = coverage.Coverage.current()
        if own is not None:
            _save_on_sigterm(_finisher(own))
        return _nothing
    inherited = coverage.Coverage.current()
    if inherited is not None:
        # A fork child inherits the parent's running tracer; its data is the parent's
        # and must not be saved from here. (A spawn child may have one that
        # COVERAGE_PROCESS_START started from a config file alone, without the options
        # the run was given, e.g. pytest-cov's --cov: the parent's configuration wins,
        # and only one of them saves.)
        inherited._auto_save = False
        inherited.stop()
    if the_plan.config is not None:
        cov = coverage.Coverage(config_file=the_plan.config, data_suffix=True)
        if the_plan.data_file is not None:
            cov.config.data_file = the_plan.data_file  # read when it starts, just below
    else:
        cov = coverage.Coverage(data_suffix=True, **the_plan.kwargs)
    # The worker may run none of the measured code: that is not worth a warning.
    cov._warn_no_data = False
    cov._warn_unimported_source = False
    cov._warn_preimported_source = False
    cov.start()
    finish = _finisher(cov)
    _save_on_sigterm(finish)
    return finish


def _save_on_sigterm(finish: Callable[[], None]) -> None:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        finish()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


def _finisher(cov: Any) -> Callable[[], None]:
    done = False

    def finish() -> None:
        nonlocal done
        if done:
            return
        done = True
        # A SIGTERM in the middle of writing would leave half a data file, which the
        # combine step cannot read: it waits until the file is whole.
        block = getattr(signal, "pthread_sigmask", None)  # absent on Windows
        old = block(signal.SIG_BLOCK, {signal.SIGTERM}) if block is not None else None
        try:
            cov.stop()
            cov.save()
        finally:
            if block is not None and old is not None and signal.SIGTERM not in old:
                block(signal.SIG_UNBLOCK, {signal.SIGTERM})

    return finish


def _nothing() -> None:
    return None
