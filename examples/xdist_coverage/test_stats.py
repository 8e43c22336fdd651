"""Runs under pytest-xdist with coverage: see pytest.ini and .coveragerc next to it."""

from __future__ import annotations

from multiprocessing.context import BaseContext

from stats import parallel_sum_of_squares
from stats import sum_of_squares

from pytest_procsafe import WorkerGroup


def test_in_a_pool(mp_context: BaseContext) -> None:
    assert parallel_sum_of_squares(mp_context, [[1, 2], [3]]) == 14


def test_in_a_worker(mp_process: WorkerGroup) -> None:
    assert mp_process(sum_of_squares, [4, 5]).result() == 41
