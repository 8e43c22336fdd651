"""Shared by the end-to-end and hostile suites: run an inner pytest in a subprocess, bounded.

Every inner run goes through `run`, which always passes `RUN_LIMIT` as the timeout: a hung
inner run fails its test instead of hanging the suite. A run that must be signalled, fed a
debugger's stdin or killed goes through `Inner`, whose every wait is bounded the same way.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final
from typing import final

import pytest

#: An inner run that takes this long is hung: the test fails instead of waiting.
RUN_LIMIT: Final = 240.0
#: Load procsafe explicitly (it is also found by its entry point, unless autoload is off).
PLUGIN: Final = ("-p", "procsafe")
#: `PLUGIN`, with leaks failing the inner run: a process left behind is one more error.
FAIL_ON_LEAKS: Final = (*PLUGIN, "--procsafe-leaks=fail")


def run(
    pytester: pytest.Pytester, *args: str, options: Sequence[str] = PLUGIN
) -> pytest.RunResult:
    """Run pytest in a subprocess with *options* (a file's defaults), then *args*; fail if
    it outlives `RUN_LIMIT`. ``options=()`` runs it with no option at all."""
    return pytester.runpytest_subprocess(*options, *args, timeout=RUN_LIMIT)


@final
class Inner:
    """pytest started in a subprocess of its own (``python -m pytest``), its stdout and
    stderr in files; killed by pid should the test fail before it ended. With *session*
    it leads a process group of its own, as a job a terminal runs (Ctrl-C reaches all of
    it)."""

    def __init__(
        self,
        pytester: pytest.Pytester,
        *args: str,
        options: Sequence[str] = PLUGIN,
        session: bool = False,
    ) -> None:
        self.path: Final = pytester.path
        self._out = open(pytester.path / "inner-stdout.txt", "wb")  # noqa: SIM115
        self._err = open(pytester.path / "inner-stderr.txt", "wb")  # noqa: SIM115
        self.process: Final = subprocess.Popen(
            [sys.executable, "-m", "pytest", *options, *args],
            cwd=pytester.path,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            start_new_session=session,  # its own process group, as a terminal's job
        )
        self.ended_at: float | None = None

    def __enter__(self) -> Inner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(RUN_LIMIT)
        self._out.close()
        self._err.close()

    def wait_for(self, path: Path) -> None:
        """Until the inner run creates *path* (it must not end first)."""
        deadline = time.monotonic() + RUN_LIMIT
        while not path.exists():
            assert self.process.poll() is None, f"the inner run ended early:\n{self.text()}"
            assert time.monotonic() < deadline, f"the inner run never got there:\n{self.text()}"
            time.sleep(0.02)

    def end(self) -> int:
        """Wait for the inner pytest to exit; its return code."""
        code = self.process.wait(RUN_LIMIT)
        self.ended_at = time.monotonic()
        return code

    @property
    def stdout(self) -> str:
        return (self.path / "inner-stdout.txt").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.path / "inner-stderr.txt").read_text(errors="replace")

    def text(self) -> str:
        return f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
