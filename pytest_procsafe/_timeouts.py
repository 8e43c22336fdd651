"""Waiting on channels: `ChannelTimeout` and `Watch`, which bounds every blocking call.

A blocking call on something `Channels` made waits in short steps. Between steps it
checks the time and whether the call can still complete: once every worker of the test
has exited and nothing is pending, nothing ever will be, so it fails at once instead of
waiting out the timeout. Its message says which call on which channel, after how long,
and what the test's workers are doing.

Imported inside workers too (when a channel is unpickled there): no pytest, no plugin.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Final
from typing import Literal
from typing import TypeAlias
from typing import TypeVar
from typing import final

from pytest_procsafe import _seconds

_R = TypeVar("_R")

#: How long one wait step lasts before the time and the workers are checked again.
STEP: Final = 0.05


@final
class ChannelTimeout(TimeoutError):
    """A blocking call on a procsafe channel timed out, or could never complete.

    The message names the call, the channel, how long it waited and what the workers of
    the test are doing.
    """

    __module__ = "pytest_procsafe"


class Token(enum.Enum):
    """Markers that are not values: the default timeout, and "not done yet"."""

    DEFAULT = "the procsafe timeout"
    MISS = "not done yet"

    def __repr__(self) -> str:  # what a signature shows: ``timeout=<the procsafe timeout>``
        return f"<{self.value}>"


DEFAULT: Final = Token.DEFAULT
MISS: Final = Token.MISS
#: A ``timeout`` argument: seconds, None (wait forever) or, by default, the procsafe timeout.
Timeout: TypeAlias = "float | Literal[Token.DEFAULT] | None"


@final
@dataclass(frozen=True)
class Watch:
    """How one test's channels wait: the default timeout and, in the test process only,
    what to say about the test's workers."""

    timeout: float
    #: Describes the test's workers, one line each ("worker 'w1' pid 42 exited with code 1").
    diagnose: Callable[[], str] | None = None
    #: True once nothing but the test process itself could still use a channel.
    senders_gone: Callable[[], bool] | None = None
    #: The test process; a forked child inherits this object but must not diagnose.
    pid: int = field(default_factory=os.getpid)

    def wait(
        self,
        what: str,
        attempt: Callable[[float], _R | Literal[Token.MISS]],
        timeout: float | Literal[Token.DEFAULT],
        *,
        stuck: Callable[[], bool],
        stuck_reason: str,
        started: float | None = None,
    ) -> _R:
        """Call ``attempt(seconds)`` in short steps until it returns anything but `MISS`.

        Raises `ChannelTimeout` when the timeout passes, or as soon as the senders are
        gone while ``stuck()`` still holds (*stuck_reason* says what that means).
        *started*: the ``time.monotonic()`` the wait began at, when the caller already
        waited a first step itself (the channels' reads do, without building a closure).
        """
        __tracebackhide__ = True  # pytest shows the test's own call, not this loop
        limit = self.timeout if timeout is DEFAULT else timeout
        start = time.monotonic() if started is None else started
        while True:
            left = limit - (time.monotonic() - start)
            result = attempt(max(0.0, min(STEP, left)))
            if result is not MISS:
                return result
            elapsed = time.monotonic() - start
            if elapsed >= limit:
                source = "the procsafe timeout" if timeout is DEFAULT else "the timeout given"
                raise ChannelTimeout(
                    self.explain(f"{what} timed out after {_seconds.fmt(limit)} ({source})")
                )
            # Senders first, then the channel: what an exited worker sent is readable now.
            if self._senders_gone() and stuck():
                raise ChannelTimeout(
                    self.explain(
                        f"{what} gave up after {_seconds.fmt(elapsed)}: every worker of this test "
                        f"has exited and {stuck_reason}, so it could never complete"
                    )
                )

    def explain(self, headline: str) -> str:
        """*headline*, then what the test's workers are doing (in the test process only)."""
        if self.diagnose is None or os.getpid() != self.pid:
            return headline
        try:
            text = self.diagnose()
        except Exception as exc:  # a broken diagnosis must not hide the timeout itself
            text = f"(describing the workers failed: {exc!r})"
        lines = text.strip().splitlines() or ["no worker was started with mp_process"]
        return "\n".join([headline, "workers of this test:", *(f"  {line}" for line in lines)])

    def _senders_gone(self) -> bool:
        return self.senders_gone is not None and os.getpid() == self.pid and self.senders_gone()
