"""Helper processes started on first use and shared by every test that needs them.

Long-lived on purpose: the first test to use one starts it, so without further ado the
leak checks would blame that test.
"""

from __future__ import annotations

import subprocess
import sys

#: The cache server's name: it appears in its command line, so a pattern can find it.
TAG = "example-cache-server"

_helpers: dict[str, subprocess.Popen[bytes]] = {}


def server(tag: str = TAG) -> subprocess.Popen[bytes]:
    """The helper named *tag*, started on first use."""
    helper = _helpers.get(tag)
    if helper is None or helper.poll() is not None:
        code = "import time; time.sleep(300)"
        helper = _helpers[tag] = subprocess.Popen([sys.executable, "-c", code, tag])
    return helper


def stop_all() -> None:
    """Stop every helper that runs."""
    while _helpers:
        _, helper = _helpers.popitem()
        helper.terminate()
        helper.wait()
