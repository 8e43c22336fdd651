from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import sys
import time
import types
from collections.abc import Callable
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import NamedTuple

import pytest
import worker_targets
from worker_targets import answer
from worker_targets import exit_with
from worker_targets import parent_death_signal
from worker_targets import raise_keyboard_interrupt
from worker_targets import raise_needs_two_args
from worker_targets import raise_unpicklable
from worker_targets import raise_value_error
from worker_targets import ready_then_sleep
from worker_targets import ready_then_spin_in_a_named_function
from worker_targets import return_a_lock

from pytest_procsafe import _bootstrap
from pytest_procsafe import _stacks
from pytest_procsafe._bootstrap import Launch
from pytest_procsafe._bootstrap import Outcome
from pytest_procsafe._payload import Payload

WAIT = 60.0  # generous: only a broken child ever takes this long
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux prctl")


# --- helpers --------------------------------------------------------------------------


class Started(NamedTuple):
    process: BaseProcess
    reader: Connection


class Launcher:
    """Starts bootstrap children for a test and stops every one of them at teardown."""

    def __init__(self, context: BaseContext, method: str) -> None:
        self.context = context
        self.method = method
        self.started: list[Started] = []

    def start(
        self,
        target: Callable[..., object],
        *args: object,
        stack_file: str | None = None,
        deathsig: bool = False,
        parent_pid: int | None = None,
    ) -> Started:
        reader, writer = self.context.Pipe(duplex=False)
        launch = Launch(self.method, stack_file, deathsig, parent_pid)
        process = self.context.Process(  # type: ignore[attr-defined]
            target=_bootstrap.main, args=(Payload(target, args), writer, launch)
        )
        process.start()
        writer.close()
        started = Started(process, reader)
        self.started.append(started)
        return started

    def outcome(self, target: Callable[..., object], *args: object) -> tuple[Outcome, int]:
        process, reader = self.start(target, *args)
        assert reader.poll(WAIT), "the worker sent nothing"
        outcome = pickle.loads(reader.recv_bytes())
        process.join(WAIT)
        assert process.exitcode is not None
        return outcome, process.exitcode

    def stop_all(self) -> None:
        for process, reader in self.started:
            if process.exitcode is None:
                process.kill()
            process.join(WAIT)
            reader.close()


@pytest.fixture
def launcher(mp_context: BaseContext, mp_start_method: str) -> Iterator[Launcher]:
    made = Launcher(mp_context, mp_start_method)
    yield made
    made.stop_all()


# --- outcomes -------------------------------------------------------------------------


def test_a_return_value_is_sent_and_the_exit_code_is_0(launcher: Launcher) -> None:
    outcome, code = launcher.outcome(answer)
    assert (outcome.kind, code, outcome.summary) == (_bootstrap.VALUE, 0, "returned 42")
    assert outcome.blob is not None
    assert pickle.loads(outcome.blob) == 42


def test_an_unpicklable_value_is_described_instead(launcher: Launcher) -> None:
    outcome, code = launcher.outcome(return_a_lock)
    assert (outcome.kind, outcome.blob, code) == (_bootstrap.UNPICKLABLE, None, 0)
    assert "the return value of 'return_a_lock' cannot be pickled" in outcome.text
    assert "lock" in outcome.text


def test_an_exception_is_sent_with_its_traceback_and_the_exit_code_is_1(
    launcher: Launcher,
) -> None:
    outcome, code = launcher.outcome(raise_value_error)
    assert (outcome.kind, code, outcome.summary) == (_bootstrap.ERROR, 1, "ValueError: boom")
    assert outcome.blob is not None
    exc = pickle.loads(outcome.blob)
    assert type(exc) is ValueError
    assert exc.args == ("boom",)
    assert f'File "{worker_targets.__file__}"' in outcome.text
    assert "in raise_value_error" in outcome.text
    assert _bootstrap.__file__ not in outcome.text  # the user's code starts the traceback


@pytest.mark.parametrize("target", [raise_unpicklable, raise_needs_two_args])
def test_an_exception_that_cannot_travel_still_sends_its_traceback(
    launcher: Launcher, target: Callable[[], None]
) -> None:
    outcome, code = launcher.outcome(target)
    assert (outcome.kind, outcome.blob, code) == (_bootstrap.ERROR, None, 1)
    assert f"in {target.__name__}" in outcome.text
    assert "(the exception itself could not be sent:" in outcome.text


def test_keyboard_interrupt_is_an_exception_outcome(launcher: Launcher) -> None:
    outcome, code = launcher.outcome(raise_keyboard_interrupt)
    assert (outcome.kind, outcome.summary, code) == (_bootstrap.ERROR, "KeyboardInterrupt", 1)


@pytest.mark.parametrize(
    ("code", "exit_code", "text"),
    [(None, 0, ""), (0, 0, "0"), (3, 3, "3"), ("bye", 1, "bye")],
)
def test_system_exit_maps_to_exit_codes_as_multiprocessing_does(
    launcher: Launcher, code: object, exit_code: int, text: str
) -> None:
    outcome, process_code = launcher.outcome(exit_with, code)
    assert (outcome.kind, outcome.code, process_code) == (_bootstrap.EXIT, exit_code, exit_code)
    assert outcome.text == text
    assert outcome.summary == f"SystemExit({code!r})"


