"""Where each child process came from: the user's line that started it, and direct births.

A leak report that says "leaked pid 4242: python -m pytest" tells a user nothing (a fork
child's command line is pytest's own). So whenever this process starts a child, the
first frame of the user's code on the stack is noted (`where`: ``test_g.py:14``), cheaply
(a few microseconds: a walk up the frames with a per-file cache), and listeners (the
leak checks' trackers) are told the child's pid:

* ``multiprocessing`` processes of every start method (``BaseProcess.start``);
* ``subprocess.Popen`` (its ``_execute_child``);
* ``os.posix_spawn``/``posix_spawnp`` and ``_posixsubprocess.fork_exec`` as
  ``multiprocessing.util.spawnv_passfds`` uses it: direct children that no Python object
  stands for, which the leak checks must not take for orphans (an orphan was first a
  grandchild);
* ``os.system``, whose shell is gone when it returns (told as `NO_PID`), but not what the
  shell started in the background;
* plain ``os.fork`` is seen by the trackers' at-fork hooks, which ask `where` too.

`before` callbacks run just before each of those starts (``os.fork``'s too): what must hold
before a process's first child exists (the leak checks start the guardian and make the
process a subreaper there, not at startup). What a thread starts inside `unheard`
(procsafe's own guardian shell) is neither told nor preceded by callbacks.
``multiprocessing`` is wrapped when the run imports it (`_afterimport`), not imported here.

The wrappers call the wrapped function unchanged and only look around it; they are in
place while a listener is. A multiprocessing start that fails to pickle its process object
(spawn, forkserver) also gets `_pickling`'s note on its exception, which costs nothing
unless a start fails. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import Final

from pytest_procsafe import _afterimport
from pytest_procsafe import _forkhooks
from pytest_procsafe import _imports

#: ``listener(pid, where, direct)``: *direct* when the child is this process's own.
Listener = Callable[[int, "str | None", bool], None]
#: The pid told for a child that is already gone (``os.system`` waits for its shell).
NO_PID: Final = 0

_LISTENERS: list[Listener] = []
_BEFORE: list[Callable[[], None]] = []
_UNDO: list[Callable[[], None]] = []
_FORKS_HOOKED: list[bool] = []
_UNHEARD = threading.local()  # .on: this thread is inside `unheard`
# pid -> the object a heard start made (`started`): the leak checks' way to a candidate's
# object without a walk of every object.
_OBJECTS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()

# Frames of these packages are never the user's code, wherever they are installed.
_NOT_USER: Final = frozenset({"pytest_procsafe", "_pytest", "pytest", "pluggy", "xdist"})
# filename -> shown name ("test_g.py"), or None for a file that is not the user's code.
_FILES: dict[str, str | None] = {}


def where(skip: int = 1) -> str | None:
    """``path:line`` of the innermost frame of the user's code above the caller."""
    frame = sys._getframe(skip + 1) if hasattr(sys, "_getframe") else None
    files = _FILES
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        try:
            shown = files[filename]
        except KeyError:
            shown = files[filename] = _shown(filename, frame.f_globals.get("__name__"))
        if shown is not None:
            return f"{shown}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _shown(filename: str, module: object) -> str | None:
    if not isinstance(module, str) or module.partition(".")[0] in _NOT_USER:
        return None
    if filename.startswith("<") or _imports.excluded(filename):
        return None  # frozen, generated, the standard library or an installed package
    try:
        relative = os.path.relpath(filename)
    except ValueError:  # another drive (Windows)
        return filename
    return filename if relative.startswith(os.pardir) else relative


def listen(listener: Listener) -> Callable[[], None]:
    """Tell *listener* of every child this process starts from now on; the undo."""
    _LISTENERS.append(listener)
    if not _UNDO:
        _install()

    def undo() -> None:
        if listener in _LISTENERS:
            _LISTENERS.remove(listener)
        if not _LISTENERS:
            while _UNDO:
                _UNDO.pop()()

    return undo


