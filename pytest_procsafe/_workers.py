"""WorkerGroup: start workers, hand back their outcomes, and always reap them.

A `WorkerGroup` (the ``mp_process`` fixture) starts each worker as a ``multiprocessing``
process of the test's context whose target is `_bootstrap.main`; the bootstrap sends the
target's `Outcome` over a one-way result pipe. Whenever the test process waits for a
worker it also reads that pipe (``multiprocessing.connection.wait`` on the process
sentinel *and* the pipe), so a worker sending a large result never blocks on a full pipe
while the parent waits for it to exit.

One worker, its outcome and the wait loop live in `_worker`; this module holds the
group, its teardown and the registry of live groups. `WorkerGroup.close` is the teardown:
join within the timeout, dump the stack of each worker still running (faulthandler on
`_stacks.SIGNAL` inside the child), terminate, kill after the grace, reap, and describe every
worker that hung, or raised or crashed without the test looking.

Signals only ever go to our own unreaped children: a child's pid cannot be reused before
its parent reaps it, and multiprocessing only reaps by the child's own pid.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Final
from typing import final

from pytest_procsafe import _bootstrap
from pytest_procsafe import _coverage
from pytest_procsafe import _dumps
from pytest_procsafe import _escalate
from pytest_procsafe import _owned
from pytest_procsafe import _seconds
from pytest_procsafe import _stacks
from pytest_procsafe._payload import Payload
from pytest_procsafe._payload import PayloadError
from pytest_procsafe._payload import describe
from pytest_procsafe._worker import Limits
from pytest_procsafe._worker import Worker
from pytest_procsafe._worker import WorkerCrashed
from pytest_procsafe._worker import WorkerError
from pytest_procsafe._worker import WorkerTimeout
from pytest_procsafe._worker import send_signal
from pytest_procsafe._worker import stop_workers
from pytest_procsafe._worker import wait_for

__all__ = [
    "Worker",
    "WorkerCrashed",
    "WorkerError",
    "WorkerGroup",
    "WorkerTimeout",
    "stop_all",
]

_INTERRUPTED: Final = "raised KeyboardInterrupt,"
# Groups whose workers may still run: the session-end and SIGTERM paths stop them all.
_LIVE: set[WorkerGroup] = set()


def stop_all(grace: float, since: float | None = None) -> None:
    """Stop every live worker of every open group: terminate, kill after *grace*, reap.

    With *since* (a ``time.monotonic()`` value), only groups made from then on: a pytest
    run nested in a test (pytester's inline mode) stops its own workers, not those of the
    test running it. Workers stopped here count as stopped, not as crashed, when their
    group closes.
    """
    groups = [group for group in _LIVE if since is None or group.created >= since]
    workers = [w for group in groups for w in group.workers if w.process.exitcode is None]
    for worker in workers:
        worker.mark_stopped()
    pumps = [pump for pump in (group.pumper() for group in groups) if pump is not None]

    def pump_all() -> None:
        for pump in pumps:
            pump()

    stop_workers(workers, grace, pump=pump_all if pumps else None)
    for worker in workers:
        if worker.process.exitcode is not None:
            _owned.discard_pid(worker.pid)


_owned.on_stop(stop_all)


@final
class WorkerGroup:
    """The workers of one test: ``mp_process``. Built by the fixture, not by users."""

    def __init__(
        self,
        context: BaseContext,
        *,
        start_method: str,
        timeout: float,
        kill_grace: float,
        owner: str,
    ) -> None:
        self._limits = Limits(
            start_method=start_method,
            owner=owner,
            timeout=_seconds.check("timeout", timeout, allow_zero=False),
            kill_grace=_seconds.check("kill_grace", kill_grace, allow_zero=True),
        )
        self._context = context
        self.start_method: Final = start_method
        self.timeout: Final = self._limits.timeout
        self.kill_grace: Final = self._limits.kill_grace
        self.owner: Final = owner
        self._workers: list[Worker] = []
        self._pumps: list[Callable[[], object]] = []
        self._pump_errors: list[str] = []
        self._counters: dict[str, int] = {}
        self._problems: list[str] | None = None
        self._notes: list[str] = []
        self._interrupted = False
        self._coverage: tuple[_coverage.Plan | None] | None = None  # computed once
        #: When the group was made (``time.monotonic()``): see `stop_all`.
        self.created: Final = time.monotonic()
        _LIVE.add(self)

    def __call__(
        self, target: Callable[..., object], /, *args: object, **kwargs: object
    ) -> Worker:
        """Start ``target(*args, **kwargs)`` in a new worker."""
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        return self.start(target, args, kwargs)

    def start(
        self,
        target: Callable[..., object],
        args: Iterable[object] = (),
        kwargs: Mapping[str, object] | None = None,
        *,
        name: str | None = None,
        daemon: bool | None = None,
    ) -> Worker:
        """Start ``target(*args, **kwargs)`` in a new worker named *name*."""
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        if self._problems is not None:
            raise WorkerError(f"the workers of {self.owner} are already torn down")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping or None, got {kwargs!r}")
        payload = Payload(target, tuple(args), kwargs)
        name = self._pick_name(target, name)
        if self.start_method != "fork":
            _check_cwd(f"cannot start worker {name!r} ({self.start_method}) of {self.owner}")
        stack_file = _stacks.make_file()
        launch = _bootstrap.Launch(
            start_method=self.start_method,
            stack_file=stack_file,
            deathsig=(
                self.start_method == "forkserver"
                or threading.current_thread() is threading.main_thread()
            ),
            parent_pid=None if self.start_method == "forkserver" else os.getpid(),
            coverage=self._coverage_plan(),
        )
        reader, writer = self._context.Pipe(duplex=False)
        # The stubs only give Process to the concrete context classes.
        process_type: type[BaseProcess] = self._context.Process  # type: ignore[attr-defined]
        process = process_type(
            target=_bootstrap.main, args=(payload, writer, launch), name=name, daemon=daemon
        )
        try:
            process.start()
        except BaseException as exc:
            reader.close()
            _stacks.remove(stack_file)
            # Interrupted half way (Ctrl-C while a spawn child starts): the child may exist
            # already. It is procsafe's own, so it is stopped here, never left behind to be
            # reported as somebody's orphan.
            _escalate.kill_at_once(process)
            if isinstance(exc, PayloadError):
                error = WorkerError(
                    f"cannot start worker {name!r} ({self.start_method}) of {self.owner}: {exc}"
                )
                if exc.procsafe_note is not None:
                    from pytest_procsafe import _pickling

                    _pickling.attach(error, exc.procsafe_note)
                raise error from exc
            raise
        finally:
            writer.close()  # the child has its copy; ours would hide the child's EOF
        worker = Worker(process, reader, name, stack_file, limits=self._limits, pumper=self.pumper)
        self._workers.append(worker)
        _owned.add_pid(worker.pid, _owned.WORKER)
        _dumps.worker_file(worker.pid, stack_file)
        return worker

    def _coverage_plan(self) -> _coverage.Plan | None:
        # Once per group: whether and how the run is measured does not change within a test.
        if self._coverage is None:
            self._coverage = (_coverage.plan(self.start_method),)
        return self._coverage[0]

    @property
    def closed(self) -> bool:
        """Whether `close` ran (its problems are final)."""
        return self._problems is not None

    @property
    def workers(self) -> tuple[Worker, ...]:
        """Every worker started so far, in start order."""
        return tuple(self._workers)

    def join_all(self, timeout: float | None = None) -> None:
        """Wait for every worker to exit; raise `WorkerTimeout` naming those still running."""
        __tracebackhide__ = True  # pytest shows the caller's line, not ours
        limit = self.timeout if timeout is None else _seconds.check("timeout", timeout)
        wait_for(self._workers, limit, pump=self.pumper())
        running = [worker for worker in self._workers if worker.process.exitcode is None]
        if running:
            if timeout is None:
                for worker in running:
                    worker.mark_overdue()
            names = ", ".join(f"{worker.name!r} pid {worker.pid}" for worker in running)
            raise WorkerTimeout(
                f"{len(running)} of {len(self._workers)} workers ({self.start_method}) of "
                f"{self.owner} still running after {limit:g}s: {names}"
            )

    def all_exited(self) -> bool:
        """Whether workers were started and every one of them has exited."""
        return bool(self._workers) and all(w.settled() for w in self._workers)

    def add_pump(self, pump: Callable[[], object]) -> None:
        """Call *pump* every few ms while waiting for workers (channels drain themselves)."""
        if not callable(pump):
            raise TypeError(f"a pump must be callable, got {pump!r}")
        self._pumps.append(pump)

    def diagnose(self) -> str:
        """One line per worker saying what it is doing; empty when none was started."""
        return "\n".join(worker.diagnosis() for worker in self._workers)

    def close(self, *, now: str | None = None) -> list[str]:
        """Tear the workers down; return one problem text per worker that went wrong.

        Joins each worker within the timeout; a worker still running has its stack dumped,
        is terminated, killed after ``kill_grace`` and reaped. Problems: hung workers, and
        workers that raised or crashed while the test never called ``result()`` nor read
        ``exitcode``. Calling it again returns the same list.

        *now* says why the run is being cut short (Ctrl-C, ``pytest.exit()``, ``-x``): the
        workers still running are then stopped at once, not waited for, and are not
        problems; `notes` says what was stopped. Interrupt-safe: whatever interrupts the
        join (an outside timer's exception, Ctrl-C), the workers still running are stopped
        and reaped before it propagates, and the problems (`interrupted` is then True) say
        where each one was.
        """
        __tracebackhide__ = True  # the error shown is the one that interrupted the join
        if self._problems is not None:
            return list(self._problems)
        problems: list[str] = []
        why = now
        try:
            if now is None:
                # A worker that already used up a full default timeout in join()/result()
                # gets no second one: a hung test then takes about timeout + grace.
                waiting = [worker for worker in self._workers if not worker.overdue]
                try:
                    wait_for(waiting, self.timeout, pump=self.pumper())
                except BaseException as exc:
                    self._interrupted = True
                    why = f"its teardown was interrupted ({type(exc).__name__}: {exc})"
                    raise
        finally:
            try:
                self._settle(problems, why, at_once=now is not None)
            finally:
                for worker in self._workers:
                    worker.release()
                    if worker.process.exitcode is not None:  # else still ours to stop
                        _owned.discard_pid(worker.pid)
                _LIVE.discard(self)
                self._problems = problems
        return list(problems)

    @property
    def notes(self) -> list[str]:
        """What `close` stopped without waiting because the run was cut short."""
        return list(self._notes)

    @property
    def interrupted(self) -> bool:
        """Whether an exception interrupted `close` (its problems went with that error)."""
        return self._interrupted

    def _settle(self, problems: list[str], why: str | None, *, at_once: bool) -> None:
        """Stop the workers still running (stacks first) and describe what went wrong."""
        # Read the outcomes already sent (no join ran when the run is cut short).
        hung = [worker for worker in self._workers if not worker.settled()]
        if at_once:
            for worker in hung:
                worker.mark_stopped()
        stacks: dict[Worker, str] = {}
        try:
            stacks = self._capture_stacks(hung)
        finally:  # stopped even when a second interruption cuts the capture short
            killed = stop_workers(hung, self.kill_grace, pump=self.pumper())
        for worker in self._workers:
            if worker in hung:
                report = self._hang_report(worker, stacks.get(worker), worker in killed, why)
                (self._notes if at_once else problems).append(report)
                continue
            problem = worker.unobserved_problem()
            # A terminal's Ctrl-C reaches the whole process group: the workers' own
            # KeyboardInterrupt is that Ctrl-C, not a failure of theirs.
            if problem is not None and not (why and problem.startswith(_INTERRUPTED)):
                problems.append(f"{worker.label()} of {self.owner} {problem}")
        problems.extend(
            f"while waiting for the workers of {self.owner}, {text}" for text in self._pump_errors
        )

    def pumper(self) -> Callable[[], None] | None:
        """What waits should call between checks: None when there is nothing to pump."""
        return self._pump if self._pumps else None

    def _pump(self) -> None:
        """Run every pump once; a pump that fails is reported at close and not run again."""
        for pump in list(self._pumps):
            try:
                pump()
            except Exception as exc:
                self._pumps.remove(pump)
                self._pump_errors.append(f"the pump {pump!r} failed: {type(exc).__name__}: {exc}")

    def _pick_name(self, target: Callable[..., object], name: str | None) -> str:
        taken = {worker.name for worker in self._workers}
        if name is not None:
            if not isinstance(name, str) or not name:
                raise TypeError(f"a worker name must be a non-empty string, got {name!r}")
            if name in taken:
                raise ValueError(
                    f"a worker named {name!r} already exists in {self.owner}; "
                    "worker names must be unique within a test (or leave name out)"
                )
            return name
        base = describe(target).rpartition(".")[2]  # "test_x.<locals>.work": "work"
        while True:
            self._counters[base] = self._counters.get(base, 0) + 1
            candidate = f"{base}-{self._counters[base]}"
            if candidate not in taken:
                return candidate

    def _capture_stacks(self, hung: Sequence[Worker]) -> dict[Worker, str]:
        """Ask each hung worker for its stack; return the dumps that arrived in time."""
        asked = {
            worker.pid: worker
            for worker in hung
            if worker.stack_file is not None and worker.process.exitcode is None
        }
        dumps = _stacks.capture(
            {pid: worker.stack_file for pid, worker in asked.items() if worker.stack_file},
            send=lambda pid, signum: send_signal(asked[pid], signum),
            pump=self._pump,
        )
        below = _bootstrap.__file__
        return {asked[pid]: _stacks.trim_worker(text, below) for pid, text in dumps.items()}

    def _hang_report(
        self, worker: Worker, stack: str | None, killed: bool, why: str | None = None
    ) -> str:
        how = f"killed after the {self.kill_grace:g}s grace" if killed else "terminated"
        if why is None:
            first = f"after the {self.timeout:g}s timeout, so it was stopped ({how})."
        else:
            first = f"when {why}, so it was stopped without waiting ({how})."
        lines = [f"{worker.label()} of {self.owner} was still running {first}"]
        if worker.process.exitcode is None:
            lines.append("It did not exit even after SIGKILL.")
        if stack is not None:
            lines.append(f"Its Python stack (all threads) when it was stopped:\n{stack.rstrip()}")
        elif _stacks.SIGNAL is None:
            lines.append("(No stack: this platform has no signal for faulthandler's dumps.)")
        else:
            lines.append(
                "(No stack: the worker dumped none. It had not reached the procsafe bootstrap "
                f"yet, or its code replaced the {_stacks.SIGNAL_NAME} handler.)"
            )
        earlier = worker.unobserved_problem(include_crash=False)
        if earlier is not None:
            lines.append(f"Before that it {earlier}")
        elif worker.handed_back():
            lines.append(f"It had handed back its outcome ({worker.handed_back()}), then hung.")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = " closed" if self._problems is not None else ""
        return (
            f"<WorkerGroup of {self.owner!r} {self.start_method} "
            f"workers={len(self._workers)}{state}>"
        )


def _check_cwd(what: str) -> None:
    # spawn and forkserver children start in the parent's current directory, and
    # multiprocessing fails with a bare FileNotFoundError when it was removed.
    try:
        os.getcwd()
    except FileNotFoundError as exc:
        raise WorkerError(
            f"{what}: the current directory of the test process no longer exists (it was "
            "removed while the process was in it); spawn and forkserver children start in "
            "their parent's current directory, so chdir into one that exists first"
        ) from exc
