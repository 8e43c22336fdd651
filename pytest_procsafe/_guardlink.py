"""The test process's side of the guardian (`_guardian`): start it, tell it, say "done".

`acquire` starts one guardian per process (a pytest run nested in a test, pytester's inline
mode, shares it) and sets `_guardian.VARIABLE` to the run's token in ``os.environ``. The
guardian is started through ``/bin/sh`` in the background, so it is not the test process's
child: the leak checks' one ``waitid`` per test phase then still finds no child at all in a
clean test (start it before the test process becomes a subreaper, or it comes back);
`Guardian.announce` tells it of a process of the run by pid and start time (never blocks);
`release` tells it ``done`` once procsafe's cleanup has finished, or closes the pipe without
it when the cleanup did not finish, so that the guardian stops what is left. Forked
children forget the guardian (an at-fork hook): their copy of the pipe must not hide the
test process's end. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any
from typing import Final
from typing import final

from pytest_procsafe import _dumps
from pytest_procsafe import _forkhooks
from pytest_procsafe import _proctable
from pytest_procsafe._guardwire import MARK
from pytest_procsafe._guardwire import SHIELD
from pytest_procsafe._guardwire import VARIABLE

_BOOT: Final = (
    # Appended: for an installed wheel it is site-packages, which must not shadow stdlib.
    f"import os, sys; sys.path.append(sys.argv[1]); from {MARK}; os._exit(main(sys.argv[2:]))"
)
#: How long the test process waits for a guardian told ``done`` to exit.
EXIT_WAIT: Final = 2.0
#: The shell that starts the guardian in the background; it prints the guardian's pid.
SHELL: Final = "/bin/sh"
_DETACH: Final = '"$@" >/dev/null & echo $!'
#: How long the shell may take to start the guardian and exit (it takes a millisecond).
SHELL_WAIT: Final = 10.0


@final
class Guardian:
    """The test process's end of a started guardian. Built by `spawn`.

    *child*: the guardian's `Popen` when it had to be this process's child (no shell);
    otherwise it is nobody's here, and its exit is awaited through a pidfd (Linux) or by
    polling its pid and start time.
    """

    def __init__(
        self,
        proc: _proctable.Proc,
        writer: int,
        token: str,
        child: subprocess.Popen[bytes] | None = None,
    ) -> None:
        self.pid: Final = proc.pid
        self.proc: Final = proc
        self.token: Final = token
        #: Whether the guardian is this process's child (then the leak checks exempt it).
        self.child: Final = child is not None
        self._popen = child
        self._writer = writer
        self._backlog = b""
        self._pidfd = -1  # to wait on at the end, pinning the process (Linux)
        if child is None and hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self._pidfd = os.pidfd_open(proc.pid)
            if self._pidfd >= 0 and _proctable.same(proc) is None:  # gone already
                self._pidfd = _close(self._pidfd)

    @property
    def connected(self) -> bool:
        """Whether announcements still reach the guardian."""
        return self._writer >= 0

    def announce(self, pid: int, start: float, *, own: bool) -> None:
        """Tell the guardian that *pid* (started at *start*) is the run's; *own*: procsafe's
        own (stopped even under ``cleanup=keep``). Never blocks: a full pipe keeps the rest
        for the next announcement."""
        if self._writer < 0:
            return
        self._backlog += f"+ {pid} {start!r} {'o' if own else 'd'}\n".encode()
        self._flush()

    def _flush(self) -> None:
        try:
            while self._backlog:
                self._backlog = self._backlog[os.write(self._writer, self._backlog) :]
        except BlockingIOError:
            pass
        except OSError:  # the guardian is gone: nobody to tell any more
            self._writer = _close(self._writer)

    def disconnect(self) -> None:
        """Drop the pipe without a word (a forked child's copy, or a guardian that died)."""
        self._writer = _close(self._writer)
        self._pidfd = _close(self._pidfd)

    def close(self, *, done: bool) -> None:
        """The run ends: with *done* (procsafe's cleanup ran) the guardian exits at once;
        without, it stops what is left of the run as if pytest had died. With *done*,
        waits (bounded) for it to exit, and kills it if it does not."""
        try:
            if self._writer >= 0:
                os.set_blocking(self._writer, True)
                self._flush()
                if done and self._writer >= 0:
                    with contextlib.suppress(OSError):
                        os.write(self._writer, b"done\n")
                self._writer = _close(self._writer)
            if done and not self.wait(EXIT_WAIT):
                self._kill()
            elif not done and self._popen is not None:
                self._popen.poll()  # reaped now if it is gone already; else by subprocess
        finally:
            self._pidfd = _close(self._pidfd)

    def wait(self, timeout: float) -> bool:
        """Wait up to *timeout* for the guardian to exit; True once it has."""
        if self._popen is not None:
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        if self._pidfd >= 0:
            with contextlib.suppress(InterruptedError):
                select.select([self._pidfd], [], [], timeout)  # readable once it has exited
            return self.exited()
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def exited(self) -> bool:
        """Whether the guardian has exited (a zombie has: its parent reaps it)."""
        if self._popen is not None:
            return self._popen.poll() is not None
        current = _proctable.same(self.proc)
        return current is None or current.zombie

    def _kill(self) -> None:
        from pytest_procsafe import _escalate  # a guardian that did not exit: rare

        if self._popen is not None:
            self._popen.kill()
            self._popen.wait(_escalate.KILL_WAIT)
            return
        _escalate.signal_same(self.proc, _escalate.SIGKILL, lambda current: not current.zombie)
        self.wait(_escalate.KILL_WAIT)


def _close(fd: int) -> int:
    """Close *fd* if it is open; -1, for the attribute that held it."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    return -1


def spawn(
    *,
    grace: float,
    keep: bool,
    token: str | None = None,
    stacks: str | None = None,
    stderr: int | None = None,
) -> Guardian | None:
    """Start a guardian for this process; None where that cannot be done (no pipes and
    fork-free spawning, a failing interpreter start). Sets `VARIABLE` to the run's token
    in ``os.environ`` (the caller undoes it). *stderr*: the file descriptor it writes to
    (what it stops and why); by default this process's own fd 2."""
    if os.name != "posix" or not sys.executable:  # embedded interpreters may have none
        return None
    me = _proctable.stat(os.getpid())
    if me is None:
        return None
    token = token or f"{os.getpid()}-{os.urandom(8).hex()}"
    os.environ[VARIABLE] = token
    reader, writer = os.pipe()
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(os.getpid())
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["-I", "-S"] if _proctable.LINUX else ["-I"]  # psutil elsewhere: site-packages
    argv = [
        sys.executable,
        *flags,
        "-c",
        _BOOT,
        package_parent,
        str(reader),
        str(pidfd),
        str(me.pid),
        repr(me.start),
        token,
        repr(grace),
        "keep" if keep else "stop",
        stacks or "",  # where the run's children write their stacks (`_dumps`)
    ]
    # Blocked here, blocked in the child from its first instruction on (signal masks
    # survive exec): a Ctrl-C now is delivered to pytest once unblocked, never lost.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELD)
    try:
        fds = [fd for fd in (reader, pidfd) if fd >= 0]
        guardian = _start(argv, fds, writer, token, stderr)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(reader)
        if pidfd >= 0:
            os.close(pidfd)
    if guardian is None:
        os.close(writer)
        return None
    os.set_blocking(writer, False)
    return guardian


def _start(
    argv: list[str], fds: list[int], writer: int, token: str, stderr: int | None
) -> Guardian | None:
    """Start the guardian in the background of a shell that exits at once (so that it is
    nobody's child here); as a child only where there is no shell."""
    options: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stderr": stderr,
        "pass_fds": fds,
        "cwd": "/",
        "start_new_session": True,
    }
    if os.path.exists(SHELL):
        proc = _detached(argv, options)
        return None if proc is None else Guardian(proc, writer, token)
    try:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **options)
    except OSError:
        return None
    proc = _proctable.stat(child.pid)
    if proc is None:  # it died at once
        child.wait()
        return None
    return Guardian(proc, writer, token, child)


