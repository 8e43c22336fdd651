"""Unit tests of `_dumps`: every multiprocessing child of the run can show its stack."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

import pytest
from worker_targets import sleep_in_a_named_function

from pytest_procsafe import _dumps
from pytest_procsafe import _stacks

pytestmark = pytest.mark.skipif(_stacks.SIGNAL is None, reason="no signal for faulthandler")

WAIT = 30.0


def wait_for_handler(pid: int) -> None:
    assert _stacks.SIGNAL is not None
    deadline = time.monotonic() + WAIT
    while not _stacks.catches(pid, _stacks.SIGNAL):
        assert time.monotonic() < deadline, f"pid {pid} never installed the handler"
        time.sleep(0.01)


@pytest.fixture
def sleeping(mp_context: BaseContext) -> Iterator[tuple[int, str]]:
    """A plain process of the test's start method asleep in a named function, its handler
    installed: (its pid, its dump file)."""
    ready = mp_context.Event()
    process: Any = mp_context.Process(  # type: ignore[attr-defined]
        target=sleep_in_a_named_function, args=(ready, WAIT)
    )
    process.start()
    try:
        assert ready.wait(WAIT)
        wait_for_handler(process.pid)
        path = _dumps.file_for(process.pid)
        assert path is not None
        yield process.pid, path
    finally:
        process.kill()
        process.join(WAIT)


def test_a_plain_process_of_every_method_shows_where_it_is(sleeping: tuple[int, str]) -> None:
    pid, path = sleeping
    dumps = _stacks.capture({pid: path}, send=os.kill)
    assert "in sleep_in_a_named_function" in dumps[pid]


def test_a_second_dump_is_waited_for_even_when_its_handler_is_slow(
    sleeping: tuple[int, str],
) -> None:
    """The file already holds the first dump: only what the second request adds counts,
    however late the process gets to it."""
    pid, path = sleeping
    assert "in sleep_in_a_named_function" in _stacks.capture({pid: path}, send=os.kill)[pid]
    first = os.path.getsize(path)

    def late(pid: int, signum: int) -> None:
        threading.Timer(0.2, os.kill, (pid, signum)).start()

    again = _stacks.capture({pid: path}, send=late)
    assert "in sleep_in_a_named_function" in again.get(pid, "")
    assert os.path.getsize(path) > first


def test_a_process_that_is_not_python_is_not_signalled() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert _stacks.SIGNAL is not None
        assert not _stacks.catches(sleeper.pid, _stacks.SIGNAL)
        dumps = _stacks.capture({sleeper.pid: f"/nonexistent/{sleeper.pid}"}, send=os.kill)
        assert dumps == {}
        assert sleeper.poll() is None  # alive: an uncaught signal would have killed it
    finally:
        sleeper.kill()
        sleeper.wait(WAIT)


def test_trim_keeps_the_innermost_frames_and_the_users_threads_first() -> None:
    dump = "\n".join(
        [
            "Thread 0x1 (most recent call first):",
            '  File "/usr/lib/python3.11/threading.py", line 320 in wait',
            '  File "/usr/lib/python3.11/threading.py", line 622 in wait',
            "",
            "Current thread 0x2 (most recent call first):",
            '  File "/src/app.py", line 7 in task',
            '  File "/src/app.py", line 3 in run',
            *[f'  File "/usr/lib/python3.11/x.py", line {n} in f{n}' for n in range(10)],
        ]
    )
    trimmed = _stacks.trim(dump, frames=2).splitlines()
    assert trimmed[:4] == [
        "Current thread 0x2 (most recent call first):",
        '  File "/src/app.py", line 7 in task',
        '  File "/src/app.py", line 3 in run',
        "  ... (10 more frames)",
    ]
    assert trimmed[4] == "Thread 0x1 (most recent call first):"


def test_installing_it_costs_well_under_a_millisecond(tmp_path: Any) -> None:
    # The per-child cost of the handler (benchmarks/README.md records the figure).
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from pytest_procsafe import _dumps;"
        "t = time.perf_counter(); _dumps.install_here(sys.argv[2]);"
        "print(time.perf_counter() - t)"
    )
    root = os.path.dirname(os.path.dirname(_dumps.__file__))
    out = subprocess.run(
        [sys.executable, "-c", code, root, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT,
    )
    assert float(out.stdout) < 0.05  # generous: the bound is that it is cheap at all
