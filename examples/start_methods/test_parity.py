"""What changes between start methods, and what procsafe makes work under all of them."""

from __future__ import annotations

import pytest

from pytest_procsafe import WorkerGroup


# start: closure
def test_a_closure_runs_under_every_method(mp_process: WorkerGroup) -> None:
    offset = 10
    # Plain multiprocessing cannot pickle a lambda for spawn or forkserver;
    # mp_process can, so the same test runs under all three methods.
    worker = mp_process(lambda n: n + offset, 1)
    assert worker.result() == 11


# end: closure


# start: state
SETTINGS = {"debug": False}


def debug_enabled() -> bool:
    return SETTINGS["debug"]


def test_parent_state_reaches_only_fork_children(
    mp_process: WorkerGroup, mp_start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(SETTINGS, "debug", True)
    # fork copies the parent's memory; spawn and forkserver import this module afresh,
    # so they see the module as written, not as the test changed it.
    assert mp_process(debug_enabled).result() is (mp_start_method == "fork")


# end: state


# start: marker
@pytest.mark.procsafe(start_methods="fork")
def test_only_under_fork(mp_start_method: str) -> None:
    # Skipped with a reason where fork is not selected or does not exist (Windows).
    assert mp_start_method == "fork"


# end: marker
