"""The words of `_pickling`'s notes: what the culprit is, why it failed, what to do.

Names are made without running any of the culprit's own code (no ``repr`` of user
objects): functions, classes and modules by their qualified names, files by their name,
everything else by its type. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap
import types
from typing import Final

from pytest_procsafe._picklewalk import Culprit
from pytest_procsafe._picklewalk import is_pytest

#: Every note starts so; an exception whose notes have one is explained already.
PREFIX: Final = "procsafe: "
_WIDTH: Final = 80  # pytest shows each line of a note after 'E       '


# --- naming what was found --------------------------------------------------------------


def _qualified(kind: type) -> str:
    module = kind.__module__
    if module in ("builtins", "_io", "_thread", "_socket"):
        module = {"_io": "io", "_thread": "_thread", "_socket": "socket"}.get(module, "")
    return f"{module}.{kind.__qualname__}" if module else kind.__qualname__


_THREAD_LOCKS: Final = {"_thread.lock": "a threading.Lock", "_thread.RLock": "a threading.RLock"}


def _public_pytest(kind: type) -> str:
    """``pytest.FixtureRequest`` for ``_pytest.fixtures.TopRequest``: the name users know."""
    public = sys.modules.get("pytest")
    for base in kind.__mro__:
        if getattr(public, base.__name__, None) is base:
            return f"pytest.{base.__name__}"
    return _qualified(kind)


def describe(obj: object) -> str:
    """A short name for *obj* that runs none of its code (no ``repr`` of user objects)."""
    if isinstance(obj, types.FunctionType):
        qualname, module = obj.__qualname__, obj.__module__
        if obj.__name__ == "<lambda>":
            where = f"{os.path.basename(obj.__code__.co_filename)}:{obj.__code__.co_firstlineno}"
            return f"a lambda ({qualname}, {where})"
        if "<locals>" in qualname:
            return f"the local function {qualname}"
        return f"the function {module}.{qualname}"
    if isinstance(obj, type):
        if "<locals>" in obj.__qualname__:
            return f"the local class {obj.__qualname__}"
        return f"the class {_qualified(obj)}"
    if isinstance(obj, types.MethodType):
        return (
            f"the method {getattr(obj.__func__, '__qualname__', '?')} of {describe(obj.__self__)}"
        )
    if isinstance(obj, types.ModuleType):
        return f"the module {obj.__name__}"
    if isinstance(obj, types.GeneratorType):
        return f"the generator {obj.__qualname__}"
    name = _qualified(type(obj))
    if name in _THREAD_LOCKS:
        return _THREAD_LOCKS[name]
    if is_pytest(obj):
        return f"a {_public_pytest(type(obj))} (pytest's own)"
    if isinstance(obj, io.IOBase) and type(obj).__module__ in ("_io", "io"):
        file = getattr(obj, "name", None)
        state = "a closed" if obj.closed else "an open"
        return f"{state} file {file!r} ({name})" if file is not None else f"{state} {name}"
    if type(obj) in (tuple, list, dict, set, frozenset):
        return f"a {name} of {len(obj)} items"  # type: ignore[arg-type]
    return f"a {name}"


def _kind(culprit: Culprit) -> tuple[str, str]:
    """What sort of thing failed, for advice: ``(kind, name)``."""
    obj = culprit.obj
    if isinstance(obj, (types.FunctionType, type)):
        qualname = obj.__qualname__
        if "<locals>" in qualname or obj.__name__ == "<lambda>":
            return "local", qualname
    if isinstance(obj, (types.FunctionType, type)):
        return "by-name", f"{obj.__module__}.{obj.__qualname__}"
    name = _qualified(type(obj))
    if name in _THREAD_LOCKS:
        return "thread-lock", name
    if isinstance(culprit.exc, RuntimeError) and "inheritance" in str(culprit.exc):
        return "inherited", type(obj).__name__
    if isinstance(culprit.exc, RuntimeError) and "fork context" in str(culprit.exc):
        return "other-context", type(obj).__name__
    if isinstance(obj, io.IOBase):
        return "file", repr(getattr(obj, "name", "?"))
    if is_pytest(obj):
        return "pytest", name
    if isinstance(obj, types.GeneratorType):
        return "generator", name
    if isinstance(obj, types.ModuleType):
        return "module", obj.__name__
    if type(obj).__module__.partition(".")[0] in ("sqlite3", "socket", "_socket", "ssl", "select"):
        return "resource", name
    return "other", name


# --- why and what to do --------------------------------------------------------------------------

_WHY: Final = {
    "start": (
        "under {method}, a process starts as a fresh interpreter and receives the Process "
        "object (its target, args and kwargs) pickled; fork copies the parent's memory "
        "and pickles nothing, which is why this may work under fork. Python 3.14 made "
        "forkserver, which pickles too, the default start method on Linux."
    ),
    "worker": (
        "under {method}, procsafe sends a worker's target and arguments to a fresh "
        "interpreter with cloudpickle: closures, lambdas and local functions travel, but "
        "not an object bound to this process (a lock, an open file, a connection); fork "
        "copies it and pickles nothing. Python 3.14 made forkserver the default start "
        "method on Linux."
    ),
    "task": (
        "a Pool or ProcessPoolExecutor sends each task (its function and arguments) to a "
        "worker process through a pipe, so tasks are pickled under every start method, "
        "fork included."
    ),
    "send": (
        "what goes through a multiprocessing Pipe, Queue or manager is pickled, under "
        "every start method."
    ),
}

_MP_PROCESS: Final = (
    "or start it with procsafe's mp_process fixture, which carries closures and lambdas "
    "with cloudpickle"
)


def _advice(culprit: Culprit, context: str) -> str:
    kind, name = _kind(culprit)
    if kind == "local":
        where = (
            "define it at the top level of a module (a test module will do: procsafe "
            "lets spawn and forkserver children import test modules)"
        )
        if name.endswith("<lambda>"):
            where = (
                "replace the lambda with a function defined at the top level of a module "
                "(functools.partial binds arguments)"
            )
        if context == "start":
            return f"{where}, {_MP_PROCESS}."
        if context == "task":
            return f"{where}; a pool cannot carry closures or lambdas (mp_process can)."
        return f"{where}."
    if kind == "by-name":
        return (
            f"a function or class is pickled by its name: make {name} name this very "
            "object (a decorator without functools.wraps, or a name bound again later, "
            "breaks that)."
        )
    if kind == "thread-lock":
        if context == "worker":
            return (
                "a threading lock only works within one process: use a multiprocessing lock "
                "of the same context (mp_channels.lock()); mp_process carries it to the "
                "worker as an argument or in a closure."
            )
        if context == "task":
            return (
                "a threading lock only works within one process: give the pool's workers a "
                "multiprocessing lock through initializer/initargs, or pass a manager's "
                "lock (mp_manager.Lock()), whose proxy pickles."
            )
        return (
            "a threading lock only works within one process: use a multiprocessing lock "
            "of the same context (ctx.Lock(), mp_channels.lock()) and pass it as a "
            "Process argument when the process starts."
        )
    if kind == "inherited":
        return (
            f"a multiprocessing {name} reaches a child only as the child starts: pass it "
            "as a Process argument, or to a pool through initializer/initargs; to hand "
            "one over later, use a manager's (mp_manager.Lock(), mp_manager.Queue()), "
            "whose proxies pickle."
        )
    if kind == "other-context":
        return (
            f"make it from the context the process starts with (mp_context.{name}(), "
            f"ctx.{name}() of get_context(...)), not from another one."
        )
    if kind == "file":
        return f"pass the file's path ({name}) and open it in the child."
    if kind == "pytest":
        return (
            "pytest's objects stay in the test process: pass the plain values the child "
            "needs (request.param, str(tmp_path), ...)."
        )
    if kind == "generator":
        return "pass the values (a list) instead, or a function that makes them in the child."
    if kind == "module":
        return "import the module in the child instead of passing it."
    if kind == "resource":
        return "open it in the child: pass what it needs to connect (a path, an address)."
    return (
        "pass a value that pickles (plain data the child can rebuild it from), or make "
        "its class picklable (__reduce__, __getstate__)."
    )


def compose(culprit: Culprit, context: str, method: str | None) -> str:
    what = describe(culprit.obj)
    if culprit.hint:
        what += f" ({culprit.hint})"
    elif culprit.within is not None:
        what += f" (in {culprit.within[0]}: {culprit.within[1]})"
    head = f"{PREFIX}{culprit.path} cannot be pickled: {what}"
    if not culprit.complete:
        head += " (or something inside it: procsafe stopped looking there)"
    lines = [*_wrap(head, ""), *_wrap(f"({culprit.error})", "  ")]
    lines += _wrap("Why: " + _WHY[context].format(method=method), "  ")
    lines += _wrap("What to do: " + _advice(culprit, context), "  ")
    return "\n".join(lines)


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text,
        _WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
