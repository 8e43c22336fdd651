"""One worker seen from the test process: its outcome, waits, stop; the worker exceptions.

`Worker` turns the `Outcome` the bootstrap sent into what the test sees: the return value,
the child's own exception re-raised with the remote traceback as its cause, `WorkerError`,
`WorkerCrashed` or `WorkerTimeout`. It remembers whether the test looked at the outcome
(``result()`` called, or a final ``exitcode`` read) so the group's teardown can report the
failures nobody saw. `wait_for` is the one wait loop: it reads result pipes and runs the
channels' pumps while it waits, so neither a big result nor a full queue can block a
worker's exit.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import final

from pytest_procsafe._bootstrap import ERROR
from pytest_procsafe._bootstrap import EXIT
from pytest_procsafe._bootstrap import LOAD_FAILED
from pytest_procsafe._bootstrap import UNPICKLABLE
from pytest_procsafe._bootstrap import VALUE
from pytest_procsafe._bootstrap import Outcome

if TYPE_CHECKING:
    from pytest_procsafe._workers import WorkerGroup

#: How often waits wake up to run the pumps, when there are any.
PUMP_INTERVAL: Final = 0.03
#: How often waits look for an exit the sentinel did not signal: a grandchild the worker
#: forked holds the sentinel's write end, so it stays silent after the worker exited.
EXIT_POLL: Final = 0.1
#: How long a SIGKILLed worker may take to be reaped before we give up on it.
KILL_WAIT: Final = 5.0

_NOT_LOOKED_AT: Final = "and the test never called result() nor read exitcode"


class WorkerError(Exception):
    """A worker could not run its target or hand back its outcome."""

    __module__ = "pytest_procsafe"


@final
class WorkerCrashed(WorkerError):
    """A worker ended without handing back a result: killed by a signal or a bare exit."""

    __module__ = "pytest_procsafe"


@final
class WorkerTimeout(WorkerError, TimeoutError):
    """A worker was still running when a wait for it timed out."""

    __module__ = "pytest_procsafe"


@final
class RemoteTraceback(Exception):
    """The formatted traceback from inside a worker; the cause of the re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


def check_timeout(what: str, value: object, *, allow_zero: bool = True) -> float:
    """*value* as seconds, or a ValueError naming *what* and the allowed values."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        allowed = "a number of seconds >= 0" if allow_zero else "a number of seconds > 0"
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return float(value)


def exit_status(code: int) -> str:
    """ "exited with code 3" or "was killed by SIGKILL" for a multiprocessing exit code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


def wait_for(
    workers: Sequence[Worker],
    timeout: float,
    *,
    pump: Callable[[], None] | None = None,
    for_outcome: bool = False,
) -> None:
    """Wait up to *timeout* until every worker exited (or, *for_outcome*, reported).

    Reads the result pipes all along and calls *pump* every `PUMP_INTERVAL`.
    """
    deadline = time.monotonic() + timeout
    while True:
        pending = [worker for worker in workers if not worker._settled(for_outcome)]
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            return
        waitables: list[Any] = [obj for worker in pending for obj in worker._waitables()]
        if not waitables:
            continue  # they exited since _settled looked: look again, do not sleep
        connection.wait(waitables, min(remaining, PUMP_INTERVAL if pump else EXIT_POLL))
        if pump is not None:
            pump()


# The real os.kill, taken at import: teardown runs while a test's monkeypatch of os.kill
# is still active (multiprocessing's terminate() and kill() call os.kill by name), and a
# hung worker must be stopped all the same.
_KILL: Final = os.kill


def send_signal(worker: Worker, signum: int) -> None:
    """Send *signum* to *worker* unless it has been reaped (then its pid is not ours)."""
    if worker.process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            _KILL(worker.pid, signum)


