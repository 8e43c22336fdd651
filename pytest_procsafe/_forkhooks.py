"""procsafe's at-fork callbacks: the one place that registers them with ``os``.

``os.register_at_fork`` keeps what it is given until the interpreter is gone, and a
function keeps its module's globals: everything those reach (``typing``, the plugin, what
it imported) then outlives the collections of the interpreter's end, which walk all of it,
about 2 ms of every pytest process. So procsafe registers three small callers once, kept in
this module (which imports only ``os``, ``sys`` and ``atexit``), and they call what the parts
`add`; at exit the lists are emptied and nothing of procsafe's is kept from going.

Order: *prepare* callbacks first, first added first (they may start processes of their
own: the guardian starts just before the run's first child); then *before* callbacks,
last added first, as ``os.register_at_fork`` has it (the last look at the children, then
SIGTERM blocked until the child is ready: nothing may fork after those); after the fork,
first added first. A fork made after the exit handlers (nothing procsafe watches) calls
nothing. Imports neither pytest nor ``typing``: a spawn child imports this.
"""

from __future__ import annotations

import atexit
import os
import sys

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from collections.abc import Callable
    from collections.abc import Iterable

_PREPARE: list[Callable[[], object]] = []
_BEFORE: list[Callable[[], object]] = []
_PARENT: list[Callable[[], object]] = []
_CHILD: list[Callable[[], object]] = []
_REGISTERED: list[bool] = []


def add(
    *,
    prepare: Callable[[], object] | None = None,
    before: Callable[[], object] | None = None,
    after_in_parent: Callable[[], object] | None = None,
    after_in_child: Callable[[], object] | None = None,
) -> None:
    """Call these around every ``os.fork`` of this process from now on (no undo: a part
    adds its callbacks once, and they look at its own state)."""
    if not hasattr(os, "register_at_fork"):
        return  # Windows: no fork
    if not _REGISTERED:
        os.register_at_fork(before=_before, after_in_parent=_parent, after_in_child=_child)
        atexit.register(_drop)
        _REGISTERED.append(True)
    if prepare is not None:
        _PREPARE.append(prepare)
    if before is not None:
        _BEFORE.append(before)
    if after_in_parent is not None:
        _PARENT.append(after_in_parent)
    if after_in_child is not None:
        _CHILD.append(after_in_child)


def _before() -> None:
    _call(list(_PREPARE))
    _call(reversed(list(_BEFORE)))


def _parent() -> None:
    _call(list(_PARENT))


def _child() -> None:
    _call(list(_CHILD))


def _call(callbacks: Iterable[Callable[[], object]]) -> None:
    # As os does: a callback that raises is reported and the others still run.
    for callback in callbacks:
        try:
            callback()
        except Exception:
            import traceback

            print(f"Exception ignored in at-fork callback {callback!r}:", file=sys.stderr)
            traceback.print_exc()


def _drop() -> None:
    _PREPARE.clear()
    _BEFORE.clear()
    _PARENT.clear()
    _CHILD.clear()
