"""The guardian: a small separate process that stops what a run left when pytest dies.

When pytest ends without procsafe's cleanup (SIGKILL, ``os._exit`` as pytest-timeout's
thread method does, a segfault, the OOM killer), nothing in the test process can act. The
guardian, started once per pytest process that runs leak checks (just before its first
child: before that there is nothing to stop), then stops every process
of the run still running: children before parents, SIGTERM, SIGKILL after the kill grace,
each signalled only while its pid still names the process seen (same start time). Before
that it writes to pytest's stderr which processes it stops. Under ``cleanup=keep`` it stops
only procsafe's own processes (workers, managers) and lists the others as left running.

Which processes are the run's (chosen so that nothing else is ever signalled):

* those whose environment holds `VARIABLE` with this run's token: the test process sets it
  in ``os.environ`` when the guardian starts, so every process started afterwards inherits
  it, however it was started and wherever it was re-parented;
* those the test process told the guardian about, by pid and start time: every new
  descendant the leak checks observe (after each test phase) is announced over a pipe, so
  processes started with a replaced environment (``env={...}``) are known too;
* the descendants, as they are now, of either kind.

Why not the process tree alone: once pytest is gone, its children are re-parented to
pytest's nearest subreaper ancestor or to init, and the kernel keeps no record of where
they came from. The guardian is no subreaper either: started in a shell's background, it
is nobody's child in the run (pytest's nearest subreaper or init adopts it), not an
ancestor of the run's processes, so nothing is ever re-parented to it. The token and the
announced pids and start times are what still find the run's processes, wherever they
went. Announcements travel over the same pipe that tells of pytest's end rather than
through a file: nothing is left on disk, and the guardian holds the list in memory.
(``/proc/<pid>/environ`` shows the environment a process was exec'd with: forked
children show pytest's own, without the token, which is why forks are announced.)

Not found: a process pytest itself started with a replaced environment in the very test
phase in which pytest died (the leak checks had not observed it yet), once it was
re-parented. The kernel keeps no record of its former parent, and finding it otherwise
would mean watching the process table all the time, which the guardian does not do.

How it learns that pytest is gone: it blocks on the announcement pipe (and, on Linux, on a
pidfd of the test process), so an idle guardian costs no CPU and a test costs nothing. The
test process's normal cleanup writes ``done`` and the guardian exits; end of file without
``done``, or the pidfd becoming readable, means pytest ended without it. Forked children
close their copy of the pipe's write end (an at-fork hook), so they never hide that end.

The guardian starts in a session of its own with SIGINT, SIGTERM and SIGHUP blocked: a
Ctrl-C, a terminal hang-up or a CI job's SIGTERM to pytest's process group ends pytest and
leaves the guardian to finish the job. It is registered in `_owned`, so the leak checks
never report it; the guardian of a pytest run inside this one, which this subreaper
adopts, is nobody's here (`_tracker`): never reported or swept, reaped once it exits. This module is the guardian process; `_guardlink` is the test process's
side (starting it, announcing, ``done``). It imports the process table and the one
escalation routine only, and runs with ``-I -S`` on Linux: it starts in milliseconds and
costs the test process one short-lived ``sh`` (a few milliseconds).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Mapping
from typing import Final
from typing import final

from pytest_procsafe import _escalate
from pytest_procsafe import _proctable
from pytest_procsafe import _stacks
from pytest_procsafe._guardwire import MARK as MARK
from pytest_procsafe._guardwire import SHIELD as SHIELD
from pytest_procsafe._guardwire import VARIABLE as VARIABLE
from pytest_procsafe._proctable import Proc

_TRACKER: Final = "multiprocessing.resource_tracker import main"


@final
class Run:
    """What the guardian knows of its run: the test process, the token, the announced."""

    def __init__(self, parent: Proc, token: str) -> None:
        self.parent: Final = parent
        self.needle: Final = f"\0{VARIABLE}={token}\0".encode()
        #: pid -> (start time, procsafe's own), as announced.
        self.known: dict[int, tuple[float, bool]] = {}
        self.done = False
        self._partial = b""

    def feed(self, data: bytes) -> None:
        """Take in what the test process wrote: announcements and ``done``."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            fields = line.split()
            if fields == [b"done"]:
                self.done = True
            elif len(fields) == 4 and fields[0] == b"+":
                with contextlib.suppress(ValueError):
                    self.known[int(fields[1])] = (_start(fields[2]), fields[3] == b"o")

    def marked(self, pid: int) -> bool:
        """Whether *pid*'s environment carries this run's token."""
        return self.needle in _environ(pid)

    def members(
        self,
        table: Mapping[int, Proc],
        *,
        marked: Callable[[int], bool] | None = None,
        skip: Collection[int] = (),
    ) -> dict[int, bool]:
        """The run's processes still running in *table*: ``{pid: procsafe's own}``.

        Announced ones (same start time), marked ones started after the test process, and
        the descendants of both; never the test process, anything in *skip*, a guardian,
        or a zombie (it has exited already).
        """
        marked = marked or self.marked
        found: dict[int, bool] = {}
        for pid, proc in table.items():
            announced = self.known.get(pid)
            if announced is not None and announced[0] == proc.start:
                found[pid] = announced[1]
            elif proc.start >= self.parent.start and pid != self.parent.pid and marked(pid):
                found[pid] = False
        children: dict[int, list[int]] = {}
        for pid, proc in table.items():
            children.setdefault(proc.ppid, []).append(pid)
        todo = list(found)
        while todo:
            for child in children.get(todo.pop(), ()):
                if child not in found:
                    found[child] = False
                    todo.append(child)
        return {
            pid: own
            for pid, own in found.items()
            if pid != self.parent.pid
            and pid not in skip
            and not table[pid].zombie
            and MARK not in " ".join(_proctable.cmdline(pid))
        }


