"""The one terminate -> grace -> kill -> reap routine, for every kind of process handle.

procsafe stops three kinds of things: its workers (`Worker`, waited on through their
result pipes and sentinels, with the channels pumped meanwhile), the processes a test
leaked (`Proc` records of the process table, signalled only after their identity is
verified, reaped by pid) and its managers (``multiprocessing`` processes). Each brings its
own way to signal, to tell whether it has exited and to wait (the wait reaps); the ladder
itself lives here once:

1. SIGTERM to each (in the order given: callers pass children before parents);
2. wait up to *grace* for them to exit;
3. SIGKILL to those still running;
4. wait up to `KILL_WAIT` for those to be reaped.

Interrupt-safe: when the first wait is interrupted (Ctrl-C, an outside timer's exception),
whatever is still running is killed and reaped before the exception propagates.

For process-table records (`Proc`: leaked trees, and what the guardian stops once pytest
is gone) `signal_same` is the one way to signal and `depth_order` the one order.
Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Final
from typing import TypeVar

from pytest_procsafe._proctable import LINUX
from pytest_procsafe._proctable import Proc
from pytest_procsafe._proctable import same

#: How long SIGKILLed processes may take to be reaped before we give up on them.
KILL_WAIT: Final = 5.0
SIGTERM: Final = signal.SIGTERM
#: Windows has no SIGKILL; ``os.kill`` with SIGTERM terminates there.
SIGKILL: Final = getattr(signal, "SIGKILL", signal.SIGTERM)

_T = TypeVar("_T")


def escalate(
    targets: Sequence[_T],
    grace: float,
    *,
    send: Callable[[_T, int], object],
    exited: Callable[[_T], bool],
    wait: Callable[[Sequence[_T], float], object],
    kill_wait: float = KILL_WAIT,
) -> list[_T]:
    """Stop *targets*: terminate, kill those alive after *grace*, reap; return the killed.

    *send(target, signum)* signals one target if it is still ours, *exited(target)* says
    whether it is gone, *wait(targets, timeout)* waits (and reaps) until all of them exited
    or *timeout* passed.
    """
    pending = [target for target in targets if not exited(target)]
    if not pending:
        return []
    killed: list[_T] = []
    try:
        for target in pending:
            send(target, SIGTERM)
        wait(pending, grace)
    finally:
        killed = [target for target in pending if not exited(target)]
        for target in killed:
            send(target, SIGKILL)
        if killed:
            wait(killed, kill_wait)
    return killed


def signal_same(proc: Proc, signum: int, check: Callable[[Proc], bool]) -> bool:
    """Send *signum* to *proc* if its pid still names that process (same start time) and
    *check* accepts it as it is now; return whether the signal was sent.

    On Linux a pidfd pins the process while it is checked, so its identity cannot change
    before the signal is sent (no pid-reuse race).
    """
    pidfd = -1
    if LINUX and hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            return False
    try:
        current = same(proc)
        if current is None or not check(current):
            return False
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(proc.pid, signum)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def depth_order(procs: Sequence[Proc]) -> list[Proc]:
    """*procs* with children before their parents (deepest first)."""
    parent = {proc.pid: proc.ppid for proc in procs}

    def depth(proc: Proc) -> int:
        level, pid = 0, proc.ppid
        while pid in parent and level < len(parent):
            level, pid = level + 1, parent[pid]
        return level

    return sorted(procs, key=depth, reverse=True)


def kill_at_once(process: Any) -> None:
    """Kill and reap a ``multiprocessing`` process whose start did not complete (Ctrl-C
    while it was launched), if it exists at all: no grace for what never ran."""
    if getattr(process, "_popen", None) is None:
        return
    escalate(
        [process],
        0.0,
        send=lambda proc, signum: proc.kill(),
        exited=lambda proc: proc.exitcode is not None,
        wait=lambda procs, timeout: procs[0].join(timeout),
    )
