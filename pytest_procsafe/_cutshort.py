"""When the run is cut short: why, and how procsafe's teardowns take it.

Ctrl-C, ``pytest.exit()`` (quitting ``--pdb`` raises it too) and ``-x``/``--maxfail`` stop
the run; procsafe's teardowns then stop what is still running at once instead of joining
it for the timeout (DESIGN.md, "When a run is cut short"). pytest says so in two ways, both
before the teardowns that matter run:

* ``pytest_keyboard_interrupt`` for ``KeyboardInterrupt`` and ``pytest.exit()``: called as
  the exception reaches the session, before the session's end tears the fixtures down;
* ``session.shouldfail`` / ``session.shouldstop`` (``-x``, ``--maxfail``, other plugins),
  set when the failing test's report is logged, before its teardown.

An exception that interrupts a teardown (pytest-timeout's ``Failed: Timeout``, a
``KeyboardInterrupt``) propagates after the teardown stopped everything: `absorb` shows
what it found as the teardown's ``procsafe`` section, and swallows a *second* Ctrl-C,
which only asked to stop without waiting (done by then): the run ends as the first asked,
without a procsafe traceback.
"""

from __future__ import annotations

import sys
from typing import Final
from typing import final

import pytest

_REASON: Final = pytest.StashKey[str]()


@final
class Hooks:
    """Remembers the interrupt that is ending the session (registered in every mode)."""

    def __init__(self, config: pytest.Config) -> None:
        self._config = config

    @pytest.hookimpl(tryfirst=True)
    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        self._config.stash[_REASON] = describe(excinfo.value)


def describe(exc: BaseException) -> str:
    """The end of "was still running when ...": what cut the run short."""
    if isinstance(exc, KeyboardInterrupt):
        return "the run was interrupted (KeyboardInterrupt)"
    if isinstance(exc, pytest.exit.Exception):
        return f"the run was stopped (pytest.exit: {exc.msg})"
    return f"the run was stopped ({type(exc).__name__}: {exc})"


def interrupted(config: pytest.Config) -> bool:
    """Whether a Ctrl-C or ``pytest.exit()`` is ending the session."""
    return _REASON in config.stash


def reason(session: pytest.Session) -> str | None:
    """Why the run is being cut short, or None while it is not."""
    found = session.config.stash.get(_REASON, None)
    if found is not None:
        return found
    for value in (session.shouldfail, session.shouldstop):
        if isinstance(value, str) and value:
            return f"the run was stopping ({value})"
        if value:
            return "the run was stopping"
    return None


def absorb(
    request: pytest.FixtureRequest, exc: BaseException, why: str | None, problems: list[str]
) -> bool:
    """A teardown's close was interrupted by *exc* (it stopped everything first): show its
    *problems* with the teardown's error; True to swallow *exc* (a second Ctrl-C)."""
    section(request, problems)
    if not isinstance(exc, KeyboardInterrupt) or why is None:
        return False
    say(
        request.config,
        request.node.nodeid,
        ["a second Ctrl-C: what was still running was killed without waiting out the grace"],
    )
    return True


def section(request: pytest.FixtureRequest, texts: list[str]) -> None:
    """Show *texts* in the test's teardown report (with the error that interrupted it)."""
    if texts:
        request.node.add_report_section("teardown", "procsafe", "\n\n".join(texts))


def say(config: pytest.Config, nodeid: str, texts: list[str]) -> None:
    """Tell the user what was stopped without waiting (not an error: the run is ending)."""
    if not texts:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for text in texts:
        line = f"procsafe: {nodeid}: {text}" if nodeid else f"procsafe: {text}"
        if reporter is not None:
            reporter.write_line(line, yellow=True)
        else:  # pytest without its terminal (-p no:terminal)
            sys.stderr.write(line + "\n")
