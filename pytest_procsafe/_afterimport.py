"""Run a function on a module once it is imported: now, if it already is.

procsafe wraps a few functions of ``multiprocessing`` (a process's start, the spawn
preparation data, the resource tracker's registrations). A run whose tests start no
multiprocessing process need not import it (with ``pickle``, a few milliseconds of every
pytest process): `call` wraps the module when the run imports it, whoever imports it,
and at once when it is imported already. The parts own their wrappers; this module only
says when.

A module can be imported more than once in a process: pytester's in-process runs drop
from ``sys.modules`` what they imported. The function is called for every copy that is
loaded while it is registered, so the copy the tests use next is wrapped as well.

How: while a function is registered, a finder at the front of ``sys.meta_path`` asks the
finders behind it for the module's spec and puts its own loader in, which executes the
module with the real loader (the module keeps that one as ``__loader__`` and in its
spec), then calls the functions. A name nobody waits for costs a dictionary lookup per
import; with nothing registered the finder is gone.

Runs inside workers: imports neither pytest nor the plugin, nor ``typing``.
"""

from __future__ import annotations

import sys
import threading

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from collections.abc import Callable
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

    Function = Callable[[ModuleType], None]

# module name -> the functions to call on each copy of it that is loaded, in order.
_WAITING: dict[str, list[Function]] = {}
_LOCK = threading.Lock()


def call(name: str, function: Function) -> Callable[[], None]:
    """Call ``function(module)`` now if *name* is imported, and on every copy of it
    imported from now on; returns the undo, which stops the calls to come."""
    with _LOCK:
        _WAITING.setdefault(name, []).append(function)
        if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    module = sys.modules.get(name)
    if module is not None:
        function(module)

    def undo() -> None:
        with _LOCK:
            functions = _WAITING.get(name, [])
            if function in functions:
                functions.remove(function)
            if not functions:
                _WAITING.pop(name, None)
            if not _WAITING:
                sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]

    return undo


def waiting() -> tuple[str, ...]:
    """The names functions wait for (for tests and diagnostics)."""
    return tuple(_WAITING)


class _Finder:
    """Finds nothing itself: for a name waited for, the spec of the finders behind it,
    with `_Loader` in front of the real loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in _WAITING:
            return None
        seen = False
        for finder in list(sys.meta_path):
            if not seen:
                seen = finder is self
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is None:
                continue
            loader = spec.loader
            if loader is not None and hasattr(loader, "exec_module"):
                spec.loader = _Loader(loader)
            return spec  # type: ignore[no-any-return]
        return None

    def invalidate_caches(self) -> None:
        """Nothing cached here (``importlib.invalidate_caches`` asks every finder)."""


class _Loader:
    """Executes the module with the real loader, which the module keeps, then calls the
    functions waiting for it."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        if spec is not None and getattr(spec, "loader", None) is self:
            spec.loader = self.loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        self.loader.exec_module(module)
        with _LOCK:
            functions = list(_WAITING.get(module.__name__, ()))
        for function in functions:
            function(module)

    def __getattr__(self, name: str) -> Any:
        # Whatever else asks the loader of a module being loaded (get_code, is_package).
        return getattr(self.loader, name)
