"""Reading and skipping whole messages on a multiprocessing connection.

multiprocessing's framing is a 4-byte big-endian length, or -1 then an 8-byte length for
messages over 2 GiB, then the body.

`read_now` reads one message in the system calls of a plain ``Connection.recv_bytes``
when its first bytes are already there, and reads nothing when they are not. A bounded
read then needs no ``poll`` first whenever the reader is the slower side: the header's
read itself says whether anything is waiting (Linux's ``RWF_NOWAIT``, one read that does
not block, on pipes and sockets alike, without touching the descriptor's flags, which the
other processes holding it share).

``Connection.recv_bytes`` blocks until a message is complete. A writer killed half-way
through a large message (a worker's feeder thread stuck on a full pipe when the worker was
killed) would hang it forever, because the test process itself still holds the write end.
`Skipper` reads raw bytes instead, follows the framing and keeps its place in a message
from one call to the next.

Imported inside workers too (with the channels): no pytest, no plugin.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import final

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

#: Bytes one call discards at most, so a writer producing without end cannot keep
#: teardown in one call forever.
_BUDGET: Final = 16 << 20
_LONG_MARK: Final = struct.pack("!i", -1)
_SIZE: Final = struct.Struct("!i")
_LONG_SIZE: Final = struct.Struct("!Q")

#: ``os.preadv``'s flag for a read that does not wait (Linux 4.14+; pipes from 5.8): None
#: where the platform has none, and `read_now` must not be called.
NOWAIT: Final[int | None] = getattr(os, "RWF_NOWAIT", None) if sys.platform == "linux" else None


class CannotReadNow(Exception):
    """This kernel cannot read this descriptor without waiting (nothing was read)."""


def read_now(fd: int, header: bytearray) -> bytes | None:
    """The next message on *fd* if its header can be read without waiting, else None.

    *header* is a 4-byte buffer of the caller's (one per connection end, reused).
    Once a header is there, the rest is read as ``Connection.recv_bytes`` reads it,
    waiting for the writer to finish the message, and the end of file gives the same
    errors: `EOFError` before a message, `OSError` within one. A kernel that cannot read
    this descriptor without waiting (``EOPNOTSUPP``, ``EINVAL``) raises `CannotReadNow`
    before anything is read: poll, then read, from then on.
    """
    try:
        got = os.preadv(fd, (header,), -1, NOWAIT)  # type: ignore[arg-type]  # None: never called
    except BlockingIOError:
        return None
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            raise CannotReadNow from error
        raise
    if got < 4:
        if not got:
            raise EOFError
        header[got:] = _exactly(fd, 4 - got, started=True)
    (size,) = _SIZE.unpack(header)
    if size == -1:
        (size,) = _LONG_SIZE.unpack(_exactly(fd, 8))
    return _exactly(fd, size)


def _exactly(fd: int, size: int, *, started: bool = False) -> bytes:
    """*size* bytes from *fd*, as ``Connection._recv`` reads them (each of its reads
    blocks until something comes)."""
    if not size:
        return b""
    data = os.read(fd, size)
    if len(data) == size:
        return data
    parts = [data]
    left = size - len(data)
    while data and left:
        data = os.read(fd, left)
        parts.append(data)
        left -= len(data)
    if left:
        if left == size and not started:
            raise EOFError
        raise OSError("got end of file during message")
    return b"".join(parts)


@final
class Skipper:
    """Discards whole messages from one connection, never blocking; one per connection."""

    def __init__(self) -> None:
        self._header = b""
        self._left = 0  # body bytes of the current message still to discard
        self.ended = False

    @property
    def mid_message(self) -> bool:
        return bool(self._header) or self._left > 0

    def skip(self, conn: Connection[Any, Any]) -> int:
        """Discard what is readable now; return how many messages were completed."""
        if sys.platform == "win32":  # message-mode pipes: a message is never cut
            return self._skip_whole(conn)
        done, budget, fd = 0, _BUDGET, conn.fileno()
        while budget > 0 and not self.ended and conn.poll(0):
            if self._left:
                want = min(self._left, budget, 1 << 20)
            else:
                want = (12 if self._header[:4] == _LONG_MARK else 4) - len(self._header)
            chunk = os.read(fd, want)
            if not chunk:
                self.ended = True
                break
            budget -= len(chunk)
            if self._left:
                self._left -= len(chunk)
                if not self._left:
                    done += 1
                continue
            self._header += chunk
            if len(self._header) == 4 and self._header != _LONG_MARK:
                (size,) = struct.unpack("!i", self._header)
            elif len(self._header) == 12:
                (size,) = struct.unpack("!Q", self._header[4:])
            else:
                continue
            self._header = b""
            self._left = size
            if not size:
                done += 1
        return done

    def _skip_whole(self, conn: Connection[Any, Any]) -> int:
        done = 0
        while done < 1000 and conn.poll(0):  # bounded, like the byte budget above
            try:
                conn.recv_bytes()
            except EOFError:
                self.ended = True
                break
            done += 1
        return done
