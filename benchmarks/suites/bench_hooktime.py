"""A pytest plugin (``-p bench_hooktime``, loaded before procsafe configures) timing, inside
the run, the bodies of procsafe's per-test hook implementations (`_testhooks`): what each
test pays procsafe beyond pluggy's dispatch, measured where it runs, between all of
pytest's own work (so with the caches as cold as a real run leaves them).

An empty hook implementation of this plugin is timed the same way, so the timer's own
cost can be taken off. Writes ``{"tests": N, "hooks": {name: [calls, ns]}, "empty": [calls,
ns]}`` to the JSON file named by ``PROCSAFE_BENCH_OUT``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import pytest

from pytest_procsafe import _testhooks

_NS: dict[str, list[int]] = {}
_TESTS = [0]


def _timed(owner: type, name: str, label: str) -> None:
    original = owner.__dict__[name]

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            spent = time.perf_counter_ns() - start
            entry = _NS.setdefault(label, [0, 0])
            entry[0] += 1
            entry[1] += spent

    setattr(owner, name, timed)


for _hook in ("pytest_runtest_setup", "pytest_runtest_makereport", "pytest_runtest_teardown"):
    for _set in (_testhooks.Checked, _testhooks.Plain):
        if _hook in _set.__dict__:
            _timed(_set, _hook, f"{_set.__name__}.{_hook}")


class _Empty:
    """The timer around a body that does nothing: its cost is taken off the others'."""

    def pytest_runtest_logfinish(self) -> None:
        _TESTS[0] += 1


_timed(_Empty, "pytest_runtest_logfinish", "empty")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_Empty(), "bench-hooktime-empty")


def pytest_sessionfinish() -> None:
    empty = _NS.pop("empty", [0, 0])
    with open(os.environ["PROCSAFE_BENCH_OUT"], "w") as file:
        json.dump({"tests": _TESTS[0], "hooks": _NS, "empty": empty}, file)
