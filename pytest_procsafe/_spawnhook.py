"""The one wrapper of ``multiprocessing.spawn.get_preparation_data`` and what rides in it.

Every spawn and forkserver launch (procsafe's workers, and a test's own ``Process``,
``Pool`` or ``ProcessPoolExecutor``) calls ``get_preparation_data`` and pickles its result
to the child, which unpickles it before anything else of the parent's arrives. Objects put
there (*stowaways*, the trick coverage uses to start itself in spawn children) run code in
the child at that moment: the module map (`_imports`), the resource-tracker listener
(`_registrations`), the parent's environment (`_environ`), later the stack-dump handler. Each part registers its rider here with
`carry`; this module owns the wrapper, so there is one in the chain whatever parts are in
use, and it chains with whatever was there before (coverage may have wrapped it first).

The wrapper also fixes two things the original does to a pytest run:

* It asks for the global start method, which fixes it for good as a side effect: after one
  spawn child, a test's own ``set_start_method()`` would raise. It is left unset again.
* Under the ``pytest`` console script, ``__main__`` is that script: every child would re-run
  it as ``__mp_main__``, importing pytest and its plugins (about 50 ms a child) for nothing
  a test needs (test modules come through the module map). Its path is left out, as for
  ``python -m pytest``, where multiprocessing skips a ``__main__`` module by itself.

A rider's object is unpickled in the child, where it calls `carry` again so the child's own
children get it too. ``multiprocessing.spawn`` is wrapped when the run imports it
(`_afterimport`): a run that starts no multiprocessing child does not import it. Runs
inside workers: imports neither pytest nor the plugin.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from pytest_procsafe import _afterimport
from pytest_procsafe._notyping import final

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import Any
    from typing import Final

#: The key of procsafe's entry in multiprocessing's preparation data.
KEY: Final = "pytest_procsafe"
#: The keys that make a child re-run the parent's ``__main__``.
_MAIN_PATH: Final = "init_main_from_path"

#: Where the ``pytest`` and ``py.test`` console scripts take their entry point from.
_PYTEST_ENTRY_POINTS: Final = frozenset(
    {
        ("_pytest.config", "console_main"),
        ("_pytest.config", "_console_main"),
        ("pytest", "console_main"),
    }
)

Rider = Callable[[], object]


@final
class Call:
    """A stowaway that, unpickled in the child, calls ``function(argument)`` there: how a
    rider that only needs one value (a path) installs itself (`_registrations`,
    `_dumps`). *function* must be importable by name: a module-level function."""

    def __init__(self, function: Callable[[str], None], argument: str) -> None:
        self.function = function
        self.argument = argument

    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return self.function, (self.argument,)


# name -> what to carry: called for each launch, None carries nothing this time.
_RIDERS: dict[str, Rider] = {}


@final
class _Wrapper:
    """Replaces ``spawn.get_preparation_data``, calling the function it replaced."""

    def __init__(self, wrapped: Callable[[str], dict[str, Any]]) -> None:
        self.wrapped = wrapped
        # updated=(): copying the wrapped one's __dict__ would copy a wrapper's state.
        functools.update_wrapper(self, wrapped, updated=())

    def __call__(self, name: str) -> dict[str, Any]:
        if not _RIDERS:  # no procsafe session in this process: pass the data through
            return self.wrapped(name)
        import multiprocessing  # imported: it called this

        unset = multiprocessing.get_start_method(allow_none=True) is None
        data = self.wrapped(name)
        if unset:
            multiprocessing.set_start_method(None, force=True)
        if _MAIN_PATH in data and runs_pytest_script(sys.modules.get("__main__")):
            del data[_MAIN_PATH]
        riders = {}
        for key, rider in list(_RIDERS.items()):
            value = rider()
            if value is not None:
                riders[key] = value
        if riders:
            data[KEY] = riders
        return data


# Our wrapper, and the copy of ``multiprocessing.spawn`` it was put into.
_STATE: dict[str, Any] = {"wrapper": None, "module": None}
# Undoes the wait for ``multiprocessing.spawn`` (`_afterimport`) while riders are carried.
_WAIT: list[Callable[[], None]] = []


def runs_pytest_script(main: object) -> bool:
    """Whether *main* (``__main__``) is pytest's console script (``pytest``, ``py.test``).

    The script an installer writes imports pytest's entry point (``console_main``, in
    pytest 9 ``_console_main``) and calls it; nothing else lives there. A script of the
    user's own that calls ``pytest.main()`` is not one: it may define what children need.
    """
    if getattr(main, "__spec__", None) is not None:
        return False  # ``python -m ...``: multiprocessing decides by the module's name
    namespace = getattr(main, "__dict__", None)
    if not isinstance(namespace, dict):
        return False
    for value in list(namespace.values()):
        where = (getattr(value, "__module__", None), getattr(value, "__name__", None))
        if where in _PYTEST_ENTRY_POINTS:
            return True
    return False


def installed() -> bool:
    """Whether our wrapper is still in ``spawn.get_preparation_data``'s chain.

    Wrappers made with ``functools.wraps`` name the one below; an opaque one above ours
    (coverage's) is taken to call ours. Only finding what ours wrapped, before ours, means
    ours was taken out (a test's monkeypatch undone).
    """
    wrapper, spawn = _STATE["wrapper"], _STATE["module"]
    if wrapper is None or spawn is None:
        return False
    if sys.modules.get(spawn.__name__) is not spawn:
        return False  # put into a copy of the module dropped since
    current: object = getattr(spawn, "get_preparation_data", None)
    for _ in range(32):
        if current is wrapper:
            return True
        if current is wrapper.wrapped:
            return False
        below = getattr(current, "__wrapped__", None)
        if below is None:
            return True
        current = below
    return True


def carry(name: str, rider: Rider) -> Callable[[], None]:
    """Put ``rider()`` into the preparation data of every spawn/forkserver child started
    from now on, under *name*; returns the undo, which restores what *name* carried before
    (a pytest run nested in a test hands the outer run's rider back)."""
    previous = _RIDERS.get(name)
    _RIDERS[name] = rider
    if not _WAIT:  # wraps the module now if it is imported, else when it is
        _WAIT.append(_afterimport.call("multiprocessing.spawn", _wrap))
    elif "multiprocessing.spawn" in sys.modules:  # ours may have been taken out since
        _wrap(sys.modules["multiprocessing.spawn"])

    def undo() -> None:
        if _RIDERS.get(name) is not rider:
            return
        if previous is None:
            del _RIDERS[name]
        else:
            _RIDERS[name] = previous
        _uninstall_if_idle()

    return undo


def _wrap(spawn: Any) -> None:
    """Put a wrapper into this copy of the module's chain, unless ours is there."""
    if spawn is _STATE["module"] and installed():
        return
    wrapper = _Wrapper(spawn.get_preparation_data)
    _STATE.update(wrapper=wrapper, module=spawn)
    spawn.get_preparation_data = wrapper


def _uninstall_if_idle() -> None:
    if _RIDERS:
        return
    while _WAIT:
        _WAIT.pop()()
    wrapper, spawn = _STATE["wrapper"], _STATE["module"]
    if wrapper is None or spawn is None:
        return
    if spawn.get_preparation_data is wrapper:
        spawn.get_preparation_data = wrapper.wrapped
        _STATE.update(wrapper=None, module=None)
    # Else something wrapped it after us: ours stays in the chain, passing data through.


def riders() -> tuple[str, ...]:
    """The names of what rides now (for tests and diagnostics)."""
    return tuple(_RIDERS)
