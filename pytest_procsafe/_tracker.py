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

import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any
from typing import Final
from typing import final

from pytest_procsafe import _births
from pytest_procsafe import _forkhooks
from pytest_procsafe import _owned
from pytest_procsafe import _proctable
from pytest_procsafe._guardwire import MARK
from pytest_procsafe._ledger import Found
from pytest_procsafe._ledger import Ledger
from pytest_procsafe._ledger import Owner
from pytest_procsafe._ledger import Seen
from pytest_procsafe._proctable import Proc

if TYPE_CHECKING:
    # Imported where a candidate needs them: a clean run never does (the fixed cost).
    from pytest_procsafe import _holders
    from pytest_procsafe._leaked import LeakKind

#: How long a candidate may take to finish exiting (a process terminated but not yet
#: reaped by its parent) before it counts as a leak; spent only when there is a candidate.
EXIT_GRACE: Final = 0.25
#: The grace ends sooner once the candidates waited for, the parents of the zombies among
#: them and this process's other threads (which may be telling them to stop) have all been
#: asleep and done nothing for this long: an idle process is not on its way out (a parent
#: that polls for its children's exits more often than this is seen to act).
IDLE: Final = 0.1

# execnet's popen gateways (xdist workers, seen from the controller): their subtrees
# belong to the procsafe running inside them.
EXECNET: Final = "import sys;exec(eval(sys.stdin.readline()))"


