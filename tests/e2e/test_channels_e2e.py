"""End-to-end: mp_pipe, mp_queue, mp_manager and mp_channels under every start method.

Each run writes a test file and runs it once per start method in a pytest subprocess with
``--procsafe-leaks=fail``; many cases share one run, since each run costs about a second.
"""

from __future__ import annotations

import time

import pytest

from e2ekit import FAIL_ON_LEAKS
from e2ekit import run
from pytest_procsafe import _methods

ALL = _methods.available()

#: After every inner test (an autouse fixture is torn down after the mp_* fixtures): no
#: feeder thread, no worker or manager process, no manager procsafe still owns.
NOTHING_LEFT = """
    import multiprocessing
    import threading

    import pytest

    from pytest_procsafe import _owned


    @pytest.fixture(autouse=True)
    def nothing_left_behind():
        yield
        feeders = [t for t in threading.enumerate() if t.name == "QueueFeederThread"]
        assert feeders == [], "a queue feeder thread outlived the test"
        assert multiprocessing.active_children() == [], "a process outlived the test"
        # The guardian is procsafe's too, for the whole run: only workers and managers count.
        assert _owned.pids() - _owned.pids(_owned.GUARDIAN) == set()
"""

ROUND_TRIPS = """
    import os

    BIG = 2 << 20  # far more than a pipe buffer holds


    def double_from(inbox, outbox):
        outbox.put(inbox.get() * 2)


    def echo(end):
        end.send(end.recv() * 2)


    def work_off(tasks, results):
        while (task := tasks.get()) is not None:
            results.put(task + 1)
            tasks.task_done()
        tasks.task_done()


    def record_pid(shared):
        shared.append(os.getpid())


    def test_queue(mp_process, mp_queue, mp_channels):
        outbox = mp_channels.queue()
        worker = mp_process(double_from, mp_queue, outbox)
        mp_queue.put(21)
        assert outbox.get() == 42
        worker.result()


    def test_pipes(mp_process, mp_pipe, mp_channels):
        left, right = mp_pipe
        worker = mp_process(echo, right)
        left.send(21)
        assert left.recv() == 42
        reader, writer = mp_channels.pipe(duplex=False)
        mp_process(lambda: writer.send("captured in a closure")).result()
        assert reader.recv() == "captured in a closure"
        worker.result()


    def test_joinable_queue(mp_process, mp_channels):
        tasks, results = mp_channels.joinable_queue(), mp_channels.queue()
        worker = mp_process(work_off, tasks, results)
        for task in (1, 2, 3, None):
            tasks.put(task)
        tasks.join()
        assert sorted(results.get() for _ in range(3)) == [2, 3, 4]
        worker.result()


    def test_manager(mp_process, mp_manager, mp_channels):
        shared = mp_manager.list()
        mapping = mp_channels.manager().dict()
        worker = mp_process(record_pid, shared)
        mp_process(lambda: mapping.update(seen=True)).result()
        worker.result()
        assert list(shared) == [worker.pid]
        assert dict(mapping) == {"seen": True}


    def test_plain_process(mp_context, mp_queue):
        process = mp_context.Process(target=double_from, args=(mp_queue, mp_queue))
        process.start()
        mp_queue.put(21)
        process.join(30)
        assert mp_queue.get() == 42


    def test_a_worker_puts_2mb_that_nobody_reads(mp_process, mp_queue):
        mp_process(mp_queue.put, b"x" * BIG)


    def test_a_worker_sends_2mb_that_nobody_reads(mp_process, mp_pipe):
        mp_process(mp_pipe[1].send_bytes, b"x" * BIG)


    def test_the_test_puts_2mb_that_nobody_reads(mp_queue):
        mp_queue.put(b"x" * BIG)


    def test_the_test_closes_them_itself(mp_queue, mp_pipe, mp_manager):
        with mp_manager:
            mp_manager.dict()["seen"] = True
        mp_queue.put("flushed")
        mp_queue.close()
        mp_queue.join_thread()
        for end in mp_pipe:
            end.close()
"""

FAILURES = """
    import os

    import pytest


    def die():
        os._exit(3)


    def wait_for_goodbye(end):
        end.recv(timeout=None)


    @pytest.mark.procsafe(timeout=60)
    def test_get_from_a_dead_worker(mp_process, mp_queue):
        mp_process.start(die, name="dies")
        assert mp_queue.get() == "never sent"


    def test_recv_that_nobody_answers(mp_process, mp_pipe):
        left, right = mp_pipe
        mp_process.start(wait_for_goodbye, (right,), name="waits")
        try:
            left.recv()
        finally:
            left.send("goodbye")
"""


def test_round_trips_pass_and_leave_nothing_behind(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NOTHING_LEFT)
    pytester.makepyfile(ROUND_TRIPS)
    result = run(pytester, "-v", options=FAIL_ON_LEAKS)
    result.assert_outcomes(passed=9 * len(ALL))
    for method in ALL:
        result.stdout.fnmatch_lines([f"*test_manager[[]{method}[]] PASSED*"])


def test_reads_nothing_can_answer_fail_with_a_diagnosis(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NOTHING_LEFT)
    pytester.makepyfile(FAILURES)
    start = time.monotonic()
    result = run(pytester, "--procsafe-timeout=1", options=FAIL_ON_LEAKS)
    # The dead worker's get() fails at once, long before its 60 s timeout.
    assert time.monotonic() - start < 40
    # Beside the failed read, the worker's crash nobody looked at errors its teardown.
    result.assert_outcomes(failed=2 * len(ALL), errors=len(ALL))
    result.stdout.fnmatch_lines(
        [
            "E * pytest_procsafe.ChannelTimeout: get() on mp_queue gave up after *: every "
            "worker of this test has exited and nothing is pending, so it could never complete",
            "E *workers of this test:",
            "E *  worker 'dies' pid * exited with code 3 before handing back a result",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E * pytest_procsafe.ChannelTimeout: recv() on mp_pipe left timed out after 1s "
            "(the procsafe timeout)",
            "E *workers of this test:",
            "E *  worker 'waits' pid * is still running",
        ]
    )
