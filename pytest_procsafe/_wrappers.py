"""The channel objects tests hold: pipe ends and queues whose reads cannot hang.

`ProcsafeConnection` wraps a `multiprocessing.connection.Connection`; `ProcsafeQueue` and
`ProcsafeJoinableQueue` subclass multiprocessing's queues. Their blocking calls wait
through a `Watch` (the procsafe timeout, a diagnosis, an early end when no worker is left).
They pickle to children as the standard objects do, through multiprocessing's own
reducers, and keep the default timeout there (without a diagnosis, which only the test
process can make). They also know how to be drained and closed at teardown without ever
blocking; `Channels` decides when.

Imported inside workers too (when a channel is unpickled there): no pytest, no plugin.
"""

from __future__ import annotations

import math
import multiprocessing.queues
import select
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from queue import Empty
from queue import Full
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import Literal
from typing import TypeAlias
from typing import final

from pytest_procsafe import _seconds
from pytest_procsafe._frames import NOWAIT
from pytest_procsafe._frames import CannotReadNow
from pytest_procsafe._frames import Skipper
from pytest_procsafe._frames import read_now
from pytest_procsafe._timeouts import DEFAULT
from pytest_procsafe._timeouts import MISS
from pytest_procsafe._timeouts import STEP
from pytest_procsafe._timeouts import Timeout
from pytest_procsafe._timeouts import Token
from pytest_procsafe._timeouts import Watch

if TYPE_CHECKING:
    import threading
    from multiprocessing.connection import Connection

    # multiprocessing's queues are only subscriptable at runtime from Python 3.12 on.
    _QueueBase: TypeAlias = multiprocessing.queues.Queue[Any]
    _JoinableBase: TypeAlias = multiprocessing.queues.JoinableQueue[Any]
else:
    _QueueBase = multiprocessing.queues.Queue
    _JoinableBase = multiprocessing.queues.JoinableQueue

# select.poll where it exists (not on Windows): readiness in one syscall.
# ``Connection.poll`` builds a selector on every call, which made each read of a channel
# three times as slow as a plain ``recv()``/``get()`` (benchmarks/README.md).
_POLL: Final = getattr(select, "poll", None)


def _poller(conn: Connection[Any, Any]) -> Any:
    poller = _POLL()  # type: ignore[misc]  # only called when _POLL exists
    poller.register(conn.fileno(), select.POLLIN)
    return poller


def _ready(poller: Any, timeout: float | None) -> bool:
    """``Connection.poll`` semantics (end of file and errors count as ready)."""
    return bool(poller.poll(None if timeout is None else math.ceil(max(timeout, 0) * 1000)))


