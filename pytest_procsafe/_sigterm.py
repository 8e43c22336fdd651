"""SIGTERM to pytest: stop what the run started, then die of it as without procsafe.

`on_sigterm` installs a handler (procsafe starts no thread) that runs the session's
emergency cleanup and then lets the previous disposition act. Fork guards keep forked
children from inheriting it: to them, `Process.terminate()` means "die now".
Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from pytest_procsafe import _forkhooks

# The handler on_sigterm installed and the disposition it replaced. Forked children must
# not inherit the handler: `Process.terminate()` means "die now" to them. SIGTERM stays
# blocked across the fork until the child has its old disposition back: CPython drops
# signals its handler caught in a child before its after-fork code ran, so a
# ``p.start(); p.terminate()`` would otherwise be lost and the child live on.
_SIGTERM: list[tuple[Callable[..., None], Any]] = []
_FORK: dict[str, bool] = {"hooked": False, "blocked": False}


def _sigterm_fork_before() -> None:
    if _SIGTERM:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        _FORK["blocked"] = signal.SIGTERM not in old


def _sigterm_fork_parent() -> None:
    if _FORK["blocked"]:
        _FORK["blocked"] = False
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _sigterm_fork_child() -> None:
    ours = dict(_SIGTERM)
    current = disposition = signal.getsignal(signal.SIGTERM)
    while disposition in ours:  # unwind nested runs' handlers, none beyond them
        disposition = ours[disposition]
    if disposition is not current:
        signal.signal(signal.SIGTERM, disposition)
    _sigterm_fork_parent()


def on_sigterm(cleanup: Callable[[], None]) -> Callable[[], None]:
    """Run *cleanup* on SIGTERM, then let the previous disposition act; returns the undo.

    A handler only (procsafe starts no thread); installed from the main thread, and not
    at all when SIGTERM is ignored or was set outside Python.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous == signal.SIG_IGN:
        return lambda: None
    pid = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM acts as before
        try:
            if os.getpid() == pid:  # not in a child forked from C, which kept the handler
                cleanup()
        finally:
            if callable(previous):
                previous(signum, frame)
            else:  # SIG_DFL: die of SIGTERM, as without procsafe
                os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, handler)
    if not _FORK["hooked"]:
        _forkhooks.add(
            before=_sigterm_fork_before,
            after_in_parent=_sigterm_fork_parent,
            after_in_child=_sigterm_fork_child,
        )
        _FORK["hooked"] = True
    _SIGTERM.append((handler, previous))

    def undo() -> None:
        if (handler, previous) in _SIGTERM:
            _SIGTERM.remove((handler, previous))
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return undo
