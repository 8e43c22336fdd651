"""Owners, snapshot diff and classification of the processes a test leaves behind.

`Tracker` keeps every descendant it has seen with the owner it was first seen under: the
test whose setup, call or teardown was running, a wider-scoped fixture during its setup,
or the session (collection, other plugins' hooks). Observing is one read of the children
files when nothing changed; classification, command lines and the exit grace are spent
only on candidates, so a clean test costs a few microseconds.

Orphans: a grandchild whose parent exited is re-parented to the test process (a child
subreaper on Linux). The kernel keeps no record of the original parent, so a direct
child is one this process is known to have started (a fork seen by the at-fork hooks, a
``multiprocessing`` or ``subprocess`` object); a child first seen under another parent,
or that nothing here started (a double fork, a shell's ``cmd &``), is an orphan.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import Final
from typing import Literal
from typing import final

from pytest_procsafe import _owned
from pytest_procsafe import _proctable
from pytest_procsafe import _reaper
from pytest_procsafe._ledger import Ledger
from pytest_procsafe._proctable import Proc

LeakKind = Literal["leaked", "zombie", "orphan"]

#: How long a candidate may take to finish exiting (a process terminated but not yet
#: reaped by its parent) before it counts as a leak; spent only when there is a candidate.
EXIT_GRACE: Final = 0.3

# multiprocessing's helper processes: never leaks, however they were started.
_MACHINERY: Final = re.compile(
    r"from multiprocessing\.(?:forkserver|resource_tracker|semaphore_tracker) import main"
)
# execnet's popen gateways (xdist workers, seen from the controller): their subtrees
# belong to the procsafe running inside them.
EXECNET: Final = "import sys;exec(eval(sys.stdin.readline()))"


Where = tuple[str, int]


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
@dataclasses.dataclass(eq=False)
class Seen:
    """A descendant the tracker knows, with its owner at first sight."""

    proc: Proc
    owner: Owner | None  # None: it existed before this tracker (a nested pytest run)
    phase: str
    ppid: int
    reparented: bool = False


@final
class Found:
    """A classified candidate: a leak unless an ignore rule or hook exempts it."""

    __slots__ = ("cmdline", "kind", "proc", "seen")

    def __init__(self, seen: Seen, proc: Proc, kind: LeakKind) -> None:
        self.seen = seen
        self.proc = proc
        self.kind: LeakKind = kind
        self.cmdline = _proctable.cmdline(proc.pid)


# Trackers of this process, innermost last. The at-fork hooks (which cannot be
# unregistered) tell each of them which children its forks created.
_ACTIVE: list[Tracker] = []
_HOOKED = False


def _before_fork() -> None:
    for tracker in _ACTIVE:
        tracker.fork_before()


def _after_fork_in_parent() -> None:
    for tracker in _ACTIVE:
        tracker.fork_after()


@final
class Tracker:
    """Descendants of this process by owner; see the module docstring."""

    def __init__(self, table: _proctable.ProcTable | None = None) -> None:
        global _HOOKED
        self.table: Final = table if table is not None else _proctable.ProcTable()
        self.root: Final = self.table.root
        self.nested: Final = bool(_ACTIVE)
        self.seen: dict[int, Seen] = {}
        self.exempt: set[int] = set()  # never candidates again (ignored, machinery)
        self.prune: set[int] = set()  # subtrees not walked (execnet)
        self._ledger: Ledger[Owner, int] = Ledger()
        self._direct: dict[int, float] = {}  # pid -> start time, forked by this process
        #: Told of every descendant when it is first seen (the guardian's announcements).
        self.on_new: Callable[[Proc], object] | None = None
        self._pre_fork: set[int] = set()
        if self.nested:
            # A pytest run inside a pytest run (pytester's inline mode): what runs already
            # belongs to the outer run, never to this one.
            for pid, ppid in self.table.tree().items():
                proc = _proctable.stat(pid)
                if proc is not None:
                    self.seen[pid] = Seen(proc, None, "before", ppid)
                    self.exempt.add(pid)
        _ACTIVE.append(self)
        if not _HOOKED and hasattr(os, "register_at_fork"):
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)
            _HOOKED = True

    def close(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self.table.close()

    # --- forks of this very process (run in whichever thread forks) -------------------

    def fork_before(self) -> None:
        if os.getpid() == self.root and _proctable.LINUX:
            self._pre_fork = set(_proctable.children(self.root))

    def fork_after(self) -> None:
        if os.getpid() != self.root or not _proctable.LINUX:
            return
        for pid in set(_proctable.children(self.root)) - self._pre_fork:
            proc = _proctable.stat(pid)
            if proc is not None and proc.ppid == self.root:
                self._direct[pid] = proc.start
                if self.on_new is not None:  # a fork inherits no environment change
                    self.on_new(proc)

    # --- observing ----------------------------------------------------------------------

    def observe(self, owner: Owner, phase: str) -> None:
        """Give every descendant not seen before to *owner*; forget those that are gone."""
        seen = self.seen
        if not seen and self.table.quiet():  # the clean test's whole cost
            return
        tree = self.table.tree(self.prune)
        # A known pid under the same parent is taken to be the same process: pids are
        # handed out in sequence, so a reuse between two observations would take the
        # whole pid space going round within one test phase.
        for pid, ppid in tree.items():
            entry = seen.get(pid)
            if entry is not None and (entry.ppid == ppid or self._moved(entry, ppid)):
                continue
            self._add(pid, ppid, owner, phase)
        if len(seen) > len(tree):
            for pid in [pid for pid in seen if pid not in tree]:
                self._forget(pid)

    def _moved(self, entry: Seen, ppid: int) -> bool:
        """A known pid under a new parent: True if re-parented, False if the pid is new."""
        if _proctable.same(entry.proc) is None:
            self._forget(entry.proc.pid)
            return False
        if ppid == self.root and entry.ppid != self.root:
            entry.reparented = True
        entry.ppid = ppid
        return True

    def _add(self, pid: int, ppid: int, owner: Owner, phase: str) -> None:
        proc = _proctable.stat(pid)
        if proc is None:
            return
        self.seen[pid] = entry = Seen(proc, owner, phase, ppid)
        if self.on_new is not None:
            self.on_new(proc)
        # First seen under another descendant: if it is our child now, it was re-parented.
        entry.reparented = proc.ppid != ppid
        if ppid in self.prune:
            self.exempt.add(pid)
            self.prune.add(pid)
            return
        # Outside tests only: xdist starts its gateways then, and reading the command line
        # of every new child inside tests would cost for nothing.
        if (
            owner.scope == "session"
            and ppid == self.root
            and EXECNET in " ".join(_proctable.cmdline(pid))
        ):
            self.exempt.add(pid)
            self.prune.add(pid)
            return
        self._ledger.add(owner, pid)

    def _forget(self, pid: int) -> None:
        entry = self.seen.pop(pid, None)
        self.exempt.discard(pid)
        self.prune.discard(pid)
        self._direct.pop(pid, None)
        if entry is not None:
            self._ledger.discard(entry.owner, pid)

    # --- owners -------------------------------------------------------------------------

    def has_candidates(self, owner: Owner) -> bool:
        return self._ledger.has(owner)

    def owners(self) -> list[Owner]:
        """Owners that still have unchecked processes, in the order they first had one."""
        return self._ledger.owners()

    def take(self, owner: Owner) -> list[Seen]:
        """The unchecked processes of *owner*, which are checked now (once)."""
        return [self.seen[pid] for pid in self._ledger.take(owner) if pid in self.seen]

    def give(self, owner: Owner, entries: Iterable[Seen]) -> None:
        """Hand *entries* to *owner*: they are checked again when *owner* is."""
        for entry in entries:
            entry.owner = owner
            self._ledger.add(owner, entry.proc.pid)

    def leftovers(self) -> list[Proc]:
        """Every descendant now that no rule exempts: the final sweep's targets."""
        machinery = _machinery_pids()
        out = []
        for pid in self.table.tree(self.prune):
            if pid in self.exempt or pid in machinery:
                continue
            proc = _proctable.stat(pid)
            if proc is not None and not _is_machinery(proc, machinery, self.root):
                out.append(proc)
        return out

    # --- classification -----------------------------------------------------------------

    def classify(self, entries: list[Seen], later: Owner) -> list[Found]:
        """Which of *entries* are leaks, and of what kind, after the exit grace.

        Machinery is exempted for good; processes procsafe's own fixtures still own are
        handed to *later* (the session). Zombies that multiprocessing or subprocess will
        reap through their own objects are left to them, and a zombie orphan finished in
        time: it is reaped quietly (without the subreaper, init would have reaped it).
        """
        deadline = time.monotonic() + EXIT_GRACE
        pause = 0.002
        deep: dict[int, object] | None = None
        while True:
            shallow = _reaper.python_children()  # multiprocessing reaps its own first
            machinery, owned = _machinery_pids(), _owned.pids()
            found: list[Found] = []
            waiting = False
            for entry in list(entries):
                proc = _proctable.same(entry.proc)
                if proc is None:
                    entries.remove(entry)
                    self._forget(entry.proc.pid)
                    continue
                if _is_machinery(proc, machinery, self.root):
                    entries.remove(entry)
                    self.exempt.add(proc.pid)
                    continue
                if proc.pid in owned:
                    entries.remove(entry)
                    self.give(later, [entry])
                    continue
                ours = proc.ppid == self.root and not entry.reparented
                if ours and proc.pid not in shallow and self._direct.get(proc.pid) != proc.start:
                    if deep is None:
                        deep = _reaper.python_children(deep=True)
                    ours = proc.pid in deep
                if proc.zombie and proc.ppid == self.root and (proc.pid in shallow or not ours):
                    _reaper.reap([proc], self.root)
                    waiting = True
                    continue
                if not proc.zombie or proc.ppid != self.root:
                    waiting = True  # may still be exiting, or be reaped by its parent
                kind: LeakKind = "zombie" if proc.zombie else "leaked"
                if kind == "leaked" and proc.ppid == self.root and not ours:
                    kind = "orphan"
                found.append(Found(entry, proc, kind))
            if not waiting or time.monotonic() >= deadline:
                return found
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def _machinery_pids() -> set[int]:
    """The forkserver and resource tracker this process started, if any."""
    pids: set[int] = set()
    for module, holder, attribute in (
        ("multiprocessing.forkserver", "_forkserver", "_forkserver_pid"),
        ("multiprocessing.resource_tracker", "_resource_tracker", "_pid"),
    ):
        pid = getattr(getattr(sys.modules.get(module), holder, None), attribute, None)
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def _is_machinery(proc: Proc, pids: set[int], root: int) -> bool:
    if proc.pid in pids:
        return True
    # Forks of a forkserver worker carry the server's command line; once re-parented to
    # the test process they are orphans, not the server (ours is in *pids*).
    if proc.ppid == root or not _MACHINERY.search(" ".join(_proctable.cmdline(proc.pid))):
        return False
    # A forkserver's children are forks of it, with its command line: they are workers.
    return not _MACHINERY.search(" ".join(_proctable.cmdline(proc.ppid)))


def detach(procs: Iterable[Proc]) -> None:
    """Keep multiprocessing's exit handler from joining kept children: it joins with no
    timeout, so a kept child still running would hang the interpreter's exit."""
    pids = {proc.pid for proc in procs}
    children = getattr(sys.modules["multiprocessing.process"], "_children", None)
    for process in multiprocessing.active_children():
        if process.pid in pids and isinstance(children, set):
            children.discard(process)
