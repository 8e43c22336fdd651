"""`LeakedProcess`: one process left behind, as the hooks and the report see it.

A module of its own: the class is made only when a leak is found (`_leaks` imports it
then), so that a clean run does not pay for generating a frozen dataclass's methods (about
1 ms of every pytest process; benchmarks/README.md). Public as
``pytest_procsafe.LeakedProcess``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal
from typing import final

Action = Literal["killed", "reaped", "kept"]
LeakKind = Literal["leaked", "zombie", "orphan"]


@final
@dataclasses.dataclass(frozen=True)
class LeakedProcess:
    """One process left behind, as the hooks and the report see it."""

    __module__ = "pytest_procsafe"

    pid: int
    ppid: int
    cmdline: tuple[str, ...]
    kind: LeakKind
    #: A test node id, ``fixture <name>`` or ``session``.
    owner: str
    #: When it was first seen: ``setup``, ``call``, ``teardown``, ``collection``, ``session``.
    phase: str
    action: Action
    #: What it is on the Python side (``ForkPoolWorker-1 of a multiprocessing.pool.Pool``).
    name: str | None = None
    #: Who holds it, as a user writes it (``reuse._executor``): a held process belongs to
    #: the session, not to the test that started it.
    held_by: str | None = None
    #: ``path:line`` of the user's code that started it.
    created_at: str | None = None
    #: Its Python stack (all threads) when it was found, where one could be had.
    stack: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The JSON report's form (plain types only: it also travels between processes)."""
        return {
            "owner": self.owner,
            "kind": self.kind,
            "pid": self.pid,
            "ppid": self.ppid,
            "cmdline": list(self.cmdline),
            "name": self.name,
            "phase": self.phase,
            "action": self.action,
            "held_by": self.held_by,
            "created_at": self.created_at,
            "stack": self.stack,
        }
