"""Descendants of this process: Linux procfs fast path, psutil elsewhere; subreaper; stop.

The per-test leak check runs several times per test, so the common case (no children at
all) must cost a few microseconds: on Linux the children of the test process are read
with one ``pread`` of an already open ``/proc/<pid>/task/<tid>/children`` file per thread
(a full ``/proc`` scan or psutil costs about 1 ms). Deeper levels, start times and command
lines are read only for processes that exist. Without children files (a kernel built
without ``CONFIG_PROC_CHILDREN``) a full ``/proc`` scan is the fallback; elsewhere psutil.

Processes are identified by pid *and* start time (`same`), so a reused pid is never
taken for the process it once was. Acting on them is `_reaper`'s job (and the guardian's,
once pytest is gone), through `_escalate`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Collection
from typing import Any
from typing import Final
from typing import NamedTuple
from typing import final

from pytest_procsafe import _forkhooks

LINUX: Final = sys.platform.startswith("linux")

_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_GET_CHILD_SUBREAPER: Final = 37

# waitid with WNOWAIT, to tell "no child at all" with one light syscall (Linux, macOS).
_WAITID: Final = all(
    hasattr(os, name) for name in ("waitid", "P_ALL", "WEXITED", "WNOHANG", "WNOWAIT")
)

#: This process's pid, kept current in forked children by an at-fork hook: the per-test
#: path reads it instead of calling ``os.getpid()`` (a system call) each time.
SELF: Final = [os.getpid()]


def _after_fork_in_child() -> None:
    SELF[0] = os.getpid()


_forkhooks.add(after_in_child=_after_fork_in_child)

#: The last pid handed out in this pid namespace (Linux 3.3+, ``CONFIG_CHECKPOINT_RESTORE``).
LAST_PID: Final = "/proc/sys/kernel/ns_last_pid"

#: At most this many descendants keep their procfs files open between scans (two fds
#: each): beyond that, scans read by path, so procsafe never eats much of a test's fds.
CACHED: Final = 64


class Proc(NamedTuple):
    """One process as the table saw it; (pid, start) identifies it across pid reuse."""

    pid: int
    ppid: int
    #: Opaque start time: clock ticks since boot on Linux, psutil's create_time elsewhere.
    start: float
    zombie: bool


# --- reading one process ------------------------------------------------------------------


def stat(pid: int) -> Proc | None:
    """The process *pid* now, or None when there is none."""
    if LINUX:
        data = _read(f"/proc/{pid}/stat")
        if not data:
            return None
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = data[data.rindex(b")") + 2 :].split(b" ", 20)
        state = fields[0]
        if state in (b"X", b"x"):  # dead, being removed: as good as gone
            return None
        return Proc(pid, int(fields[1]), int(fields[19]), state == b"Z")
    psutil = _psutil()
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return Proc(
                pid,
                process.ppid(),
                process.create_time(),
                process.status() == psutil.STATUS_ZOMBIE,
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def cmdline(pid: int) -> tuple[str, ...]:
    """The command line of *pid*; ``("[name]",)`` when it has none (zombies, kernel)."""
    if LINUX:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                raw = file.read()
            if raw:
                return tuple(os.fsdecode(part) for part in raw.rstrip(b"\0").split(b"\0"))
            with open(f"/proc/{pid}/comm", "rb") as file:
                return (f"[{os.fsdecode(file.read().strip())}]",)
        except OSError:
            return ()
    psutil = _psutil()
    try:
        process = psutil.Process(pid)
        try:
            return tuple(process.cmdline()) or (f"[{process.name()}]",)
        except (psutil.ZombieProcess, psutil.AccessDenied):
            return (f"[{process.name()}]",)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ()


def activity(pid: int, *, skip: int | None = None) -> tuple[object, ...] | None:
    """A fingerprint of what *pid*'s sleeping threads have done (Linux): it changes
    whenever one of them ran, starts or ends (``/proc/PID/task/TID/schedstat``: time on a
    CPU, time waiting for one, times run). None when a thread is busy right now (running
    or waiting for a CPU, ``R``; in an uninterruptible wait, ``D``) or it cannot tell: not
    Linux, no schedstat, the process gone. The thread *skip* (a native thread id: the
    caller's own) is left out."""
    if not LINUX:
        return None
    try:
        tids = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return None
    marks: list[object] = []
    for tid in tids:
        if tid == skip:
            continue
        base = f"/proc/{pid}/task/{tid}/"
        data = _read(base + "stat")
        if not data:
            continue  # the thread just ended: the list of tids shows the change
        close = data.rindex(b")")
        if data[close + 2 : close + 3] in (b"R", b"D"):
            return None
        times = _read(base + "schedstat")
        if not times:
            return None
        marks.append((tid, times))
    return tuple(marks)


def descends(proc: Proc, root: int) -> bool:
    """Whether *proc* is, right now, a descendant of *root* (walks the ppid chain)."""
    seen = 0
    current: Proc | None = proc
    while current is not None and seen < 256:
        if current.ppid == root:
            return True
        if current.ppid <= 1:
            return False
        current = stat(current.ppid)
        seen += 1
    return False


def same(proc: Proc) -> Proc | None:
    """*proc* now, if its pid still belongs to the same process (start time matches)."""
    current = stat(proc.pid)
    return current if current is not None and current.start == proc.start else None


# --- the table ----------------------------------------------------------------------------


@final
class ProcTable:
    """The descendants of *root* (default: this process), read as cheaply as possible."""

    def __init__(self, root: int | None = None) -> None:
        self.root: Final = os.getpid() if root is None else root
        self.fast: Final = LINUX and os.path.exists(f"/proc/{self.root}/task/{self.root}/children")
        # tid -> open fd of its children file; reading an open seq file at offset 0 with
        # pread regenerates it, which is what makes the clean case cost one syscall.
        self._fds: dict[int, int] = {}
        self._tasks = -1  # open fd of /proc/<root>/task: its link count counts threads
        # The same for up to CACHED descendants: pid -> (task directory fd, children fd).
        self._below: dict[int, tuple[int, int]] = {}
        self._last_pid = -1 if LINUX else -2  # open fd of LAST_PID; -2: none to be had

    def close(self) -> None:
        for fd in [*self._fds.values(), self._tasks, self._last_pid]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds.clear()
        self._tasks = -1
        self._last_pid = -1 if LINUX else -2
        self._drop(list(self._below))

    def last_pid(self) -> bytes | None:
        """The pid this pid namespace handed out last (Linux: one ``pread``), None where it
        cannot be read. Every process and thread born anywhere in the namespace moves it;
        unmoved, no descendant can be new."""
        fd = self._last_pid
        if fd == -2:
            return None
        try:
            if fd < 0:
                fd = self._last_pid = os.open(LAST_PID, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(fd, 32, 0)
        except OSError:
            self.close_last_pid()
            return None

    def close_last_pid(self) -> None:
        if self._last_pid >= 0:
            with contextlib.suppress(OSError):
                os.close(self._last_pid)
        self._last_pid = -2

    def _drop(self, pids: Collection[int]) -> None:
        for pid in pids:
            for fd in self._below.pop(pid, ()):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def quiet(self) -> bool:
        """True when the root has no child at all: one ``waitid`` syscall.

        ``WNOWAIT`` only peeks (nothing is reaped, no exit status is taken from anyone);
        ``ECHILD`` means no thread of this process has a child, living or zombie, so
        there are no descendants either (orphans are re-parented to us as children).
        """
        if not _WAITID or self.root != SELF[0]:
            return False
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        except OSError:
            return False
        return False

    def tree(self, prune: Collection[int] = ()) -> dict[int, int]:
        """``{pid: ppid}`` for every descendant; the subtrees under *prune* are not walked."""
        if not LINUX:
            return self._tree_psutil(prune)
        if not self.fast:
            return self._tree_scan(prune)
        first = self._root_children()
        found: dict[int, int] = {}
        todo = [(pid, self.root) for pid in first]
        while todo:
            pid, ppid = todo.pop()
            if pid in found:
                continue
            found[pid] = ppid
            if pid not in prune:
                todo.extend((child, pid) for child in self._children_below(pid))
        if len(self._below) > len(found) or any(pid not in found for pid in self._below):
            self._drop([pid for pid in self._below if pid not in found])
        return found

    def _children_below(self, pid: int) -> list[int]:
        """Children of the descendant *pid*: a scan with 50 live children must stay under
        a millisecond, so a single-threaded one costs an fstat and a pread of open files
        (several times cheaper than walking procfs paths)."""
        if self.root != os.getpid():
            return children(pid)
        fds = self._below.get(pid)
        if fds is None:
            if len(self._below) >= CACHED:
                return children(pid)
            try:
                task = os.open(f"/proc/{pid}/task", os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return []
            try:
                fds = (task, os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY))
            except OSError:
                os.close(task)
                return []
            self._below[pid] = fds
        try:
            # 2 + the number of tasks; 2 once the process is reaped, when its pid may
            # already name another process: then (or when threaded) read by path.
            if os.fstat(fds[0]).st_nlink == 3:
                data = os.pread(fds[1], 65536, 0)
                if len(data) < 65536:
                    return [int(child) for child in data.split()]
        except OSError:
            pass
        self._drop([pid])
        return children(pid)

    def _root_children(self) -> list[int]:
        if self.root != os.getpid():  # a forked child running this code: no fd sharing
            return children(self.root)
        if self._tasks < 0:
            self._tasks = os.open(f"/proc/{self.root}/task", os.O_RDONLY | os.O_DIRECTORY)
        # Each thread holds the children it started until its OS thread is gone (a joined
        # Python thread may linger), so every task is read; the directory's link count
        # is 2 + the number of tasks, which makes a single-threaded process one pread.
        tids: Collection[int]
        if os.fstat(self._tasks).st_nlink <= 3:
            fd = self._fds.get(self.root)
            if fd is not None:
                try:
                    data = os.pread(fd, 65536, 0)
                except OSError:
                    data = b"x" * 65536  # read again below
                if len(data) < 65536:
                    return [int(pid) for pid in data.split()]
            tids = (self.root,)
        else:
            tids = [int(tid) for tid in os.listdir(self._tasks)]
        if len(self._fds) > len(tids):
            for tid in [tid for tid in self._fds if tid not in tids]:
                with contextlib.suppress(OSError):
                    os.close(self._fds.pop(tid))
        out: list[int] = []
        for tid in tids:
            fd = self._fds.get(tid)
            try:
                data = os.pread(fd, 65536, 0) if fd is not None else self._reopen(tid)
            except OSError:
                data = self._reopen(tid)  # the thread ended, or its tid was reused
            if len(data) == 65536:
                data = self._reopen(tid)
            out.extend(int(pid) for pid in data.split())
        return out

    def _reopen(self, tid: int) -> bytes:
        old = self._fds.pop(tid, None)
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)
        path = f"/proc/{self.root}/task/{tid}/children"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return b""
        self._fds[tid] = fd
        data = os.pread(fd, 65536, 0)
        if len(data) == 65536:  # more children than one read holds: read them all
            with open(path, "rb") as file:
                data = file.read()
        return data

    def _tree_scan(self, prune: Collection[int]) -> dict[int, int]:
        parents: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                proc = stat(int(name))
                if proc is not None:
                    parents.setdefault(proc.ppid, []).append(proc.pid)
        return _walk(parents, self.root, prune)

    def _tree_psutil(self, prune: Collection[int]) -> dict[int, int]:
        psutil = _psutil()
        parents: dict[int, list[int]] = {}
        try:
            found = psutil.Process(self.root).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        for child in found:
            try:
                parents.setdefault(child.ppid(), []).append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return _walk(parents, self.root, prune)


def children(pid: int) -> list[int]:
    """Children of *pid* from every one of its tasks (Linux); [] when it is gone."""
    out: list[int] = []
    try:
        # The task directory's link count is 2 + the number of tasks: a single-threaded
        # process needs no listing (this runs for every descendant in every scan).
        tasks = os.stat(f"/proc/{pid}/task").st_nlink - 2
        tids: Collection[int | str] = (pid,) if tasks == 1 else os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        out.extend(int(child) for child in _read(f"/proc/{pid}/task/{tid}/children").split())
    return out


def _read(path: str) -> bytes:
    """The whole of a small procfs file, b"" when it cannot be read: os-level calls only,
    three syscalls where a Python file object makes about seven."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:  # more than one read holds (a long children list)
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    except OSError:
        return b""
    finally:
        os.close(fd)


def _walk(parents: dict[int, list[int]], root: int, prune: Collection[int]) -> dict[int, int]:
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for child in parents.get(parent, ()):
            if child not in found:
                found[child] = parent
                if child not in prune:
                    todo.append(child)
    return found


def _psutil() -> Any:
    # Imported lazily: psutil is a dependency only off Linux, and costs import time.
    import psutil

    return psutil


# --- subreaper ----------------------------------------------------------------------------


def set_subreaper(on: bool) -> bool | None:
    """Make this process a child subreaper (Linux); return the previous value, None if n/a.

    Orphaned grandchildren are then re-parented to us instead of init, so the leak checks
    can see, report and reap them.
    """
    if not LINUX:
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        previous = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(previous), 0, 0, 0) != 0:
            return None
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return bool(previous.value)
