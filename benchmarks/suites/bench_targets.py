"""Worker targets for the benchmark suites.

They live apart from the test modules so that a spawn or forkserver child imports only this
small module: neither the raw nor the procsafe worker pays for importing pytest.
"""

from __future__ import annotations

import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any


def work(x: int) -> int:
    return x + 1


def raw_round_trip(queue: Any, x: int) -> None:
    queue.put(work(x))


def produce_queue(queue: Any, count: int) -> None:
    for i in range(count):
        queue.put(i)


def produce_pipe(conn: Connection | Any, count: int) -> None:
    for i in range(count):
        conn.send(i)


def heavy_modules() -> list[str]:
    """What a worker has imported that it should not need: pytest, procsafe's parent side."""
    parent_side = (
        "pytest_procsafe._channels",
        "pytest_procsafe._workers",
        "pytest_procsafe.plugin",
    )
    return sorted(name for name in sys.modules if name in ("pytest", "_pytest", *parent_side))


def hang() -> None:
    while True:
        time.sleep(0.05)


def hang_ignoring_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hang()