def main(argv: list[str]) -> int:
    """The guardian process: wait for the test process to end, then act (see the module
    docstring). *argv*: reader fd, pidfd (-1: none), pid and start of the test process,
    token, kill grace, ``keep`` or ``stop``."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SHIELD)
    reader, pidfd, pid = int(argv[0]), int(argv[1]), int(argv[2])
    run = Run(Proc(pid, 0, _start(argv[3]), False), argv[4])
    grace, keep = float(argv[5]), argv[6] == "keep"
    stacks = argv[7] if len(argv) > 7 and argv[7] else None
    watch(run, reader, pidfd)
    if run.done:
        return 0
    try:
        act(
            run,
            grace=grace,
            keep=keep,
            cleanup_failed=not _ended(run.parent, pidfd),
            stacks=stacks,
        )
    except Exception as exc:  # say it in a line: pytest's stderr is the user's terminal
        _say(f"procsafe: the guardian of pytest (pid {pid}) failed: {exc!r}")
        return 1
    finally:
        if stacks is not None:  # pytest could not remove it: its cleanup never ran
            import shutil

            shutil.rmtree(stacks, ignore_errors=True)
    return 0


def _ended(parent: Proc, pidfd: int, within: float = 0.2) -> bool:
    """Whether the test process has exited, waiting up to *within*: its end of the pipe
    closes a moment before it is a zombie. Still running after that: the pipe was closed
    without ``done`` because procsafe's cleanup did not finish."""
    deadline = time.monotonic() + within
    while True:
        if pidfd >= 0:
            if select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return True
        else:
            current = _proctable.same(parent)
            if current is None or current.zombie:
                return True
            time.sleep(0.01)
        if time.monotonic() >= deadline:
            return False


def watch(run: Run, reader: int, pidfd: int) -> None:
    """Block until the test process says ``done`` or is gone (no timeout: no CPU)."""
    poller = select.poll()
    poller.register(reader, select.POLLIN)
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    while not run.done:
        events = poller.poll()
        if any(fd == pidfd for fd, _ in events):
            break
        data = os.read(reader, 65536)
        if not data:
            return
        run.feed(data)
    # Gone: take in what it wrote last (a forked child may hold the pipe open: no EOF).
    os.set_blocking(reader, False)
    with contextlib.suppress(OSError):
        while data := os.read(reader, 65536):
            run.feed(data)


