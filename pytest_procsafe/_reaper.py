"""Acting on descendants: verified signals, reaping by pid, stopping whole trees.

Only verified descendants are signalled: the pid must still belong to the process seen
(same start time) and still descend from the test process. Reaping is by specific pid
only, after multiprocessing and subprocess had the chance to reap their own children
through their objects: ``waitpid(-1)`` (or ``os.wait()``) would steal their exit
statuses.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Final
from typing import Literal

from pytest_procsafe import _dumps
from pytest_procsafe import _escalate
from pytest_procsafe import _holders
from pytest_procsafe import _seconds
from pytest_procsafe import _stacks
from pytest_procsafe._escalate import depth_order
from pytest_procsafe._proctable import LINUX
from pytest_procsafe._proctable import Proc
from pytest_procsafe._proctable import cmdline as _proctable_cmdline
from pytest_procsafe._proctable import descends
from pytest_procsafe._proctable import same

# --- Python-level owners of direct children -----------------------------------------------


def python_children(*, deep: bool = False) -> dict[int, object]:
    """Direct children this interpreter has objects for: ``{pid: Process or Popen}``.

    Calls `multiprocessing.active_children`, which reaps multiprocessing's finished
    children first. With *deep*, live ``subprocess.Popen`` objects are found by a scan
    of the garbage collector's objects (slow; only used when there is a candidate leak).
    """
    found: dict[int, object] = {}
    for process in multiprocessing.active_children():
        if process.pid is not None:
            found[process.pid] = process
    # Popen objects dropped while their process ran wait here to be reaped (CPython).
    for popen in list(getattr(subprocess, "_active", None) or ()):
        if isinstance(popen, subprocess.Popen) and popen.returncode is None:
            found.setdefault(popen.pid, popen)
    if deep:
        for pid, obj in _holders.objects().processes.items():
            found.setdefault(pid, obj)
    return found


# --- signalling, reaping, stopping --------------------------------------------------------


def send(proc: Proc, signum: int, root: int) -> bool:
    """Send *signum* to *proc* if it is the same process and still a descendant of *root*."""
    return _escalate.signal_same(
        proc, signum, lambda current: not current.zombie and descends(current, root)
    )


def reap(procs: Iterable[Proc], root: int, handles: Mapping[int, object] | None = None) -> None:
    """Reap the zombies among *procs* that are our direct children, by pid.

    multiprocessing's and subprocess's own children are reaped through their objects
    (*handles* may add Popen objects found by a deep scan), so their exit statuses stay
    right; only the others are ``waitpid``-ed, one pid at a time.
    """
    if os.getpid() != root:
        return
    owners = python_children()
    if handles:
        owners.update(handles)
    for proc in procs:
        current = same(proc)
        if current is None or not current.zombie or current.ppid != root:
            continue
        handle = owners.get(proc.pid)
        if _holders.is_popen(handle):
            handle.poll()  # type: ignore[attr-defined]
        elif handle is not None:
            # A process object of multiprocessing or a relative (loky, multiprocess):
            # its own popen reaps it and keeps its exit code right.
            poll = getattr(getattr(handle, "_popen", None), "poll", None)
            if callable(poll):
                with contextlib.suppress(Exception):
                    poll()
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, os.WNOHANG)


def dump_stacks(procs: Iterable[Proc], root: int) -> dict[int, str]:
    """The Python stacks (all threads) of those of *procs* that can dump one: each is
    asked by a verified signal (`_dumps`' handler); pid -> the dump."""
    by_pid = {proc.pid: proc for proc in procs if not proc.zombie}
    files = {pid: path for pid in by_pid if (path := _dumps.file_for(pid)) is not None}
    if not files:
        return {}
    dumps = _stacks.capture(files, send=lambda pid, signum: send(by_pid[pid], signum, root))
    # Python processes without the handler (not multiprocessing's): other ways, bounded.
    others = [pid for pid in files if pid not in dumps and _looks_like_python(pid)]
    for pid in others[:_OTHER_WAYS]:
        if same(by_pid[pid]) is not None:  # still the process seen, still here
            text = _stacks.other_ways(pid, files[pid])
            if text is not None:
                dumps[pid] = text
    return dumps


#: At most this many processes are asked for a stack the slow ways (py-spy, remote_exec).
_OTHER_WAYS: Final = 5


def _looks_like_python(pid: int) -> bool:
    args = _proctable_cmdline(pid)
    return bool(args) and os.path.basename(args[0]).startswith(("python", "pypy"))


def running(procs: Iterable[Proc]) -> list[Proc]:
    """Those of *procs* that still exist and have not exited."""
    out = []
    for proc in procs:
        current = same(proc)
        if current is not None and not current.zombie:
            out.append(current)
    return out


def remaining(procs: Iterable[Proc]) -> list[Proc]:
    """Those of *procs* that still exist, zombies included."""
    return [current for current in map(same, procs) if current is not None]


def wait_gone(
    procs: Sequence[Proc],
    timeout: float,
    root: int,
    handles: Mapping[int, object] | None = None,
) -> list[Proc]:
    """Reap and wait until none of *procs* is left or *timeout* passes; return the rest."""
    left = list(procs)
    for _ in _seconds.backoff(timeout):
        reap(procs, root, handles)
        left = remaining(procs)
        if not left:
            break
    return left


def dies_on_sigterm(pid: int) -> bool:
    """Whether SIGTERM's default action would end *pid* now: not ignored, caught or
    blocked (Linux: ``/proc/<pid>/status``; elsewhere unknown, so False)."""
    if not LINUX:
        return False
    try:
        with open(f"/proc/{pid}/status", "rb") as file:
            lines = file.read().splitlines()
    except OSError:
        return True  # gone already
    bit = 1 << (signal.SIGTERM - 1)
    masks = [
        line.split()[1] for line in lines if line.startswith((b"SigBlk", b"SigIgn", b"SigCgt"))
    ]
    return len(masks) == 3 and not any(int(mask, 16) & bit for mask in masks)


def _end_pools(pids: Collection[int], pools: Sequence[object]) -> None:
    """Terminate the live pools with a worker among *pids*.

    A pool's handler thread respawns workers that die, so killing them is not enough;
    and killing them first would be worse: an idle worker holds the task queue's lock
    while it waits, so ``terminate()`` after a SIGKILL can deadlock. ``terminate()``
    joins workers it sent SIGTERM with no timeout, so a pool is only terminated when
    every worker would die of it; the others are left to the escalation.
    """
    for pool in pools:
        workers = [getattr(w, "pid", None) for w in getattr(pool, "_pool", None) or ()]
        if any(pid in pids for pid in workers) and all(
            isinstance(pid, int) and dies_on_sigterm(pid) for pid in workers
        ):
            pool.terminate()  # type: ignore[attr-defined]


def stop(
    procs: Sequence[Proc], grace: float, root: int, *, pools: bool = True
) -> dict[int, Literal["killed", "reaped"]]:
    """Stop a set of processes (whole trees): children before parents, SIGTERM, SIGKILL
    after *grace*, then reap. Returns ``{pid: "killed" | "reaped"}``.

    Only verified descendants of *root* are signalled. With *pools*, the multiprocessing
    pools among them are terminated first (not from a signal handler: that joins threads).
    """
    ordered = depth_order(procs)
    pids = {proc.pid for proc in ordered}
    alive = {proc.pid for proc in running(ordered)}
    handles: dict[int, object] = {}
    if pools:
        found = _holders.objects()
        _end_pools(pids, found.pools)
        handles = {
            pid: handle
            for pid, handle in found.processes.items()
            if pid in pids and _holders.is_popen(handle)
        }
    # What was running counts as killed even when a pool's terminate() ended it.
    actions: dict[int, Literal["killed", "reaped"]] = {
        pid: "killed" if pid in alive else "reaped" for pid in pids
    }
    try:
        _escalate.escalate(
            ordered,
            grace,
            send=lambda proc, signum: send(proc, signum, root),
            exited=lambda proc: not running([proc]),
            # Wait for the whole set: a zombie grandchild is reaped once its parent died.
            wait=lambda _, timeout: wait_gone(ordered, timeout, root, handles),
        )
    finally:
        wait_gone(ordered, 0.0, root, handles)  # one last reap of those that had exited
    return actions
