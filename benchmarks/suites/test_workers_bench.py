"""Worker round trips and channel throughput, procsafe against raw multiprocessing.

Each test times both variants in the same process, alternating them (ABBA order, after a
warm-up of each), and appends its samples to the JSON file named by ``PROCSAFE_BENCH_OUT``.
Sizes come from ``PROCSAFE_BENCH_ROUND_TRIPS``, ``PROCSAFE_BENCH_ITEMS`` and
``PROCSAFE_BENCH_REPEATS``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

from bench_targets import heavy_modules
from bench_targets import produce_pipe
from bench_targets import produce_queue
from bench_targets import raw_round_trip
from bench_targets import work

from pytest_procsafe import WorkerGroup

ROUND_TRIPS = int(os.environ.get("PROCSAFE_BENCH_ROUND_TRIPS", "20"))
ITEMS = int(os.environ.get("PROCSAFE_BENCH_ITEMS", "10000"))
REPEATS = int(os.environ.get("PROCSAFE_BENCH_REPEATS", "5"))
WAIT = 60.0  # generous: only a broken benchmark ever waits this long


def record(key: str, raw: list[float], ours: list[float], **extra: object) -> None:
    path = os.environ["PROCSAFE_BENCH_OUT"]
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as file:
            data = json.load(file)
    data[key] = {"raw": raw, "ours": ours, **extra}
    with open(path, "w") as file:
        json.dump(data, file)


def abba(count: int) -> Iterator[tuple[str, str]]:
    """raw, ours, ours, raw, ...: neither variant always runs first."""
    for i in range(count):
        yield ("raw", "ours") if i % 2 == 0 else ("ours", "raw")


def timed_pairs(count: int, run: dict[str, Callable[[int], float]]) -> dict[str, list[float]]:
    for name in ("raw", "ours"):
        run[name](-1)  # warm-up: the forkserver, the resource tracker, imports in the parent
    samples: dict[str, list[float]] = {"raw": [], "ours": []}
    for i, order in enumerate(abba(count)):
        for name in order:
            samples[name].append(run[name](i))
    return samples


def test_round_trip(
    mp_process: WorkerGroup, mp_context: BaseContext, mp_start_method: str
) -> None:
    def raw(i: int) -> float:
        start = time.perf_counter()
        queue = mp_context.Queue()
        process = mp_context.Process(target=raw_round_trip, args=(queue, i))  # type: ignore[attr-defined]
        process.start()
        assert queue.get(timeout=WAIT) == i + 1
        process.join(WAIT)
        queue.close()
        queue.join_thread()
        return time.perf_counter() - start

    def ours(i: int) -> float:
        start = time.perf_counter()
        assert mp_process(work, i).result() == i + 1
        return time.perf_counter() - start

    samples = timed_pairs(ROUND_TRIPS, {"raw": raw, "ours": ours})
    # The procsafe worker must not import pytest, nor the parent side of procsafe.
    heavy = mp_process(heavy_modules).result()
    if mp_start_method == "fork":
        heavy = []  # a forked child inherits the parent's modules: nothing was imported
    record(f"round trip {mp_start_method}", samples["raw"], samples["ours"], heavy=heavy)


def test_queue_throughput(
    mp_process: WorkerGroup, mp_queue: Any, mp_context: BaseContext, mp_start_method: str
) -> None:
    def drain(get: Callable[[], object]) -> float:
        get()  # the producer is running: time the channel, not the process start
        start = time.perf_counter()
        for _ in range(ITEMS - 1):
            get()
        return time.perf_counter() - start

    def raw(i: int) -> float:
        queue = mp_context.Queue()
        process = mp_context.Process(target=produce_queue, args=(queue, ITEMS))  # type: ignore[attr-defined]
        process.start()
        seconds = drain(queue.get)  # plain blocking reads: the fastest raw code
        process.join(WAIT)
        queue.close()
        queue.join_thread()
        return seconds

    def ours(i: int) -> float:
        worker = mp_process(produce_queue, mp_queue, ITEMS)
        seconds = drain(mp_queue.get)
        worker.result()
        return seconds

    samples = timed_pairs(REPEATS, {"raw": raw, "ours": ours})
    record(f"queue {mp_start_method}", samples["raw"], samples["ours"])


def test_pipe_throughput(
    mp_process: WorkerGroup, mp_pipe: Any, mp_context: BaseContext, mp_start_method: str
) -> None:
    def drain(recv: Callable[[], object]) -> float:
        recv()
        start = time.perf_counter()
        for _ in range(ITEMS - 1):
            recv()
        return time.perf_counter() - start

    def raw(i: int) -> float:
        left, right = mp_context.Pipe()
        process = mp_context.Process(target=produce_pipe, args=(right, ITEMS))  # type: ignore[attr-defined]
        process.start()
        seconds = drain(left.recv)  # plain blocking reads: the fastest raw code
        process.join(WAIT)
        left.close()
        right.close()
        return seconds

    left, right = mp_pipe

    def ours(i: int) -> float:
        worker = mp_process(produce_pipe, right, ITEMS)
        seconds = drain(left.recv)
        worker.result()
        return seconds

    samples = timed_pairs(REPEATS, {"raw": raw, "ours": ours})
    record(f"pipe {mp_start_method}", samples["raw"], samples["ours"])

    # The reader-bound case on its own: every read finds its item already there. The test
    # process writes a batch the socket buffer holds, then reads it; only the reads count.
    raw_ends = mp_context.Pipe()

    def waiting(ends: Any) -> Callable[[int], float]:
        reader, writer = ends

        def run(i: int) -> float:
            seconds = 0.0
            for _ in range(ITEMS // BATCH):
                for item in range(BATCH):
                    writer.send(item)
                start = time.perf_counter()
                for _ in range(BATCH):
                    reader.recv()
                seconds += time.perf_counter() - start
            return seconds

        return run

    try:
        samples = timed_pairs(REPEATS, {"raw": waiting(raw_ends), "ours": waiting(mp_pipe)})
    finally:
        for end in raw_ends:
            end.close()
    reads = ITEMS // BATCH * BATCH
    record(f"pipe-waiting {mp_start_method}", samples["raw"], samples["ours"], reads=reads)


#: Items written before they are read in the reader-bound pipe case: far fewer than a
#: socket pair's buffer holds (about 200 small messages here).
BATCH = 50
