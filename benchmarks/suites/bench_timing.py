"""A pytest plugin (``-p bench_timing``) recording, per test, the seconds from the end of its
call phase to the end of its teardown, into the JSON file named by ``PROCSAFE_BENCH_OUT``."""

from __future__ import annotations

import json
import os

import pytest

_CALL_END: dict[str, float] = {}
_TEARDOWN: dict[str, dict[str, object]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _CALL_END[report.nodeid] = report.stop
    elif report.when == "teardown" and report.nodeid in _CALL_END:
        _TEARDOWN[report.nodeid] = {
            "seconds": report.stop - _CALL_END[report.nodeid],
            "outcome": report.outcome,
            "text": report.longreprtext[-2000:],
        }


def pytest_sessionfinish() -> None:
    with open(os.environ["PROCSAFE_BENCH_OUT"], "w") as file:
        json.dump(_TEARDOWN, file)
