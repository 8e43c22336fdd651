"""Which shared memory segments and semaphores this process tree made, as multiprocessing
tells its resource tracker.

Every `SharedMemory` and every SemLock of a spawn/forkserver context (a Lock, a Queue's
locks, an Event...) is registered with the resource tracker when it is made and
unregistered when it is unlinked; multiprocessing looks ``register``/``unregister`` up on
the ``resource_tracker`` module at each call, so wrapping them sees each one. That is the
evidence the leak checks need to tell this run's ``/dev/shm`` entries from other runs'
(xdist siblings, parallel runs, other programs): the name alone says nothing.

* In the test process the wrapper keeps the names in `REGISTERED` (a dict: no I/O).
* Fork children inherit the wrapper; it appends ``+``/``-`` lines to a log file instead.
* Spawn and forkserver children get it as a rider of `_spawnhook`: unpickling its
  `_spawnhook.Call` in the child installs the wrapper, pointed at the same log, and passes it on to the
  child's own children.

`Registrations` (the test process's side) reads the log only when the leak checks have
a candidate. Runs inside workers: imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from pytest_procsafe import _afterimport
from pytest_procsafe import _spawnhook
from pytest_procsafe._notyping import final

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import Any
    from typing import Final

#: The name of the listener among `_spawnhook`'s riders.
RIDER: Final = "registrations"
KINDS: Final = ("shared_memory", "semaphore")

#: POSIX name -> kind, registered by the test process and not unregistered since.
REGISTERED: dict[str, str] = {}
#: How many registrations and unregistrations the test process made (a cheap "anything
#: new?" for the leak checks' phase observations).
changes = 0
#: The log children append to, and the process that keeps `REGISTERED` (the test process).
_STATE: dict[str, Any] = {"log": None, "root": None}


def _note(sign: str, name: object, rtype: object) -> None:
    if rtype not in KINDS or not isinstance(name, str):
        return
    if os.getpid() == _STATE["root"]:
        global changes
        changes += 1
        if sign == "+":
            REGISTERED[name] = str(rtype)
        else:
            REGISTERED.pop(name, None)
        return
    log = _STATE["log"]
    if log is None:
        return
    with contextlib.suppress(OSError):  # the session is over: nobody reads it any more
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"{sign} {rtype} {name}\n".encode())  # one short append: atomic
        finally:
            os.close(fd)


def _listen() -> Callable[[], None]:
    """Wrap the tracker module's register/unregister, now if it is imported, else when it
    is (`_afterimport`; one wrapper per copy of the module); the undo."""
    undo_wraps: list[Callable[[], None]] = []

    def wrap(resource_tracker: Any) -> None:
        register, unregister = resource_tracker.register, resource_tracker.unregister
        if getattr(register, "_procsafe", False):
            return

        def on_register(name: Any, rtype: str) -> None:
            register(name, rtype)
            _note("+", name, rtype)

        def on_unregister(name: Any, rtype: str) -> None:
            unregister(name, rtype)
            _note("-", name, rtype)

        on_register._procsafe = True  # type: ignore[attr-defined]
        resource_tracker.register = on_register
        resource_tracker.unregister = on_unregister

        def undo() -> None:
            if resource_tracker.register is on_register:  # else someone patched over us
                resource_tracker.register = register
            if resource_tracker.unregister is on_unregister:
                resource_tracker.unregister = unregister

        undo_wraps.append(undo)

    cancel = _afterimport.call("multiprocessing.resource_tracker", wrap)

    def undo() -> None:
        cancel()
        while undo_wraps:
            undo_wraps.pop()()

    return undo


def _arrive(log: str) -> None:
    _STATE["log"], _STATE["root"] = log, None
    _listen()
    _carry()


def _rider() -> _spawnhook.Call | None:
    log = _STATE["log"]
    return None if log is None else _spawnhook.Call(_arrive, log)


def _carry() -> Callable[[], None]:
    """Put a `_spawnhook.Call` of `_arrive` into every spawn/forkserver child's preparation data; the undo."""
    return _spawnhook.carry(RIDER, _rider)


@final
class Registrations:
    """The test process's view: names its tree registered and did not unregister."""

    def __init__(self) -> None:
        import tempfile  # the test process's side only: a spawn child would pay 6 ms

        fd, self.path = tempfile.mkstemp(prefix="pytest-procsafe-", suffix=".registrations")
        self._fd = fd
        self._offset = 0
        self._children: dict[str, str] = {}
        self._previous = dict(_STATE)  # a nested in-process run hands it back at close
        _STATE["log"], _STATE["root"] = self.path, os.getpid()
        self._undo = [_listen(), _carry()]

    def names(self) -> dict[str, str]:
        """POSIX name -> kind, for everything registered and not unregistered since."""
        if self._fd >= 0:
            while chunk := os.pread(self._fd, 1 << 16, self._offset):
                complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits
                if not complete:
                    break
                self._offset += len(complete)
                for line in complete.decode(errors="replace").splitlines():
                    sign, _, rest = line.partition(" ")
                    kind, _, name = rest.partition(" ")
                    if sign == "+":
                        self._children[name] = kind
                    else:
                        self._children.pop(name, None)
        return {**self._children, **REGISTERED}

    def forget(self, name: str) -> None:
        REGISTERED.pop(name, None)
        self._children.pop(name, None)

    def close(self) -> None:
        for undo in self._undo:
            undo()
        self._undo = []
        if _STATE["log"] == self.path:
            _STATE.update(self._previous)
        if _STATE["root"] is None:
            REGISTERED.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(OSError):
                os.unlink(self.path)
