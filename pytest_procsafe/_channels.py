"""Channels bound to one test: the ``mp_channels`` factory and what it cleans up.

`Channels` makes pipes, queues, managers and shared state (locks, events, barriers,
values, shared memory: `_shared`) from the test's context and keeps a registry of what
needs cleaning up, so teardown can follow DESIGN.md's order: `Channels.drain` while the
workers are joined (a worker blocked writing, or flushing its queue at exit, can then
finish), then `Channels.close` once they are gone: queues closed with the test's feeder
threads joined, pipes closed, managers shut down (terminated, then killed, when they do
not stop), shared memory closed and unlinked.

The objects themselves live in `_wrappers`, their waiting in `_timeouts`. Imports neither
pytest nor the plugin, and starts no thread.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.managers
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING
from typing import Any
from typing import Protocol
from typing import TypeVar
from typing import final

from pytest_procsafe import _owned
from pytest_procsafe import _seconds
from pytest_procsafe._managers import ManagerResource
from pytest_procsafe._managers import manager_process
from pytest_procsafe._shared import ProcsafeBarrier
from pytest_procsafe._shared import ProcsafeCondition
from pytest_procsafe._shared import ProcsafeEvent
from pytest_procsafe._shared import ProcsafeLock
from pytest_procsafe._shared import ProcsafeRLock
from pytest_procsafe._shared import ProcsafeSemaphore
from pytest_procsafe._shared import SharedMemoryResource
from pytest_procsafe._shared import check_typecode
from pytest_procsafe._timeouts import Watch
from pytest_procsafe._wrappers import ProcsafeConnection
from pytest_procsafe._wrappers import ProcsafeJoinableQueue
from pytest_procsafe._wrappers import ProcsafeQueue

if TYPE_CHECKING:
    pass

_Q = TypeVar("_Q", bound=ProcsafeQueue)


class Joinable(Protocol):
    """The test's workers, as the channels' teardown needs them (a `WorkerGroup`)."""

    def add_pump(self, pump: Callable[[], object]) -> None:
        """Have *pump* called while the workers are waited for."""

    def close(self, *, now: str | None = None) -> object:
        """Join the workers (stopping those that hang; all of them at once with *now*, why
        the run is cut short); reports its own problems."""


class Resource(Protocol):
    """Something `Channels` made and cleans up at teardown."""

    label: str

    def drain(self, *, force: bool) -> None:
        """Read what workers wrote and nobody read, without blocking."""

    def close(self, *, now: bool = False) -> list[str]:
        """Release it for good (workers are gone); return what went wrong, if anything.
        *now*: the run is cut short, do not wait on anything that may hang."""


@final
class _QueueResource:
    def __init__(self, queue: ProcsafeQueue, timeout: float) -> None:
        self.label = queue.label
        self._queue = queue
        self._timeout = timeout

    def drain(self, *, force: bool) -> None:
        self._queue._procsafe_drain(force=force)

    def close(self, *, now: bool = False) -> list[str]:
        return self._queue._procsafe_close(self._timeout)  # bounded: it drains itself


@final
class _PipeResource:
    def __init__(self, label: str, ends: tuple[ProcsafeConnection, ProcsafeConnection]) -> None:
        self.label = label
        self._ends = ends

    def drain(self, *, force: bool) -> None:
        left, right = self._ends
        for end, peer in ((left, right), (right, left)):
            # What arrives on an end was sent on its peer; what this process sent there is
            # meant for a worker reading that end, so unforced it is left alone.
            if force or not peer.sent_here:
                end._procsafe_drain()

    def close(self, *, now: bool = False) -> list[str]:
        for end in self._ends:
            end.close()
        return []


@final
class Channels:
    """Channels bound to one test's start method (the ``mp_channels`` fixture).

    Everything it makes is registered and cleaned up at teardown: `drain` while the
    workers are joined, then `close`.
    """

    def __init__(
        self,
        context: BaseContext,
        *,
        timeout: float,
        kill_grace: float,
        diagnose: Callable[[], str],
        workers_done: Callable[[], bool] | None = None,
    ) -> None:
        timeout = _seconds.check("timeout", timeout, allow_zero=False)
        _seconds.check("kill_grace", kill_grace)

        def senders_gone() -> bool:
            # Workers are not the only possible senders: a test may feed a channel from
            # processes it started itself (a Pool, plain processes). Managers procsafe
            # made never send on their own.
            if workers_done is None or not workers_done():
                return False
            managers = _owned.pids(_owned.MANAGER)
            return all(p.pid in managers for p in multiprocessing.active_children())

        self._context = context
        self._kill_grace = kill_grace
        self._watch = Watch(timeout, diagnose, senders_gone)
        self._resources: list[Resource] = []
        self._made: dict[str, int] = {}
        self._problems: list[str] | None = None

    @property
    def context(self) -> BaseContext:
        return self._context

    @property
    def watch(self) -> Watch:
        return self._watch

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError(
            "mp_channels cannot be sent to another process; pass the pipes and queues it "
            "made (they travel as multiprocessing's own do)"
        )

    def __repr__(self) -> str:
        state = "closed" if self._problems is not None else f"{len(self._resources)} made"
        return f"<Channels {self._context.get_start_method()} {state}>"

    def pipe(
        self, duplex: bool = True, *, name: str | None = None
    ) -> tuple[ProcsafeConnection, ProcsafeConnection]:
        """A pair of connected ends: ``(left, right)``, or ``(reader, writer)`` when not
        *duplex*."""
        if not isinstance(duplex, bool):
            raise TypeError(f"duplex must be True or False, got {duplex!r}")
        self._check_open()
        label = self._label("pipe", name)
        names = ("left", "right") if duplex else ("reader", "writer")
        inner = self._context.Pipe(duplex)
        ends = (
            ProcsafeConnection(inner[0], label=f"{label} {names[0]}", watch=self._watch),
            ProcsafeConnection(inner[1], label=f"{label} {names[1]}", watch=self._watch),
        )
        self.adopt(_PipeResource(label, ends))
        return ends

    def queue(self, maxsize: int = 0, *, name: str | None = None) -> ProcsafeQueue:
        """A Queue (unbounded unless *maxsize* > 0)."""
        return self._queue(ProcsafeQueue, maxsize, "queue", name)

    def joinable_queue(
        self, maxsize: int = 0, *, name: str | None = None
    ) -> ProcsafeJoinableQueue:
        """A JoinableQueue (unbounded unless *maxsize* > 0)."""
        return self._queue(ProcsafeJoinableQueue, maxsize, "joinable queue", name)

    def manager(self, *, name: str | None = None) -> multiprocessing.managers.SyncManager:
        """A started `SyncManager`, shut down at teardown (terminated, then killed, if it
        does not stop)."""
        self._check_open()
        label = self._label("manager", name)
        manager = multiprocessing.managers.SyncManager(ctx=self._context)
        manager.start()
        pid = manager_process(manager).pid
        assert pid is not None  # started
        _owned.add_pid(pid, _owned.MANAGER)
        self.adopt(ManagerResource(manager, label, self._watch.timeout, self._kill_grace))
        return manager

    # --- shared state (`_shared`): made from the context, bounded waits -----------------

    def lock(self, *, name: str | None = None) -> ProcsafeLock:
        """A Lock; ``acquire()`` and ``with`` default to the procsafe timeout."""
        return ProcsafeLock(**self._made_here("lock", name))

    def rlock(self, *, name: str | None = None) -> ProcsafeRLock:
        """An RLock; ``acquire()`` and ``with`` default to the procsafe timeout."""
        return ProcsafeRLock(**self._made_here("rlock", name))

    def semaphore(self, value: int = 1, *, name: str | None = None) -> ProcsafeSemaphore:
        """A Semaphore; ``acquire()`` and ``with`` default to the procsafe timeout."""
        return ProcsafeSemaphore(value, **self._made_here("semaphore", name))

    def event(self, *, name: str | None = None) -> ProcsafeEvent:
        """An Event; ``wait()`` defaults to the procsafe timeout."""
        return ProcsafeEvent(**self._made_here("event", name))

    def condition(self, lock: Any = None, *, name: str | None = None) -> ProcsafeCondition:
        """A Condition (over a bounded RLock unless *lock* is given); ``wait()`` and
        ``wait_for()`` default to the procsafe timeout."""
        return ProcsafeCondition(lock, **self._made_here("condition", name))

    def barrier(
        self, parties: int, action: Callable[[], object] | None = None, *, name: str | None = None
    ) -> ProcsafeBarrier:
        """A Barrier for *parties*; ``wait()`` defaults to the procsafe timeout and, when it
        gives up, breaks the barrier for the other parties."""
        return ProcsafeBarrier(parties, action, **self._made_here("barrier", name))

    def value(self, typecode: str | type[Any], value: Any = 0, *, name: str | None = None) -> Any:
        """A synchronized shared `multiprocessing.Value` whose lock is a bounded RLock."""
        check_typecode(typecode)
        lock = ProcsafeRLock(**self._made_here("value", name))
        return self._context.Value(typecode, value, lock=lock)

    def array(
        self, typecode: str | type[Any], size_or_initializer: Any, *, name: str | None = None
    ) -> Any:
        """A synchronized shared `multiprocessing.Array` whose lock is a bounded RLock."""
        check_typecode(typecode)
        lock = ProcsafeRLock(**self._made_here("array", name))
        return self._context.Array(typecode, size_or_initializer, lock=lock)

    def shared_memory(self, size: int, *, name: str | None = None) -> SharedMemory:
        """A new `multiprocessing.shared_memory.SharedMemory` block of *size* bytes,
        closed and unlinked at teardown."""
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"a shared memory block's size must be an int > 0, got {size!r}")
        label = self._made_here("shared memory", name)["label"]
        block = SharedMemory(create=True, size=size)
        self.adopt(SharedMemoryResource(block, label))
        return block

    def _made_here(self, kind: str, name: str | None) -> dict[str, Any]:
        self._check_open()
        return {"ctx": self._context, "label": self._label(kind, name), "watch": self._watch}

    def adopt(self, resource: Resource) -> None:
        """Register *resource* for teardown (what the factory methods make is registered)."""
        self._check_open()
        self._resources.append(resource)

    def drain(self) -> None:
        """Discard what workers wrote and the test did not read, without blocking, so a
        worker blocked writing (or flushing its queue at exit) can finish. Meant to run
        repeatedly while the workers are joined at teardown."""
        for resource in self._resources:
            # Closed or broken meanwhile: close() reports what matters.
            with contextlib.suppress(OSError, ValueError):
                resource.drain(force=False)

    def teardown(self, workers: Joinable, *, now: str | None = None) -> list[str]:
        """DESIGN's teardown order; returns the channels' problems.

        Drain first and while the workers are joined: a worker blocked writing (or
        flushing its queue as it exits) finishes only once someone reads. Only now: during
        the test, a join must not swallow what the test still means to read. Then close
        everything, whatever the join raised. *now* (why the run is cut short): the
        workers are stopped and the managers shut down without waiting.
        """
        __tracebackhide__ = True  # the error shown is the one that interrupted the join
        hurry = now is not None
        try:
            self.drain()
            workers.add_pump(self.drain)
            workers.close(now=now)  # idempotent; mp_process's own teardown reports its problems
        except BaseException:
            hurry = True  # interrupted: close what is left without waiting
            raise
        finally:
            problems = self.close(now=hurry)
        return problems

    def close(self, *, now: bool = False) -> list[str]:
        """Close everything it made, newest first; return the problems (idempotent).

        Interrupt-safe: an exception that interrupts one close (Ctrl-C, an outside timer)
        is raised once everything else is closed too, without waiting (*now*)."""
        __tracebackhide__ = True
        if self._problems is None:
            self._problems = []
            interrupted: BaseException | None = None
            for resource in reversed(self._resources):
                try:
                    self._problems.extend(resource.close(now=now or interrupted is not None))
                except Exception as exc:  # one broken channel must not keep others open
                    self._problems.append(f"{resource.label}: closing it failed: {exc!r}")
                except BaseException as exc:
                    interrupted = interrupted or exc
            # Frees the queues' semaphores now rather than whenever the garbage collector
            # breaks the cycle through the worker group's pump and diagnosis.
            self._resources.clear()
            if interrupted is not None:
                raise interrupted
        return list(self._problems)

    def _check_open(self) -> None:
        if self._problems is not None:
            raise RuntimeError(
                "mp_channels is closed: its test's teardown has run; make channels during the test"
            )

    def _queue(self, cls: type[_Q], maxsize: int, kind: str, name: str | None) -> _Q:
        self._check_open()
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise TypeError(f"maxsize must be an int (<= 0 means unbounded), got {maxsize!r}")
        queue = cls(maxsize, ctx=self._context, label=self._label(kind, name), watch=self._watch)
        self.adopt(_QueueResource(queue, self._watch.timeout))
        return queue

    def _label(self, kind: str, name: str | None) -> str:
        if name is not None:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"name must be a non-empty string, got {name!r}")
            return name
        number = self._made[kind] = self._made.get(kind, 0) + 1
        return f"{kind} #{number}"
