"""Workers share a counter under a lock; a shared memory block carries bytes back.

`mp_channels` makes the lock, the value and the block from the test's start method. A
worker that died holding the lock would fail the test at once with ChannelTimeout,
naming the worker and its signal, instead of hanging it; the block is unlinked at
teardown, so nothing is left in /dev/shm.
"""

from __future__ import annotations

from typing import Any

from pytest_procsafe import Channels
from pytest_procsafe import WorkerGroup


def count(lock: Any, counter: Any, times: int) -> None:
    for _ in range(times):
        with lock:  # bounded by the procsafe timeout: never a silent hang
            counter.value += 1


def shout(block: Any) -> None:
    block.buf[:5] = b"HELLO"


def test_counter_and_block(mp_process: WorkerGroup, mp_channels: Channels) -> None:
    lock, counter = mp_channels.lock(), mp_channels.value("i", 0)
    workers = [mp_process(count, lock, counter, 100) for _ in range(4)]
    block = mp_channels.shared_memory(5)
    mp_process(shout, block).result()
    for worker in workers:
        worker.result()
    assert counter.value == 400
    assert bytes(block.buf[:5]) == b"HELLO"
