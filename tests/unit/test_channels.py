"""Unit tests of `_channels`, `_wrappers` and `_timeouts`, with real processes.

Children are plain ``multiprocessing`` processes of the test's context (parametrized over
the start methods through ``mp_context``), so the wrappers travel as ordinary process
arguments: pickled under spawn and forkserver, inherited under fork.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from queue import Empty
from queue import Full
from typing import Any

import pytest

import pytest_procsafe
from pytest_procsafe import _owned
from pytest_procsafe._channels import Channels
from pytest_procsafe._frames import Skipper
from pytest_procsafe._timeouts import ChannelTimeout
from pytest_procsafe._timeouts import Watch
from pytest_procsafe._wrappers import ProcsafeConnection
from pytest_procsafe._wrappers import ProcsafeQueue

#: An upper bound for things that must happen "at once": far below the 30 s timeout the
#: channels use, far above any scheduling delay.
PROMPTLY = 10.0
BIG = 2 << 20  # far more than any pipe buffer holds


class Lab:
    """Processes and channels of one test; whatever a test leaves running is killed."""

    def __init__(self, context: BaseContext) -> None:
        self.context = context
        self.processes: list[BaseProcess] = []
        self.made: list[Channels] = []

    def start(self, target: Callable[..., object], *args: object) -> BaseProcess:
        process: BaseProcess = self.context.Process(target=target, args=args)  # type: ignore[attr-defined]
        process.start()
        self.processes.append(process)
        return process

    def channels(self, timeout: float = 30.0, kill_grace: float = 1.0) -> Channels:
        channels = Channels(
            self.context,
            timeout=timeout,
            kill_grace=kill_grace,
            diagnose=self.describe,
            workers_done=lambda: (
                bool(self.processes) and all(p.exitcode is not None for p in self.processes)
            ),
        )
        self.made.append(channels)
        return channels

    def describe(self) -> str:
        return "\n".join(
            f"worker pid {p.pid} "
            + ("is still running" if p.exitcode is None else f"exited with code {p.exitcode}")
            for p in self.processes
        )

    def drain_until_exit(self, channels: Channels, process: BaseProcess) -> None:
        # What WorkerGroup.close() does with a pump at teardown.
        deadline = time.monotonic() + PROMPTLY
        while process.exitcode is None and time.monotonic() < deadline:
            channels.drain()
            process.join(0.02)

    def cleanup(self) -> None:
        for process in self.processes:
            if process.exitcode is None:
                process.kill()
            process.join(PROMPTLY)
        for channels in self.made:
            channels.close()


@pytest.fixture
def lab(mp_context: BaseContext) -> Iterator[Lab]:
    lab = Lab(mp_context)
    yield lab
    lab.cleanup()


@pytest.fixture
def local() -> Iterator[Lab]:
    """For tests whose behaviour does not depend on the start method: no children."""
    lab = Lab(multiprocessing.get_context("spawn"))
    yield lab
    lab.cleanup()


def feeder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "QueueFeederThread" and t.is_alive()]


# --- targets run in the children (module level, so spawn can import them) ---------------


def echo_queue(inbox: ProcsafeQueue, outbox: ProcsafeQueue) -> None:
    outbox.put((type(inbox).__name__, inbox.label, inbox.get() * 2))


def echo_pipe(end: ProcsafeConnection, writer: ProcsafeConnection) -> None:
    writer.send((type(end).__name__, end.label))
    end.send(end.recv() * 2)


def work_off(tasks: Any, results: ProcsafeQueue) -> None:
    while (task := tasks.get()) is not None:
        results.put(task + 1)
        tasks.task_done()
    tasks.task_done()


def read_with_default_timeouts(queue: ProcsafeQueue, end: ProcsafeConnection, out: Any) -> None:
    texts = []
    for read in (queue.get, end.recv):
        try:
            read()
        except ChannelTimeout as exc:
            texts.append(str(exc))
    out.send(texts)


def exit_with_3(*channels: object) -> None:
    os._exit(3)


def put_later(queue: ProcsafeQueue) -> None:
    time.sleep(0.3)  # several wait steps: the reader must keep waiting for it
    queue.put("late")


def put_big(queue: ProcsafeQueue) -> None:
    queue.put(b"x" * BIG)


def send_big(end: ProcsafeConnection) -> None:
    end.send_bytes(b"x" * BIG)


def put_big_then_hang(queue: ProcsafeQueue) -> None:
    queue.put(b"x" * BIG)
    time.sleep(60)


def take_items_on_cue(
    cue: ProcsafeConnection, queue: ProcsafeQueue, end: ProcsafeConnection, out: Any
) -> None:
    cue.recv()  # the test has drained by now
    out.send([queue.get(timeout=5) for _ in range(3)] + [end.recv(), end.recv()])


def wait_for_word(end: ProcsafeConnection) -> None:
    end.recv(timeout=None)


def append_to(shared: Any) -> None:
    shared.append(os.getpid())


# --- round trips --------------------------------------------------------------------------


def test_queue_round_trip_through_a_child(lab: Lab) -> None:
    channels = lab.channels()
    inbox, outbox = channels.queue(name="inbox"), channels.queue()
    lab.start(echo_queue, inbox, outbox)
    inbox.put(21)
    assert outbox.get() == ("ProcsafeQueue", "inbox", 42)
    assert channels.close() == []


def test_pipe_round_trip_through_a_child(lab: Lab) -> None:
    channels = lab.channels()
    left, right = channels.pipe()
    reader, writer = channels.pipe(duplex=False, name="news")
    lab.start(echo_pipe, right, writer)
    assert reader.recv() == ("ProcsafeConnection", "pipe #1 right")
    left.send(21)
    waitables: list[Any] = [left]  # anything with fileno(), though the stubs say otherwise
    ready: list[Any] = multiprocessing.connection.wait(waitables, PROMPTLY)
    assert ready == [left]
    assert left.recv() == 42
    assert channels.close() == []
    assert [end.closed for end in (left, right, reader, writer)] == [True] * 4


def test_joinable_queue_round_trip(lab: Lab) -> None:
    channels = lab.channels()
    tasks, results = channels.joinable_queue(), channels.queue()
    lab.start(work_off, tasks, results)
    for task in (1, 2, 3, None):
        tasks.put(task)
    tasks.join()
    assert sorted(results.get() for _ in range(3)) == [2, 3, 4]
    assert channels.close() == []


def test_children_keep_the_default_timeout_without_a_diagnosis(lab: Lab) -> None:
    channels = lab.channels(timeout=0.2)
    queue = channels.queue(name="q")
    _, right = channels.pipe(name="p")
    reader, writer = channels.pipe(duplex=False)
    lab.start(read_with_default_timeouts, queue, right, writer)
    texts = reader.recv(timeout=PROMPTLY)
    assert writer.label == "pipe #1 writer"
    assert texts == [
        "get() on q timed out after 0.2s (the procsafe timeout)",
        "recv() on p right timed out after 0.2s (the procsafe timeout)",
    ]


# --- timeouts and diagnoses --------------------------------------------------------------


@pytest.mark.parametrize("call", ["get", "recv", "join"])
def test_a_read_fails_fast_once_every_worker_died(lab: Lab, call: str) -> None:
    channels = lab.channels()
    queue, joinable = channels.queue(), channels.joinable_queue(name="tasks")
    left, right = channels.pipe(name="mp_pipe")
    worker = lab.start(exit_with_3, queue, right, joinable)
    joinable.put("never done")  # after the start: a feeder thread must not run at a fork
    reads: dict[str, Callable[[], object]] = {
        "get": queue.get,
        "recv": left.recv,
        "join": joinable.join,
    }
    read = reads[call]
    start = time.monotonic()
    with pytest.raises(ChannelTimeout) as info:
        read()
    assert time.monotonic() - start < PROMPTLY
    message = str(info.value)
    assert "every worker of this test has exited" in message
    assert f"worker pid {worker.pid} exited with code 3" in message
    assert message.startswith(
        {"get": "get() on queue #1", "recv": "recv() on mp_pipe left", "join": "join() on tasks"}[
            call
        ]
    )


@pytest.mark.parametrize("kind", ["pipe", "queue"])
def test_a_reads_first_step_counts_against_its_timeout(
    local: Lab, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A default read waits its first step without the bounded wait's machinery; the
    wait's clock still starts before that step, so the timeout is not extended by it."""
    channels = local.channels(timeout=0.2)
    begun: list[float | None] = []
    wait = Watch.wait

    def spy(self: Watch, *args: Any, **kwargs: Any) -> Any:
        begun.append(kwargs.get("started"))
        return wait(self, *args, **kwargs)

    monkeypatch.setattr(Watch, "wait", spy)
    if kind == "pipe":
        left, _right = channels.pipe(name="p")
        read: Callable[[], object] = left.recv
    else:
        read = channels.queue(name="q").get
    before = time.monotonic()
    with pytest.raises(ChannelTimeout, match=r"timed out after 0\.2s"):
        read()
    after = time.monotonic()
    assert len(begun) == 1
    started = begun[0]
    assert started is not None, "the wait started its own clock after the first step"
    assert before <= started <= before + 0.04 < after  # before the first step's 50 ms
    channels.close()


