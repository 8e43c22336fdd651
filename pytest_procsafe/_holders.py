"""Who holds a survivor: the Python objects behind processes and segments, and their holders.

After a test, a process (or segment) still running may be *held* rather than leaked: a
module or class attribute, a cache in a module, a reusable executor keeps it on purpose
for later tests. This module owns the two walks that answer that, and is the only place
that walks the garbage collector's objects:

* `objects` finds, in one pass over ``gc.get_objects()``, the objects that stand for
  processes (``multiprocessing``'s ``BaseProcess`` and its relatives' of the same name:
  loky, multiprocess, billiard; ``subprocess.Popen``), for semaphores (``SemLock``) and
  for shared memory (``SharedMemory``), and the pools among them;
* `holders` walks referrers up from such objects (``gc.get_referrers``, one scan per
  level, all targets at once) to a module's globals or a class's attributes, and names
  the way down as a user would write it: ``reuse._executor``, ``test_g.LAZY['p']``,
  ``Cache.pool``.

What pytest, the interpreter, procsafe and the standard library keep (frames and
tracebacks of a failure, ``sys.last_exc``, multiprocessing's ``_children`` and its
finalizers, pool handler threads in ``threading``) holds nothing: such roots are not
followed, so a test that fails while holding a pool in a local variable still leaked it.

Every object is looked at through ``type(obj)`` only: ``isinstance`` on a dead
``weakref.proxy`` raises ``ReferenceError``. Both walks cost time only when a check has
candidates. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import types
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any
from typing import Final
from typing import NamedTuple
from typing import final

#: How many referrer levels above an object a holder is looked for.
DEPTH: Final = 10
#: At most this many objects per level are followed: ``gc.get_referrers`` costs a pass
#: over every object times the number of objects asked about.
WIDTH: Final = 64

# Top-level packages whose module globals hold nothing a test made: the runner, its
# plugins' machinery, procsafe, and (added below) the standard library.
_NEUTRAL: Final = frozenset(
    {"_pytest", "pytest", "pluggy", "pytest_procsafe", "xdist", "execnet", "py", "__main__"}
)
# Referrers that never make a holder: a failure's frames and tracebacks, suspended code.
# (Compared by exact type: these types cannot be subclassed.)
_OPAQUE: Final = frozenset(
    {
        types.FrameType,
        types.TracebackType,
        types.CoroutineType,
        types.GeneratorType,
        types.AsyncGeneratorType,
    }
)

Kind = str  # "process", "popen", "semlock", "shared_memory", "pool", "executor"


class Found(NamedTuple):
    """What the object walk found: Python objects by what they stand for."""

    #: pid -> the process object (``BaseProcess``-like or ``Popen``).
    processes: dict[int, Any]
    #: POSIX name (``/mp-x``) -> a live SemLock-like object.
    semlocks: dict[str, Any]
    #: POSIX name (``/psm_x``) -> a live SharedMemory-like object, still mapped.
    shared_memory: dict[str, Any]
    #: multiprocessing pools (``multiprocessing.pool.Pool`` and subclasses).
    pools: list[Any]
    #: Process pool executors (concurrent.futures', loky's).
    executors: list[Any]

    def name(self, pid: int) -> str | None:
        """What *pid* is on the Python side: ``ForkPoolWorker-1 of a
        multiprocessing.pool.Pool``; None for a ``Popen`` (its args are its command line)
        or a process no object here stands for."""
        obj = self.processes.get(pid)
        if obj is None or kind_of(type(obj)) != "process":
            return None
        name = obj.__dict__.get("_name")
        text = name if isinstance(name, str) else type(obj).__name__
        for group, members in self._groups():
            if pid in members:
                cls = type(group)
                return f"{text} of a {cls.__module__}.{cls.__qualname__}"
        return text

    def _groups(self) -> list[tuple[Any, set[Any]]]:
        groups = []
        for pool in self.pools:
            workers = pool.__dict__.get("_pool") or ()
            groups.append((pool, {getattr(w, "pid", None) for w in list(workers)}))
        for executor in self.executors:
            processes = executor.__dict__.get("_processes") or {}
            groups.append((executor, set(processes)))
        return groups


def _mro_names(cls: type) -> set[str]:
    try:
        return {base.__name__ for base in cls.__mro__}
    except Exception:  # an exotic metaclass
        return set()


def _classify(cls: type) -> Kind | None:
    names = _mro_names(cls)
    if "BaseProcess" in names and cls.__module__.partition(".")[0] != "pytest_procsafe":
        return "process"
    if subprocess.Popen in getattr(cls, "__mro__", ()):
        return "popen"
    if "SemLock" in names:
        return "semlock"
    if "SharedMemory" in names:
        return "shared_memory"
    pool = sys.modules.get("multiprocessing.pool")
    if pool is not None and pool.Pool in getattr(cls, "__mro__", ()):
        return "pool"
    if "ProcessPoolExecutor" in names:
        return "executor"
    return None


# type -> its kind, or None: each type is classified once for the process's lifetime.
_KINDS: dict[type, Kind | None] = {}


def objects() -> Found:
    """One pass over the garbage collector's objects: see `Found`."""
    found = Found({}, {}, {}, [], [])
    kinds = _KINDS
    for obj in gc.get_objects():
        cls = type(obj)
        try:
            kind = kinds[cls]
        except KeyError:
            kind = kinds[cls] = _classify(cls)
        except TypeError:  # an unhashable metaclass
            continue
        if kind is not None:
            _take(found, kind, obj)
    return found


