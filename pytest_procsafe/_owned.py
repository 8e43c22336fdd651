"""The one registry of what procsafe itself owns: its workers, managers, shared memory and
the guardian.

Workers and Channels write to it as they start and stop things; the leak checks read it,
so a process or segment procsafe's own fixtures still answer for is never reported as a
leak, and every way a run ends can stop what procsafe started. Nobody looks another
module up by name: a part that starts things registers here, a part that checks asks
here.

Imports nothing of procsafe's and no pytest (Channels' shared state, which writes here,
is imported inside workers too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

#: Stops what one part started since a ``time.monotonic()`` value (None: everything),
#: terminating, then killing after the grace (seconds).
Stopper = Callable[[float, "float | None"], None]

# pid -> what it is ("worker", "manager", "guardian"), for the processes procsafe answers for.
_PIDS: dict[int, str] = {}
# Names (with their leading slash) of shared memory blocks procsafe made and has not
# unlinked yet.
_SEGMENTS: set[str] = set()
_STOPPERS: list[Stopper] = []

WORKER: Final = "worker"
MANAGER: Final = "manager"
#: The guardian (`_guardian`): never a leak, never stopped by the leak checks' sweeps.
GUARDIAN: Final = "guardian"


def add_pid(pid: int, what: str) -> None:
    """*pid* is procsafe's (*what*: `WORKER`, `MANAGER`, `GUARDIAN`) until `discard_pid`."""
    _PIDS[pid] = what


def discard_pid(pid: int) -> None:
    _PIDS.pop(pid, None)


def pids(what: str | None = None) -> set[int]:
    """The processes procsafe answers for now (of one kind, with *what*)."""
    if what is None:
        return set(_PIDS)
    return {pid for pid, kind in _PIDS.items() if kind == what}


def add_segment(name: str) -> None:
    _SEGMENTS.add(name)


def discard_segment(name: str) -> None:
    _SEGMENTS.discard(name)


def segments() -> set[str]:
    """Shared memory blocks procsafe still owns (the leak checks must not report them)."""
    return set(_SEGMENTS)


def on_stop(stopper: Stopper) -> None:
    """Have `stop` call *stopper* (once per stopper, however often registered)."""
    if stopper not in _STOPPERS:
        _STOPPERS.append(stopper)


def stop(grace: float, since: float | None = None) -> None:
    """Stop every process procsafe started (since *since*) and still owns: on every way
    out of a run (its end, unconfigure, SIGTERM). Parts never imported have none."""
    for stopper in list(_STOPPERS):
        stopper(grace, since)
