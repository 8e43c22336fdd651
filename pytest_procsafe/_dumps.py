"""The stack-dump handler of every multiprocessing child of the run, not only procsafe's.

When something hangs, the question is which process and where. So every Python child the
test process starts through ``multiprocessing`` (and every plain ``os.fork`` child) gets a
``faulthandler`` handler for `_stacks.SIGNAL` that writes all its threads' stacks to
``<run directory>/<pid>.txt``:

* spawn and forkserver children get it as a rider of `_spawnhook` (unpickled before the
  target, it installs the handler and rides on into the child's own children);
* fork children through an at-fork callback (`_forkhooks`).

Installing it costs one ``open`` and one ``faulthandler.register`` per child (well under a
millisecond) and nothing per test. A child whose code replaces the handler, or that is
not Python at all, simply has no stack: `_stacks.capture` only signals processes that
catch the signal, and the reports say "no Python stack available". The directory is made
when the session starts and removed when it ends. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
from collections.abc import Callable

from pytest_procsafe import _forkhooks
from pytest_procsafe import _spawnhook
from pytest_procsafe import _stacks

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import IO
    from typing import Final

#: The name of the handler among `_spawnhook`'s riders.
RIDER: Final = "stacks"

# The run's directory (None: no session here), and the file the handler of this very
# process writes to (kept open: faulthandler writes to its descriptor from the handler).
_STATE: dict[str, str | None] = {"dir": None}
_FILE: list[IO[str]] = []
_HOOKED: list[bool] = []


def directory() -> str | None:
    """The run's directory of stack dumps, while a session runs here."""
    return _STATE["dir"]


# pid -> the file of a procsafe worker, whose bootstrap points the handler there.
_WORKERS: dict[int, str] = {}


def worker_file(pid: int, path: str | None) -> None:
    """*pid* is a procsafe worker writing its dumps to *path* (None: it is gone)."""
    if path is None:
        _WORKERS.pop(pid, None)
    else:
        _WORKERS[pid] = path


def file_for(pid: int) -> str | None:
    """Where *pid*'s handler writes its dump, while a session runs here."""
    worker = _WORKERS.get(pid)
    if worker is not None:
        return worker
    directory = _STATE["dir"]
    return None if directory is None else os.path.join(directory, f"{pid}.txt")


def install_here(directory: str) -> bool:
    """Install the handler in this process, writing to *directory*/<pid>.txt."""
    register = getattr(faulthandler, "register", None)
    if register is None or _stacks.SIGNAL is None:
        return False  # Windows: no such signals
    _STATE["dir"] = directory
    try:
        file = open(os.path.join(directory, f"{os.getpid()}.txt"), "w")  # noqa: SIM115
    except OSError:  # the run's directory is gone: the session is over
        return False
    while _FILE:  # a fork child inherits its parent's file object: not its own
        with contextlib.suppress(OSError):
            _FILE.pop().close()
    _FILE.append(file)
    register(_stacks.SIGNAL, file=file, all_threads=True, chain=False)
    return True


def _arrive(directory: str) -> None:
    if install_here(directory):
        _carry()


def _rider() -> _spawnhook.Call | None:
    directory = _STATE["dir"]
    return None if directory is None else _spawnhook.Call(_arrive, directory)


def _carry() -> Callable[[], None]:
    _hook_forks()
    return _spawnhook.carry(RIDER, _rider)


def _after_fork_in_child() -> None:
    directory = _STATE["dir"]
    if directory is not None:
        install_here(directory)


def _hook_forks() -> None:
    if not _HOOKED:
        _forkhooks.add(after_in_child=_after_fork_in_child)  # cannot be undone
        _HOOKED.append(True)


def activate() -> Callable[[], None]:
    """In the test process: make the run's directory and give every child started from
    now on the handler; returns the undo, which removes the directory."""
    import shutil  # the test process's side only: children need neither
    import tempfile

    previous = _STATE["dir"]
    directory = tempfile.mkdtemp(prefix="pytest-procsafe-stacks-")
    _STATE["dir"] = directory
    uncarry = _carry()

    def undo() -> None:
        uncarry()
        if _STATE["dir"] == directory:
            _STATE["dir"] = previous  # a nested run hands the outer one back
        shutil.rmtree(directory, ignore_errors=True)

    return undo