def stands_for(obj: Any) -> int | None:
    """The pid of the process *obj* stands for while it is not yet waited for
    (``BaseProcess``-like or ``Popen``), else None."""
    kind = kind_of(type(obj))
    if kind not in ("process", "popen"):
        return None
    return _pid_of(kind, obj)


def _pid_of(kind: Kind, obj: Any) -> int | None:
    try:
        if kind == "process":
            popen = obj.__dict__.get("_popen")
            pid = getattr(popen, "pid", None)
            returncode = getattr(popen, "returncode", None)
        else:
            pid, returncode = obj.pid, obj.returncode
    except Exception:  # a half-built or torn-down object: it stands for nothing
        return None
    return pid if isinstance(pid, int) and returncode is None else None


def _take(found: Found, kind: Kind, obj: Any) -> None:
    try:
        if kind in ("process", "popen"):
            pid = _pid_of(kind, obj)
            if pid is not None:
                found.processes.setdefault(pid, obj)
        elif kind == "semlock":
            name = getattr(obj.__dict__.get("_semlock"), "name", None)
            if isinstance(name, str):
                found.semlocks.setdefault(name if name.startswith("/") else "/" + name, obj)
        elif kind == "shared_memory":
            # Only while mapped: a closed block's object unlinks nothing when it dies.
            name = obj.__dict__.get("_name")
            if isinstance(name, str) and obj.__dict__.get("_mmap") is not None:
                found.shared_memory.setdefault(name if name.startswith("/") else "/" + name, obj)
        elif kind == "pool":
            found.pools.append(obj)
        else:
            found.executors.append(obj)
    except Exception:  # a half-built or torn-down object: it stands for nothing
        return


def kind_of(cls: type) -> Kind | None:
    """What objects of *cls* stand for (see `Found`), classified once per type."""
    try:
        return _KINDS[cls]
    except KeyError:
        kind = _KINDS[cls] = _classify(cls)
        return kind
    except TypeError:  # an unhashable metaclass
        return None


def is_popen(obj: object) -> bool:
    """Whether *obj* is a ``subprocess.Popen`` (looked at through its type only)."""
    return kind_of(type(obj)) == "popen"


def _uses_only(cls: type) -> bool:
    """Objects that refer to a process without holding it on purpose: a manager's proxies
    (``manager.dict()`` passed on somewhere keeps its manager alive, but the test that
    made the manager still leaked it)."""
    try:
        return _PROXIES[cls]
    except KeyError:
        verdict = _PROXIES[cls] = "BaseProxy" in _mro_names(cls)
        return verdict
    except TypeError:
        return False


_PROXIES: dict[type, bool] = {}


# type -> whether it is the runner's or procsafe's own (its objects are not followed).
_RUNNER_TYPES: dict[type, bool] = {}


def _runner_type(cls: type) -> bool:
    try:
        return _RUNNER_TYPES[cls]
    except KeyError:
        module = getattr(cls, "__module__", None)
        verdict = isinstance(module, str) and module.partition(".")[0] in _NEUTRAL
        _RUNNER_TYPES[cls] = verdict
        return verdict
    except TypeError:
        return False


def _neutral(module: str) -> bool:
    top = module.partition(".")[0]
    return top in _NEUTRAL or top in _STDLIB


_STDLIB: Final = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "sys"}


def _roots() -> tuple[dict[int, str], set[int]]:
    """Module globals that can hold (id -> module name), and those that cannot."""
    holding: dict[int, str] = {}
    neutral: set[int] = set()
    for name, module in list(sys.modules.items()):
        if type(module) is not types.ModuleType:
            continue
        namespace = module.__dict__
        if _neutral(name):
            neutral.add(id(namespace))
        else:
            holding[id(namespace)] = name
    return holding, neutral


