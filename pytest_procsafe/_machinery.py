"""multiprocessing's machinery and its relatives': helper processes that are never leaks.

The forkservers and resource (or semaphore) trackers of ``multiprocessing``, ``multiprocess``
(dill's fork, used by mpire and pathos), ``billiard`` and loky start once and serve the
whole run: killing one breaks every later user ("resource_tracker: process died
unexpectedly, relaunching"). They are known by the pid their module keeps and by their
command line. `detach` keeps multiprocessing's exit handler from waiting for a child
procsafe leaves running. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import multiprocessing
import re
import sys
from collections.abc import Iterable
from typing import Final

from pytest_procsafe import _proctable
from pytest_procsafe._proctable import Proc

# The helper processes of multiprocessing and its relatives (multiprocess, billiard, loky,
# and copies vendored inside other packages, such as joblib's joblib.externals.loky):
# forkservers, resource and semaphore trackers. Never leaks, however they were started.
_MACHINERY: Final = re.compile(
    r"from (?:[\w.]+\.)?(?:multiprocessing|multiprocess|billiard|loky\.backend)\."
    r"(?:forkserver|resource_tracker|semaphore_tracker) import main"
)
# Where each kind of helper's module keeps the pid of the one it started.
_HOLDERS: Final = {
    "forkserver": ("_forkserver", "_forkserver_pid"),
    "resource_tracker": ("_resource_tracker", "_pid"),
    "semaphore_tracker": ("_semaphore_tracker", "_pid"),
}
_FAMILY: Final = ("multiprocessing", "multiprocess", "billiard", "loky")


def pids() -> set[int]:
    """The forkservers and trackers this process started, if any (modules not imported
    started none), of every copy of multiprocessing's family that is imported."""
    found: set[int] = set()
    for name, module in list(sys.modules.items()):
        package, _, leaf = name.rpartition(".")
        where = _HOLDERS.get(leaf)
        if where is None or not any(part in _FAMILY for part in package.split(".")):
            continue
        pid = getattr(getattr(module, where[0], None), where[1], None)
        if isinstance(pid, int):
            found.add(pid)
    return found


def is_machinery(proc: Proc, pids: set[int], root: int) -> bool:
    if proc.pid in pids:
        return True
    match = _MACHINERY.search(" ".join(_proctable.cmdline(proc.pid)))
    if match is None:
        return False
    if "tracker" in match.group(0):
        return True  # a tracker is never forked off anything: whoever started it, it is one
    # Forks of a forkserver worker carry the server's command line; once re-parented to
    # the test process they are orphans, not the server (ours is in *pids*).
    if proc.ppid == root:
        return False
    # A forkserver's children are forks of it, with its command line: they are workers.
    return not _MACHINERY.search(" ".join(_proctable.cmdline(proc.ppid)))


def detach(procs: Iterable[Proc]) -> None:
    """Keep multiprocessing's exit handler from joining kept children: it joins with no
    timeout, so a kept child still running would hang the interpreter's exit."""
    pids = {proc.pid for proc in procs}
    children = getattr(sys.modules["multiprocessing.process"], "_children", None)
    for process in multiprocessing.active_children():
        if process.pid in pids and isinstance(children, set):
            children.discard(process)
