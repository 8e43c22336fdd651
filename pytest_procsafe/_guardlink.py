"""The test process's side of the guardian (`_guardian`): start it, tell it, say "done".

`acquire` starts one guardian per process (a pytest run nested in a test, pytester's inline
mode, shares it) and sets `_guardian.VARIABLE` to the run's token in ``os.environ``;
`Guardian.announce` tells it of a process of the run by pid and start time (never blocks);
`release` tells it ``done`` once procsafe's cleanup has finished, or closes the pipe without
it when the cleanup did not finish, so that the guardian stops what is left. Forked
children forget the guardian (an at-fork hook): their copy of the pipe must not hide the
test process's end. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Final
from typing import final

from pytest_procsafe import _dumps
from pytest_procsafe import _escalate
from pytest_procsafe import _proctable
from pytest_procsafe._guardian import MARK
from pytest_procsafe._guardian import SHIELD
from pytest_procsafe._guardian import VARIABLE

_BOOT: Final = (
    # Appended: for an installed wheel it is site-packages, which must not shadow stdlib.
    f"import os, sys; sys.path.append(sys.argv[1]); from {MARK}; os._exit(main(sys.argv[2:]))"
)
#: How long the test process waits for a guardian told ``done`` to exit.
EXIT_WAIT: Final = 2.0


@final
class Guardian:
    """The test process's end of a started guardian. Built by `spawn`."""

    def __init__(self, process: subprocess.Popen[bytes], writer: int, token: str) -> None:
        self.process: Final = process
        self.pid: Final = process.pid
        self.token: Final = token
        self._writer = writer
        self._backlog = b""

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
            self.disconnect()

    def disconnect(self) -> None:
        """Drop the pipe without a word (a forked child's copy, or a guardian that died)."""
        writer, self._writer = self._writer, -1
        if writer >= 0:
            with contextlib.suppress(OSError):
                os.close(writer)

    def close(self, *, done: bool) -> None:
        """The run ends: with *done* (procsafe's cleanup ran) the guardian exits at once;
        without, it stops what is left of the run as if pytest had died. Waits (bounded)
        for it to exit and reaps it."""
        if self._writer >= 0:
            os.set_blocking(self._writer, True)
            self._flush()
            if done and self._writer >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._writer, b"done\n")
            self.disconnect()
        try:
            self.process.wait(EXIT_WAIT if done else 0.0)
        except subprocess.TimeoutExpired:
            if done:  # it should have exited at once: do not leave it behind
                self.process.kill()
                self.process.wait(_escalate.KILL_WAIT)


def spawn(
    *, grace: float, keep: bool, token: str | None = None, stacks: str | None = None
) -> Guardian | None:
    """Start a guardian for this process; None where that cannot be done (no pipes and
    fork-free spawning, a failing interpreter start). Sets `VARIABLE` to the run's token
    in ``os.environ`` (the caller undoes it)."""
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
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=[fd for fd in (reader, pidfd) if fd >= 0],
            cwd="/",
            start_new_session=True,
        )
    except OSError:
        os.close(writer)
        return None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        os.close(reader)
        if pidfd >= 0:
            os.close(pidfd)
    os.set_blocking(writer, False)
    return Guardian(process, writer, token)


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
    if not _SHARED["hooked"] and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_forget_in_child)
        _SHARED["hooked"] = True


def acquire(*, grace: float, keep: bool) -> Guardian | None:
    """This process's guardian, started on first use; pair every call with `release`."""
    guardian = _SHARED["guardian"]
    if not isinstance(guardian, Guardian):
        previous = os.environ.get(VARIABLE)
        guardian = spawn(grace=grace, keep=keep, stacks=_dumps.directory())
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