def before(callback: Callable[[], None]) -> Callable[[], None]:
    """Call *callback* just before each child this process starts from now on (while a
    listener is installed, and at every ``os.fork``); the undo."""
    _BEFORE.append(callback)
    if not _FORKS_HOOKED:
        _forkhooks.add(prepare=_before)  # cannot be undone: it calls what is listed
        _FORKS_HOOKED.append(True)

    def undo() -> None:
        if callback in _BEFORE:
            _BEFORE.remove(callback)

    return undo


@contextlib.contextmanager
def unheard() -> Iterator[None]:
    """What this thread starts inside is procsafe's own: no listener is told of it, no
    `before` callback runs for it."""
    previous = getattr(_UNHEARD, "on", False)
    _UNHEARD.on = True
    try:
        yield
    finally:
        _UNHEARD.on = previous


def _before() -> None:
    if _BEFORE and not getattr(_UNHEARD, "on", False):
        for callback in list(_BEFORE):
            callback()


def started(pid: int) -> Any | None:
    """The ``multiprocessing`` process or ``Popen`` object a heard start of *pid* made,
    while it lives (held weakly: this keeps nothing alive); None for any other child."""
    return _OBJECTS.get(pid)


def _tell(pid: object, where_: str | None, direct: bool, obj: object = None) -> None:
    if getattr(_UNHEARD, "on", False):
        return
    if isinstance(pid, int) and pid >= NO_PID:
        if obj is not None and pid != NO_PID:
            with contextlib.suppress(TypeError):  # an object that takes no weak reference
                _OBJECTS[pid] = obj
        for listener in list(_LISTENERS):
            listener(pid, where_, direct)


def _patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_procsafe_births", False):
        return
    wrapper = make(original)
    wrapper._procsafe_births = True
    setattr(owner, name, wrapper)

    def undo() -> None:
        if getattr(owner, name, None) is wrapper:
            setattr(owner, name, original)

    _UNDO.append(undo)


def _install() -> None:
    def start(original: Any) -> Any:
        def start(self: Any) -> None:
            at = where()
            _before()
            try:
                original(self)
            except Exception as exc:
                # Under spawn/forkserver a start pickles the process object: say which part
                # cannot be pickled, why and what to do (nothing runs unless it failed).
                from pytest_procsafe import _pickling

                _pickling.explain_start(self, exc)
                raise
            _tell(getattr(self, "pid", None), at, False, self)  # fork/spawn ones are direct too

        return start

    # Each copy of the module that is loaded (pytester's in-process runs drop theirs).
    _UNDO.append(
        _afterimport.call(
            "multiprocessing.process", lambda module: _patch(module.BaseProcess, "start", start)
        )
    )

    if hasattr(subprocess.Popen, "_execute_child"):

        def execute(original: Any) -> Any:
            def _execute_child(self: Any, *args: Any, **kwargs: Any) -> Any:
                at = where()
                _before()
                result = original(self, *args, **kwargs)
                _tell(getattr(self, "pid", None), at, True, self)
                return result

            return _execute_child

        _patch(subprocess.Popen, "_execute_child", execute)

    def direct(original: Any) -> Any:
        def spawn(*args: Any, **kwargs: Any) -> Any:
            at = where()
            _before()
            pid = original(*args, **kwargs)
            _tell(pid, at, True)
            return pid

        return spawn

    for name in ("posix_spawn", "posix_spawnp"):
        _patch(os, name, direct)

    def system(original: Any) -> Any:
        def system(command: Any) -> int:
            at = where()
            _before()
            try:
                return int(original(command))
            finally:  # the shell is gone (reaped), what it started in the background not
                _tell(NO_PID, at, True)

        return system

    _patch(os, "system", system)
    posixsubprocess = sys.modules.get("_posixsubprocess")
    if posixsubprocess is not None:
        _patch(posixsubprocess, "fork_exec", direct)
