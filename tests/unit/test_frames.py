"""Unit tests of `_frames.read_now` and the reads of `ProcsafeConnection` and
`ProcsafeQueue` built on it.

Every outcome is checked against multiprocessing's own ``Connection.recv_bytes`` on an
identical pipe: the same bytes, or the same kind of error at the end of file.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import struct
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import Any

import pytest

from pytest_procsafe._frames import NOWAIT
from pytest_procsafe._frames import read_now
from pytest_procsafe._timeouts import ChannelTimeout
from pytest_procsafe._timeouts import Watch
from pytest_procsafe._wrappers import ProcsafeConnection
from pytest_procsafe._wrappers import ProcsafeQueue

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    Reader = Callable[[Connection[Any, Any]], bytes | None]

needs_nowait = pytest.mark.skipif(NOWAIT is None, reason="reads that do not wait: Linux only")
PROMPTLY = 10.0
BIG = 2 << 20  # more than any pipe buffer holds: the writer blocks half-way


def header(size: int) -> bytes:
    return struct.pack("!i", size)


#: What a writer put on the pipe before it hung up, and the message (or error) a read gives.
ENDINGS: dict[str, tuple[bytes, bytes | type[BaseException]]] = {
    "a message": (header(5) + b"hello", b"hello"),
    "an empty message": (header(0), b""),
    "the long form": (header(-1) + struct.pack("!Q", 3) + b"xyz", b"xyz"),
    "nothing": (b"", EOFError),
    "half a header": (header(7)[:2], OSError),
    "a header alone": (header(7), EOFError),
    "half a body": (header(7) + b"1234", OSError),
}


def raw(conn: Connection[Any, Any]) -> bytes | None:
    return conn.recv_bytes()


def now(conn: Connection[Any, Any]) -> bytes | None:
    return read_now(conn.fileno(), bytearray(4))


def wrapped(conn: Connection[Any, Any]) -> bytes | None:
    return ProcsafeConnection(conn, label="pipe", watch=Watch(PROMPTLY)).recv_bytes()


READERS = [
    pytest.param(raw, id="multiprocessing"),
    pytest.param(now, id="read_now", marks=needs_nowait),
    pytest.param(wrapped, id="ProcsafeConnection"),
]


@contextlib.contextmanager
def in_a_thread(target: Callable[..., object], *args: object) -> Iterator[None]:
    """*target* runs in a thread while the block does (a writer for the reader)."""
    thread = threading.Thread(target=target, args=args)
    thread.start()
    try:
        yield
    finally:
        thread.join(PROMPTLY)


@pytest.fixture(params=[True, False], ids=["socketpair", "pipe"])
def ends(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[Connection[Any, Any], Connection[Any, Any]]]:
    """(reader, writer): a duplex Pipe is a socket pair, a one-way one an OS pipe."""
    reader, writer = multiprocessing.Pipe(duplex=request.param)
    with reader, writer:
        yield reader, writer


@pytest.mark.parametrize("read", READERS)
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_ending_reads_as_multiprocessing_reads_it(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]], read: Reader, ending: str
) -> None:
    reader, writer = ends
    written, expected = ENDINGS[ending]
    if written:
        os.write(writer.fileno(), written)
    writer.close()
    if isinstance(expected, bytes):
        assert read(reader) == expected
    else:
        with pytest.raises(expected) as caught:
            read(reader)
        # multiprocessing's errors exactly: within a message an OSError, not a subclass.
        assert type(caught.value) is expected


@needs_nowait
def test_read_now_reads_nothing_when_nothing_is_there(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
) -> None:
    reader, writer = ends
    scratch = bytearray(4)
    assert read_now(reader.fileno(), scratch) is None
    writer.send_bytes(b"one")
    writer.send_bytes(b"two")
    assert read_now(reader.fileno(), scratch) == b"one"
    assert read_now(reader.fileno(), scratch) == b"two"
    assert read_now(reader.fileno(), scratch) is None
    assert not reader.poll(0)


@needs_nowait
def test_once_a_header_began_the_rest_is_waited_for(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
) -> None:
    """A writer part-way through a message finishes it: its first bytes commit the read."""
    reader, writer = ends
    os.write(writer.fileno(), header(4)[:3])

    def rest() -> None:
        time.sleep(0.1)
        os.write(writer.fileno(), header(4)[3:])
        time.sleep(0.1)
        os.write(writer.fileno(), b"ab")
        time.sleep(0.1)
        os.write(writer.fileno(), b"cd")

    with in_a_thread(rest):
        assert read_now(reader.fileno(), bytearray(4)) == b"abcd"


@needs_nowait
def test_a_message_bigger_than_the_pipe_is_read_whole(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
) -> None:
    reader, writer = ends
    payload = os.urandom(BIG)
    with in_a_thread(writer.send_bytes, payload):
        deadline = time.monotonic() + PROMPTLY
        got = None
        while got is None and time.monotonic() < deadline:
            got = read_now(reader.fileno(), bytearray(4))
        assert got == payload


@needs_nowait
def test_a_waiting_message_is_read_without_a_poll(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
) -> None:
    reader, writer = ends
    end = ProcsafeConnection(reader, label="pipe", watch=Watch(PROMPTLY))

    def no_poll() -> Any:
        raise AssertionError("polled although a message was waiting")

    end._live_poller = no_poll  # type: ignore[method-assign]
    writer.send({"a": 1})
    writer.send_bytes(b"raw")
    assert end.recv() == {"a": 1}
    assert end.recv_bytes() == b"raw"


def test_nothing_waiting_is_waited_for_within_the_timeout(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
) -> None:
    reader, writer = ends
    end = ProcsafeConnection(reader, label="pipe", watch=Watch(PROMPTLY))
    timer = threading.Timer(0.2, writer.send, args=(["late"],))
    timer.start()
    try:
        assert end.recv() == ["late"]
    finally:
        timer.join(PROMPTLY)
    started = time.monotonic()
    with pytest.raises(ChannelTimeout):
        end.recv(timeout=0.2)
    assert 0.2 <= time.monotonic() - started < PROMPTLY


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_kernel_that_cannot_read_without_waiting_gets_poll_then_read(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
    code: int,
) -> None:
    reader, writer = ends
    calls: list[int] = []

    def unsupported(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        calls.append(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "preadv", unsupported)
    end = ProcsafeConnection(reader, label="pipe", watch=Watch(PROMPTLY))
    end._header = bytearray(4)  # as on a platform that has the flag
    writer.send(1)
    writer.send(2)
    assert (end.recv(), end.recv()) == (1, 2)
    assert len(calls) == 1  # not tried again on that end


def test_other_read_errors_are_the_callers(
    ends: tuple[Connection[Any, Any], Connection[Any, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader, _ = ends

    def broken(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", broken)
    end = ProcsafeConnection(reader, label="pipe", watch=Watch(PROMPTLY))
    end._header = bytearray(4)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)) as caught:
        end.recv()
    assert caught.value.errno == errno.EIO


def test_a_closed_or_write_only_end_fails_as_multiprocessing_fails() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        with pytest.raises(OSError, match="connection is write-only"):
            ProcsafeConnection(writer, label="pipe", watch=Watch(PROMPTLY)).recv()
        end = ProcsafeConnection(reader, label="pipe", watch=Watch(PROMPTLY))
        end.close()
        with pytest.raises(OSError, match="handle is closed"):
            end.recv()
        with pytest.raises(OSError, match="handle is closed"):
            end.recv_bytes()


# --- queues: the same read under the queue's read lock -------------------------------------


@pytest.fixture
def queue() -> Iterator[ProcsafeQueue]:
    q = ProcsafeQueue(
        1, ctx=multiprocessing.get_context("spawn"), label="queue", watch=Watch(PROMPTLY)
    )
    yield q
    q._procsafe_close(PROMPTLY)


def wait_until_written(q: ProcsafeQueue) -> None:
    """Until the feeder thread has written what was put (a reader's poll would say)."""
    deadline = time.monotonic() + PROMPTLY
    while not q._reader.poll(0) and time.monotonic() < deadline:
        time.sleep(0.001)


@needs_nowait
def test_a_waiting_item_is_got_without_a_poll_and_its_slot_given_back(
    queue: ProcsafeQueue,
) -> None:
    def no_poll(timeout: float | None = 0.0) -> bool:
        raise AssertionError("polled although an item was waiting")

    for item in ("first", "second"):
        queue.put(item)
        wait_until_written(queue)
        queue._poll = no_poll
        assert queue.get() == item
        queue._poll = queue._procsafe_poll  # back to its own for the next wait
    queue.put_nowait("third")  # the slots came back: a full queue would raise here
    assert queue.get() == "third"


def test_another_reader_holding_the_lock_means_the_usual_wait(queue: ProcsafeQueue) -> None:
    queue.put("item")
    wait_until_written(queue)
    assert queue._rlock.acquire(False)
    threading.Timer(0.2, queue._rlock.release).start()
    started = time.monotonic()
    assert queue.get() == "item"
    assert time.monotonic() - started >= 0.15


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_queue_on_a_kernel_that_cannot_read_without_waiting(
    queue: ProcsafeQueue, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    calls: list[int] = []

    def unsupported(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        calls.append(fd)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "preadv", unsupported)
    queue._procsafe_header = bytearray(4)
    for item in (1, 2):
        queue.put(item)
        assert queue.get() == item
    assert len(calls) == 1
    assert queue._rlock.acquire(False)  # released on the way out
    queue._rlock.release()


def test_a_closed_queue_fails_as_multiprocessing_fails(queue: ProcsafeQueue) -> None:
    queue.close()
    with pytest.raises(ValueError, match="is closed"):
        queue.get()
