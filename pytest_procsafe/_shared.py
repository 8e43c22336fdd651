"""Shared state that cannot deadlock a test: locks, semaphores, events, conditions, barriers.

Each class subclasses multiprocessing's own (`multiprocessing.synchronize`), so it is made
from the test's context, pickles to children exactly as the standard object does (a
SemLock still travels only as a Process argument or inside the target, as multiprocessing
insists under spawn and forkserver) and keeps every standard behaviour but one: a blocking
call without a timeout (``acquire()``, ``with lock:``, ``wait()``, ``wait_for()``,
``Barrier.wait()``) waits through a `Watch` and raises `ChannelTimeout` after the procsafe
timeout, saying what the test's workers are doing, or as soon as every worker has exited
and nobody is left to release, notify, set or reach it. An explicit timeout keeps its
standard meaning (``acquire`` returns False, ``Event.wait`` returns False, a barrier
breaks), and ``timeout=None`` waits forever, as documented by multiprocessing.

In children the objects stay bounded by the same timeout, like procsafe's queues there,
but without the diagnosis, which only the test process can make: a worker waiting on a
lock a dead sibling holds fails with `ChannelTimeout` instead of hanging until teardown
stops it.

Shared memory blocks need no wrapper (they travel by name); `SharedMemoryResource` closes
and unlinks them at teardown; `_owned` knows the blocks still open, so the leak
checks never report them.

Imported inside workers (when an object is unpickled there): no pytest, no plugin.
"""

from __future__ import annotations

import contextlib
import multiprocessing.synchronize
import threading
from collections.abc import Callable
from multiprocessing import sharedctypes
from multiprocessing.context import BaseContext
from multiprocessing.shared_memory import SharedMemory
from typing import Any
from typing import Literal
from typing import TypeVar
from typing import cast
from typing import final

from pytest_procsafe import _owned
from pytest_procsafe import _seconds
from pytest_procsafe._timeouts import DEFAULT
from pytest_procsafe._timeouts import MISS
from pytest_procsafe._timeouts import ChannelTimeout
from pytest_procsafe._timeouts import Timeout
from pytest_procsafe._timeouts import Token
from pytest_procsafe._timeouts import Watch

_R = TypeVar("_R")


def check_typecode(typecode: object) -> None:
    """Refuse an unknown ``Value``/``Array`` typecode with the allowed ones."""
    codes: dict[str, object] = getattr(sharedctypes, "typecode_to_type", {})
    if isinstance(typecode, str) and codes and typecode not in codes:
        allowed = " ".join(sorted(codes))
        raise ValueError(f"unknown typecode {typecode!r}; allowed: {allowed} or a ctypes type")


def _limit(timeout: float | None) -> float | None:
    return None if timeout is None else _seconds.check("timeout", timeout)


class _Watched:
    """What every object here carries: a label for messages and the test's `Watch`."""

    _procsafe_label: str
    _procsafe_watch: Watch

    def _procsafe_init(self, label: str, watch: Watch) -> None:
        self._procsafe_label = label
        self._procsafe_watch = watch

    @property
    def label(self) -> str:
        return self._procsafe_label

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._procsafe_label!r}>"

    # The standard object's own state (SemLock's asserts spawning), plus ours. super() is
    # the multiprocessing class each subclass also derives from.
    def __getstate__(self) -> Any:
        inner = super().__getstate__()  # type: ignore[misc]
        return inner, self._procsafe_label, self._procsafe_watch.timeout

    def __setstate__(self, state: Any) -> None:
        inner, label, timeout = state
        super().__setstate__(inner)  # type: ignore[misc]
        self._procsafe_init(label, Watch(timeout))

    def _procsafe_wait(
        self, call: str, attempt: Callable[[float], _R | Literal[Token.MISS]], why: str
    ) -> _R:
        __tracebackhide__ = True
        return self._procsafe_watch.wait(
            f"{call} on {self._procsafe_label}",
            attempt,
            DEFAULT,
            stuck=_no_other_thread,
            stuck_reason=why,
        )


def _no_other_thread() -> bool:
    # Once every worker has exited only a thread of the test process could still release,
    # notify or set: with none, nothing ever will.
    return threading.active_count() == 1


# --- SemLock-based: Lock, RLock, Semaphore ------------------------------------------------


