"""Run the same Pool-based code under every start method this platform has.

`mp_context` is parametrized by pytest-procsafe, so this test runs once per start
method ([fork], [spawn], [forkserver]) without touching the global start method.
"""

from __future__ import annotations

from multiprocessing.context import BaseContext


def square(n: int) -> int:
    return n * n


def parallel_squares(ctx: BaseContext, numbers: list[int]) -> list[int]:
    with ctx.Pool(2) as pool:
        return pool.map(square, numbers)


def test_parallel_squares(mp_context: BaseContext) -> None:
    assert parallel_squares(mp_context, [1, 2, 3, 4]) == [1, 4, 9, 16]