@pytest.mark.procsafe(start_methods="spawn forkserver")
def test_a_target_the_child_cannot_import_is_a_load_failure(
    launcher: Launcher, monkeypatch: pytest.MonkeyPatch, mp_start_method: str
) -> None:
    ghost = types.ModuleType("procsafe_ghost_for_bootstrap")
    exec("def haunt():\n    return 'boo'\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, ghost.__name__, ghost)

    outcome, code = launcher.outcome(ghost.haunt)

    assert (outcome.kind, code) == (_bootstrap.LOAD_FAILED, 1)
    assert outcome.summary == (
        f"could not load the target 'haunt' in the {mp_start_method} child: "
        "ModuleNotFoundError: No module named 'procsafe_ghost_for_bootstrap'"
    )
    assert "ModuleNotFoundError" in outcome.text


# --- stack dumps and parent death -----------------------------------------------------


@pytest.mark.skipif(_stacks.SIGNAL is None, reason="needs a signal for faulthandler")
def test_sigusr1_dumps_every_thread_to_the_stack_file_and_the_worker_lives_on(
    launcher: Launcher, mp_context: BaseContext, tmp_path: Path
) -> None:
    stack_file = tmp_path / "stack.txt"
    stack_file.touch()
    ready = mp_context.Event()
    process, _ = launcher.start(
        ready_then_spin_in_a_named_function, ready, stack_file=str(stack_file)
    )
    assert ready.wait(WAIT)

    os.kill(process.pid, _stacks.SIGNAL)  # type: ignore[arg-type]
    deadline = time.monotonic() + WAIT
    while "ready_then_spin" not in stack_file.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)

    dump = stack_file.read_text()
    assert "in ready_then_spin_in_a_named_function" in dump
    assert "(most recent call first)" in dump
    assert process.is_alive()


@linux_only
@pytest.mark.parametrize(("deathsig", "expected"), [(True, signal.SIGKILL), (False, 0)])
def test_the_parent_death_signal_is_armed_only_when_asked(
    launcher: Launcher, deathsig: bool, expected: int
) -> None:
    _, reader = launcher.start(parent_death_signal, deathsig=deathsig)
    assert reader.poll(WAIT)
    outcome = pickle.loads(reader.recv_bytes())
    assert outcome.blob is not None
    assert pickle.loads(outcome.blob) == expected


@linux_only
def test_a_worker_whose_parent_already_changed_kills_itself(launcher: Launcher) -> None:
    # The parent "died" between fork and prctl: the worker must not run on as an orphan.
    process, reader = launcher.start(answer, deathsig=True, parent_pid=-1)
    process.join(WAIT)
    assert process.exitcode == -signal.SIGKILL
    assert reader.poll(WAIT)
    with pytest.raises(EOFError):
        reader.recv_bytes()  # it died before sending any outcome


def _middle(method: str, pids: Connection) -> None:
    """A parent that starts a worker, reports its pid and dies without reaping it."""
    context = multiprocessing.get_context(method)
    ready = context.Event()
    _, writer = context.Pipe(duplex=False)  # nobody reads: the worker never finishes
    launch = Launch(method, None, True, os.getpid())
    worker = context.Process(  # type: ignore[attr-defined]
        target=_bootstrap.main, args=(Payload(ready_then_sleep, (ready, 20.0)), writer, launch)
    )
    worker.start()
    if ready.wait(WAIT):
        pids.send(worker.pid)
    # Unlink the event's named semaphores as a normal exit would (the worker keeps its
    # mapping): only the worker is meant to be left without its parent.
    multiprocessing.util._run_finalizers(0)  # type: ignore[attr-defined]
    os._exit(0)


def _state(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of *pid*, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


@linux_only
@pytest.mark.procsafe(start_methods="fork spawn")  # a forkserver worker's parent is the server
def test_a_worker_dies_with_its_parent(mp_start_method: str) -> None:
    fork = multiprocessing.get_context("fork")
    reader, writer = fork.Pipe(duplex=False)
    middle = fork.Process(target=_middle, args=(mp_start_method, writer))
    middle.start()
    writer.close()
    try:
        assert reader.poll(WAIT), "the middle process reported no worker"
        worker_pid = reader.recv()
    finally:
        middle.join(WAIT)
        reader.close()

    deadline = time.monotonic() + 10
    state = _state(worker_pid)
    while state is not None and state[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.02)
        state = _state(worker_pid)
    if state is not None and state[1] == os.getpid():
        # This process is a subreaper, so the orphan is ours: reap it, dead or not.
        if state[0] != "Z":
            os.kill(worker_pid, signal.SIGKILL)
        os.waitpid(worker_pid, 0)
    assert state is None or state[0] == "Z", f"worker {worker_pid} outlived its parent"
