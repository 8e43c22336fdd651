"""A producer/consumer pipeline: producers put jobs on a queue, a consumer sums them.

Every process gets its queues as arguments, so the same code runs under any start method
and a test can hand it procsafe's queues (which never hang a test).
"""

from __future__ import annotations

from multiprocessing.queues import Queue
from typing import Any

DONE = None  # one per producer tells the consumer that producer has finished


def produce(jobs: Queue[Any], start: int, stop: int) -> None:
    """Put the numbers start..stop-1 on *jobs*, then DONE."""
    for number in range(start, stop):
        jobs.put(number)
    jobs.put(DONE)


def consume(jobs: Queue[Any], results: Queue[Any], producers: int) -> None:
    """Sum the squares of what arrives on *jobs* until every producer is done."""
    total = 0
    finished = 0
    while finished < producers:
        job = jobs.get()
        if job is DONE:
            finished += 1
        else:
            total += job * job
    results.put(total)
