"""The first code that runs inside every worker, under every start method.

`main` is the ``target`` of the ``multiprocessing`` process behind each worker. In order:

1. arm the parent-death signal (Linux), so a worker dies with a killed pytest;
2. register a faulthandler stack dump of every thread on `_stacks.SIGNAL`, written to a file the
   parent created, so the parent can show where a hung worker is stuck;
3. start coverage when the parent's `_coverage.Plan` asks for it (before the payload is
   loaded, so a spawn child's imports of the test module are measured too);
4. load the payload (under spawn/forkserver this unpickles the target, which may import
   the test module: a failure is reported as the outcome, not as a bare crash);
5. run the target, save the coverage data, and send its outcome over the result pipe:
   saving first means the test process never holds a result whose data is not on disk.

Outcomes and exit codes, mirroring ``multiprocessing.Process`` where it has a rule:

* the target returns: the value is sent (``VALUE``); if it cannot be pickled its
  description is sent instead (``UNPICKLABLE``); exit code 0.
* the target raises ``SystemExit``: ``EXIT`` with the code multiprocessing derives from it
  (``None`` -> 0, an int -> itself, anything else -> 1, its text printed to stderr); the
  process exits with that code. ``SystemExit(0)`` is a clean exit without a result.
* the target raises anything else, ``KeyboardInterrupt`` included: ``ERROR`` with the
  pickled exception (when it survives pickling) and its formatted traceback; exit code 1.
* the target cannot be loaded: ``LOAD_FAILED`` with the traceback; exit code 1.

Runs inside workers: imports neither pytest nor the plugin.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import pickle
import reprlib
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import IO
from typing import Any
from typing import Final
from typing import NamedTuple

from pytest_procsafe import _coverage
from pytest_procsafe import _stacks
from pytest_procsafe._payload import Payload
from pytest_procsafe._payload import dumps

VALUE: Final = "value"
UNPICKLABLE: Final = "unpicklable"
ERROR: Final = "error"
EXIT: Final = "exit"
LOAD_FAILED: Final = "load-failed"

_PR_SET_PDEATHSIG: Final = 1  # from <linux/prctl.h>


class Launch(NamedTuple):
    """What the parent tells a worker's bootstrap besides the payload."""

    #: The start method, for messages.
    start_method: str
    #: File for the faulthandler stack dump on `_stacks.SIGNAL`; None where there is none.
    stack_file: str | None
    #: Whether to arm PR_SET_PDEATHSIG: only when the thread that creates the child lives as
    #: long as the test process (the signal fires when that *thread* exits).
    deathsig: bool
    #: The pid the child's parent must have once the signal is armed; None when the parent
    #: is not the test process (forkserver: the server is the parent).
    parent_pid: int | None
    #: What to do for coverage; None when the test run is not measured (or coverage's own
    #: configuration does all of it).
    coverage: _coverage.Plan | None = None


class Outcome(NamedTuple):
    """What a worker reports back to the test process."""

    kind: str
    #: The pickled return value or exception, when it could be pickled.
    blob: bytes | None
    #: The formatted remote traceback, or why the value could not be sent.
    text: str
    #: A one-line summary for messages ("ValueError: boom").
    summary: str
    #: The process exit code that goes with an EXIT outcome.
    code: int | None = None


# Kept open for the life of the process: faulthandler writes to its descriptor from a
# signal handler, long after main() has moved on.
_stack_file: IO[str] | None = None


def main(payload: Payload, result: Connection, launch: Launch) -> None:
    """Run *payload* in this worker and send its `Outcome` over *result*."""
    _arm_parent_death_signal(launch)
    _register_stack_dump(launch.stack_file)
    finish = _start_coverage(launch.coverage)
    try:
        target, args, kwargs = payload.load()
    except BaseException as exc:
        _send(result, _load_failure(payload.name, launch.start_method, exc), finish)
        raise SystemExit(1) from None
    try:
        value = target(*args, **kwargs)
    except SystemExit as exc:
        _send(result, exit_outcome(exc), finish)
        raise
    except BaseException as exc:
        _send(result, error_outcome(exc), finish)
        raise SystemExit(1) from None
    _send(result, value_outcome(payload.name, value), finish)