@final
class ProcsafeConnection:
    """One end of a pipe whose reads default to the procsafe timeout.

    ``recv``, ``recv_bytes`` and ``recv_bytes_into`` take a keyword ``timeout``: seconds,
    None to wait forever, or by default the procsafe timeout; when it passes they raise
    `ChannelTimeout`. Everything else is `multiprocessing.connection.Connection`'s own.
    """

    def __init__(self, conn: Connection[Any, Any], *, label: str, watch: Watch) -> None:
        self._conn = conn
        self._label = label
        self._watch = watch
        # The first step of a default read's wait, in poll's milliseconds (`_readable`).
        self._first_ms = math.ceil(min(STEP, watch.timeout) * 1000)
        self._sent = False
        self._skipper = Skipper()
        self._poller: Any = None
        # `read_now`'s header buffer; None where reads that do not wait are not available.
        self._header: bytearray | None = None if NOWAIT is None else bytearray(4)

    def __reduce__(self) -> tuple[Callable[..., ProcsafeConnection], tuple[Any, ...]]:
        # Through the inner Connection, so multiprocessing's reducers (fd passing) apply.
        return _rebuild_connection, (self._conn, self._label, self._watch.timeout)

    def __repr__(self) -> str:
        state = "closed" if self._conn.closed else f"fd={self._conn.fileno()}"
        return f"<ProcsafeConnection {self._label!r} {state}>"

    @property
    def label(self) -> str:
        return self._label

    @property
    def sent_here(self) -> bool:
        """Whether this process sent anything on this end."""
        return self._sent

    @property
    def connection(self) -> Connection[Any, Any]:
        """The underlying `multiprocessing.connection.Connection`."""
        return self._conn

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def readable(self) -> bool:
        return self._conn.readable

    @property
    def writable(self) -> bool:
        return self._conn.writable

    def fileno(self) -> int:
        return self._conn.fileno()

    def close(self) -> None:
        self._conn.close()

    def send(self, obj: Any) -> None:
        self._sent = True
        self._conn.send(obj)

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        self._sent = True
        self._conn.send_bytes(buf, offset, size)

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._conn.poll(timeout)

    def recv(self, *, timeout: Timeout = DEFAULT) -> Any:
        __tracebackhide__ = True
        data = self._message("recv()", timeout)
        return self._conn.recv() if data is None else ForkingPickler.loads(data)

    def recv_bytes(self, maxlength: int | None = None, *, timeout: Timeout = DEFAULT) -> bytes:
        __tracebackhide__ = True
        if maxlength is None:
            data = self._message("recv_bytes()", timeout)
            if data is not None:
                return data
        else:  # a message over maxlength closes the end unread: multiprocessing's own read
            self._readable("recv_bytes()", timeout)
        return self._conn.recv_bytes(maxlength)

    def recv_bytes_into(self, buf: Any, offset: int = 0, *, timeout: Timeout = DEFAULT) -> int:
        __tracebackhide__ = True
        self._readable("recv_bytes_into()", timeout)
        return self._conn.recv_bytes_into(buf, offset)

    def __enter__(self) -> ProcsafeConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _procsafe_drain(self) -> None:
        """Discard what is readable on this end now, without blocking."""
        if not self._conn.closed and self._conn.readable and not self._skipper.ended:
            self._skipper.skip(self._conn)

    def _message(self, call: str, timeout: Timeout) -> bytes | None:
        """The next message, when it is already there; else None once a read will not
        block (after `_readable`'s wait), for the plain read to take it.

        With a message waiting (the reader is the slower side) this is that read alone:
        no ``poll`` before it."""
        __tracebackhide__ = True
        if timeout is None:
            return None  # explicitly unbounded: the plain blocking read
        if timeout is not DEFAULT:
            _seconds.check("timeout", timeout)  # a bad one is an error even with data there
        header, conn = self._header, self._conn
        if header is not None and not conn.closed and conn.readable:
            try:
                data = read_now(conn.fileno(), header)
            except CannotReadNow:
                self._header = None  # this kernel cannot, on this end: poll, then read
            else:
                if data is not None:
                    return data
        self._readable(call, timeout)
        return None

    def _readable(self, call: str, timeout: Timeout) -> None:
        """Return once a read will not block (or raise the timeout's error): with the
        default timeout, one ``poll`` when data is waiting or comes within a step.

        That step is the bounded wait's first, counted in it: a reader faster than its
        writer then waits in the kernel, not in Python code, for each message."""
        __tracebackhide__ = True
        if self._conn.closed or not self._conn.readable:
            return  # the read itself raises what multiprocessing raises
        if timeout is DEFAULT:
            poller = self._live_poller()
            if poller is not None:  # the usual read
                started = time.monotonic()
                if not poller.poll(self._first_ms):  # not within a step
                    self._await(call, timeout, started)
                return
            if self._poll(0.0):  # no select.poll (Windows)
                return
        self._await(call, timeout)

    def _await(self, call: str, timeout: Timeout, started: float | None = None) -> None:
        __tracebackhide__ = True
        if timeout is None:
            return  # explicitly unbounded: the plain blocking read
        limit = timeout if timeout is DEFAULT else _seconds.check("timeout", timeout)

        def attempt(step: float) -> Literal[Token.MISS] | None:
            return None if self._poll(step) else MISS

        self._watch.wait(
            f"{call} on {self._label}",
            attempt,
            limit,
            stuck=lambda: not self._poll(0.0),
            stuck_reason="nothing is pending",
            started=started,
        )

    def _poll(self, timeout: float) -> bool:
        """``Connection.poll(timeout)`` in one syscall where select.poll exists."""
        poller = self._live_poller()
        if poller is None:
            return self._conn.poll(timeout)  # and what a closed connection raises
        return _ready(poller, timeout)

    def _live_poller(self) -> Any:
        """This end's ``select.poll``, made on first use; None without one or once closed."""
        if _POLL is None or self._conn.closed:
            return None
        if self._poller is None:
            self._poller = _poller(self._conn)
        return self._poller


