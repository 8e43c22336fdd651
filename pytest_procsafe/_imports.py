"""The parent's module-name -> file map, carried into spawn and forkserver children.

A spawn or forkserver child starts from a fresh interpreter and imports by name whatever a
pickled target refers to ("test_things.square"). Under pytest's ``importlib`` import mode
(and for conftests, rootdirs without ``__init__.py`` files, ``sys.path`` edits made by a
plugin) the parent imported those modules from files that the child's ``sys.path`` does
not lead to, so the child fails with ``ModuleNotFoundError`` although the same code works
under fork.

`install` has `_spawnhook` carry a stowaway in the preparation data of every spawn and
forkserver launch (also for plain ``multiprocessing.Process``, ``Pool`` and
``ProcessPoolExecutor``): pickling it records which file each non-stdlib,
non-site-packages module came from; unpickling it in the child, before the process object
itself is loaded, puts a meta path finder at the front of ``sys.meta_path`` that resolves
those names to the same files.

Runs inside workers: imports neither pytest nor the plugin.
"""

from __future__ import annotations

import collections
import functools
import importlib.machinery
import importlib.util
import os
import site
import sys
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from types import ModuleType

from pytest_procsafe import _spawnhook
from pytest_procsafe._notyping import final

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import Any
    from typing import Final
    from typing import NamedTuple

#: The name of the module map among `_spawnhook`'s riders.
RIDER: Final = "imports"

# The main module is re-run by multiprocessing itself under its own rules (as __mp_main__);
# mapping it would import a second copy.
_SKIPPED: Final = frozenset({"__main__", "__mp_main__"})


if TYPE_CHECKING:

    class Entry(NamedTuple):
        """Where one module lives: a file, a package's search path, or both."""

        #: The module's file (a package's ``__init__.py``); None for a namespace package.
        file: str | None
        #: A package's submodule search locations; None for a plain module.
        paths: tuple[str, ...] | None

else:  # the same at run time, without typing
    Entry = collections.namedtuple("Entry", ["file", "paths"])
    Entry.__doc__ = "Where one module lives: a file, a package's search path, or both."


@functools.lru_cache(maxsize=1)
def _excluded_roots() -> tuple[str, ...]:
    """Directories whose modules every child finds on its own: stdlib and site-packages."""
    import sysconfig  # the test process's side only: children do not collect

    roots: set[str] = set()
    paths = sysconfig.get_paths()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        if key in paths:
            roots.add(paths[key])
    getsitepackages = getattr(site, "getsitepackages", None)  # absent in old virtualenvs
    if getsitepackages is not None:
        roots.update(getsitepackages())
    user_site = site.getusersitepackages()
    if isinstance(user_site, str):
        roots.add(user_site)
    normalized = {os.path.normcase(os.path.abspath(root)) for root in roots}
    normalized |= {os.path.normcase(os.path.realpath(root)) for root in roots}
    return tuple(sorted(root.rstrip(os.sep) + os.sep for root in normalized))


def excluded(path: str) -> bool:
    """Whether *path* lies in the standard library or site-packages (children find it)."""
    roots = _excluded_roots()
    cheap = os.path.normcase(os.path.abspath(path))
    if cheap.startswith(roots):
        return True
    # Symlinked interpreters (pyenv shims, venvs) only match after resolving; doing that
    # only for the few candidates keeps collecting cheap.
    return os.path.normcase(os.path.realpath(path)).startswith(roots)


def _search_paths(module: ModuleType) -> tuple[str, ...] | None:
    search = getattr(module, "__path__", None)
    if search is None:
        return None
    try:
        return tuple(os.path.abspath(str(location)) for location in search)
    except Exception:  # an exotic __path__ (lazy module proxies); let normal import handle it
        return None


