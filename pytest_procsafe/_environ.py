"""The parent's ``os.environ``, carried into forkserver children as it is at their start.

A fork child copies the parent's environment at the fork and a spawn child gets it at
exec, but a forkserver child is forked from the server, which took the parent's
environment once, when it started, perhaps many tests earlier. A ``monkeypatch.setenv``
(or ``delenv``) made after that is invisible to every later forkserver child, and which
tests see it depends on the order they run in.

`install` has `_spawnhook` carry a stowaway in the preparation data of every spawn and
forkserver launch (procsafe's workers, and a test's own ``Process``, ``Pool`` or
``ProcessPoolExecutor``). Pickled in the parent at the launch, it takes a copy of
``os.environ`` when the launch is a forkserver one; unpickled in the child, before the
parent's main module is re-imported and before the target is unpickled, it makes the
child's environment that copy: additions, changes and deletions alike. Spawn launches
carry none: the child got that very environment at exec, and applying it again would
undo what the interpreter changes at its own start. The stowaway carries itself on from
the child, so the child's own forkserver children get the child's environment.

Runs inside workers: imports neither pytest nor the plugin.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Mapping

from pytest_procsafe import _spawnhook
from pytest_procsafe._notyping import final

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import Final

#: The name of the environment among `_spawnhook`'s riders.
RIDER: Final = "environ"


def apply(environ: Mapping[str, str]) -> None:
    """Make ``os.environ`` (and the C-level environment) equal to *environ*."""
    for name in [name for name in os.environ if name not in environ]:
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _arrive(environ: dict[str, str] | None) -> None:
    if environ is not None:
        apply(environ)
    install()  # the child's own forkserver children need it as well


@final
class _Stowaway:
    """Rides in the preparation data; pickling takes the environment, unpickling applies it."""

    def __reduce__(self) -> tuple[Callable[[dict[str, str] | None], None], tuple[object]]:
        # Taken here, at the launch, not when the preparation data is built: the
        # forkserver asks for that data once when it starts and drops this entry.
        from multiprocessing import context  # a launch: imported

        popen = context.get_spawning_popen()
        if getattr(popen, "method", None) == "spawn":
            return _arrive, (None,)
        return _arrive, (dict(os.environ),)


def install() -> Callable[[], None]:
    """Carry the environment into every forkserver child started from now on; the undo."""
    return _spawnhook.carry(RIDER, _Stowaway)