Where = tuple[str, int]


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
        self._created: dict[int, str] = {}  # pid -> where the user's code started it
        self._holders: dict[tuple[int, float], str | None] = {}  # (pid, start) -> holder
        self._hints: _holders.Hints | None = None  # where holders were found: looked under first
        self._walked: bytes | None = None  # `ProcTable.last_pid` at the last walk
        self._births_walked = 0  # `births` at the last walk
        self._adopted: dict[int, float] = {}  # pid -> start: reported elsewhere (`adopt`)
        self._spared: dict[int, float] = {}  # pid -> start: not reported, still swept
        self._guardians: set[int] = set()  # other runs' guardians re-parented here
        #: Children this process was seen starting (any launcher, forks), ever.
        self.births = 0
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
        self._deaf = _births.listen(self._born)
        if not _HOOKED:
            _forkhooks.add(before=_before_fork, after_in_parent=_after_fork_in_parent)
            _HOOKED = True

    def close(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._deaf()
        self.table.close()

    def _born(self, pid: int, where: str | None, direct: bool) -> None:
        """A child started here (`_births`): note where, and that it is a direct one."""
        if os.getpid() != self.root:
            return
        self.births += 1
        if pid == _births.NO_PID:
            return
        if where is not None:
            self._created[pid] = where
        if direct:
            proc = _proctable.stat(pid)
            if proc is not None and proc.ppid == self.root:
                self._direct[pid] = proc.start

    # --- forks of this very process (run in whichever thread forks) -------------------

    def fork_before(self) -> None:
        if os.getpid() == self.root and _proctable.LINUX:
            self._pre_fork = set(_proctable.children(self.root))

    def fork_after(self) -> None:
        if os.getpid() != self.root or not _proctable.LINUX:
            return
        born = []
        for pid in set(_proctable.children(self.root)) - self._pre_fork:
            proc = _proctable.stat(pid)
            if proc is not None and proc.ppid == self.root:
                born.append(proc)
        if not born:
            return
        # One fork makes one child. Anything else new is a grandchild re-parented to us
        # meanwhile (its parent forked it and exited at once): it was born later.
        child = min(born, key=lambda proc: (proc.start, proc.pid))
        self.births += 1
        self._direct[child.pid] = child.start
        at = _births.where(2)  # above this hook: os.fork's caller and up
        if at is not None:
            self._created.setdefault(child.pid, at)
        if self.on_new is not None:  # a fork inherits no environment change
            self.on_new(child)

    # --- observing ----------------------------------------------------------------------

    def busy(self) -> bool:
        """Whether there is anything to observe: False costs one ``waitid`` (no child, and
        none known), the clean test's whole cost."""
        return bool(self.seen) or not self.table.quiet()

    def observe(self, owner: Owner, phase: str) -> None:
        """Give every descendant not seen before to *owner*; forget those that are gone.

        With descendants already known (a resource tracker, a forkserver, a held pool),
        the tree is walked again only when a process was born in the pid namespace since
        the last walk (`ProcTable.last_pid`): what was known stays known, and one that
        ended is looked at when its owner is checked.
        """
        if not self.busy():
            return
        table = self.table
        stamp = table.last_pid() if self.seen else None  # read before the walk it dates
        if stamp is not None and stamp == self._walked:
            if self.births == self._births_walked:
                if self._guardians:  # an exit makes no pid: theirs are reaped all the same
                    self._reap_guardians()
                return
            # A child started here and no pid handed out: the file does not follow births
            # (an emulated /proc); walk at every look from now on.
            table.close_last_pid()
            stamp = None
        seen = self.seen
        tree = table.tree(self.prune)
        self._walked, self._births_walked = stamp, self.births
        # A known pid under the same parent is taken to be the same process: pids are
        # handed out in sequence, so a reuse between two observations would take the
        # whole pid space going round within one test phase.
        for pid, ppid in tree.items():
            entry = seen.get(pid)
            if entry is not None and (entry.ppid == ppid or self._moved(entry, ppid)):
                continue
            self._add(pid, ppid, owner, phase)
        if self._guardians:
            self._reap_guardians()
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
        if self._adopted.get(pid) == proc.start:  # handed over, already reported
            self.seen[pid] = Seen(proc, None, "forked", ppid)
            self.exempt.add(pid)
            return
        # Re-parented here, not started here: perhaps the guardian of a pytest run inside
        # this one (a pytester subprocess, an xdist worker), sent to this subreaper as it
        # started. Not this run's process: it stops once its own run is gone.
        command = None
        if ppid == self.root and (owner.scope == "session" or pid not in self._direct):
            command = " ".join(_proctable.cmdline(pid))
            if MARK in command:  # in every guardian's command line
                self.seen[pid] = Seen(proc, None, phase, ppid)
                self.exempt.add(pid)
                self._guardians.add(pid)
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
        if owner.scope == "session" and command is not None and EXECNET in command:
            self.exempt.add(pid)
            self.prune.add(pid)
            return
        self._ledger.add(owner, pid)

    def _reap_guardians(self) -> None:
        """Reap the other runs' guardians re-parented here that have exited: nobody else
        will (they are never candidates)."""
        for pid in list(self._guardians):
            entry = self.seen.get(pid)
            current = None if entry is None else _proctable.same(entry.proc)
            if current is None:
                self._guardians.discard(pid)
            elif current.zombie:
                from pytest_procsafe import _reaper

                _reaper.reap([current], self.root)
                self._guardians.discard(pid)

    def _forget(self, pid: int) -> None:
        entry = self.seen.pop(pid, None)
        self.exempt.discard(pid)
        self.prune.discard(pid)
        self._direct.pop(pid, None)
        self._created.pop(pid, None)
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

    def live(self, owner: Owner) -> list[Proc]:
        """*owner*'s processes that still run, without checking them (`take` does that);
        multiprocessing's machinery (forkservers, trackers) left out."""
        from pytest_procsafe import _machinery

        machinery = _machinery.pids()
        out = []
        for pid in self._ledger.peek(owner):
            entry = self.seen.get(pid)
            current = _proctable.same(entry.proc) if entry is not None else None
            if current is None or current.zombie:
                continue
            if not _machinery.is_machinery(current, machinery, self.root):
                out.append(current)
        return out

    def created_at(self, pid: int) -> str | None:
        """Where the user's code started *pid*, if it was seen starting."""
        return self._created.get(pid)

    def adopt(self, proc: Proc) -> None:
        """*proc* was reported elsewhere (a forked test process): never a candidate here,
        whether it is seen already or only once it is re-parented here."""
        self._adopted[proc.pid] = proc.start
        entry = self.seen.get(proc.pid)
        if entry is not None and entry.proc.start == proc.start:
            self._ledger.discard(entry.owner, proc.pid)
            entry.owner = None
            self.exempt.add(proc.pid)

    def give(self, owner: Owner, entries: Iterable[Seen]) -> None:
        """Hand *entries* to *owner*: they are checked again when *owner* is."""
        for entry in entries:
            entry.owner = owner
            self._ledger.add(owner, entry.proc.pid)

    def spare(self, proc: Proc) -> None:
        """*proc* is exempt from reports (``ignore``, the hook, a ``leaks="off"`` marker)
        but not from the final sweep: nothing the run started outlives it."""
        self.exempt.add(proc.pid)
        self._spared[proc.pid] = proc.start

    def leftovers(self) -> list[Proc]:
        """Every descendant now that no rule exempts, and those only spared from reports:
        the final sweep's targets."""
        tree = self.table.tree(self.prune)
        if not tree:  # the usual end: nothing to tell apart
            return []
        from pytest_procsafe import _machinery

        machinery = _machinery.pids()
        out = []
        for pid in tree:
            if (pid in self.exempt and pid not in self._spared) or pid in machinery:
                continue
            proc = _proctable.stat(pid)
            if proc is None or _machinery.is_machinery(proc, machinery, self.root):
                continue
            if pid in self._spared and self._spared[pid] != proc.start:
                continue  # the pid was reused: not the process spared, nor the run's
            out.append(proc)
        return out

    # --- classification -----------------------------------------------------------------

    def classify(
        self, entries: list[Seen], later: Owner, *, find_holders: bool = True
    ) -> list[Found]:
        """Which of *entries* are leaks, and of what kind.

        Machinery is exempted for good; processes procsafe's own fixtures still own are
        handed to *later* (the session), and so are processes an object that outlives the
        test holds (*find_holders*: a module global, a class attribute, a reusable
        executor; `_holders`), with the holder's name. Zombies that multiprocessing or
        subprocess will reap through their own objects are left to them, and a zombie
        orphan finished in time: it is reaped quietly (without the subreaper, init would
        have reaped it). What is left gets a short grace to finish exiting (a pool being
        terminated, an executor shutting down in the background), spent only then.
        """
        look = _Look()
        found, waiting = self._look(entries, later, look)
        idle = _Idle(self.root)
        if found and waiting:
            idle.settled(found)  # the idle window starts now: the holder search is in it
        if found and find_holders:
            found = self._rehome_held(found, entries, later, look)
        if found and waiting:
            deadline = time.monotonic() + EXIT_GRACE
            pause = 0.002
            while waiting and time.monotonic() < deadline:
                time.sleep(min(pause, idle.left()))
                pause = min(pause * 2, IDLE / 2)
                found, waiting = self._look(entries, later, look)
                if waiting and idle.settled(found):
                    break
        if found:
            objects = look.objects()
            for item in found:
                item.name = objects.name(item.proc.pid)
        return found

    def _look(self, entries: list[Seen], later: Owner, look: _Look) -> tuple[list[Found], bool]:
        """One look at *entries*: the candidates, and whether any may still be exiting."""
        from pytest_procsafe import _machinery
        from pytest_procsafe import _reaper

        shallow = _reaper.python_children()  # multiprocessing reaps its own first
        machinery, owned = _machinery.pids(), _owned.pids()
        found: list[Found] = []
        waiting = False
        for entry in list(entries):
            proc = _proctable.same(entry.proc)
            if proc is None:
                entries.remove(entry)
                self._forget(entry.proc.pid)
                continue
            if _machinery.is_machinery(proc, machinery, self.root):
                entries.remove(entry)
                self.exempt.add(proc.pid)
                continue
            if proc.pid in owned:
                entries.remove(entry)
                self.give(later, [entry])
                continue
            ours = proc.ppid == self.root and not entry.reparented
            if ours and proc.pid not in shallow and self._direct.get(proc.pid) != proc.start:
                ours = look.process(proc.pid) is not None
            if proc.zombie and proc.ppid == self.root and (proc.pid in shallow or not ours):
                _reaper.reap([proc], self.root)
                waiting = True
                continue
            if not proc.zombie or proc.ppid != self.root:
                waiting = True  # may still be exiting, or be reaped by its parent
            kind: LeakKind = "zombie" if proc.zombie else "leaked"
            if kind == "leaked" and proc.ppid == self.root and not ours:
                kind = "orphan"
            found.append(Found(entry, proc, kind, self._created.get(proc.pid)))
        return found, waiting

    def _rehome_held(
        self, found: list[Found], entries: list[Seen], later: Owner, look: _Look
    ) -> list[Found]:
        """Hand the candidates an outliving object holds (and their descendants) to
        *later*; return the others."""
        targets = {
            item: obj
            for item in found
            if item.kind == "leaked" and (obj := look.process(item.proc.pid)) is not None
        }
        from pytest_procsafe import _holders

        if self._hints is None:
            self._hints = _holders.Hints()
        held = _holders.held_by(
            targets,
            self._holders,
            key=lambda item: (item.proc.pid, item.proc.start),
            ignore=look.containers(),
            hints=self._hints,
        )
        by_pid = {item.proc.pid: name for item, name in held.items()}
        # A held process's descendants go with it: also those of one held earlier (a
        # reusable executor's worker running a nested executor of its own).
        for pid, entry in self.seen.items():
            if entry.held_by is not None:
                by_pid.setdefault(pid, entry.held_by)
        parents = {pid: entry.ppid for pid, entry in self.seen.items()}
        parents.update((item.proc.pid, item.proc.ppid) for item in found)
        keep: list[Found] = []
        for item in found:
            name, pid = None, item.proc.pid
            for _ in range(len(parents) + 1):
                name = by_pid.get(pid)
                if name is not None or pid not in parents or pid == self.root:
                    break
                pid = parents[pid]
            if name is None:
                keep.append(item)
                continue
            item.seen.held_by = name
            if item.seen in entries:
                entries.remove(item.seen)
            self.give(later, [item.seen])
        return keep


@final
class _Idle:
    """Whether the candidates of one grace are idle (see `IDLE`): the processes that would
    have to act for them to go (each live one, a zombie's parent, this process's threads
    other than the caller's) were asleep at every look for `IDLE`, and did nothing."""

    __slots__ = ("_marks", "_root", "_since")

    def __init__(self, root: int) -> None:
        self._root = root
        # pid -> its fingerprint at the last look (`_proctable.activity`); None: busy then.
        self._marks: dict[int, tuple[object, ...] | None] | None = None
        self._since = time.monotonic()

    def settled(self, found: list[Found]) -> bool:
        """Whether what must act for *found* to go has been idle for `IDLE`. A process
        that no longer needs to (a candidate handed on) leaves the window running."""
        pids = {item.proc.ppid if item.proc.zombie else item.proc.pid for item in found}
        pids.discard(self._root)
        marks = {pid: _proctable.activity(pid) for pid in pids}
        if self._root == os.getpid():
            marks[self._root] = _proctable.activity(self._root, skip=threading.get_native_id())
        now = time.monotonic()
        last = self._marks
        busy = None in marks.values()
        if busy or last is None or any(last.get(pid) != mark for pid, mark in marks.items()):
            self._marks = None if busy else marks
            self._since = now
            return False
        return now - self._since >= IDLE

    def left(self) -> float:
        """Seconds until the window can be over (at least a moment: it may restart)."""
        return max(0.001, self._since + IDLE - time.monotonic())


@final
class _Look:
    """What one classification found out once: the walk of the Python objects is costly,
    and made only for what the starts `_births` heard do not tell."""

    __slots__ = ("_objects",)

    def __init__(self) -> None:
        self._objects: _holders.Found | None = None

    def objects(self) -> _holders.Found:
        if self._objects is None:
            from pytest_procsafe import _holders

            self._objects = _holders.objects()
        return self._objects

    def process(self, pid: int) -> Any | None:
        """The live object that stands for the process *pid* (``BaseProcess``-like or
        ``Popen``): the one whose start was heard, or else the walk's."""
        from pytest_procsafe import _holders

        obj = _births.started(pid)
        if obj is not None and _holders.stands_for(obj) == pid:
            return obj
        return self.objects().processes.get(pid)

    def containers(self) -> tuple[object, ...]:
        """What this look made that refers to the objects (not their holders)."""
        found = self._objects
        return () if found is None else (found, found.processes)