def holders(
    targets: Mapping[Any, Any],
    *,
    depth: int = DEPTH,
    ignore: Iterable[object] = (),
    hints: Hints | None = None,
) -> dict[Any, str]:
    """For each key of *targets* whose object is held, the holder's name.

    Walks referrers up from all objects at once, one ``gc.get_referrers`` scan per level,
    until a module's globals or a class's attributes; frames, tracebacks, suspended
    generators and the globals of the runner, procsafe and the standard library are not
    followed, nor the caller's own containers in *ignore* (the walk's are skipped anyway).
    With *hints*, the holders found before are looked under first (`Hints`), and each one
    found is noted there.
    """
    if not targets:
        return {}
    named: dict[Any, str] = {}
    if hints is not None:
        named = hints.search(targets)
        if len(named) == len(targets):
            return named
        targets = {key: obj for key, obj in targets.items() if key not in named}
    holding, neutral = _roots()
    # id(obj) -> {target key: the object one step nearer that target (None: the target)}
    down: dict[int, dict[Any, Any]] = {}
    frontier: dict[int, Any] = {}
    for key, obj in targets.items():
        down.setdefault(id(obj), {})[key] = None
        frontier[id(obj)] = obj
    ours = {id(down), id(frontier), id(targets), id(named), *map(id, ignore)}
    if hints is not None:
        ours.add(id(hints.held))
    for _ in range(depth):
        if not frontier or len(named) == len(targets):
            break
        # A tuple is passed to the call as it is: it must not be found as a referrer.
        objs = tuple(frontier.values())
        ours.add(id(objs))
        referrers = gc.get_referrers(*objs)
        ours.add(id(referrers))
        following: dict[int, Any] = {}
        ours.add(id(following))
        for ref in referrers:
            ident = id(ref)
            cls = type(ref)  # never isinstance(): a dead weakref.proxy raises there
            if ident in ours or ident in down or ident in neutral or cls in _OPAQUE:
                continue
            if _runner_type(cls):
                continue  # the runner's and procsafe's own objects hold nothing
            if _uses_only(cls):
                continue  # a manager's proxy uses its manager; it does not keep it
            routes = {
                key: child
                for child in _referents(ref)
                if id(child) in frontier
                for key in down[id(child)]
                if key not in named
            }
            if not routes:
                continue
            if ident in holding:
                for key, child in routes.items():
                    _name(named, key, _describe(holding[ident], ref, child, key, down, hints))
                continue
            if issubclass(cls, type):
                # A class reaches its attributes through its namespace dict (the child).
                if not _neutral(getattr(ref, "__module__", "") or ""):
                    qualname = getattr(ref, "__qualname__", "?")
                    for key, child in routes.items():
                        below = down[id(child)].get(key)
                        if below is not None:
                            described = _describe(qualname, child, below, key, down, hints)
                            _name(named, key, described)
                continue
            if len(following) < WIDTH:
                ours.add(id(routes))
                down[ident] = routes
                following[ident] = ref
        frontier = following
        del objs, referrers
    return named


def _referents(obj: Any) -> list[Any]:
    try:
        return gc.get_referents(obj)
    except Exception:
        return []


def _name(named: dict[Any, str], key: Any, name: str | None) -> None:
    if name is not None:
        named.setdefault(key, name)


def _describe(
    root: str,
    namespace: Any,
    child: Any,
    key: Any,
    down: Mapping[int, dict[Any, Any]],
    hints: Hints | None = None,
) -> str | None:
    """``root.attr`` and the subscripts of the containers below it, as a user writes it."""
    attr = _key_of(namespace, child)
    if attr is None:
        return None
    if hints is not None:
        hints.note(namespace, attr, root)
    chain = [child]  # down towards the target, while through plain containers
    while type(chain[-1]) in (dict, list, tuple):
        below = down.get(id(chain[-1]), {}).get(key)
        if below is None:
            break
        chain.append(below)
    return _subscripted(f"{root}.{attr}", chain)


# What a look down from a hint does not descend into: code and namespaces (a function's
# globals lead everywhere: `_look_down` follows only its closure), and what `holders`
# does not follow up either.
_NOT_BELOW: Final = frozenset(
    {
        types.ModuleType,
        types.BuiltinFunctionType,
        types.MethodType,
        types.CodeType,
        types.CellType,
        types.MappingProxyType,
        *_OPAQUE,
    }
)