def escalate(
    workers: Sequence[Worker], grace: float, *, pump: Callable[[], None] | None = None
) -> list[Worker]:
    """Terminate *workers*, kill those alive after *grace*, reap; return the ones killed."""
    for worker in workers:
        if sys.platform == "win32":
            worker.process.terminate()
        else:
            send_signal(worker, signal.SIGTERM)
    wait_for(workers, grace, pump=pump)
    killed = [worker for worker in workers if worker.process.exitcode is None]
    for worker in killed:
        if sys.platform == "win32":
            worker.process.kill()
        else:
            send_signal(worker, signal.SIGKILL)
    wait_for(killed, KILL_WAIT, pump=pump)
    return killed


@final
class Worker:
    """One worker process of a test. Built by `WorkerGroup`, not by users."""

    def __init__(
        self,
        group: WorkerGroup,
        process: BaseProcess,
        reader: Connection,
        name: str,
        stack_file: str | None,
    ) -> None:
        assert process.pid is not None, "the process must be started"
        self._group = group
        self._process = process
        self._reader: Connection | None = reader
        self._outcome: Outcome | None = None
        self._observed = False
        self._stopped = False
        # Set when a wait with the default timeout ran out: teardown does not wait again.
        self._overdue = False
        self.name: Final = name
        self.pid: Final[int] = process.pid
        self.stack_file: Final = stack_file

    @property
    def process(self) -> BaseProcess:
        """The underlying ``multiprocessing`` process."""
        return self._process

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while running.

        Reading a final exit code counts as looking at the outcome: teardown then no
        longer reports an exception or a crash of this worker.
        """
        self._collect()
        code = self._process.exitcode
        if code is not None:
            self._observed = True
        return code

    def is_alive(self) -> bool:
        """Whether the worker process is still running."""
        self._collect()
        return self._process.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to exit; raise `WorkerTimeout` if it is still running."""
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        limit = self._limit(timeout)
        wait_for([self], limit, pump=self._group._pumper())
        if self._process.exitcode is None:
            self._overdue = self._overdue or timeout is None
            raise WorkerTimeout(f"{self.label()} of {self._group.owner} {self._running(limit)}")

    def result(self, timeout: float | None = None) -> Any:
        """The target's return value, once the worker hands it back.

        Re-raises the target's own exception (an ``Exception`` subclass) with the remote
        traceback chained as its cause. Raises `WorkerError` when the value or exception
        cannot be brought back, for a ``KeyboardInterrupt`` or other ``BaseException`` in
        the worker, or when the target could not be loaded; `WorkerCrashed` when the worker
        ended without an outcome (killed by a signal, ``os._exit``) or raised
        ``SystemExit`` with a non-zero code (``SystemExit(0)`` returns None); and
        `WorkerTimeout` when it has not finished within *timeout*.
        """
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        limit = self._limit(timeout)
        wait_for([self], limit, pump=self._group._pumper(), for_outcome=True)
        outcome = self._outcome
        label = self.label()
        if outcome is None:
            code = self._process.exitcode
            if code is None:
                self._overdue = self._overdue or timeout is None
                raise WorkerTimeout(f"{label} of {self._group.owner} {self._running(limit)}")
            self._observed = True
            hint = " (did the target call os._exit()?)" if code == 0 else ""
            by = " after the test stopped it" if self._stopped else ""
            raise WorkerCrashed(
                f"{label} {exit_status(code)}{by} before handing back a result{hint}"
            )
        self._observed = True
        return self._interpret(outcome, label)

    def stop(self, grace: float | None = None) -> None:
        """Terminate the worker, kill it after *grace* (default: the kill grace), reap it.

        A worker stopped this way is not reported as crashed at teardown.
        """
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        limit = self._group.kill_grace if grace is None else check_timeout("grace", grace)
        if self._process.exitcode is None:
            self._stopped = True
        escalate([self], limit, pump=self._group._pumper())

    def label(self) -> str:
        """``worker 'name' (pid N, method)``, for messages."""
        return f"worker {self.name!r} (pid {self.pid}, {self._group.start_method})"

    def diagnosis(self) -> str:
        """One line saying what the worker is doing or how it ended (never blocks)."""
        self._collect()
        who = f"worker {self.name!r} pid {self.pid}"
        did = self._did()
        code = self._process.exitcode
        if code is None:
            return f"{who} {did} and is still running" if did else f"{who} is still running"
        status = exit_status(code) + (" (stopped)" if self._stopped else "")
        if did:
            return f"{who} {did} and {status}"
        return f"{who} {status} before handing back a result"

    def unobserved_problem(self, *, include_crash: bool = True) -> str | None:
        """What went wrong in this worker that the test never looked at, if anything."""
        if self._observed:
            return None
        outcome = self._outcome
        if outcome is not None:
            text = outcome.text.rstrip()
            if outcome.kind == ERROR:
                return f"raised {outcome.summary}, {_NOT_LOOKED_AT}. Remote traceback:\n{text}"
            if outcome.kind == LOAD_FAILED:
                return f"failed: {outcome.summary}, {_NOT_LOOKED_AT}. Remote traceback:\n{text}"
            if outcome.kind == EXIT and outcome.code != 0 and include_crash:
                return f"exited with code {outcome.code} ({outcome.summary}), {_NOT_LOOKED_AT}."
            return None
        code = self._process.exitcode
        if not include_crash or self._stopped or not code:
            return None
        return f"{exit_status(code)} before handing back a result, {_NOT_LOOKED_AT}."

    def release(self) -> None:
        """Read a last outcome, close the result pipe and remove the stack dump file."""
        self._collect()
        self._close_reader()
        if self.stack_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.stack_file)

    def _interpret(self, outcome: Outcome, label: str) -> Any:
        __tracebackhide__ = True
        if outcome.kind == VALUE:
            assert outcome.blob is not None
            try:
                return pickle.loads(outcome.blob)
            except Exception as exc:
                raise WorkerError(
                    f"{label} returned a value the test process cannot unpickle: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        if outcome.kind == UNPICKLABLE:
            raise WorkerError(f"{label}: {outcome.text}")
        if outcome.kind == EXIT:
            if outcome.code == 0:
                return None
            raise WorkerCrashed(f"{label} exited with code {outcome.code}: {outcome.summary}")
        remote = RemoteTraceback(outcome.text)
        if outcome.kind == LOAD_FAILED:
            raise WorkerError(f"{label}: {outcome.summary}") from remote
        raised: object = None
        if outcome.blob is not None:
            with contextlib.suppress(Exception):
                raised = pickle.loads(outcome.blob)
        if isinstance(raised, Exception):
            raise raised from remote
        if raised is None:
            why = "the exception could not be brought back to the test process"
        else:
            why = "not re-raised here, where it would stop the whole test run"
        raise WorkerError(f"{label} raised {outcome.summary} ({why})") from remote

    def _did(self) -> str:
        outcome = self._outcome
        if outcome is None:
            return ""
        if outcome.kind in (VALUE, UNPICKLABLE, LOAD_FAILED):
            return outcome.summary
        return f"raised {outcome.summary}"

    def _limit(self, timeout: float | None) -> float:
        return self._group.timeout if timeout is None else check_timeout("timeout", timeout)

    def _running(self, limit: float) -> str:
        return f"is still running after {limit:g}s (teardown shows where it is stuck)"

    def _settled(self, for_outcome: bool) -> bool:
        self._collect()
        if for_outcome and self._outcome is not None:
            return True
        return self._process.exitcode is not None

    def _waitables(self) -> list[Any]:
        waitables: list[Any] = []
        if self._process.exitcode is None:
            waitables.append(self._process.sentinel)
        if self._reader is not None:
            waitables.append(self._reader)
        return waitables

    def _collect(self) -> None:
        """Read the outcome if it is waiting in the pipe; never blocks on an empty pipe."""
        reader = self._reader
        if reader is None:
            return
        try:
            if not reader.poll(0):
                return
            data = reader.recv_bytes()
        except (EOFError, OSError):
            self._close_reader()  # the worker ended without an outcome
            return
        self._outcome = pickle.loads(data)
        self._close_reader()  # a worker sends exactly one outcome

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __repr__(self) -> str:
        code = self._process.exitcode
        state = "running" if code is None else exit_status(code)
        return f"<Worker {self.name!r} pid={self.pid} {self._group.start_method} {state}>"