def test_a_read_times_out_while_a_worker_runs(lab: Lab) -> None:
    channels = lab.channels(timeout=0.5)
    left, right = channels.pipe(name="mp_pipe")
    worker = lab.start(wait_for_word, right)
    start = time.monotonic()
    with pytest.raises(ChannelTimeout) as info:
        left.recv()
    assert time.monotonic() - start >= 0.5
    assert str(info.value) == (
        "recv() on mp_pipe left timed out after 0.5s (the procsafe timeout)\n"
        f"workers of this test:\n  worker pid {worker.pid} is still running"
    )
    left.send("go")
    worker.join(PROMPTLY)
    assert worker.exitcode == 0


def test_other_children_of_the_test_still_count_as_senders(lab: Lab) -> None:
    channels = Channels(
        lab.context, timeout=30, kill_grace=1, diagnose=str, workers_done=lambda: True
    )
    lab.made.append(channels)
    queue = channels.queue()
    lab.start(put_later, queue)  # not a "worker": a plain process the test started
    assert queue.get() == "late"


def test_explicit_timeouts_keep_their_standard_meaning(local: Lab) -> None:
    channels = local.channels(timeout=0.2)
    queue, bounded = channels.queue(), channels.queue(maxsize=1)
    left, right = channels.pipe()
    joinable = channels.joinable_queue()
    with pytest.raises(Empty):
        queue.get(timeout=0.05)
    with pytest.raises(Empty):
        queue.get(block=False)
    with pytest.raises(Empty):
        queue.get_nowait()
    bounded.put(1)
    with pytest.raises(Full):
        bounded.put(2, timeout=0.05)
    with pytest.raises(Full):
        bounded.put_nowait(2)
    with pytest.raises(ChannelTimeout, match=r"^put\(\) on queue #2 timed out after 0.2s"):
        bounded.put(2)
    with pytest.raises(
        ChannelTimeout,
        match=r"^recv\(\) on pipe #1 left timed out after 0.05s \(the timeout given\)",
    ):
        left.recv(timeout=0.05)
    right.send_bytes(b"abc")
    assert left.recv_bytes(timeout=None) == b"abc"
    right.send_bytes(b"def")
    buffer = bytearray(5)
    assert left.recv_bytes_into(buffer, 1, timeout=0) == 3
    assert buffer == b"\0def\0"
    joinable.put("task")
    with pytest.raises(
        ChannelTimeout,
        match=r"^join\(\) on joinable queue #1 timed out after 0s \(the timeout given\)",
    ):
        joinable.join(0)
    assert joinable.get() == "task"
    joinable.task_done()
    joinable.join()
    assert channels.close() == []
    assert feeder_threads() == []


