"""A worker that hangs past the procsafe timeout, per start method: teardown must stop it
within timeout + kill_grace (plus a little). ``bench_timing`` records how long it took."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from bench_targets import hang
from bench_targets import hang_ignoring_sigterm

from pytest_procsafe import WorkerGroup

TARGETS: dict[str, Callable[[], None]] = {
    "hang": hang,
    "hang_ignoring_sigterm": hang_ignoring_sigterm,
}
WANTED = os.environ.get("PROCSAFE_BENCH_HUNG", ",".join(TARGETS)).split(",")


@pytest.mark.parametrize("target", [TARGETS[name] for name in WANTED], ids=WANTED)
def test_hung(mp_process: WorkerGroup, target: Callable[[], None]) -> None:
    mp_process(target)
