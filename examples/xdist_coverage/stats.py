"""Statistics computed in child processes: code that only ever runs outside the test
process, so measuring its coverage needs the children to be measured."""

from __future__ import annotations

from multiprocessing.context import BaseContext


def sum_of_squares(numbers: list[int]) -> int:
    """Runs in a child process."""
    return sum(n * n for n in numbers)


def parallel_sum_of_squares(ctx: BaseContext, chunks: list[list[int]]) -> int:
    pool = ctx.Pool(2)
    try:
        return sum(pool.map(sum_of_squares, chunks))
    finally:
        # close() + join() lets the workers finish and exit on their own; the `with`
        # block would terminate() them, which throws away what they have not saved.
        pool.close()
        pool.join()