@pytest.mark.parametrize("timeout", [-1, "1", True, float("nan")])
@pytest.mark.parametrize("waiting", [False, True], ids=["nothing-waiting", "message-waiting"])
def test_a_bad_timeout_is_a_clear_error(local: Lab, timeout: object, waiting: bool) -> None:
    left, right = local.channels().pipe()
    if waiting:  # read at once without a wait: the timeout is still checked, nothing lost
        right.send("kept")
    for read in (left.recv, left.recv_bytes):
        with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0, got"):
            read(timeout=timeout)  # type: ignore[arg-type]
    if waiting:
        assert left.recv() == "kept"


# --- drain and close ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["queue", "pipe"])
def test_a_worker_blocked_on_a_big_write_exits_once_drained(lab: Lab, kind: str) -> None:
    channels = lab.channels()
    if kind == "queue":
        worker = lab.start(put_big, channels.queue())
    else:
        worker = lab.start(send_big, channels.pipe()[1])
    lab.drain_until_exit(channels, worker)
    assert worker.exitcode == 0
    assert channels.close() == []


def test_drain_spares_what_the_test_sent_to_its_workers(lab: Lab) -> None:
    channels = lab.channels()
    queue = channels.queue()
    left, right = channels.pipe()
    cue, cue_writer = channels.pipe(duplex=False)
    reader, writer = lab.context.Pipe(duplex=False)  # the answer: not drained
    # Started first: under fork, no feeder thread of the test may run yet.
    worker = lab.start(take_items_on_cue, cue, queue, right, writer)
    for item in (1, 2, 3):
        queue.put(item)
    left.send("a")
    left.send("b")
    time.sleep(0.1)  # let the feeder thread write; a drain must still spare the items
    channels.drain()
    cue_writer.send("go")
    with reader, writer:
        assert reader.poll(PROMPTLY)
        assert reader.recv() == [1, 2, 3, "a", "b"]
    worker.join(PROMPTLY)
    assert channels.close() == []


