"""Managers made by `Channels`: shut down at teardown without ever blocking on them.

A manager that does not answer (stopped, deadlocked, its server thread stuck) would block
``shutdown()`` forever, so teardown sends the same shutdown request itself with a deadline,
then terminates, kills and reaps through `_escalate`. Imports neither pytest nor the
plugin.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.managers
import time
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING
from typing import Any
from typing import cast
from typing import final

from pytest_procsafe import _escalate
from pytest_procsafe import _owned
from pytest_procsafe import _seconds

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


@final
class ManagerResource:
    def __init__(
        self,
        manager: multiprocessing.managers.SyncManager,
        label: str,
        timeout: float,
        grace: float,
    ) -> None:
        self.label = label
        self._manager = manager
        self._authkey = bytes(multiprocessing.current_process().authkey)
        self._timeout = timeout
        self._grace = grace

    def drain(self, *, force: bool) -> None:
        pass

    def close(self, *, now: bool = False) -> list[str]:
        process = manager_process(self._manager)
        problems: list[str] = []
        if process.is_alive():
            problem = self._stop(process, now=now)
            if problem:
                problems.append(problem)
        if process.is_alive():
            return problems  # shutdown() would talk to it without a timeout
        if process.pid is not None:
            _owned.discard_pid(process.pid)
        self._manager.shutdown()  # bookkeeping only: it sends nothing to a dead process
        return problems

    def _stop(self, process: BaseProcess, *, now: bool = False) -> str | None:
        """Ask the manager to shut down, then terminate, then kill (each bounded); with
        *now* (the run is cut short), terminate at once. Interrupt-safe: whatever
        interrupts the request or the wait, the manager is stopped before it propagates."""
        refused: str | None = None
        stubborn = False  # still running after a shutdown request: that is a problem
        try:
            if not now:
                deadline = time.monotonic() + self._timeout
                refused = _ask_to_shut_down(self._manager.address, self._authkey, deadline)
                process.join(0.0 if refused else max(0.0, deadline - time.monotonic()))
                stubborn = process.is_alive()
        finally:
            killed = _escalate.escalate(  # nothing to do when it exited already
                [process],
                self._grace,
                send=_signal_manager,
                exited=lambda proc: not proc.is_alive(),
                wait=lambda procs, timeout: procs[0].join(timeout),
            )
        if not stubborn:
            return None
        how = "killed" if killed else "terminated"
        reason = f" ({refused})" if refused else ""
        outcome = how if not process.is_alive() else f"{how}, but it is still running"
        return (
            f"{self.label} (manager pid {process.pid}) did not shut down within "
            f"{_seconds.fmt(self._timeout)}{reason}; {outcome}"
        )


def _signal_manager(process: BaseProcess, signum: int) -> None:
    # multiprocessing's own calls: they know the platform, and a reaped one is left alone.
    if signum == _escalate.SIGTERM:
        process.terminate()
    else:
        process.kill()


def manager_process(manager: multiprocessing.managers.BaseManager) -> BaseProcess:
    return manager._process  # type: ignore[attr-defined,no-any-return]  # not in the stubs


@final
class _Bounded:
    """Just enough of a connection for multiprocessing's handshake, with a deadline."""

    def __init__(self, conn: Connection[Any, Any], deadline: float) -> None:
        self._conn = conn
        self._deadline = deadline

    def send_bytes(self, data: bytes) -> None:
        self._conn.send_bytes(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        if not self._conn.poll(max(0.0, self._deadline - time.monotonic())):
            raise TimeoutError("the manager did not answer")
        return self._conn.recv_bytes(maxlength)


def _ask_to_shut_down(address: Any, authkey: bytes, deadline: float) -> str | None:
    """Send a manager the shutdown request its own ``shutdown()`` sends, but without
    blocking past *deadline* on a manager that does not answer (stopped, deadlocked).
    Returns why the request could not be delivered, or None."""
    try:
        conn = multiprocessing.connection.Client(address)  # no authkey: no handshake yet
    except OSError as exc:
        return f"cannot connect to it: {exc}"
    try:
        bounded = cast("Connection[Any, Any]", _Bounded(conn, deadline))
        multiprocessing.connection.answer_challenge(bounded, authkey)
        multiprocessing.connection.deliver_challenge(bounded, authkey)
        conn.send((None, "shutdown", (), {}))
        bounded.recv_bytes()  # its answer: hanging up before it makes the manager complain
    except (OSError, EOFError, multiprocessing.AuthenticationError) as exc:
        return f"the shutdown request failed: {exc}"
    finally:
        conn.close()
    return None