def _detached(argv: list[str], options: dict[str, Any]) -> _proctable.Proc | None:
    """Run *argv* in the background of ``sh``, which prints its pid and exits: the process
    is then re-parented to the nearest subreaper or init. None if it did not start."""
    try:
        shell = subprocess.Popen(
            [SHELL, "-c", _DETACH, "sh", *argv], stdout=subprocess.PIPE, **options
        )
    except OSError:
        return None
    try:
        out, _ = shell.communicate(timeout=SHELL_WAIT)
    except subprocess.TimeoutExpired:
        from pytest_procsafe import _escalate

        shell.kill()
        shell.wait(_escalate.KILL_WAIT)
        return None
    try:
        pid = int(out)
    except ValueError:
        return None
    return _proctable.stat(pid)


# One guardian per process: a pytest run nested in a test (pytester's inline mode) shares
# the one its process already has. Forked children forget it (see the module docstring).
_SHARED: dict[str, object] = {"guardian": None, "users": 0, "environ": None, "hooked": False}


def _forget_in_child() -> None:
    guardian = _SHARED["guardian"]
    if isinstance(guardian, Guardian):
        guardian.disconnect()
    _SHARED.update(guardian=None, users=0, environ=None)


def hook_forks() -> None:
    """Have forked children forget this process's guardian (once per process)."""
    if not _SHARED["hooked"]:
        _forkhooks.add(after_in_child=_forget_in_child)
        _SHARED["hooked"] = True


def acquire(*, grace: float, keep: bool, stderr: int | None = None) -> Guardian | None:
    """This process's guardian, started on first use; pair every call with `release`.
    *stderr*: see `spawn` (a run that starts it mid-test passes the real one: pytest's
    capture may hold fd 2 then)."""
    guardian = _SHARED["guardian"]
    if not isinstance(guardian, Guardian):
        previous = os.environ.get(VARIABLE)
        try:
            guardian = spawn(grace=grace, keep=keep, stacks=_dumps.directory(), stderr=stderr)
        except OSError:  # out of file descriptors, say: the start it precedes goes on
            guardian = None
        if guardian is None:
            _restore(previous)
            return None
        _SHARED.update(guardian=guardian, environ=previous)
        hook_forks()
    users = _SHARED["users"]
    assert isinstance(users, int)
    _SHARED["users"] = users + 1
    return guardian


def release(guardian: Guardian, *, done: bool) -> bool:
    """Undo one `acquire`; the last one closes the guardian (see `Guardian.close`) and
    returns True."""
    if _SHARED["guardian"] is not guardian:
        return False
    users = _SHARED["users"]
    assert isinstance(users, int)
    _SHARED["users"] = users - 1
    if users > 1:
        return False
    previous = _SHARED["environ"]
    _SHARED.update(guardian=None, users=0, environ=None)
    try:
        guardian.close(done=done)
    finally:
        _restore(previous if isinstance(previous, str) else None)
    return True


def _restore(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(VARIABLE, None)
    else:
        os.environ[VARIABLE] = previous