@pytest.mark.skipif(sys.platform == "win32", reason="a message is never cut on Windows pipes")
def test_the_skipper_follows_the_framing_across_cut_messages() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    skipper = Skipper()

    def skip() -> tuple[int, bool, bool]:
        """Messages completed, whether one is half-read, whether the writer hung up."""
        return skipper.skip(reader), skipper.mid_message, skipper.ended

    with reader, writer:
        writer.send_bytes(b"a")
        writer.send_bytes(b"")
        os.write(writer.fileno(), struct.pack("!i", 7)[:2])  # cut inside the header
        assert skip() == (2, True, False)
        os.write(writer.fileno(), struct.pack("!i", 7)[2:] + b"1234")  # cut inside the body
        assert skip() == (0, True, False)
        os.write(writer.fileno(), b"567")
        # The long form, used above 2 GiB: -1, then an 8-byte length.
        os.write(writer.fileno(), struct.pack("!i", -1) + struct.pack("!Q", 3) + b"xyz")
        writer.send_bytes(b"last")
        assert skip() == (3, False, False)
        assert not reader.poll(0)
        writer.close()
        assert skip() == (0, False, True)


@pytest.mark.skipif(sys.platform == "win32", reason="a message is never cut on Windows pipes")
def test_drain_never_blocks_on_a_message_its_writer_cut_off(lab: Lab) -> None:
    channels = lab.channels()
    queue = channels.queue()
    worker = lab.start(put_big_then_hang, queue)
    deadline = time.monotonic() + PROMPTLY
    while queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not queue.empty()
    worker.kill()  # its feeder thread is stuck half-way through the message
    worker.join(PROMPTLY)
    channels.drain()  # recv_bytes() would wait forever for the rest of the message
    assert channels.close() == []