class _BoundedSemLock(_Watched):
    """``acquire()`` and ``with`` bounded; the rest is multiprocessing's SemLock."""

    _semlock: Any
    #: Why a wait can never end once every worker is gone (nobody here holds it).
    _procsafe_stuck = "it is still held (by a process that is gone)"

    def _make_methods(self) -> None:
        # SemLock binds acquire/release on the instance, which would hide ours.
        self.release = self._semlock.release

    def acquire(self, block: bool = True, timeout: Timeout = DEFAULT) -> bool:
        __tracebackhide__ = True
        semlock = self._semlock
        if not block:
            return bool(semlock.acquire(False))
        if timeout is not DEFAULT:
            return bool(semlock.acquire(True, _limit(timeout)))

        def attempt(step: float) -> bool | Literal[Token.MISS]:
            return True if semlock.acquire(True, step) else MISS

        # Held by nobody in this process: only a worker could release it, and none is left.
        return self._procsafe_watch.wait(
            f"acquire() on {self._procsafe_label}",
            attempt,
            DEFAULT,
            stuck=lambda: semlock._count() == 0,
            stuck_reason=self._procsafe_stuck,
        )

    def __enter__(self) -> bool:
        __tracebackhide__ = True
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self._semlock.release()


@final
class ProcsafeLock(_BoundedSemLock, multiprocessing.synchronize.Lock):
    """A `multiprocessing.Lock` whose blocking ``acquire()`` and ``with`` are bounded."""

    def __init__(self, *, ctx: BaseContext, label: str, watch: Watch) -> None:
        self._procsafe_init(label, watch)
        super().__init__(ctx=ctx)


@final
class ProcsafeRLock(_BoundedSemLock, multiprocessing.synchronize.RLock):
    """A `multiprocessing.RLock` whose blocking ``acquire()`` and ``with`` are bounded."""

    def __init__(self, *, ctx: BaseContext, label: str, watch: Watch) -> None:
        self._procsafe_init(label, watch)
        super().__init__(ctx=ctx)


@final
class ProcsafeSemaphore(_BoundedSemLock, multiprocessing.synchronize.Semaphore):
    """A `multiprocessing.Semaphore` whose blocking ``acquire()`` and ``with`` are bounded."""

    _procsafe_stuck = "nobody is left to release it"

    def __init__(self, value: int, *, ctx: BaseContext, label: str, watch: Watch) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"a semaphore's value must be an int >= 0, got {value!r}")
        self._procsafe_init(label, watch)
        super().__init__(value, ctx=ctx)


# --- Condition, Event, Barrier ------------------------------------------------------------


@final
class ProcsafeCondition(_Watched, multiprocessing.synchronize.Condition):
    """A `multiprocessing.Condition` (over a bounded RLock unless given a lock) whose
    ``wait()`` and ``wait_for()`` without a timeout are bounded."""

    def __init__(self, lock: Any = None, *, ctx: BaseContext, label: str, watch: Watch) -> None:
        self._procsafe_init(label, watch)
        if lock is None:
            lock = ProcsafeRLock(ctx=ctx, label=f"{label}'s lock", watch=watch)
        super().__init__(lock, ctx=ctx)

    #: How a wait_for() reads in messages (a barrier's own wait() waits through it).
    _procsafe_wait_for = "wait_for()"

    def wait(self, timeout: Timeout = DEFAULT) -> bool:
        __tracebackhide__ = True
        if timeout is not DEFAULT:
            return bool(super().wait(_limit(timeout)))
        wait = super().wait

        def attempt(step: float) -> bool | Literal[Token.MISS]:
            return True if wait(step) else MISS

        return self._procsafe_wait("wait()", attempt, "nobody is left to notify it")

    def wait_for(self, predicate: Callable[[], _R], timeout: Timeout = DEFAULT) -> _R:
        __tracebackhide__ = True
        if timeout is not DEFAULT:
            found = super().wait_for(predicate, _limit(timeout))  # type: ignore[arg-type]
            return cast("_R", found)
        result = predicate()
        if result:
            return result
        wait = super().wait

        def attempt(step: float) -> _R | Literal[Token.MISS]:
            wait(step)
            found = predicate()
            return found if found else MISS

        return self._procsafe_wait(self._procsafe_wait_for, attempt, "nobody is left to notify it")


