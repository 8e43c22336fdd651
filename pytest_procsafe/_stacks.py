"""Stacks of live descendants: the faulthandler dump a procsafe worker writes on a signal.

Each procsafe worker enables ``faulthandler`` on `SIGNAL` (SIGUSR1) at its bootstrap,
writing to a file of its own; `capture` sends the signal (only to a process whose handler
is installed: otherwise the signal would kill it), waits until each dump stops growing,
and reads it. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Final

#: The signal a worker dumps its stacks on; None where the platform has none.
SIGNAL: Final = getattr(signal, "SIGUSR1", None)
#: How long to wait for faulthandler's dump once the signal is sent (it writes at once).
WAIT: Final = 1.0


def make_file() -> str | None:
    """A new file for one worker's dump (None where there is no signal to ask for one)."""
    if SIGNAL is None:
        return None
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
    for pid in asked:
        send(pid, SIGNAL)
    sizes = dict.fromkeys(asked, -1)
    deadline = time.monotonic() + WAIT
    while sizes and time.monotonic() < deadline:
        time.sleep(0.02)
        if pump is not None:
            pump()
        for pid in list(sizes):
            size = _size(files[pid])
            if 0 < size == sizes[pid]:  # written and no longer growing
                del sizes[pid]
            else:
                sizes[pid] = size
    dumps: dict[int, str] = {}
    for pid in asked:
        text = _read(files[pid])
        if text.strip():
            dumps[pid] = text
    return dumps


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


def _read(path: str | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def remove(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def trim(dump: str, bootstrap: str) -> str:
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
