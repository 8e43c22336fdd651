"""DEMO: a worker that never finishes. Run it on purpose to see what procsafe shows:

    pytest -p procsafe examples/hung_worker/demo_hung_worker.py --procsafe-timeout=3

The file name does not start with ``test_``, so ``pytest examples/`` skips it.
"""

from __future__ import annotations

from multiprocessing.context import BaseContext
from multiprocessing.queues import Queue
from typing import Any

from pytest_procsafe import WorkerGroup


def next_job(jobs: Queue[Any]) -> Any:
    return jobs.get()  # nobody ever puts a job: the worker hangs here


def test_hung_worker(mp_context: BaseContext, mp_process: WorkerGroup) -> None:
    jobs = mp_context.Queue()  # a plain queue: procsafe's own would time out instead
    worker = mp_process(next_job, jobs)
    assert worker.result() == "a job"  # waits for --procsafe-timeout, then fails
