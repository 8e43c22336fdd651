"""How the test process learns that a worker exited, and how it signals one that has not.

A fork or spawn worker is a child of the test process: multiprocessing learns its exit
status with ``os.waitpid(pid, WNOHANG)``. When someone else collected that status first
(``os.wait()`` or ``os.waitpid(-1, ...)`` in the test or the code under test, or
``SIGCHLD`` set to ``SIG_IGN``, which has the kernel discard it), that call fails with
``ECHILD``, which CPython's ``popen_fork.Popen.poll`` takes for "not created yet": it
answers None for ever. The process looks alive, ``join()`` waits out every timeout, and a
later ``waitpid`` on that pid may collect the status of an unrelated child that got the
pid.

`ExitWatch` settles that. Once the worker is verifiably gone while multiprocessing still
has no exit code (its pidfd, opened while the pid was certainly the worker's, says so;
without pidfds, its sentinel is at EOF and the pid is no longer a child of this process),
it records `UNKNOWN` as the exit code in the process's ``Popen``: ``exitcode``,
``is_alive()``, ``join()`` and ``multiprocessing.active_children()`` then all see a
process that exited, and nothing waits on that pid again. Signals go through the pidfd
where there is one, so they can never reach a process that reused the pid.

Forkserver workers are the server's children, and the server sends each status over the
sentinel: they have nothing to settle. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from typing import Any
from typing import Final
from typing import final

#: The exit code of a worker whose exit status was collected elsewhere: the one
#: multiprocessing's forkserver ``Popen`` itself reports when it cannot learn a status.
UNKNOWN: Final = 255
#: How `status` words an exit whose status was collected elsewhere.
COLLECTED_ELSEWHERE: Final = (
    "exited with an unknown status (its exit status was collected elsewhere)"
)
#: Start methods whose children are children of the test process itself.
_OWN_CHILDREN: Final = frozenset({"fork", "spawn"})

# The real os.kill, taken at import: teardown runs while a test's monkeypatch of os.kill
# is still active (multiprocessing's terminate() and kill() call os.kill by name), and a
# hung worker must be stopped all the same.
_KILL: Final = os.kill
_PIDFD_OPEN: Final = getattr(os, "pidfd_open", None)
_PIDFD_SEND: Final = getattr(signal, "pidfd_send_signal", None)
# waitid with WNOWAIT asks whether a pid is still our child without collecting anything.
_WAITID: Final = all(hasattr(os, name) for name in ("waitid", "P_PID", "WEXITED", "WNOWAIT"))


def exit_status(code: int) -> str:
    """ "exited with code 3" or "was killed by SIGKILL" for a multiprocessing exit code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


@final
class ExitWatch:
    """Watches one started worker process for an exit whose status was taken elsewhere."""

    def __init__(self, process: BaseProcess, start_method: str) -> None:
        assert process.pid is not None, "the process must be started"
        self._process = process
        self._pid: Final[int] = process.pid
        #: Whether the process is a child of this one (else nothing can steal its status).
        self._ours = start_method in _OWN_CHILDREN and sys.platform != "win32"
        self._pidfd: int | None = None
        # Set when the pid was gone before a pidfd could be opened: only someone else's
        # wait can have reaped it (multiprocessing had not looked yet).
        self._gone = False
        self._elsewhere = False
        if self._ours and _PIDFD_OPEN is not None and _PIDFD_SEND is not None:
            try:
                self._pidfd = _PIDFD_OPEN(self._pid)
            except ProcessLookupError:
                self._gone = True
            except OSError:  # an old kernel, or out of descriptors: the fallback below
                self._pidfd = None

    @property
    def collected_elsewhere(self) -> bool:
        """Whether the worker exited but someone else collected its exit status."""
        return self._elsewhere

    def exitcode(self) -> int | None:
        """The worker's exit code, None while it runs; `UNKNOWN` once it is seen gone with
        its status collected elsewhere. Never blocks."""
        code = self._process.exitcode
        if code is None and self._ours and self._gone_unseen():
            popen: Any = getattr(self._process, "_popen", None)
            if popen is not None and getattr(popen, "returncode", 0) is None:
                popen.returncode = UNKNOWN
                self._elsewhere = True
            code = self._process.exitcode
        if code is not None:
            self.close()
        return code

    def status(self, code: int) -> str:
        """How the worker ended, in words, for exit code *code*."""
        return COLLECTED_ELSEWHERE if self._elsewhere else exit_status(code)

    def waitables(self) -> list[Any]:
        """What becomes ready when the worker exits: its sentinel and, if open, its pidfd
        (which also wakes up when a grandchild holds the sentinel open)."""
        if self._process.exitcode is not None:
            return []
        waitables: list[Any] = [self._process.sentinel]
        if self._pidfd is not None:
            waitables.append(self._pidfd)
        return waitables

    def send(self, signum: int) -> None:
        """Send *signum* to the worker, if it is still there (never to a reused pid)."""
        if self.exitcode() is not None:
            return  # reaped: its pid is not the worker's any more
        with contextlib.suppress(ProcessLookupError):
            if self._pidfd is not None and _PIDFD_SEND is not None:
                _PIDFD_SEND(self._pidfd, signum)
            elif not self._gone:
                _KILL(self._pid, signum)

    def close(self) -> None:
        """Close the pidfd (the exit is known, or the worker is released)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def _gone_unseen(self) -> bool:
        """Whether the process no longer exists although multiprocessing saw no exit."""
        if self._gone:
            return True
        if self._pidfd is not None and _PIDFD_SEND is not None:
            try:
                _PIDFD_SEND(self._pidfd, 0)  # a zombie still answers: it is ours to reap
            except ProcessLookupError:
                return True
            return False
        # No pidfd: only a sentinel at EOF (the process closed its end by exiting) and a
        # pid that is no longer our child say that the worker is gone.
        if not connection.wait([self._process.sentinel], 0):
            return False
        if _WAITID:
            try:
                os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            return False
        try:
            _KILL(self._pid, 0)
        except ProcessLookupError:
            return True
        return False
