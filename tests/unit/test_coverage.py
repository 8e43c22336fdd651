from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import coverage
import pytest

from pytest_procsafe import _coverage
from pytest_procsafe import _methods

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
        concurrency=concurrency, patch=patch, sigterm=sigterm, serialize=lambda: "CFG"
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


def _child(plan: _coverage.Plan, moddir: str, conn: Connection, hang: bool) -> None:
    sys.path.insert(0, moddir)
    finish = _coverage.start(plan)
    importlib.import_module("measured_mod").child_only(3)
    if hang:
        conn.send("ready")
        signal.pause()
    finish()


def _measure_child(tmp_path: Path, method: str, *, hang: bool) -> set[int]:
    if coverage.Coverage.current() is not None:
        pytest.skip("this run is itself measured")
    (tmp_path / "measured_mod.py").write_text(MEASURED)
    data_file = tmp_path / "data" / ".coverage"
    data_file.parent.mkdir()
    cov = coverage.Coverage(data_file=str(data_file), source=[str(tmp_path)])
    cov.start()
    plan = _coverage.plan(method)
    cov.stop()
    assert plan is not None
    assert plan.action == "start"
    ctx: Any = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(plan, str(tmp_path), writer, hang))
    proc.start()
    try:
        if hang:
            assert reader.poll(60)
            assert reader.recv() == "ready"
            proc.terminate()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == (-signal.SIGTERM if hang else 0)
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
    lines = _measure_child(tmp_path, method, hang=False)
    assert {2, 3, 4, 5} <= lines  # child_only's body
    assert 9 not in lines  # never_called's body


@pytest.mark.parametrize("method", _methods.available())
def test_a_terminated_worker_keeps_its_lines(tmp_path: Path, method: str) -> None:
    lines = _measure_child(tmp_path, method, hang=True)
    assert {2, 3, 4, 5} <= lines
