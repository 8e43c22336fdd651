"""One worker seen from the test process: its outcome, waits, stop; the worker exceptions.

`Worker` turns the `Outcome` the bootstrap sent into what the test sees: the return value,
the child's own exception re-raised with the remote traceback as its cause, `WorkerError`,
`WorkerCrashed` or `WorkerTimeout`. It remembers whether the test looked at the outcome
(``result()`` called, or a final ``exitcode`` read) so the group's teardown can report the
failures nobody saw. `wait_for` is the one wait loop: it reads result pipes and runs the
channels' pumps while it waits, so neither a big result nor a full queue can block a
worker's exit. Exits are read through `_exits.ExitWatch`, which also sees a worker whose
exit status someone else collected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any
from typing import Final
from typing import final

from pytest_procsafe import _dumps
from pytest_procsafe import _escalate
from pytest_procsafe import _exits
from pytest_procsafe import _seconds
from pytest_procsafe import _stacks
from pytest_procsafe._bootstrap import ERROR
from pytest_procsafe._bootstrap import EXIT
from pytest_procsafe._bootstrap import LOAD_FAILED
from pytest_procsafe._bootstrap import UNPICKLABLE
from pytest_procsafe._bootstrap import VALUE
from pytest_procsafe._bootstrap import Outcome
from pytest_procsafe._exits import exit_status

#: What waits of a worker call between checks: the group's current pump, or None.
Pumper = Callable[[], "Callable[[], None] | None"]

#: How often waits wake up to run the pumps, when there are any.
PUMP_INTERVAL: Final = 0.03
#: How often waits look for an exit the sentinel did not signal: a grandchild the worker
#: forked holds the sentinel's write end, so it stays silent after the worker exited.
EXIT_POLL: Final = 0.1

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


def wait_for(
    workers: Sequence[Worker], timeout: float, *, pump: Callable[[], None] | None = None
) -> None:
    """Wait up to *timeout* until every worker exited.

    Reads the result pipes all along and calls *pump* every `PUMP_INTERVAL`.
    """
    __tracebackhide__ = True  # an outside timer's error shows the caller, not this loop
    deadline = time.monotonic() + timeout
    while True:
        pending = [worker for worker in workers if not worker.settled()]
        remaining = deadline - time.monotonic()
        if not pending or remaining <= 0:
            return
        waitables: list[Any] = [obj for worker in pending for obj in worker.waitables()]
        if not waitables:
            continue  # they exited since _settled looked: look again, do not sleep
        connection.wait(waitables, min(remaining, PUMP_INTERVAL if pump else EXIT_POLL))
        if pump is not None:
            pump()


def send_signal(worker: Worker, signum: int) -> None:
    """Send *signum* to *worker* unless it has exited (then its pid is not ours)."""
    if worker.settled():
        return
    if sys.platform == "win32":  # no signals there: multiprocessing's own calls
        if signum == _escalate.SIGTERM:
            worker.process.terminate()
        else:
            worker.process.kill()
        return
    worker._watch.send(signum)


def stop_workers(
    workers: Sequence[Worker], grace: float, *, pump: Callable[[], None] | None = None
) -> list[Worker]:
    """Terminate *workers*, kill those alive after *grace*, reap; return the ones killed."""
    return _escalate.escalate(
        workers,
        grace,
        send=send_signal,
        exited=lambda worker: worker.settled(),
        wait=lambda pending, timeout: wait_for(pending, timeout, pump=pump),
    )


@final
@dataclasses.dataclass(frozen=True)
class Limits:
    """What a worker needs to know of its group: the method, its owner, the timeouts."""

    start_method: str
    #: The owning test's node id, for messages.
    owner: str
    timeout: float
    kill_grace: float


@final
class Worker:
    """One worker process of a test. Built by `WorkerGroup`, not by users.

    Its `exitcode` is 255 once it has exited if its exit status was collected elsewhere
    (``os.waitpid(-1, ...)``, ``SIGCHLD`` set to ``SIG_IGN``): it is never taken for hung.
    """

    def __init__(
        self,
        process: BaseProcess,
        reader: Connection,
        name: str,
        stack_file: str | None,
        *,
        limits: Limits,
        pumper: Pumper,
    ) -> None:
        assert process.pid is not None, "the process must be started"
        self._limits = limits
        self._pumper = pumper
        self._process = process
        self._watch: Final = _exits.ExitWatch(process, limits.start_method)
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
    def stopped(self) -> bool:
        """Whether procsafe or the test stopped it (a stopped worker has not crashed)."""
        return self._stopped

    def mark_stopped(self) -> None:
        """It is being stopped on purpose: its exit is not reported as a crash."""
        if self._process.exitcode is None:
            self._stopped = True

    @property
    def overdue(self) -> bool:
        """Whether a wait with the default timeout already ran out for it."""
        return self._overdue

    def mark_overdue(self) -> None:
        """A full default timeout was spent waiting for it: teardown does not wait again."""
        self._overdue = True

    @property
    def process(self) -> BaseProcess:
        """The underlying ``multiprocessing`` process."""
        return self._process

    @property
    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal), None while running.

        255 when the worker exited but its exit status was collected elsewhere (the test
        or the code under test called ``os.wait()`` or ``os.waitpid(-1, ...)``, or set
        ``SIGCHLD`` to ``SIG_IGN``): the process is gone and its real code is lost. Such a
        worker is seen to have exited within a second; messages about it say so.

        Reading a final exit code counts as looking at the outcome: teardown then no
        longer reports an exception or a crash of this worker.
        """
        self._collect()
        code = self._watch.exitcode()
        if code is not None:
            self._observed = True
        return code

    def is_alive(self) -> bool:
        """Whether the worker process is still running."""
        self._collect()
        return self._watch.exitcode() is None and self._process.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker to exit; raise `WorkerTimeout` if it is still running."""
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        limit = self._limit(timeout)
        wait_for([self], limit, pump=self._pumper())
        if self._watch.exitcode() is None:
            self._overdue = self._overdue or timeout is None
            raise WorkerTimeout(f"{self.label()} of {self._limits.owner} {self._running(limit)}")

    def result(self, timeout: float | None = None) -> Any:
        """The target's return value, once the worker has handed it back and exited.

        It returns only after the worker exited, so `exitcode` is final by then. Re-raises
        the target's own exception (an ``Exception`` subclass) with the remote traceback
        chained as its cause. Raises `WorkerError` when the value or exception cannot be
        brought back, for a ``KeyboardInterrupt`` or other ``BaseException`` in the
        worker, or when the target could not be loaded; `WorkerCrashed` when the worker
        ended without an outcome (killed by a signal, ``os._exit``, or its exit status was
        collected elsewhere so nobody can tell) or raised ``SystemExit`` with a non-zero
        code (``SystemExit(0)`` returns None); and `WorkerTimeout` when it has not exited
        within *timeout*, with or without handing back its outcome (a worker that does
        not exit is a hung worker: teardown shows its stack).
        """
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        limit = self._limit(timeout)
        wait_for([self], limit, pump=self._pumper())
        outcome = self._outcome
        label = self.label()
        code = self._watch.exitcode()
        if code is None:
            self._overdue = self._overdue or timeout is None
            did = f" {self._did()} but" if outcome is not None else ""
            raise WorkerTimeout(f"{label} of {self._limits.owner}{did} {self._running(limit)}")
        if outcome is None:
            self._observed = True
            if self._watch.collected_elsewhere:
                raise WorkerCrashed(
                    f"{label} exited before handing back a result, and its exit status was "
                    "collected elsewhere (os.wait(), os.waitpid(-1, ...) or SIGCHLD set to "
                    "SIG_IGN in the test process), so how it ended is unknown"
                )
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
        limit = self._limits.kill_grace if grace is None else _seconds.check("grace", grace)
        if self._watch.exitcode() is None:
            self._stopped = True
        stop_workers([self], limit, pump=self._pumper())

    def label(self) -> str:
        """``worker 'name' (pid N, method)``, for messages."""
        return f"worker {self.name!r} (pid {self.pid}, {self._limits.start_method})"

    def diagnosis(self) -> str:
        """One line saying what the worker is doing or how it ended (never blocks)."""
        self._collect()
        who = f"worker {self.name!r} pid {self.pid}"
        did = self._did()
        code = self._watch.exitcode()
        if code is None:
            return f"{who} {did} and is still running" if did else f"{who} is still running"
        status = self._watch.status(code) + (" (stopped)" if self._stopped else "")
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
        code = self._watch.exitcode()
        if not include_crash or self._stopped or not code:
            return None
        return f"{self._watch.status(code)} before handing back a result, {_NOT_LOOKED_AT}."

    def release(self) -> None:
        """Read a last outcome, close the result pipe and remove the stack dump file."""
        self._collect()
        self._close_reader()
        self._watch.exitcode()  # settles an exit whose status was collected elsewhere
        self._watch.close()
        _stacks.remove(self.stack_file)
        _dumps.worker_file(self.pid, None)

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

    def handed_back(self) -> str:
        """What the worker handed back ("returned 4", "raised ValueError: x"), or ""."""
        return self._did()

    def _did(self) -> str:
        outcome = self._outcome
        if outcome is None:
            return ""
        if outcome.kind in (VALUE, UNPICKLABLE, LOAD_FAILED):
            return outcome.summary
        return f"raised {outcome.summary}"

    def _limit(self, timeout: float | None) -> float:
        return self._limits.timeout if timeout is None else _seconds.check("timeout", timeout)

    def _running(self, limit: float) -> str:
        return f"is still running after {limit:g}s (teardown shows where it is stuck)"

    def settled(self) -> bool:
        """Whether it exited (also when its exit status was collected elsewhere)."""
        self._collect()
        if self._watch.exitcode() is None:
            return False
        # An outcome written just before the exit lands after the look above: look again,
        # or a worker that returned reads as one that ended without a result.
        self._collect()
        return True

    def waitables(self) -> list[Any]:
        """What `wait_for` waits on: what signals the exit, the result pipe while open."""
        waitables = self._watch.waitables()
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
        state = "running" if code is None else self._watch.status(code)
        return f"<Worker {self.name!r} pid={self.pid} {self._limits.start_method} {state}>"
