"""Notes that explain a failure to pickle: which part of what was sent, why, what to do.

Under ``spawn`` and ``forkserver`` a process start pickles the process object (its target,
args and kwargs); a Pool or ProcessPoolExecutor pickles every task under every start
method. When that fails, Python says ``Can't pickle local object 'test_x.<locals>.work'``
or ``cannot pickle '_thread.lock' object`` and no more: not *which* argument, nor why it
worked under fork, nor what to do. The note made here says all three, e.g.::

    procsafe: args[1].lock cannot be pickled: a threading.Lock

Nothing here runs unless something already failed to pickle. Then `_picklewalk` pickles
the parts of what failed again, one by one (with the pickler that failed, to a sink that
keeps nothing), to find the innermost part that fails on its own. Its reducers are the
pickler's own, so what a user registered counts. The note is added to the exception
(PEP 678 notes; on Python 3.10 pytest shows ``__notes__`` through its exceptiongroup
backport, and the plugin adds a report section where that does not happen).

Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import pickle
import re
import sys
import types
from collections.abc import Iterator
from collections.abc import Mapping
from multiprocessing import reduction
from typing import Final

from pytest_procsafe import _picklenote
from pytest_procsafe import _picklewalk
from pytest_procsafe._picklewalk import Root

#: Defined by exceptions whose owner explains them itself (procsafe's worker payloads).
NOTE_ATTRIBUTE: Final = "procsafe_note"

# What Python's picklers say when they fail, across 3.10-3.14, and what a multiprocessing
# lock or queue says when it is pickled outside a start.
_MESSAGE: Final = re.compile(
    r"pickl|Can't get local object|shared between processes\s+through inheritance", re.I
)
_CHAIN_LIMIT: Final = 16

# Pool and ProcessPoolExecutor workers: which of the worker's arguments are the user's.
_POOL_WORKERS: Final[Mapping[tuple[object, object], str]] = {
    ("multiprocessing.pool", "worker"): "pool",
    ("concurrent.futures.process", "_process_worker"): "executor",
}


# --- the entry points -------------------------------------------------------------------


def looks_like(exc: BaseException) -> bool:
    """Whether *exc* reads like a failure to pickle (the walk then confirms it)."""
    if isinstance(exc, pickle.PicklingError):
        return True
    if not isinstance(exc, (TypeError, AttributeError, RuntimeError, ValueError)):
        return False
    return _MESSAGE.search(str(exc)) is not None


def explained(exc: BaseException) -> bool:
    """Whether *exc*, or an exception in its chain, carries procsafe's note already or is
    one whose owner explains it (a payload's, even when no part could be named)."""
    return any(hasattr(each, NOTE_ATTRIBUTE) or _note_of(each) is not None for each in _chain(exc))


def attach(exc: BaseException, note: str) -> None:
    """Add *note* to *exc*: a PEP 678 note (3.11+), ``__notes__`` on 3.10 (as the
    exceptiongroup backport, which pytest uses there, reads it)."""
    if sys.version_info >= (3, 11):
        exc.add_note(note)
        return
    notes = getattr(exc, "__notes__", None)
    if isinstance(notes, list):
        notes.append(note)
    else:
        exc.__notes__ = [note]  # type: ignore[attr-defined]  # 3.10 has no notes


def explain_start(process: object, exc: BaseException) -> None:
    """Note on *exc* why ``process.start()`` failed to pickle *process*, if it did.

    Called by the start wrapper of `_births`, with the start's own exception: never
    raises, so that exception goes on unchanged but for the note.
    """
    try:
        if not looks_like(exc) or explained(exc):
            return
        method = getattr(type(process), "_start_method", None) or _default_method()
        if method not in ("spawn", "forkserver"):
            return  # fork pickles nothing: this failure is not about what was sent
        note = _process_note(process, exc, method)
        if note is not None:
            attach(exc, note)
    except Exception:  # a note is a courtesy: it never replaces the real error
        return


def worker_note(
    call: tuple[object, tuple[object, ...], Mapping[str, object]],
    exc: BaseException,
    method: str,
    pickler: type[object],
) -> str | None:
    """The note for an ``mp_process`` payload ``(target, args, kwargs)`` that *pickler*
    (procsafe's cloudpickle pickler for launches) failed to pickle; None if not found."""
    try:
        target, args, kwargs = call
        walk = _picklewalk.Walk(
            pickler, protocol=pickle.HIGHEST_PROTOCOL, by_value=True, spawning=True
        )
        culprit = walk.first(_call_roots(("target", target), args, kwargs, "args", "kwargs"))
        return None if culprit is None else _picklenote.compose(culprit, "worker", method)
    except Exception:
        return None


def explain(exc: BaseException) -> str | None:
    """Note the pickling failure in *exc*'s chain, found from its traceback; the text to
    show by other means when this Python would not show the note (else None).

    For what no wrapper saw: Pool and ProcessPoolExecutor tasks (pickled in a thread of
    the pool, the failure raised later by ``get()`` or ``result()``), messages on pipes
    and queues, and starts while the start wrapper is not installed.
    """
    try:
        if not explained(exc):
            for each in _chain(exc):
                if looks_like(each):
                    note = _from_traceback(each)
                    if note is not None:
                        attach(each, note)
                        break
        return _unshown(exc)
    except Exception:
        return None


# --- where a failure came from ----------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _CHAIN_LIMIT:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _note_of(exc: BaseException) -> str | None:
    own = getattr(exc, NOTE_ATTRIBUTE, None)
    if isinstance(own, str):
        return own
    for note in getattr(exc, "__notes__", None) or ():
        if isinstance(note, str) and note.startswith(_picklenote.PREFIX):
            return note
    return None


def _unshown(exc: BaseException) -> str | None:
    """On 3.10: our notes that this interpreter's traceback formatting does not show."""
    if sys.version_info >= (3, 11):
        return None
    import traceback

    missing = []
    for each in _chain(exc):
        note = _note_of(each)
        if note is not None and NOTE_ATTRIBUTE not in vars(each):
            shown = "".join(traceback.format_exception_only(type(each), each))
            if note.splitlines()[0] not in shown:
                missing.append(note)
    return "\n\n".join(missing) or None


_DUMPS: Final = frozenset(
    {
        reduction.ForkingPickler.dumps.__func__.__code__,  # type: ignore[attr-defined]
        reduction.dump.__code__,
    }
)


def _from_traceback(exc: BaseException) -> str | None:
    """The note for *exc*, from the object its traceback shows being pickled."""
    launch: types.FrameType | None = None
    dumped: types.FrameType | None = None
    pool_task = False
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        module = str(frame.f_globals.get("__name__", ""))
        if frame.f_code in _DUMPS:
            dumped = frame
        elif module.startswith("multiprocessing.popen_") and "process_obj" in frame.f_locals:
            launch = frame
        elif module == "multiprocessing.pool" and frame.f_code.co_name == "_handle_tasks":
            pool_task = True
        tb = tb.tb_next
    if launch is not None:  # a start: spawn and forkserver pickle the process object
        method = getattr(launch.f_locals.get("self"), "method", None)
        if method not in ("spawn", "forkserver"):
            return None
        return _process_note(launch.f_locals["process_obj"], exc, str(method))
    if dumped is None:
        return None
    obj = dumped.f_locals.get("obj")
    walk = _picklewalk.Walk(reduction.ForkingPickler, protocol=None, by_value=False)
    roots, context = _task_roots(obj, pool_task)
    culprit = walk.first(roots)
    return None if culprit is None else _picklenote.compose(culprit, context, None)


def _default_method() -> str | None:
    from multiprocessing import get_start_method

    return get_start_method(allow_none=True)  # set by the start that failed, if unset


# --- what the parts of each kind of object are called -----------------------------------


def _call_roots(
    first: tuple[str, object],
    args: object,
    kwargs: object,
    args_name: str,
    kwargs_name: str,
    hint: str | None = None,
) -> list[Root]:
    roots = [Root(first[0], first[1], hint)]
    if isinstance(args, (tuple, list)):
        roots += [Root(f"{args_name}[{i}]", arg) for i, arg in enumerate(args)]
    else:
        roots.append(Root(args_name, args))
    if isinstance(kwargs, Mapping):
        roots += [Root(f"{kwargs_name}[{key!r}]", value) for key, value in kwargs.items()]
    else:
        roots.append(Root(kwargs_name, kwargs))
    return roots


_PROCESS_INTERNALS: Final = frozenset(
    {
        "_identity",
        "_config",
        "_parent_pid",
        "_parent_name",
        "_popen",
        "_closed",
        "_target",
        "_args",
        "_kwargs",
        "_name",
        "_sentinel",
    }
)


def _process_roots(process: object) -> list[Root]:
    target = getattr(process, "_target", None)
    args = getattr(process, "_args", ())
    kwargs = getattr(process, "_kwargs", {})
    key = (getattr(target, "__module__", None), getattr(target, "__name__", None))
    pool = _POOL_WORKERS.get(key)
    roots: list[Root]
    if pool is not None and isinstance(args, tuple) and len(args) >= 4:
        owner = "a Pool" if pool == "pool" else "a ProcessPoolExecutor"
        roots = [Root("initializer", args[2], f"the initializer of {owner}")]
        initargs = args[3]
        if isinstance(initargs, (tuple, list)):
            roots += [Root(f"initargs[{i}]", arg) for i, arg in enumerate(initargs)]
        roots += [Root(f"args[{i}]", arg) for i, arg in enumerate(args) if i not in (2, 3)]
        roots += [Root(f"kwargs[{k!r}]", v) for k, v in dict(kwargs).items()]
    else:
        roots = _call_roots(("target", target), args, kwargs, "args", "kwargs")
    state = vars(process) if hasattr(process, "__dict__") else {}
    for name, value in state.items():
        if name not in _PROCESS_INTERNALS:  # a Process subclass's own attributes
            roots.append(Root(f"process.{name}", value))
    roots.append(Root("type(process)", type(process), "the class of the process object"))
    return roots


def _process_note(process: object, exc: BaseException, method: str) -> str | None:
    walk = _picklewalk.Walk(reduction.ForkingPickler, protocol=None, by_value=False, spawning=True)
    culprit = walk.first(_process_roots(process))
    return None if culprit is None else _picklenote.compose(culprit, "start", method)


def _task_roots(obj: object, pool_task: bool) -> tuple[list[Root], str]:
    """A Pool task ``(job, i, func, args, kwds)``, an executor's call item, or a message."""
    from multiprocessing import pool

    if pool_task and isinstance(obj, tuple) and len(obj) == 5 and isinstance(obj[3], tuple):
        _, chunk, func, args, kwds = obj
        star = (getattr(pool, "mapstar", None), getattr(pool, "starmapstar", None))
        if func in star and len(args) == 1 and len(args[0]) == 2:
            inner, items = args[0]
            roots = [Root("func", inner)]
            roots += [
                Root(
                    "item",
                    item,
                    f"an item of the iterable given to map (chunk {chunk}, position {j})",
                )
                for j, item in enumerate(items)
            ]
            return roots, "task"
        return _call_roots(("func", func), args, kwds, "args", "kwds"), "task"
    futures = sys.modules.get("concurrent.futures.process")
    call_item = getattr(futures, "_CallItem", None)
    if call_item is not None and isinstance(obj, call_item):
        fn, args, kwargs = obj.fn, obj.args, obj.kwargs
        chunked = getattr(futures, "_process_chunk", None)
        if getattr(fn, "func", None) is chunked and fn.args and len(args) == 1:
            roots = [Root("fn", fn.args[0])]
            roots += [
                Root("item", item, f"the arguments of one call from map (position {j})")
                for j, item in enumerate(args[0])
            ]
            return roots, "task"
        return _call_roots(("fn", fn), args, kwargs, "args", "kwargs"), "task"
    return [Root("the message", obj)], "send"
