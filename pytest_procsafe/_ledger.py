"""Owners, what the tracker knows of each process, and what each owner answers for.

The leak checks give every new process (`_tracker`) and every new ``/dev/shm`` entry
(`_segments`) to the owner it was first seen under, forget what went away, and take an
owner's whole share when that owner is checked. Owners are compared by identity and listed
in the order they first had something. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Hashable
from typing import TYPE_CHECKING
from typing import Final
from typing import Generic
from typing import Literal
from typing import TypeVar
from typing import final

from pytest_procsafe import _proctable
from pytest_procsafe._proctable import Proc

if TYPE_CHECKING:
    from pytest_procsafe._leaked import LeakKind

Where = tuple[str, int]

OwnerT = TypeVar("OwnerT", bound=Hashable)
#: Pids or ``/dev/shm`` entry names: sortable, so a check lists them in a stable order.
K = TypeVar("K", int, str)


@final
class Ledger(Generic[OwnerT, K]):
    """Owner -> the items it answers for, unchecked so far."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[OwnerT, set[K]] = {}

    def add(self, owner: OwnerT, item: K) -> None:
        self._items.setdefault(owner, set()).add(item)

    def discard(self, owner: OwnerT | None, item: K) -> None:
        """*item* went away (or was handed on): *owner* no longer answers for it."""
        if owner is None:
            return
        items = self._items.get(owner)
        if items is not None:
            items.discard(item)

    def has(self, owner: OwnerT) -> bool:
        """Whether *owner* has anything to be checked for."""
        return bool(self._items.get(owner))

    def owners(self) -> list[OwnerT]:
        """Owners that still have unchecked items, in the order they first had one."""
        return [owner for owner, items in self._items.items() if items]

    def peek(self, owner: OwnerT) -> list[K]:
        """*owner*'s items, sorted, left unchecked."""
        return sorted(self._items.get(owner, ()))

    def take(self, owner: OwnerT) -> list[K]:
        """*owner*'s items, sorted, which are checked now (once)."""
        return sorted(self._items.pop(owner, None) or ())


@final
class Owner:
    """Who answers for processes first seen while it ran (compared by identity).

    A plain slotted class: one is made for every test, so it must be cheap.
    """

    __slots__ = ("label", "scope", "where")

    def __init__(
        self,
        label: str,
        scope: Literal["test", "fixture", "session"],
        where: Where | Callable[[], Where] | None = None,
    ) -> None:
        self.label: Final = label
        self.scope: Final = scope
        #: Where its warning points (a test's is computed only when there is one).
        self.where: Final = where

    def __repr__(self) -> str:
        return f"Owner({self.label!r}, {self.scope!r})"


@final
class Seen:
    """A descendant the tracker knows, with its owner at first sight.

    A plain class, not a dataclass: generating one's methods cost every pytest process
    about 0.4 ms at import (benchmarks/README.md).
    """

    __slots__ = ("held_by", "owner", "phase", "ppid", "proc", "reparented")

    def __init__(
        self,
        proc: Proc,
        owner: Owner | None,  # None: it existed before this tracker (a nested pytest run)
        phase: str,
        ppid: int,
        reparented: bool = False,
        held_by: str | None = None,
    ) -> None:
        self.proc = proc
        self.owner = owner
        self.phase = phase
        self.ppid = ppid
        self.reparented = reparented
        #: Who holds it (``module.attr``), once the holder check found one.
        self.held_by = held_by

    def __repr__(self) -> str:
        return (
            f"Seen(pid={self.proc.pid}, owner={self.owner!r}, phase={self.phase!r}, "
            f"ppid={self.ppid}, reparented={self.reparented}, held_by={self.held_by!r})"
        )


@final
class Found:
    """A classified candidate: a leak unless an ignore rule or hook exempts it."""

    __slots__ = ("cmdline", "created_at", "kind", "name", "proc", "seen")

    def __init__(
        self, seen: Seen, proc: Proc, kind: LeakKind, created_at: str | None = None
    ) -> None:
        self.seen = seen
        self.proc = proc
        self.kind: LeakKind = kind
        self.cmdline = _proctable.cmdline(proc.pid)
        #: ``path:line`` of the user's code that started it, when it was seen starting.
        self.created_at = created_at
        #: What it is on the Python side (``ForkPoolWorker-1 of a ...Pool``), if known.
        self.name: str | None = None
