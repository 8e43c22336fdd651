from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import coverage
import pytest

from pytest_procsafe import _bootstrap
from pytest_procsafe import _coverage
from pytest_procsafe import _methods
from pytest_procsafe._payload import Payload

MEASURED = """\
def child_only(n):
    total = 0
    for i in range(n):
        total += i
    return total


def never_called():
    return "nobody"
"""


@pytest.mark.parametrize(
    ("concurrency", "patch", "sigterm", "method", "expected"),
    [
        ([], [], False, "fork", "start"),
        ([], [], False, "spawn", "start"),
        ([], ["subprocess"], False, "spawn", "sigterm"),
        ([], ["subprocess"], True, "spawn", None),
        ([], ["subprocess"], True, "fork", "start"),
        ([], ["fork"], True, "fork", "start"),  # without _exit the fork child's data is lost
        ([], ["fork", "_exit"], True, "fork", None),
        ([], ["fork", "_exit"], True, "forkserver", "start"),
        ([], ["subprocess", "fork", "_exit"], True, "forkserver", None),
        (["multiprocessing"], [], True, "forkserver", None),
        (["multiprocessing", "thread"], [], False, "spawn", "sigterm"),
    ],
)
def test_plan_does_only_what_coverage_does_not(
    monkeypatch: pytest.MonkeyPatch,
    concurrency: list[str],
    patch: list[str],
    sigterm: bool,
    method: str,
    expected: str | None,
) -> None:
    config = SimpleNamespace(
        concurrency=concurrency,
        patch=patch,
        sigterm=sigterm,
        serialize=lambda: "CFG",
        data_file=".coverage",
    )
    fake = SimpleNamespace(
        Coverage=SimpleNamespace(current=lambda: SimpleNamespace(config=config))
    )
    monkeypatch.setitem(sys.modules, "coverage", fake)
    plan = _coverage.plan(method)
    assert (plan.action if plan else None) == expected
    if plan and plan.action == "start":
        assert plan.config == ":data:CFG"


def test_no_plan_when_coverage_is_not_measuring() -> None:
    if coverage.Coverage.current() is not None:
        pytest.skip("this run is itself measured")
    assert _coverage.plan("spawn") is None


def _child(plan: _coverage.Plan, moddir: str, conn: Connection, mode: str) -> None:
    sys.path.insert(0, moddir)
    finish = _coverage.start(plan)
    importlib.import_module("measured_mod").child_only(3)
    if mode == "hang":
        conn.send("ready")
        signal.pause()
    if mode == "slow-save":
        # The parent's SIGTERM arrives while the data is being written.
        cov: Any = coverage.Coverage.current()
        save = cov.save

        def slow_save() -> None:
            conn.send("ready")
            deadline = time.monotonic() + 60
            while signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
                time.sleep(0.01)  # a handler that ran here would end the process unsaved
            save()

        cov.save = slow_save
    finish()
    conn.send("finished")  # not when a SIGTERM came: it ends the process right after


def _measure_child(tmp_path: Path, method: str, mode: str, *, legacy: bool = False) -> set[int]:
    if coverage.Coverage.current() is not None:
        pytest.skip("this run is itself measured")
    (tmp_path / "measured_mod.py").write_text(MEASURED)
    data_file = tmp_path / "data" / ".coverage"
    data_file.parent.mkdir()
    cov = coverage.Coverage(data_file=str(data_file), source=[str(tmp_path)])
    if legacy:  # coverage before 7.10 cannot serialize its configuration
        config: Any = cov.config
        config.serialize = None
    cov.start()
    plan = _coverage.plan(method)
    cov.stop()
    assert plan is not None
    assert plan.action == "start"
    assert (plan.config is None) is legacy
    ctx: Any = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(plan, str(tmp_path), writer, mode))
    proc.start()
    writer.close()
    try:
        if mode != "finish":
            assert reader.poll(60)
            assert reader.recv() == "ready"
            proc.terminate()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    terminated = mode != "finish"
    assert proc.exitcode == (-signal.SIGTERM if terminated else 0)
    try:
        last = reader.recv()
    except EOFError:
        last = None  # the child is gone without a word more
    assert last == (None if terminated else "finished")
    parts = [p for p in data_file.parent.iterdir() if p.name.startswith(".coverage.")]
    assert parts, "the worker saved no coverage data"
    combined = coverage.CoverageData(basename=str(tmp_path / "combined"))
    for part in parts:
        data = coverage.CoverageData(basename=str(part))
        data.read()
        combined.update(data)
    return set(combined.lines(os.path.realpath(tmp_path / "measured_mod.py")) or ())


