"""Stacks of live descendants: the faulthandler dump a child writes on `SIGNAL`.

Every multiprocessing child of the run has a ``faulthandler`` handler for `SIGNAL` writing
to a file of its own (`_dumps`; procsafe's workers get theirs at their bootstrap).
`capture` sends the signal (only to a process whose handler is installed: otherwise the
signal would kill it), waits until each dump stops growing, and reads it; `trim` keeps the
frames that matter. Imports neither pytest nor the plugin.

The signal is a real-time one on Linux, ``SIGRTMIN + 7``: code under test often uses
SIGUSR1 and SIGUSR2 for its own purposes and almost never real-time signals (glibc keeps
the ones it needs for threads below ``SIGRTMIN``). Elsewhere it is SIGUSR1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import Final

#: The signal a worker dumps its stacks on; None where the platform has none.
SIGNAL: Final[int | None] = (
    signal.SIGRTMIN + 7 if hasattr(signal, "SIGRTMIN") else getattr(signal, "SIGUSR1", None)
)
#: How the signal reads in messages.
SIGNAL_NAME: Final = (
    "SIGRTMIN+7" if hasattr(signal, "SIGRTMIN") else "SIGUSR1" if SIGNAL is not None else None
)
#: Frames of each thread `trim` keeps (innermost first, as faulthandler writes them).
FRAMES: Final = 4
NO_STACK: Final = "no Python stack available"
#: How long to wait for faulthandler's dump once the signal is sent (it writes at once).
WAIT: Final = 1.0


def make_file() -> str | None:
    """A new file for one worker's dump (None where there is no signal to ask for one)."""
    if SIGNAL is None:
        return None
    import tempfile  # the test process's side only: workers need not import it

    fd, path = tempfile.mkstemp(prefix="procsafe-stack-", suffix=".txt")
    os.close(fd)
    return path


def capture(
    files: Mapping[int, str],
    *,
    send: Callable[[int, int], object],
    pump: Callable[[], object] | None = None,
) -> dict[int, str]:
    """Ask each pid of *files* for its stacks (``send(pid, SIGNAL)``); the dumps that
    arrived within `WAIT`, by pid. *pump* runs while waiting (the channels drain)."""
    if SIGNAL is None:
        return {}
    asked = [pid for pid in files if catches(pid, SIGNAL)]
    # A handler appends each dump to the same file: read what this request adds.
    start = {pid: max(_size(files[pid]), 0) for pid in asked}
    for pid in asked:
        send(pid, SIGNAL)
    from pytest_procsafe import _seconds  # the test process's side: loaded there already

    sizes = dict.fromkeys(asked, -1)
    for _ in _seconds.backoff(WAIT, most=0.02):
        if not sizes:
            break
        if pump is not None:
            pump()
        for pid in list(sizes):
            size = _size(files[pid])
            # Written: this request's dump began, and either it stopped growing or every
            # thread of the process is asleep again (the handler runs from the signal to
            # its last write in one of them: a thread running it is never asleep).
            if size > start[pid] and (size == sizes[pid] or _asleep(pid)):
                del sizes[pid]
            else:
                sizes[pid] = size
    dumps: dict[int, str] = {}
    for pid in asked:
        text = _read(files[pid], start[pid])
        if text.strip():
            dumps[pid] = text
    return dumps


def _asleep(pid: int) -> bool:
    from pytest_procsafe import _proctable  # the test process's side: loaded there already

    return _proctable.activity(pid) is not None


def catches(pid: int, signum: int) -> bool:
    """Whether *pid* has a handler for *signum* (sending it otherwise would kill it)."""
    if not sys.platform.startswith("linux"):
        return True
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path is not None else 0
    except OSError:
        return 0


def _read(path: str | None, offset: int = 0) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def remove(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def trim(dump: str, frames: int = FRAMES) -> str:
    """The innermost *frames* frames of each thread, threads running the user's code
    first (the standard library's own threads, such as a pool's handlers, after)."""
    threads: list[list[str]] = []
    below = False  # past multiprocessing's bootstrap: the parent's stack, copied by fork
    for line in dump.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            threads.append([line])
            below = False
        elif threads and not below:
            threads[-1].append(line)
            below = "multiprocessing/process.py" in line and line.rstrip().endswith("_bootstrap")

    def users(thread: list[str]) -> bool:
        return any("/lib/python" not in line and "File" in line for line in thread[1:])

    threads.sort(key=lambda thread: not users(thread))
    out: list[str] = []
    for thread in threads:
        out.append(thread[0])
        out.extend(thread[1 : frames + 1])
        if len(thread) > frames + 1:
            out.append(f"  ... ({len(thread) - frames - 1} more frames)")
    return "\n".join(out)


# Run by ``sys.remote_exec`` inside the target: write every thread's stack to {path!r}.
_REMOTE: Final = """\
import faulthandler
with open({path!r}, "w") as _procsafe_file:
    faulthandler.dump_traceback(_procsafe_file, all_threads=True)
"""


def other_ways(pid: int, path: str | None) -> str | None:
    """The stack of a Python process without procsafe's handler (a ``Popen`` of
    ``sys.executable``): through ``sys.remote_exec`` where the interpreter has it
    (Python 3.14+) and permits it, else through ``py-spy dump`` where it is installed;
    None when neither can say."""
    remote = getattr(sys, "remote_exec", None)
    if callable(remote) and path is not None:
        script = f"{path}.remote.py"
        try:
            with open(script, "w") as file:
                file.write(_REMOTE.format(path=path))
            remote(pid, script)  # runs at the target's next safe point
        except (OSError, RuntimeError, ValueError, PermissionError):
            pass
        else:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                text = _read(path)
                if text.strip():
                    return text
                time.sleep(0.02)
    return _py_spy(pid)


def _py_spy(pid: int) -> str | None:
    import shutil
    import subprocess

    spy = shutil.which("py-spy")
    if spy is None:
        return None
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def trim_worker(dump: str, bootstrap: str) -> str:
    """A faulthandler dump without the frames below the target in each thread: those
    below ``main`` of the file *bootstrap* (the worker's bootstrap).

    Below the bootstrap lie multiprocessing's internals and, under fork, the whole stack
    of the test process at the moment it forked: noise next to where the worker is stuck.
    """
    below = f'File "{bootstrap}"'
    lines: list[str] = []
    skipping = False
    for line in dump.splitlines():
        if not line.startswith(" "):  # a thread's header, or the blank line between them
            skipping = False
        elif skipping:
            continue
        elif below in line and line.rstrip().endswith(" in main"):
            skipping = True
            line = "  (the procsafe bootstrap and multiprocessing frames below are omitted)"
        lines.append(line)
    return "\n".join(lines)
