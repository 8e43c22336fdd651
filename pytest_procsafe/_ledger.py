"""What each owner answers for and has not been checked for yet: processes, segments.

The leak checks give every new process (`_tracker`) and every new ``/dev/shm`` entry
(`_segments`) to the owner it was first seen under, forget what went away, and take an
owner's whole share when that owner is checked. Owners are compared by identity and listed
in the order they first had something. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic
from typing import TypeVar
from typing import final

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

    def take(self, owner: OwnerT) -> list[K]:
        """*owner*'s items, sorted, which are checked now (once)."""
        return sorted(self._items.pop(owner, None) or ())