@final
class Hints:
    """The holders found so far (a module's or a class's attribute), looked under first.

    A reusable executor or a cached pool starts new processes in many tests; finding their
    holder again by walking referrers up costs a pass over every object per level. Looking
    down from the attributes that held processes before costs only what lies under them
    (at most `BUDGET` objects each, `DEPTH` levels); a target not found there is looked
    for the full way (`holders`).
    """

    #: Objects looked at under one hint, at most.
    BUDGET: Final = 4096
    #: Hints kept, the most recent first.
    KEEP: Final = 16

    def __init__(self) -> None:
        # (namespace, attribute, how the holder reads: a module or a class qualname)
        self.held: list[tuple[Any, str, str]] = []

    def note(self, namespace: Any, attr: str, root: str) -> None:
        """Remember that ``root.attr`` (in *namespace*) held something."""
        for index, (space, name, _) in enumerate(self.held):
            if space is namespace and name == attr:
                del self.held[index]
                break
        self.held.insert(0, (namespace, attr, root))
        del self.held[self.KEEP :]

    def search(self, targets: Mapping[Any, Any]) -> dict[Any, str]:
        """The targets found under a hint, with the holder's name as `holders` gives it."""
        wanted: dict[int, list[Any]] = {}
        for key, obj in targets.items():
            wanted.setdefault(id(obj), []).append(key)
        named: dict[Any, str] = {}
        for namespace, attr, root in list(self.held):
            if len(named) == len(targets):
                break
            try:
                value = namespace[attr]
            except Exception:  # gone, or a namespace that no longer answers
                continue
            for key, chain in _look_down(value, wanted, self.BUDGET):
                if key not in named:
                    named[key] = _subscripted(f"{root}.{attr}", chain)
        return named


def _look_down(
    value: Any, wanted: Mapping[int, list[Any]], budget: int
) -> Iterable[tuple[Any, list[Any]]]:
    """(key, the objects from *value* down to it) for each wanted object below *value*."""
    up: dict[int, Any] = {id(value): None}
    level = [value]
    for _ in range(DEPTH):
        following = []
        for obj in level:
            keys = wanted.get(id(obj))
            if keys is not None:
                chain = [obj]
                while (parent := up[id(chain[-1])]) is not None:
                    chain.append(parent)
                chain.reverse()
                for key in keys:
                    yield key, chain
            cls = type(obj)  # never isinstance(): a dead weakref.proxy raises there
            if cls is types.FunctionType:  # what its closure keeps, not its globals
                children = [_cell_contents(cell) for cell in obj.__closure__ or ()]
            elif cls in _NOT_BELOW or issubclass(cls, type) or _runner_type(cls):
                continue
            elif _uses_only(cls):
                continue  # a proxy uses its manager; it does not hold it
            else:
                children = _referents(obj)
            for child in children:
                if id(child) not in up and len(up) < budget:
                    up[id(child)] = obj
                    following.append(child)
        if not following:
            return
        level = following


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _subscripted(name: str, chain: list[Any]) -> str:
    """*name* and the subscripts of the containers at the top of *chain* (`_describe`)."""
    for obj, below in itertools.pairwise(chain):
        if type(obj) not in (dict, list, tuple):
            break
        index = _index_of(obj, below)
        if index is None:
            break
        name += f"[{index!r}]"
    return name


def _key_of(namespace: Any, value: Any) -> str | None:
    try:
        for key, item in list(namespace.items()):
            # A module's own dunders (__loader__, __spec__, __builtins__) hold nothing.
            if item is value and isinstance(key, str) and not key.startswith("__"):
                return key
    except Exception:
        return None
    return None


def _index_of(container: Any, value: Any) -> object | None:
    try:
        if type(container) is dict:
            for key, item in list(container.items()):
                if item is value:
                    found: object = key
                    return found
        else:
            for index, item in enumerate(container):
                if item is value:
                    return index
    except Exception:
        return None
    return None


def held_by(
    targets: Mapping[Any, Any],
    cache: dict[Any, str | None],
    *,
    key: Callable[[Any], Any],
    ignore: Iterable[object] = (),
    hints: Hints | None = None,
) -> dict[Any, str]:
    """`holders` with a cache: a target's holder is searched once (by ``key(target)``)."""
    unknown = {k: obj for k, obj in targets.items() if key(k) not in cache}
    found = holders(unknown, ignore=ignore, hints=hints) if unknown else {}
    for k in unknown:
        cache[key(k)] = found.get(k)
    return {k: name for k in targets if (name := cache.get(key(k))) is not None}