def value_outcome(name: str, value: object) -> Outcome:
    """A return value, or why it cannot travel back."""
    try:
        return Outcome(VALUE, dumps(value), "", f"returned {_short_repr(value)}")
    except Exception as exc:
        text = (
            f"the return value of {name!r} cannot be pickled back to the test process "
            f"({_short_repr(value)}): {type(exc).__name__}: {exc}"
        )
        return Outcome(UNPICKLABLE, None, text, f"returned an unpicklable {type(value).__name__}")


def error_outcome(exc: BaseException) -> Outcome:
    """An exception with its traceback; the exception itself only if it survives pickling."""
    import traceback  # only failures need it: a worker starts without it

    text = _format(exc)
    summary = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    blob: bytes | None
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # exceptions with custom __init__ often pickle but fail to load
    except Exception as problem:
        blob = None
        text += (
            f"\n(the exception itself could not be sent: {type(problem).__name__}: {problem})\n"
        )
    return Outcome(ERROR, blob, text, summary)


def exit_outcome(exc: SystemExit) -> Outcome:
    """``SystemExit``, with the exit code multiprocessing turns it into."""
    code: Any = exc.code
    if code is None:
        number = 0
    elif isinstance(code, int):
        number = int(code)
    else:
        number = 1
    return Outcome(EXIT, None, "" if code is None else str(code), f"SystemExit({code!r})", number)


def _load_failure(name: str, start_method: str, exc: BaseException) -> Outcome:
    import traceback

    text = _format(exc)
    summary = (
        f"could not load the target {name!r} in the {start_method} child: "
        + "".join(traceback.format_exception_only(type(exc), exc)).strip()
    )
    return Outcome(LOAD_FAILED, None, text, summary)


def _format(exc: BaseException) -> str:
    import traceback

    tb = exc.__traceback__
    if tb is not None and tb.tb_frame.f_code is main.__code__:
        tb = tb.tb_next  # the user's code starts below the bootstrap's own frame
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _start_coverage(plan: _coverage.Plan | None) -> Callable[[], None]:
    """Start measuring as *plan* says; returns what saves the data (a no-op without one).

    Coverage is a bystander: if it cannot start or save here, the worker runs anyway and
    says why on stderr.
    """
    if plan is None:
        return _nothing
    try:
        finish = _coverage.start(plan)
    except Exception as exc:
        sys.stderr.write(f"procsafe: could not measure coverage in this worker: {exc!r}\n")
        return _nothing

    def guarded() -> None:
        try:
            finish()
        except Exception as exc:
            sys.stderr.write(f"procsafe: could not save this worker's coverage: {exc!r}\n")

    return guarded


def _nothing() -> None:
    return None


def _send(result: Connection, outcome: Outcome, finish: Callable[[], None]) -> None:
    finish()
    try:
        result.send_bytes(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        # The test process is gone or closed its end: keep the failure visible somewhere.
        if outcome.kind in (ERROR, LOAD_FAILED):
            sys.stderr.write(outcome.text)
    finally:
        result.close()


class _ShortRepr(reprlib.Repr):
    """``repr`` that never builds the whole text of a huge value (a 100 MB bytes result
    took seconds to repr, only to be cut to 80 characters)."""

    def repr_bytes(self, value: bytes, level: int) -> str:
        return self._cut(value)

    def repr_bytearray(self, value: bytearray, level: int) -> str:
        return self._cut(value)

    def repr_str(self, value: str, level: int) -> str:
        return self._cut(value)

    def _cut(self, value: str | bytes | bytearray) -> str:
        head = repr(value[: self.maxstring])
        return head if len(value) <= self.maxstring else head + "..."


_SHORT: Final = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = 80


def _short_repr(value: object, limit: int = 80) -> str:
    try:
        text = _SHORT.repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _register_stack_dump(path: str | None) -> None:
    global _stack_file
    register = getattr(faulthandler, "register", None)  # absent on Windows
    if path is None or register is None or _stacks.SIGNAL is None:
        return
    _stack_file = open(path, "w")  # noqa: SIM115  # must outlive this function
    register(_stacks.SIGNAL, file=_stack_file, all_threads=True, chain=False)


def _arm_parent_death_signal(launch: Launch) -> None:
    if not launch.deathsig or not sys.platform.startswith("linux"):
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    # The parent may have died between the fork and the prctl call, in which case the
    # signal will never come: act as if it had.
    if launch.parent_pid is not None and os.getppid() != launch.parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
