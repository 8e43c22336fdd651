"""Unit tests of `_environ`: every child sees ``os.environ`` as the test has it at the start.

Under forkserver the server was started earlier (by an earlier test of this run, or by the
first worker here): its children would see the environment of that moment. The order in
which the server and a change come is covered end to end (tests/e2e/test_parity_e2e.py);
here the server is always started before the change.
"""

from __future__ import annotations

import os
import pickle
import types
from multiprocessing import context
from multiprocessing.context import BaseContext

import pytest
from worker_targets import environment
from worker_targets import environment_in_own_forkserver_child
from worker_targets import send_environment

from pytest_procsafe import Channels
from pytest_procsafe import WorkerGroup
from pytest_procsafe import _environ
from pytest_procsafe import _spawnhook

WAIT = 60.0  # generous: only a broken child ever takes this long
NAMES = ("PROCSAFE_PROBE", "PATH", "HOME")


@pytest.fixture
def changed(mp_process: WorkerGroup, monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """Start a worker (and so the forkserver, if it is not running yet), then add, change
    and delete variables; the environment the children must see."""
    mp_process(environment, "PATH").result()
    monkeypatch.setenv("PROCSAFE_PROBE", "bar")
    monkeypatch.setenv("PATH", os.environ["PATH"] + os.pathsep + "procsafe-probe")
    monkeypatch.delenv("HOME", raising=False)  # set when the server started, as a rule
    return environment(*NAMES)


def test_a_worker_sees_additions_changes_and_deletions(
    mp_process: WorkerGroup, changed: dict[str, str | None]
) -> None:
    assert changed["PROCSAFE_PROBE"] == "bar"
    assert changed["HOME"] is None
    assert mp_process(environment, *NAMES).result() == changed


def test_a_tests_own_process_sees_them_too(
    mp_context: BaseContext, mp_channels: Channels, changed: dict[str, str | None]
) -> None:
    reader, writer = mp_channels.pipe(duplex=False)
    process = mp_context.Process(target=send_environment, args=(writer, NAMES))  # type: ignore[attr-defined]
    process.start()
    try:
        assert reader.recv() == changed
    finally:
        process.join(WAIT)
    assert process.exitcode == 0


def test_a_pool_sees_them_too(mp_context: BaseContext, changed: dict[str, str | None]) -> None:
    with mp_context.Pool(1) as pool:
        assert pool.apply_async(environment, NAMES).get(WAIT) == changed


# A fork child inherits its parent's forkserver, if one runs, and multiprocessing cannot
# use that one from the child (it waits for the server as for a child of its own).
@pytest.mark.procsafe(start_methods="spawn forkserver")
def test_a_workers_own_forkserver_children_see_the_workers_environment(
    mp_process: WorkerGroup,
) -> None:
    worker = mp_process(environment_in_own_forkserver_child, "PROCSAFE_NESTED", "set")
    assert worker.result() == ({"PROCSAFE_NESTED": None}, {"PROCSAFE_NESTED": "set"})


# --- the stowaway -------------------------------------------------------------------------


def _launched_by(monkeypatch: pytest.MonkeyPatch, method: str | None) -> None:
    popen = None if method is None else types.SimpleNamespace(method=method)
    monkeypatch.setattr(context, "get_spawning_popen", lambda: popen)


@pytest.mark.usefixtures("fresh_spawnhook")
@pytest.mark.parametrize("method", ["forkserver", None])
def test_the_stowaway_takes_the_environment_at_the_launch(
    monkeypatch: pytest.MonkeyPatch, method: str | None
) -> None:
    undo = _environ.install()
    try:
        assert _spawnhook._RIDERS[_environ.RIDER] is _environ._Stowaway
        stowaway = _environ._Stowaway()
        monkeypatch.setenv("PROCSAFE_PROBE", "at the launch")
        _launched_by(monkeypatch, method)
        function, args = stowaway.__reduce__()
    finally:
        undo()
    assert function is _environ._arrive
    assert args == (dict(os.environ),)
    assert pickle.loads(pickle.dumps(args)) == args  # it travels as it is


@pytest.mark.usefixtures("fresh_spawnhook")
def test_a_spawn_launch_carries_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    undo = _environ.install()
    try:
        _launched_by(monkeypatch, "spawn")
        assert _environ._Stowaway().__reduce__() == (_environ._arrive, (None,))
    finally:
        undo()
    assert _environ.RIDER not in _spawnhook.riders()  # the undo took it out


@pytest.mark.usefixtures("fresh_spawnhook")
def test_arriving_applies_the_environment_and_carries_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROCSAFE_ONLY_HERE", "gone after")
    monkeypatch.setenv("PROCSAFE_CHANGED", "old")
    parent = {key: value for key, value in os.environ.items() if key != "PROCSAFE_ONLY_HERE"}
    parent["PROCSAFE_CHANGED"] = "new"
    parent["PROCSAFE_ADDED"] = "added"
    monkeypatch.delenv("PROCSAFE_ADDED", raising=False)
    saved = dict(os.environ)
    try:
        _environ._arrive(parent)
        assert dict(os.environ) == parent
        assert _environ.RIDER in _spawnhook.riders()  # the child's own children get it
    finally:
        _environ.apply(saved)
        _spawnhook._RIDERS.pop(_environ.RIDER, None)


@pytest.mark.usefixtures("fresh_spawnhook")
def test_arriving_with_nothing_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCSAFE_PROBE", "kept")
    before = dict(os.environ)
    _environ._arrive(None)
    try:
        assert dict(os.environ) == before
        assert _environ.RIDER in _spawnhook.riders()
    finally:
        _spawnhook._RIDERS.pop(_environ.RIDER, None)