@pytest.mark.parametrize("method", _methods.available())
def test_worker_code_is_measured(tmp_path: Path, method: str) -> None:
    lines = _measure_child(tmp_path, method, "finish")
    assert {2, 3, 4, 5} <= lines  # child_only's body
    assert 9 not in lines  # never_called's body


@pytest.mark.parametrize("method", _methods.available())
def test_without_a_serialized_configuration_the_options_are_passed_on(
    tmp_path: Path, method: str
) -> None:
    lines = _measure_child(tmp_path, method, "finish", legacy=True)
    assert {2, 3, 4, 5} <= lines
    assert 9 not in lines


@pytest.mark.parametrize("method", _methods.available())
def test_a_terminated_worker_keeps_its_lines(tmp_path: Path, method: str) -> None:
    lines = _measure_child(tmp_path, method, "hang")
    assert {2, 3, 4, 5} <= lines


@pytest.mark.parametrize("method", _methods.available())
def test_a_sigterm_while_saving_waits_for_the_whole_file(tmp_path: Path, method: str) -> None:
    lines = _measure_child(tmp_path, method, "slow-save")
    assert {2, 3, 4, 5} <= lines


def test_the_data_file_stays_where_the_measurement_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if coverage.Coverage.current() is not None:
        pytest.skip("this run is itself measured")
    started, moved = tmp_path / "started", tmp_path / "moved"
    started.mkdir()
    moved.mkdir()
    monkeypatch.chdir(started)
    cov = coverage.Coverage(data_file=".coverage")
    cov.start()
    try:
        monkeypatch.chdir(moved)  # a test that changes directory before starting a worker
        plan = _coverage.plan("spawn")
    finally:
        cov.stop()
    assert plan is not None
    assert plan.data_file is not None
    assert os.path.realpath(plan.data_file) == os.path.realpath(started / ".coverage")


@pytest.mark.parametrize("method", _methods.available())
def test_the_bootstrap_saves_the_data_before_it_sends_the_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, method: str
) -> None:
    if coverage.Coverage.current() is not None:
        pytest.skip("this run is itself measured")
    # A module of its own: spawn children find modules where the parent imported them.
    name = f"measured_by_bootstrap_{method}"
    (tmp_path / f"{name}.py").write_text(MEASURED)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawn children get the parent's sys.path
    request.addfinalizer(lambda: sys.modules.pop(name, None))
    measured = importlib.import_module(name)
    data_file = tmp_path / "data" / ".coverage"
    data_file.parent.mkdir()
    cov = coverage.Coverage(data_file=str(data_file), source=[str(tmp_path)])
    cov.start()
    plan = _coverage.plan(method)
    cov.stop()
    ctx: Any = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    launch = _bootstrap.Launch(method, None, False, None, plan)
    payload = Payload(measured.child_only, (3,))
    proc = ctx.Process(target=_bootstrap.main, args=(payload, writer, launch))
    proc.start()
    writer.close()
    try:
        assert reader.poll(60), "the worker sent nothing"
        outcome = pickle.loads(reader.recv_bytes())
        # The outcome is here: the data must be too, whether or not the worker exited.
        parts = [p for p in data_file.parent.iterdir() if p.name.startswith(".coverage.")]
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert outcome.kind == _bootstrap.VALUE
    assert len(parts) == 1, parts
    data = coverage.CoverageData(basename=str(parts[0]))
    data.read()
    assert {2, 3, 4, 5} <= set(data.lines(os.path.realpath(tmp_path / f"{name}.py")) or ())