def collect(modules: Mapping[str, ModuleType | None] | None = None) -> dict[str, Entry]:
    """Map each module imported from outside stdlib and site-packages to where it lives.

    *modules* defaults to ``sys.modules``. Parent packages that only exist as placeholders
    (pytest's ``importlib`` mode creates empty modules for them) become empty namespace
    packages, so their children stay importable by their full dotted names.
    """
    source = sys.modules if modules is None else modules
    entries: dict[str, Entry] = {}
    for name, module in list(source.items()):
        if name in _SKIPPED or not isinstance(module, ModuleType):
            continue
        spec = getattr(module, "__spec__", None)
        if getattr(spec, "name", name) != name:
            continue  # an alias of a module known under another name
        paths = _search_paths(module)
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            file = os.path.abspath(file)
            if not excluded(file) and os.path.isfile(file):
                entries[name] = Entry(file, paths)
        elif paths and not all(excluded(path) for path in paths):
            entries[name] = Entry(None, paths)
    for name in list(entries):
        parent = name.rpartition(".")[0]
        while parent and parent not in entries:
            existing = source.get(parent)
            if existing is not None and (
                getattr(existing, "__file__", None) is not None or _search_paths(existing)
            ):
                break  # a real package the child finds on its own
            entries[parent] = Entry(None, ())
            parent = parent.rpartition(".")[0]
    return entries


@final
class Finder:
    """Resolves the parent's module names to the files the parent imported them from.

    A meta path finder needs only ``find_spec``: deriving from ``importlib.abc`` would
    import ``importlib.resources`` (pathlib, tempfile, ...) into every spawn child.
    """

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self.entries: dict[str, Entry] = dict(entries)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        entry = self.entries.get(fullname)
        if entry is None:
            return None
        if entry.file is None:
            # A loader of None plus search locations is how the import system spells a
            # namespace package, on every supported Python.
            spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
            spec.submodule_search_locations = list(entry.paths or ())
            return spec
        locations = list(entry.paths) if entry.paths is not None else None
        return importlib.util.spec_from_file_location(
            fullname, entry.file, submodule_search_locations=locations
        )

    def __repr__(self) -> str:
        return f"<pytest_procsafe module map: {len(self.entries)} modules>"


def install_finder(entries: Mapping[str, Entry]) -> Finder:
    """Put a `Finder` for *entries* at the front of ``sys.meta_path`` (or update ours)."""
    for finder in sys.meta_path:
        if isinstance(finder, Finder):
            finder.entries.update(entries)
            sys.meta_path.remove(finder)
            sys.meta_path.insert(0, finder)
            return finder
    finder = Finder(entries)
    sys.meta_path.insert(0, finder)
    return finder


# The last map sent and the modules it was made from: walking every module costs about
# 0.1s, which 200 short-lived workers paid 200 times while nothing had been imported.
_LAST: list[tuple[tuple[tuple[str, object], ...], dict[str, tuple[Any, ...]]]] = []


def _current_entries() -> dict[str, tuple[Any, ...]]:
    modules = tuple(sys.modules.items())  # compared by identity: cheap next to collecting
    if _LAST and _LAST[0][0] == modules:
        return _LAST[0][1]
    entries = {name: tuple(entry) for name, entry in collect().items()}
    _LAST[:] = [(modules, entries)]
    return entries


@final
class _Stowaway:
    """Rides in the preparation data; its pickling takes the map, its unpickling installs it."""

    def __getstate__(self) -> dict[str, Any]:
        # Collected here, not when the preparation data is built: the forkserver drops all
        # but two keys of the data it asks for, and then this never runs.
        return {"entries": _current_entries()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        entries = {name: Entry(*value) for name, value in state["entries"].items()}
        install_finder(entries)
        # The child's own spawn children (a Pool inside a worker) need the map as well.
        install()


def install() -> Callable[[], None]:
    """Carry the module map into every spawn/forkserver child started from now on.

    Returns the function that undoes it (`_spawnhook` owns the wrapper).
    """
    return _spawnhook.carry(RIDER, _Stowaway)
