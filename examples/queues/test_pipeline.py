"""Tests for the pipeline: real processes, real queues, no hangs."""

from __future__ import annotations

from multiprocessing.queues import Queue
from typing import Any

import pytest
from pipeline import consume
from pipeline import produce

from pytest_procsafe import Channels
from pytest_procsafe import ChannelTimeout
from pytest_procsafe import WorkerCrashed
from pytest_procsafe import WorkerGroup


# start: pipeline
def test_pipeline(mp_process: WorkerGroup, mp_channels: Channels) -> None:
    jobs = mp_channels.queue()
    results = mp_channels.queue()
    mp_process(produce, jobs, 0, 50)
    mp_process(produce, jobs, 50, 100)
    mp_process(consume, jobs, results, 2)

    assert results.get() == sum(n * n for n in range(100))
    mp_process.join_all()


# end: pipeline


# start: timeout
def crash(jobs: object) -> None:
    import os

    os._exit(3)  # dies without putting anything on the queue


def test_a_dead_producer_fails_fast(mp_process: WorkerGroup, mp_queue: Queue[Any]) -> None:
    worker = mp_process(crash, mp_queue)
    with pytest.raises(ChannelTimeout, match="exited with code 3"):
        mp_queue.get()  # fails as soon as no worker can put anything any more
    with pytest.raises(WorkerCrashed):
        worker.result()


# end: timeout