@final
class ProcsafeEvent(_Watched, multiprocessing.synchronize.Event):
    """A `multiprocessing.Event` whose ``wait()`` without a timeout is bounded."""

    def __init__(self, *, ctx: BaseContext, label: str, watch: Watch) -> None:
        self._procsafe_init(label, watch)
        # Not super().__init__: its internal lock must be bounded too (``set()`` holds it).
        lock = ProcsafeLock(ctx=ctx, label=f"{label}'s lock", watch=watch)
        self._cond = ProcsafeCondition(lock, ctx=ctx, label=label, watch=watch)
        self._flag = ctx.Semaphore(0)

    def wait(self, timeout: Timeout = DEFAULT) -> bool:
        __tracebackhide__ = True
        if timeout is not DEFAULT:
            return super().wait(_limit(timeout))
        wait = super().wait

        def attempt(step: float) -> bool | Literal[Token.MISS]:
            return True if wait(step) else MISS

        return self._procsafe_wait("wait()", attempt, "nobody is left to set it")

    def __getstate__(self) -> Any:
        return self._cond, self._flag, self._procsafe_label, self._procsafe_watch.timeout

    def __setstate__(self, state: Any) -> None:
        self._cond, self._flag, label, timeout = state
        self._procsafe_init(label, Watch(timeout))

    def __repr__(self) -> str:
        return f"<ProcsafeEvent {self._procsafe_label!r} {'set' if self.is_set() else 'unset'}>"


@final
class ProcsafeBarrier(_Watched, multiprocessing.synchronize.Barrier):
    """A `multiprocessing.Barrier` whose ``wait()`` without a timeout is bounded; when it
    gives up it breaks the barrier, so the other parties get `threading.BrokenBarrierError`
    at once, as after a standard timeout."""

    def __init__(
        self,
        parties: int,
        action: Callable[[], object] | None = None,
        *,
        ctx: BaseContext,
        label: str,
        watch: Watch,
    ) -> None:
        if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
            raise ValueError(f"a barrier's parties must be an int >= 1, got {parties!r}")
        if action is not None and not callable(action):
            raise TypeError(f"a barrier's action must be callable or None, got {action!r}")
        self._procsafe_init(label, watch)
        # multiprocessing's __init__, but with a bounded condition.
        from multiprocessing.heap import BufferWrapper

        wrapper = BufferWrapper(8)  # two C ints: state and count
        cond = ProcsafeCondition(ctx=ctx, label=label, watch=watch)
        self.__setstate__(((parties, action, None, cond, wrapper), label, watch.timeout))
        self._procsafe_init(label, watch)
        self._state = 0
        self._count = 0

    def wait(self, timeout: Timeout = DEFAULT) -> int:
        __tracebackhide__ = True
        if timeout is not DEFAULT:
            return super().wait(_limit(timeout))
        # threading.Barrier hands the timeout to the condition's wait_for: DEFAULT makes
        # that wait bounded, and its ChannelTimeout ends the barrier for everyone.
        try:
            return super().wait(DEFAULT)  # type: ignore[arg-type]
        except ChannelTimeout:
            with contextlib.suppress(ChannelTimeout):
                self.abort()
            raise

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        cond = self._cond  # type: ignore[attr-defined]  # threading.Barrier's, untyped
        cond._procsafe_wait_for = "wait()"

    def __repr__(self) -> str:
        return (
            f"<ProcsafeBarrier {self._procsafe_label!r} waiters={self.n_waiting}/{self.parties}>"
        )


# --- shared memory ------------------------------------------------------------------------


@final
class SharedMemoryResource:
    """A shared memory block `Channels` made: closed and unlinked at teardown."""

    def __init__(self, block: SharedMemory, label: str) -> None:
        self.label = label
        self._block = block
        self._name = _posix_name(block)
        _owned.add_segment(self._name)

    def drain(self, *, force: bool) -> None:
        pass

    def close(self, *, now: bool = False) -> list[str]:
        try:
            # A view the test still holds (a memoryview, a numpy array) keeps the mapping
            # alive: unlinking still frees the name, and the memory goes with the view.
            with contextlib.suppress(BufferError):
                self._block.close()
            with contextlib.suppress(FileNotFoundError):  # the test unlinked it itself
                self._block.unlink()
        finally:
            _owned.discard_segment(self._name)
        return []


def _posix_name(block: SharedMemory) -> str:
    # SharedMemory.name drops the leading slash its POSIX name has.
    name = block._name  # type: ignore[attr-defined]  # not in the stubs
    return name if isinstance(name, str) else "/" + block.name
