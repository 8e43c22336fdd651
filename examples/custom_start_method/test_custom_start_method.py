"""Tests under a conftest that chooses the start method itself (see conftest.py)."""

from __future__ import annotations

from multiprocessing.context import BaseContext

from pytest_procsafe import WorkerGroup


def test_one_start_method(mp_context: BaseContext, mp_process: WorkerGroup) -> None:
    # Not parametrized: the conftest's mp_start_method replaces procsafe's.
    assert mp_context.get_start_method() == "spawn"
    assert mp_process(abs, -3).result() == 3
