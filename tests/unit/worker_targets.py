"""Targets for the unit tests' workers.

They live apart from the test modules so that a spawn or forkserver child imports only
this small module, not pytest with the whole test module: the suite stays fast.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

WAIT = 60.0  # generous: only a broken worker ever blocks this long


def square(x: int) -> int:
    return x * x


def imported(*names: str) -> list[str]:
    """Which of the modules *names* this worker has imported."""
    return [name for name in names if name in sys.modules]


def make_adder(n: int) -> Callable[[int], int]:
    return lambda x: x + n


def answer() -> int:
    return 42


def describe(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


class Oops(Exception):
    """An exception type of the tests' own."""


def raise_oops() -> None:
    raise Oops("from the worker")


def raise_value_error() -> None:
    raise ValueError("boom")


class CarriesALock(Exception):
    def __init__(self) -> None:
        super().__init__("with a lock")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise CarriesALock


class NeedsTwoArgs(Exception):
    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"{first}+{second}")  # args has one item: unpickling fails


def raise_needs_two_args() -> None:
    raise NeedsTwoArgs("a", "b")


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def exit_with(code: object) -> None:
    raise SystemExit(code)


def hard_exit(code: int) -> None:
    os._exit(code)


def kill_myself(signum: int) -> None:
    faulthandler.disable()  # a fork child inherits pytest's, which would dump to stderr
    os.kill(os.getpid(), signum)
    time.sleep(WAIT)


def return_a_lock() -> object:
    return threading.Lock()


def big_result(size: int) -> bytes:
    return b"x" * size


def spin_forever_in_here() -> None:
    while True:
        time.sleep(0.01)


def ignore_sigterm_and_sleep() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(0.01)


def block_on_event(event: Any) -> None:
    event.wait(WAIT)


def ready_then_spin_in_a_named_function(ready: Any) -> None:
    ready.set()
    while True:
        time.sleep(0.01)


def ready_then_sleep(ready: Any, seconds: float) -> None:
    ready.set()
    time.sleep(seconds)


def put_big_item(queue: Any, size: int) -> None:
    queue.put(b"y" * size)  # the feeder thread blocks until someone reads


def parent_death_signal() -> int:
    value = ctypes.c_int(-1)
    ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(value), 0, 0, 0)  # PR_GET_PDEATHSIG
    return value.value


def return_then_linger(value: object, seconds: float) -> object:
    """Return *value*; a non-daemon thread keeps the process from exiting for *seconds*."""
    threading.Thread(target=time.sleep, args=(seconds,)).start()
    return value


def linger_forever_in_here() -> None:
    while True:
        time.sleep(0.01)


def return_then_hang(value: object) -> object:
    """Return *value*, then never exit: a non-daemon thread runs for ever."""
    threading.Thread(target=linger_forever_in_here).start()
    return value


def environment(*names: str) -> dict[str, str | None]:
    """The values of *names* in this worker's ``os.environ`` (None: not set)."""
    return {name: os.environ.get(name) for name in names}


def send_environment(connection: Any, names: tuple[str, ...]) -> None:
    connection.send(environment(*names))
    connection.close()


def environment_in_own_forkserver_child(name: str, value: str) -> tuple[object, object]:
    """*name* as a forkserver child of this worker sees it: before and after this worker
    sets it to *value*, its forkserver started before the change."""
    import multiprocessing

    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        before = pool.apply_async(environment, (name,)).get(WAIT)
    os.environ[name] = value
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        after = pool.apply_async(environment, (name,)).get(WAIT)
    return before, after


def sleep_in_a_named_function(ready: Any, seconds: float) -> None:
    """A plain child's target: its stack shows this function's name."""
    ready.set()
    time.sleep(seconds)