def test_close_flushes_and_joins_the_tests_own_feeder_thread(local: Lab) -> None:
    channels = local.channels()
    queue = channels.queue()
    queue.put(b"x" * BIG)  # nobody reads it: the feeder thread blocks on the full pipe
    assert feeder_threads() != []
    assert channels.close() == []
    assert feeder_threads() == []


# --- managers -----------------------------------------------------------------------------


def test_a_manager_serves_children_and_is_shut_down(lab: Lab) -> None:
    channels = lab.channels()
    manager = channels.manager()
    shared = manager.list()
    worker = lab.start(append_to, shared)
    worker.join(PROMPTLY)
    assert list(shared) == [worker.pid]
    process = manager._process  # type: ignore[attr-defined]
    assert process.pid in _owned.pids(_owned.MANAGER)
    assert channels.close() == []
    assert process.exitcode == 0  # it stopped on request
    assert process.pid not in _owned.pids(_owned.MANAGER)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_manager_that_does_not_answer_is_killed(lab: Lab) -> None:
    channels = lab.channels(timeout=0.3, kill_grace=0.1)
    manager = channels.manager(name="mp_manager")
    process = manager._process  # type: ignore[attr-defined]
    os.kill(process.pid, signal.SIGSTOP)  # it can neither answer nor handle SIGTERM
    try:
        problems = channels.close()
    finally:
        if process.exitcode is None:
            process.kill()
            process.join(PROMPTLY)
    assert problems == [
        f"mp_manager (manager pid {process.pid}) did not shut down within 0.3s "
        "(the shutdown request failed: the manager did not answer); killed"
    ]
    assert process.exitcode == -signal.SIGKILL
    assert process.pid not in _owned.pids(_owned.MANAGER)


# --- the factory itself -------------------------------------------------------------------


def test_channel_timeout_is_public_and_travels_between_processes() -> None:
    assert pytest_procsafe.ChannelTimeout is ChannelTimeout
    assert issubclass(ChannelTimeout, TimeoutError)
    assert ChannelTimeout.__module__ == "pytest_procsafe"
    copy = pickle.loads(pickle.dumps(ChannelTimeout("get() on q timed out")))
    assert type(copy) is ChannelTimeout
    assert str(copy) == "get() on q timed out"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"timeout": 0}, "timeout must be a number of seconds > 0, got 0"),
        ({"timeout": -1}, "timeout must be a number of seconds > 0, got -1"),
        ({"timeout": "30"}, "timeout must be a number of seconds > 0, got '30'"),
        ({"kill_grace": -0.5}, "kill_grace must be a number of seconds >= 0, got -0.5"),
        ({"kill_grace": float("nan")}, "kill_grace must be a number of seconds >= 0, got nan"),
    ],
)
def test_bad_settings_are_rejected(settings: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"timeout": 30, "kill_grace": 1, **settings}
    with pytest.raises(ValueError, match=message):
        Channels(multiprocessing.get_context("spawn"), diagnose=str, **arguments)


def test_bad_arguments_and_use_after_close_are_clear_errors(local: Lab) -> None:
    channels = local.channels()
    with pytest.raises(TypeError, match=r"maxsize must be an int .* got '3'"):
        channels.queue("3")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="duplex must be True or False, got 'yes'"):
        channels.pipe("yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name must be a non-empty string, got ''"):
        channels.joinable_queue(name="")
    with pytest.raises(TypeError, match="mp_channels cannot be sent to another process"):
        pickle.dumps(channels)
    queue = channels.queue()
    assert repr(queue) == "<ProcsafeQueue 'queue #1'>"
    assert channels.close() == channels.close() == []
    with pytest.raises(RuntimeError, match="mp_channels is closed"):
        channels.queue()
    with pytest.raises(ValueError, match="is closed"):
        queue.get()