def act(
    run: Run,
    *,
    grace: float,
    keep: bool,
    cleanup_failed: bool = False,
    stacks: str | None = None,
) -> list[Proc]:
    """Stop what is left of the run (only procsafe's own under *keep*), after saying on
    stderr what each was doing (its stack, from the run's directory *stacks*, where it
    has procsafe's handler); return the processes it had to kill after the grace."""
    table = _table()
    found = run.members(table, skip={os.getpid(), os.getppid()})
    if not found:
        return []
    targets = [table[pid] for pid in found if found[pid] or not keep]
    kept = [table[pid] for pid in found if not found[pid] and keep]
    why = (
        f"procsafe's cleanup in pytest (pid {run.parent.pid}) did not finish"
        if cleanup_failed
        else f"pytest (pid {run.parent.pid}) ended without procsafe's cleanup (it was "
        "killed, called os._exit() or crashed)"
    )
    dumps: dict[int, str] = {}
    if stacks is not None and targets:
        dumps = _stacks.capture(
            {proc.pid: os.path.join(stacks, f"{proc.pid}.txt") for proc in targets},
            send=lambda pid, signum: _escalate.signal_same(table[pid], signum, _running),
        )
    lines = []
    if targets:
        lines.append(f"procsafe: {why}; stopping {_count(targets)} of its run:")
        lines.extend(_describe(targets, dumps))
    if kept:
        what = "left running under --procsafe-cleanup=keep"
        lines.append(f"procsafe: {why}; {_count(kept)} of its run {what}:")
        lines.extend(_describe(kept))
    _say("\n".join(lines))
    ordered = sorted(
        _escalate.depth_order(targets),
        key=lambda proc: _TRACKER in " ".join(_proctable.cmdline(proc.pid)),
    )  # the resource tracker last: it cleans up what the others leave once they are gone
    killed = _escalate.escalate(
        ordered,
        grace,
        send=lambda proc, signum: _escalate.signal_same(proc, signum, _running),
        exited=lambda proc: not _alive(proc),
        wait=_wait_gone,
    )
    if killed:
        _say(
            f"procsafe: {_count(killed)} did not exit within the {grace:g}s grace after "
            f"SIGTERM and were killed: {', '.join(str(proc.pid) for proc in killed)}"
        )
    return killed


def _start(text: str | bytes) -> float:
    """A start time as the process table has it: clock ticks (an int) on Linux."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _running(proc: Proc) -> bool:
    return not proc.zombie


def _alive(proc: Proc) -> bool:
    current = _proctable.same(proc)
    return current is not None and not current.zombie


def _wait_gone(procs: Collection[Proc], timeout: float) -> None:
    """Wait until none of *procs* runs (their parents, not the guardian, reap them)."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while any(_alive(proc) for proc in procs) and time.monotonic() < deadline:
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.05)


def _count(procs: Collection[Proc]) -> str:
    return f"{len(procs)} process{'es' if len(procs) != 1 else ''}"


def _describe(procs: Collection[Proc], dumps: Mapping[int, str] | None = None) -> list[str]:
    out = []
    for proc in sorted(procs, key=lambda proc: proc.pid):
        command = " ".join(_proctable.cmdline(proc.pid)) or "?"
        if len(command) > 200:
            command = command[:197] + "..."
        out.append(f"  pid {proc.pid}: {command}")
        dump = (dumps or {}).get(proc.pid)
        if dump:
            out.extend("      " + line for line in _stacks.trim(dump).splitlines())
    return out


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # pytest's stderr may be gone with it
        os.write(2, (text + "\n").encode(errors="replace"))


def _table() -> dict[int, Proc]:
    """Every process on the machine that can be read: ``{pid: Proc}``."""
    if _proctable.LINUX:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    else:
        pids = list(_proctable._psutil().pids())
    table = {}
    for pid in pids:
        proc = _proctable.stat(pid)
        if proc is not None:
            table[pid] = proc
    return table


def _environ(pid: int) -> bytes:
    """The environment *pid* was started with, NUL-separated entries framed by NULs."""
    if _proctable.LINUX:
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                return b"\0" + file.read()
        except OSError:
            return b""
    psutil = _proctable._psutil()
    try:
        environ = psutil.Process(pid).environ()
    except Exception:  # gone, or not ours to read
        return b""
    return b"\0" + b"\0".join(f"{k}={v}".encode() for k, v in environ.items()) + b"\0"
