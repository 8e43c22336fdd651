"""Find processes an inner pytest run left behind, by an environment variable they inherit.

Every process of an inner run (pytest, its workers, the forkserver, the resource tracker,
grandchildren) inherits the environment of the inner pytest, so a unique variable set for
the run finds all of them, however they were re-parented after their parent died.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pytest_procsafe import _guardwire

VARIABLE = "PROCSAFE_E2E_RUN"
SETTLE = 10.0  # generous: the forkserver and the resource tracker exit once pytest has


def marked(mark: str) -> list[str]:
    """``pid: command line`` of each live process whose environment carries *mark*: not
    this process's own guardian, which starts with this process's first child (perhaps
    the inner run started inside `no_survivors`) and belongs to this run, not that one."""
    needle = f"{VARIABLE}={mark}".encode()
    ours = f" {os.getpid()}-"  # in the guardian's command line: its run's token
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle not in environ.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile, or a zombie: nothing runs any more
        if _guardwire.MARK in command and ours in command:
            continue
        found.append(f"{entry}: {command.strip()}")
    return found


@contextmanager
def no_survivors(monkeypatch: pytest.MonkeyPatch, *, settle: float = SETTLE) -> Iterator[None]:
    """Mark the inner runs started inside; afterwards, fail if any of their processes live
    *settle* seconds on."""
    if not sys.platform.startswith("linux"):
        yield  # the procfs scan is Linux-only; elsewhere the inner runs' own checks remain
        return
    mark = uuid.uuid4().hex
    monkeypatch.setenv(VARIABLE, mark)
    yield
    deadline = time.monotonic() + settle
    left = marked(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = marked(mark)
    assert not left, "processes of the inner run survived it:\n" + "\n".join(left)
