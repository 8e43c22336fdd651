"""The walk behind `_pickling`'s notes: the innermost part of an object that fails to pickle.

Given the parts of something that failed to pickle (a process's target, args and kwargs;
a task's function and arguments), `Walk.first` pickles each with the pickler that failed,
to a sink that keeps nothing, and descends into the first that fails: tuples and lists by
index, dicts by key, functions pickled by value (cloudpickle) by their closure, globals
and defaults, other objects by what their reduction gives (``__reduce_ex__`` or a
registered reducer: the class, the ``__dict__``/``__getstate__`` state, the arguments),
which is what pickling itself calls. It stops at the part that fails while each of its
own parts pickles, within a depth and a number of attempts.

Pickling again must not do what the failed attempt would have done had it succeeded:

* while a child is launched, multiprocessing's reducers hand descriptors to the launch
  (``get_spawning_popen()``); the walk stands in a launch of its own, which only notes
  them, so nothing is duplicated and locks and queues pickle as at a real start;
* outside a launch a connection or socket would be handed on by starting the resource
  sharer's thread and duplicating its descriptor: the walk's picklers reduce those to a
  stand-in instead (they pickle there, so they are never the culprit).

Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import itertools
import pickle
import socket
import sys
import types
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from multiprocessing import connection as mp_connection
from multiprocessing import context as mp_context
from typing import Any
from typing import Final
from typing import NamedTuple
from typing import final

#: How deep the walk goes below a root, and how many pickling attempts it makes in all.
MAX_DEPTH: Final = 16
MAX_TRIES: Final = 500
#: How many parts of one object it tries (a list of a million items is not walked).
MAX_PARTS: Final = 200


class Root(NamedTuple):
    """A named part to start from: ``target``, ``args[1]``, ``kwargs['conn']``."""

    path: str
    obj: object
    hint: str | None = None


class Culprit(NamedTuple):
    """The innermost part found that fails to pickle, and how it failed."""

    path: str
    obj: object
    error: str  # "TypeError: cannot pickle '_thread.lock' object"
    hint: str | None  # what the culprit is to its owner: "the closure variable 'lock'"
    complete: bool  # False when a limit stopped the walk above the real culprit
    exc: BaseException
    #: The nearest part above with a hint, as ``(path, hint)``, when the culprit has none.
    within: tuple[str, str] | None = None


@final
class _Sink:
    """A file that keeps nothing: the walk only wants to know whether pickling fails."""

    __slots__ = ()

    def write(self, data: Any) -> int:
        return len(data)


_SINK: Final = _Sink()


@final
class _Launch:
    """Stands in for the launch of a child while the walk pickles (see the module doc)."""

    method = "walk"

    def duplicate_for_child(self, handle: int) -> int:
        return handle

    def DupFd(self, fd: int) -> int:  # multiprocessing's name
        return fd


def _stand_in(obj: object) -> tuple[Callable[[int], int], tuple[int]]:
    if getattr(obj, "closed", False):  # a closed connection fails to pickle
        raise OSError("handle is closed")
    return (int, (0,))


def _handed_on() -> tuple[type, ...]:
    kinds: list[type] = [socket.socket, mp_connection.Connection]
    pipe = getattr(mp_connection, "PipeConnection", None)
    if isinstance(pipe, type):
        kinds.append(pipe)
    heap = sys.modules.get("multiprocessing.heap")  # its arenas travel as descriptors too
    arena = getattr(heap, "Arena", None)
    if isinstance(arena, type):
        kinds.append(arena)
    return tuple(kinds)


@contextlib.contextmanager
def _launching(on: bool) -> Iterator[None]:
    previous = mp_context.get_spawning_popen()
    launch: Any = _Launch() if on else None  # the stubs know only the real launches
    mp_context.set_spawning_popen(launch)
    try:
        yield
    finally:
        mp_context.set_spawning_popen(previous)


@final
class Walk:
    """One search, with *pickler* (a class taking ``(file, protocol)``) and its rules.

    *by_value*: the pickler carries functions by value (cloudpickle), so a function that
    fails is searched through its closure and globals; otherwise a function that fails is
    the culprit itself. *spawning*: pickle as during a launch (a process start).
    """

    def __init__(
        self, pickler: type[Any], *, protocol: int | None, by_value: bool, spawning: bool = False
    ) -> None:
        self._pickler = pickler
        self._protocol = protocol
        self._by_value = by_value
        self._spawning = spawning
        self._tries = 0
        self._handed_on = _handed_on()

    def first(self, roots: Iterable[Root]) -> Culprit | None:
        """The culprit under the first root that fails to pickle; None if all pickle."""
        with _launching(self._spawning):
            for root in itertools.islice(roots, MAX_PARTS):
                error = self._try(root.obj)
                if error is not None:
                    above = {id(root.obj)}
                    return self._descend(root.path, root.obj, error, root.hint, above, None)
        return None

    def _try(self, obj: object) -> BaseException | None:
        self._tries += 1
        pickler = self._pickler(_SINK, self._protocol)
        table = getattr(pickler, "dispatch_table", None)
        shared = getattr(type(pickler), "dispatch_table", None)
        if isinstance(table, dict) and table is not shared:  # ForkingPickler's own copy
            for kind in self._handed_on:
                if kind in table:
                    table[kind] = _stand_in
        try:
            pickler.dump(obj)
        except Exception as exc:
            return exc
        return None

    def _descend(
        self,
        path: str,
        obj: object,
        error: BaseException,
        hint: str | None,
        above: set[int],
        within: tuple[str, str] | None,
    ) -> Culprit:
        parts, complete = self._parts(obj) if len(above) <= MAX_DEPTH else ([], False)
        for step, part, part_hint in parts:
            if id(part) in above:
                continue  # a cycle back up: the failure is not below here
            if self._tries >= MAX_TRIES:
                complete = False
                break
            failed = self._try(part)
            if failed is not None:
                inner = (path, hint) if hint is not None else within
                below = above | {id(part)}
                return self._descend(path + step, part, failed, part_hint, below, inner)
        text = f"{type(error).__name__}: {error}".splitlines()[0]
        return Culprit(path, obj, text, hint, complete, error, None if hint else within)

    def _parts(self, obj: object) -> tuple[list[tuple[str, object, str | None]], bool]:
        """Up to `MAX_PARTS` parts of *obj*, and whether that is all of them."""
        try:
            parts = list(itertools.islice(self._all_parts(obj), MAX_PARTS + 1))
        except Exception:  # its reduction itself fails: it is the culprit
            return [], True
        return parts[:MAX_PARTS], len(parts) <= MAX_PARTS

    def _all_parts(self, obj: object) -> Iterator[tuple[str, object, str | None]]:
        if isinstance(obj, (type, types.ModuleType, types.CodeType)) or is_pytest(obj):
            return
        if type(obj) in (tuple, list):
            assert isinstance(obj, (tuple, list))
            for i, item in enumerate(obj):
                yield f"[{i}]", item, None
            return
        if type(obj) is dict:
            assert isinstance(obj, dict)
            for key, value in obj.items():
                yield f"[{key!r}]", value, None
            for key in obj:
                yield f".keys() item {key!r}", key, None
            return
        if isinstance(obj, types.FunctionType):
            if self._by_value:
                yield from _function_parts(obj)
            return
        if isinstance(obj, types.MethodType):
            yield ".__self__", obj.__self__, None
            yield ".__func__", obj.__func__, None
            return
        if isinstance(obj, functools.partial):
            yield ".func", obj.func, None
            for i, arg in enumerate(obj.args):
                yield f".args[{i}]", arg, None
            for key, value in obj.keywords.items():
                yield f".keywords[{key!r}]", value, None
            return
        yield from self._reduced_parts(obj)

    def _reduced_parts(self, obj: object) -> Iterator[tuple[str, object, str | None]]:
        """The parts pickling itself takes from *obj*: its reduction's class, arguments,
        state and items."""
        if type(obj) in self._handed_on:
            return  # reducing it outside a launch would hand its descriptor on
        protocol = pickle.DEFAULT_PROTOCOL if self._protocol is None else self._protocol
        table = getattr(self._pickler(_SINK, self._protocol), "dispatch_table", None)
        reduce = table.get(type(obj)) if isinstance(table, Mapping) else None
        shown = f".__reduce_ex__({protocol})"
        if reduce is None and isinstance(obj, (str, bytes, int, float, complex, bool)):
            return
        value = reduce(obj) if reduce is not None else obj.__reduce_ex__(protocol)
        if not isinstance(value, tuple) or len(value) < 2:
            return  # a global's name: the object itself is the culprit
        func, args = value[0], value[1]
        state = value[2] if len(value) > 2 else None
        if func in (copyreg.__newobj__, copyreg.__newobj_ex__, copyreg._reconstructor):  # type: ignore[attr-defined]
            yield ".__class__", type(obj), None
            extra = args[1:] if func is not copyreg.__newobj_ex__ else args[1]  # type: ignore[attr-defined]
            for i, arg in enumerate(extra):
                yield f"{shown}[1][{i + 1}]", arg, None
        else:
            yield f"{shown}[0]", func, None
            for i, arg in enumerate(args):
                yield f"{shown}[1][{i}]", arg, None
        yield from _state_parts(obj, state, shown)
        for index, part in enumerate(value[3:5], start=3):
            if part is None:
                continue
            for i, item in enumerate(itertools.islice(part, MAX_PARTS)):
                if index == 4 and isinstance(item, tuple) and len(item) == 2:
                    yield f"[{item[0]!r}]", item[1], None
                else:
                    yield f"[{i}]", item, None


def _plain_getstate(obj: object) -> bool:
    getstate = getattr(type(obj), "__getstate__", None)
    return getstate is None or getstate is getattr(object, "__getstate__", None)


def _state_parts(
    obj: object, state: object, shown: str
) -> Iterator[tuple[str, object, str | None]]:
    if state is None:
        return
    plain = _plain_getstate(obj)
    slots: object = None
    if isinstance(state, tuple) and len(state) == 2 and plain:
        state, slots = state
    if isinstance(state, dict):
        for key, value in state.items():
            if plain and isinstance(key, str) and key.isidentifier():
                yield f".{key}", value, None
            elif plain:
                yield f".__dict__[{key!r}]", value, None
            else:
                yield f".__getstate__()[{key!r}]", value, None
    elif state is not None:
        yield (".__getstate__()" if not plain else f"{shown}[2]"), state, None
    if isinstance(slots, dict):
        for key, value in slots.items():
            yield f".{key}", value, None


def _function_parts(func: types.FunctionType) -> Iterator[tuple[str, object, str | None]]:
    """What cloudpickle carries of a function it pickles by value."""
    code = func.__code__
    for i, (name, cell) in enumerate(zip(code.co_freevars, func.__closure__ or (), strict=False)):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        yield f".__closure__[{i}].cell_contents", value, f"the closure variable {name!r}"
    names = set(_global_names(code))
    for name in sorted(names):
        if name in func.__globals__:
            value = func.__globals__[name]
            if not isinstance(value, types.ModuleType):
                yield f".__globals__[{name!r}]", value, f"the global {name!r} it uses"
    for i, default in enumerate(func.__defaults__ or ()):
        yield f".__defaults__[{i}]", default, None
    for key, default in (func.__kwdefaults__ or {}).items():
        yield f".__kwdefaults__[{key!r}]", default, None
    for key, value in func.__dict__.items():
        yield f".{key}", value, None


def _global_names(code: types.CodeType, depth: int = 0) -> Iterator[str]:
    yield from code.co_names
    if depth < 8:
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield from _global_names(const, depth + 1)


_PYTEST: Final = frozenset({"_pytest", "pytest", "pluggy"})


def is_pytest(obj: object) -> bool:
    module = getattr(type(obj), "__module__", None)
    return isinstance(module, str) and module.partition(".")[0] in _PYTEST