def _rebuild_connection(
    conn: Connection[Any, Any], label: str, timeout: float
) -> ProcsafeConnection:
    return ProcsafeConnection(conn, label=label, watch=Watch(timeout))


class ProcsafeQueue(_QueueBase):
    """A `multiprocessing.Queue` whose blocking ``get`` and ``put`` default to the procsafe
    timeout and then raise `ChannelTimeout`; an explicit ``timeout`` or ``block=False``
    keeps its standard meaning (`queue.Empty` / `queue.Full`)."""

    if TYPE_CHECKING:  # multiprocessing's private state this class relies on
        _reader: Connection[Any, Any]
        _writer: Connection[Any, Any]
        _rlock: Any
        _sem: Any
        _thread: threading.Thread | None
        _poll: Callable[..., bool]

    def __init__(self, maxsize: int = 0, *, ctx: BaseContext, label: str, watch: Watch) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._procsafe_init(label, watch)

    def _procsafe_init(self, label: str, watch: Watch) -> None:
        self._procsafe_label = label
        self._procsafe_watch = watch
        self._procsafe_fed = False  # this process put items: they are for someone else
        self._procsafe_skipper = Skipper()
        self._procsafe_locked = False  # the drain holds the read lock mid-message
        # `read_now`'s header buffer; None where reads that do not wait are not available.
        self._procsafe_header: bytearray | None = None if NOWAIT is None else bytearray(4)

    def __getstate__(self) -> Any:
        return super().__getstate__(), self._procsafe_label, self._procsafe_watch.timeout

    def __setstate__(self, state: Any) -> None:
        inner, label, timeout = state
        super().__setstate__(inner)
        self._procsafe_init(label, Watch(timeout))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._procsafe_label!r}>"

    def _reset(self, after_fork: bool = False) -> None:
        # multiprocessing calls this from __init__, __setstate__ and after a fork.
        super()._reset(after_fork)  # type: ignore[misc]  # private, not in the stubs
        self._procsafe_poller: Any = None
        self._poll = self._procsafe_poll

    def _procsafe_poll(self, timeout: float | None = 0.0) -> bool:
        """What ``Queue`` polls its reader with (``get`` with a timeout, ``empty``)."""
        reader = self._reader
        if _POLL is None or reader.closed:
            return reader.poll(timeout)
        if self._procsafe_poller is None:
            self._procsafe_poller = _poller(reader)
        return _ready(self._procsafe_poller, timeout)

    @property
    def label(self) -> str:
        return self._procsafe_label

    def get(self, block: bool = True, timeout: Timeout = DEFAULT) -> Any:
        __tracebackhide__ = True
        if timeout is not DEFAULT:
            return super().get(block, timeout)
        if not block:
            return super().get(False)
        if self._procsafe_header is not None and not self._closed:  # type: ignore[attr-defined]
            data = self._procsafe_now()
            if data is not None:
                return ForkingPickler.loads(data)
        get = super().get
        watch = self._procsafe_watch
        started = time.monotonic()
        try:  # an item is waiting or comes within a step: no watch to set up (see `recv`)
            return get(True, min(STEP, watch.timeout))
        except Empty:
            pass

        def attempt(step: float) -> Any:
            try:
                return get(True, step)
            except Empty:
                return MISS

        return watch.wait(
            f"get() on {self._procsafe_label}",
            attempt,
            DEFAULT,
            stuck=self.empty,
            stuck_reason="nothing is pending",
            started=started,
        )

    def _procsafe_now(self) -> bytes | None:
        """The next item's bytes when it is already there and no other reader holds the
        read lock: ``get``'s own steps without the ``poll`` (see `ProcsafeConnection`)."""
        rlock, reader, header = self._rlock, self._reader, self._procsafe_header
        if not rlock.acquire(False):
            return None  # another reader (or the drain, mid-message): the usual wait
        try:
            if reader.closed:
                return None
            try:
                data = read_now(reader.fileno(), header)  # type: ignore[arg-type]  # not None
            except CannotReadNow:
                self._procsafe_header = None  # this kernel cannot: poll, then read
                return None
            if data is not None:
                self._sem.release()  # the item's slot, as get() gives it back
            return data
        finally:
            rlock.release()

    def put(self, obj: Any, block: bool = True, timeout: Timeout = DEFAULT) -> None:
        __tracebackhide__ = True
        self._procsafe_fed = True
        if timeout is not DEFAULT:
            return super().put(obj, block, timeout)
        if not block:
            return super().put(obj, False)
        put = super().put
        try:
            return put(obj, False)  # there is room: no watch to set up
        except Full:
            pass

        def attempt(step: float) -> Literal[Token.MISS] | None:
            try:
                put(obj, True, step)
            except Full:
                return MISS
            return None

        self._procsafe_watch.wait(
            f"put() on {self._procsafe_label}",
            attempt,
            DEFAULT,
            stuck=self.full,
            stuck_reason="the queue is still full",
        )

    def _procsafe_drain(self, *, force: bool) -> None:
        """Discard what is pending so a worker blocked writing can exit.

        Unforced (workers still running) it spares a queue this process put into, whose
        items are meant for a worker, and one a worker is reading from. The read lock is
        kept while a message is half-read so that no reader starts in its middle.
        """
        reader = self._reader
        if reader.closed or (self._procsafe_fed and not force):
            return
        rlock = self._rlock
        if not self._procsafe_locked:
            # Forced, a dead worker may still own the lock: everyone else is gone by then.
            self._procsafe_locked = rlock.acquire(False)
            if not self._procsafe_locked and not force:
                return
        try:
            for _ in range(self._procsafe_skipper.skip(reader)):
                self._sem.release()  # a put's slot, as get() gives it back
        finally:
            if self._procsafe_locked and not self._procsafe_skipper.mid_message:
                rlock.release()
                self._procsafe_locked = False

    def _procsafe_close(self, timeout: float) -> list[str]:
        """Close after the workers are gone: this process's feeder thread flushed and
        joined, both pipe ends closed."""
        problems: list[str] = []
        feeder = self._thread
        self.close()  # tells a running feeder thread to finish
        if feeder is not None:
            deadline = time.monotonic() + timeout
            while feeder.is_alive() and time.monotonic() < deadline:
                try:
                    self._procsafe_drain(force=True)  # nobody else reads: unblock the feeder
                except OSError:
                    break  # the feeder closed the pipe meanwhile: it is done
                feeder.join(STEP / 2)
            feeder.join(max(0.0, deadline - time.monotonic()))
            if feeder.is_alive():
                # Never let multiprocessing's exit handler join it without a timeout.
                self.cancel_join_thread()
                problems.append(
                    f"{self._procsafe_label}: its feeder thread did not finish writing "
                    f"within {_seconds.fmt(timeout)}"
                )
            else:
                self.join_thread()
        if self._procsafe_locked:
            self._rlock.release()
            self._procsafe_locked = False
        self._reader.close()
        self._writer.close()
        return problems


class ProcsafeJoinableQueue(ProcsafeQueue, _JoinableBase):
    """A `multiprocessing.JoinableQueue` whose ``get``, ``put`` and ``join`` default to the
    procsafe timeout; ``join(timeout)`` takes seconds or None (wait forever)."""

    if TYPE_CHECKING:
        _cond: Any
        _unfinished_tasks: Any

    def join(self, timeout: Timeout = DEFAULT) -> None:
        __tracebackhide__ = True
        if timeout is None:
            return super().join()
        limit = timeout if timeout is DEFAULT else _seconds.check("timeout", timeout)
        cond = self._cond
        unfinished = self._unfinished_tasks._semlock

        def attempt(step: float) -> Literal[Token.MISS] | None:
            if not cond.acquire(True, step):
                return MISS
            try:
                return None if cond.wait_for(unfinished._is_zero, step) else MISS
            finally:
                cond.release()

        self._procsafe_watch.wait(
            f"join() on {self._procsafe_label}",
            attempt,
            limit,
            stuck=lambda: not unfinished._is_zero(),
            stuck_reason="tasks are still unfinished",
        )
