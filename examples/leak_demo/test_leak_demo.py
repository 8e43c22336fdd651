"""DEMO: every test in this file leaves a process behind ON PURPOSE.

Run ``pytest -p procsafe examples/`` and look at the ``procsafe`` section at the end of
the output: it lists each leak with the test that caused it. The default mode, ``warn``,
lets these tests pass and shows a ``ProcessLeakWarning`` for each; with
``--procsafe-leaks=fail`` they error instead and the run fails. Either way procsafe
stops what leaked, so nothing outlives the run.

Do not copy these tests: copy the fixes in the comments.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


# start: leaked
def test_leaked_process() -> None:
    # A server started for a test and never stopped: kind "leaked" (still running).
    # Fix: server.terminate(); server.wait() (or a fixture with a finalizer).
    server = subprocess.Popen(SLEEPER)
    assert server.poll() is None


# end: leaked


# start: zombie
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_zombie() -> None:
    # A child that exited but was never waited for: kind "zombie".
    # Fix: os.waitpid(child, 0).
    child = os.fork()
    if child == 0:
        os._exit(0)
    if hasattr(os, "waitid"):  # wait until it has exited, without reaping it
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)


# end: zombie


# start: orphan
@pytest.mark.skipif(sys.platform != "linux", reason="orphans are caught on Linux")
def test_orphan() -> None:
    # A child that starts a grandchild and exits: the grandchild is an "orphan",
    # re-parented to pytest. Fix: the child stops (or waits for) its own children.
    code = f"import subprocess; subprocess.Popen({SLEEPER!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    time.sleep(0.1)  # let the grandchild start its interpreter; it is caught either way


# end: orphan
