"""Stands in for a pytest process in the guardian's unit tests (run as a program).

It starts a guardian (``stop`` or ``keep`` and the kill grace from its arguments), then
the processes a run leaves: one that inherits the run's token, one with a replaced
environment that it announces, one announced as procsafe's own, and a shell that ignores
SIGTERM with a child that does too. It prints ``<pid> <kind>`` for each, the guardian's
pid, then ``ready``, and obeys one command from stdin: ``done`` (stop its children, tell the
guardian, exit), ``close`` (close the guardian without ``done`` and wait to be killed),
``exit`` (``os._exit`` at once); or the test kills it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pytest_procsafe import _guardlink
from pytest_procsafe import _proctable


def main() -> None:
    keep, grace = sys.argv[1] == "keep", float(sys.argv[2])
    guardian = _guardlink.spawn(grace=grace, keep=keep)
    assert guardian is not None
    bare = {"PATH": os.environ["PATH"]}
    children = {
        "inherits": subprocess.Popen(["sleep", "300"]),
        "replaced": subprocess.Popen(["sleep", "300"], env=bare),
        "own": subprocess.Popen(["sleep", "300"], env=bare),
        "stubborn": subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & wait"], env=bare),
    }
    while len(_proctable.children(children["stubborn"].pid)) < 1:
        time.sleep(0.01)
    for kind, popen in children.items():
        if kind != "inherits":
            proc = _proctable.stat(popen.pid)
            assert proc is not None
            guardian.announce(proc.pid, proc.start, own=kind == "own")
        print(popen.pid, kind)
    print(_proctable.children(children["stubborn"].pid)[0], "grandchild")
    print(guardian.pid, "guardian")
    print("ready", flush=True)
    command = sys.stdin.readline().strip()
    if command == "exit":
        os._exit(3)
    if command == "close":
        guardian.close(done=False)
        time.sleep(300)
    for popen in children.values():
        popen.kill()
        popen.wait()
    guardian.close(done=True)


if __name__ == "__main__":
    main()
