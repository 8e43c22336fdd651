"""POSIX shared memory segments and named semaphores left behind, per owner.

On Linux both live in ``/dev/shm`` (a semaphore ``/mp-x`` is the file ``sem.mp-x``).
`SegmentWatch` keeps the directory's entries with the owner each was first seen under,
like `_tracker` does for processes. Observing costs one ``fstat`` of the directory when
nothing changed (2-4 microseconds, at the end of each test phase): on tmpfs its ctime
moves whenever an entry comes or goes. A change inside the timestamp granularity (a
clock tick on older kernels) could hide behind an earlier one, so a directory modified
within `RACY` of the last look is listed again next time.

``/dev/shm`` is shared by the whole machine (xdist workers, parallel runs and other
programs make entries there too) and a name says nothing about its maker, so an entry
that appeared while a test ran is only reported with evidence that this run made it:

* never: another user's entry; a procsafe ``mp_channels`` block still open; a segment or
  semaphore a live object of this process stands for (its owner unlinks it), or that a
  live process not being reported maps (both move to the session and are looked at
  again at its end);
* reported: a name this process or one of its descendants registered with
  multiprocessing's resource tracker and did not unregister (`_registrations`): every
  SharedMemory and every spawn/forkserver SemLock; or an entry mapped by this process or
  a descendant (``/proc/PID/maps``: segments other code made with ``shm_open``);
* not reported: anything else (a semaphore made with ``sem_open`` outside
  multiprocessing, whose maker's mapping shows only a temporary name).

Elsewhere (macOS) nothing lists semaphores or segments, so the registered names are
watched instead (best effort).

Unlinking also takes the name out of the resource tracker's books when one runs, so it
does not warn about it again at exit. Imports neither pytest nor the plugin.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from typing import Final
from typing import Literal
from typing import NamedTuple
from typing import final

from pytest_procsafe import _owned
from pytest_procsafe import _seconds
from pytest_procsafe._ledger import Ledger
from pytest_procsafe._registrations import Registrations

SegmentKind = Literal["shared_memory", "semaphore"]
KINDS: Final[tuple[SegmentKind, ...]] = ("shared_memory", "semaphore")
LINUX: Final = sys.platform.startswith("linux")
SHM_DIR: Final = "/dev/shm"
#: A directory modified this recently (ns) may hide a later change with the same time.
RACY: Final = 50_000_000
#: How long an entry may take to go once its owners let go of it (a resource tracker
#: unlinks a name a moment after the last process that used it did: loky's) before it
#: counts as left behind; spent only on entries that would be reported.
GRACE: Final = 0.25
_SEM: Final = "sem."


class Segment(NamedTuple):
    """One entry: its ``/dev/shm`` name, kind, POSIX name, and when it appeared."""

    entry: str
    kind: SegmentKind
    posix: str
    phase: str

    @property
    def name(self) -> str:
        """As multiprocessing names it: ``SharedMemory.name`` (``psm_x``), or a
        semaphore's POSIX name (``/mp-x``)."""
        return self.posix if self.kind == "semaphore" else self.posix.lstrip("/")


def as_record(segment: Segment, owner: str, action: str) -> dict[str, object]:
    """The JSON report's form: the name instead of a pid."""
    return {
        "owner": owner,
        "kind": segment.kind,
        "name": segment.name,
        "pid": None,
        "ppid": None,
        "cmdline": [],
        "phase": segment.phase,
        "action": action,
        "held_by": None,
        "created_at": None,
        "stack": None,
    }


def parse(entry: str) -> tuple[SegmentKind, str]:
    """Kind and POSIX name of a ``/dev/shm`` entry (``sem.mp-x`` is semaphore ``/mp-x``)."""
    if entry.startswith(_SEM):
        return "semaphore", "/" + entry[len(_SEM) :]
    return "shared_memory", "/" + entry


def entry_of(posix: str, kind: str) -> str:
    """The ``/dev/shm`` entry of a POSIX name (the inverse of `parse`)."""
    bare = posix.lstrip("/")
    return _SEM + bare if kind == "semaphore" else bare


def forget(posix: str, kind: SegmentKind) -> None:
    """Take *posix* out of this process's resource tracker's books, if a tracker runs.

    A REGISTER then an UNREGISTER: the tracker keeps a set, so this works whether or not
    it had the name (an UNREGISTER alone of an unknown name prints a traceback there).
    """
    module = sys.modules.get("multiprocessing.resource_tracker")
    tracker = getattr(module, "_resource_tracker", None)
    if tracker is None or getattr(tracker, "_fd", None) is None:
        return  # none started here: asking would start one
    with contextlib.suppress(Exception):  # a dead tracker has no books to keep
        tracker.register(posix, kind)
        tracker.unregister(posix, kind)


def in_use() -> set[str]:
    """POSIX names of the semaphores and shared memory blocks a live object of this
    process stands for: a SemLock or SharedMemory of multiprocessing or of a relative
    (loky, multiprocess, billiard), alone or inside a queue, lock or pool. Their owner
    unlinks them when it is done: unlinking them now would break the next user
    (``FileNotFoundError`` in ``SemLock._rebuild``)."""
    from pytest_procsafe import _holders  # only for an entry that would be ours

    found = _holders.objects()
    return set(found.semlocks) | set(found.shared_memory)


# --- who maps an entry ------------------------------------------------------------------


def mappers(entries: Collection[str], pids: Iterable[int]) -> dict[str, set[int]]:
    """Which of *pids* map each of *entries* (Linux; unreadable processes are skipped)."""
    found: dict[str, set[int]] = {entry: set() for entry in entries}
    needles = {f"{SHM_DIR}/{entry}\n".encode(): entry for entry in entries}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as file:
                data = file.read()
        except OSError:
            continue
        for needle, entry in needles.items():
            if needle in data:
                found[entry].add(pid)
    return found


# tmpfs stamps the directory from a coarse clock; compare with the same one.
_CLOCK: Final = getattr(time, "CLOCK_REALTIME_COARSE", time.CLOCK_REALTIME)


# --- the watch ----------------------------------------------------------------------------


@final
class SegmentWatch:
    """Segments and semaphores by owner; see the module docstring. Owners are any hashable
    objects (the leak checks' `Owner`)."""

    def __init__(self, root: int | None = None) -> None:
        self.root: Final = os.getpid() if root is None else root
        self.listing: Final = LINUX and os.path.isdir(SHM_DIR)
        self._fd = os.open(SHM_DIR, os.O_RDONLY | os.O_DIRECTORY) if self.listing else -1
        self._ctime = -1
        self._racy = True
        self.seen: dict[str, tuple[object, str]] = {}
        self._ledger: Ledger[object, str] = Ledger()
        self._deferred: list[tuple[Segment, str]] = []  # (segment, owner) for session end
        self.registrations = Registrations()
        for entry in self._entries():  # there before this session: never ours
            self.seen[entry] = (None, "before")

    def close(self) -> None:
        self.registrations.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _entries(self) -> Collection[str]:
        if self.listing:
            return os.listdir(SHM_DIR)
        return [entry_of(name, kind) for name, kind in self.registrations.names().items()]

    # --- observing --------------------------------------------------------------------

    def changed(self) -> bool:
        """Whether the entries may have changed since the last `observe`: False costs one
        ``fstat`` (an entry made or removed moves the directory's ctime)."""
        if not self.listing:
            return True
        return os.fstat(self._fd).st_ctime_ns != self._ctime or self._racy

    def observe(self, owner: object, phase: str) -> None:
        """Give new entries to *owner*; forget those that are gone."""
        if self.listing:
            ctime = os.fstat(self._fd).st_ctime_ns
            if ctime == self._ctime and not self._racy:  # nothing changed
                return
            self._ctime = ctime
            self._racy = time.clock_gettime_ns(_CLOCK) - ctime < RACY
        entries = set(self._entries())
        seen = self.seen
        for entry in entries.difference(seen):
            seen[entry] = (owner, phase)
            self._ledger.add(owner, entry)
        if len(seen) > len(entries):
            for entry in [entry for entry in seen if entry not in entries]:
                self._forget(entry)

    def _forget(self, entry: str) -> None:
        owner, _ = self.seen.pop(entry, (None, ""))
        self._ledger.discard(owner, entry)

    def has_candidates(self, owner: object) -> bool:
        return self._ledger.has(owner)

    def owners(self) -> list[object]:
        return self._ledger.owners()

    # --- attributing ------------------------------------------------------------------

    def take(
        self,
        owner: object,
        tree: Callable[[], Collection[int]],
        *,
        later: object,
        spare: Callable[[], Collection[int]] = frozenset,
    ) -> list[Segment]:
        """*owner*'s entries that are still there and attributable to it (checked once).

        *tree* gives this process's descendants, asked only when needed. An entry still in
        use (a live object here stands for it, or a live descendant among *spare()* maps
        it: one that is not being reported with this owner) is not a leak now: it moves
        to *later* (the session), which looks again at its end.
        """
        entries = self._ledger.take(owner)
        if not entries:
            return []
        own = _owned.segments()
        registered = self.registrations.names()
        uid = os.geteuid() if hasattr(os, "geteuid") else -1
        candidates: list[Segment] = []
        for entry in entries:
            kind, posix = parse(entry)
            if posix in own:
                continue
            if self.listing:
                try:
                    if os.stat(os.path.join(SHM_DIR, entry)).st_uid != uid:
                        continue
                except OSError:
                    self._forget(entry)
                    continue
            candidates.append(Segment(entry, kind, posix, self.seen.get(entry, (None, "?"))[1]))
        if not candidates:
            return []
        spared = set(spare()) if self.listing else set()
        mapped = mappers([s.entry for s in candidates], spared | {self.root}) if spared else {}
        mine: list[Segment] = []
        undecided: list[Segment] = []
        for segment in candidates:
            if mapped.get(segment.entry, set()) & spared:
                self.give(later, segment)
                continue
            registered_here = segment.posix in registered or not self.listing
            (mine if registered_here else undecided).append(segment)
        if undecided:  # no registration: only a mapping in this process tree tells
            held = mappers([s.entry for s in undecided], {self.root, *tree()})
            mine.extend(s for s in undecided if held[s.entry])
        if not mine:  # another run's entries, say: no walk of this process's objects
            return []
        used = in_use()
        for segment in [s for s in mine if s.posix in used]:
            self.give(later, segment)
            mine.remove(segment)
        return sorted(self._still_there(mine))

    def _still_there(self, segments: list[Segment]) -> list[Segment]:
        """Those of *segments* still in ``/dev/shm`` after up to `GRACE` (the wait ends
        once none is left); elsewhere nothing tells: all of them, at once."""
        if not self.listing:
            return segments
        for _ in _seconds.backoff(GRACE, first=0.002):
            left = []
            for segment in segments:
                if os.path.lexists(os.path.join(SHM_DIR, segment.entry)):
                    left.append(segment)
                else:
                    self._forget(segment.entry)
            segments = left
            if not segments:
                break
        return segments

    def give(self, owner: object, segment: Segment) -> None:
        """Hand *segment* to *owner*: it is checked again when *owner* is."""
        self.seen[segment.entry] = (owner, segment.phase)
        self._ledger.add(owner, segment.entry)

    # --- cleaning up ------------------------------------------------------------------

    def settle(self, found: list[Segment], owner: str, cleanup: str) -> list[dict[str, object]]:
        """Act on *owner*'s leaks as *cleanup* says; their report records."""
        done = self.unlink(found) if cleanup == "kill" else {}
        if cleanup == "session":
            self._deferred.extend((segment, owner) for segment in found)
        return [
            as_record(
                s,
                owner,
                "kept" if cleanup == "keep" or not done.get(s.entry, True) else "unlinked",
            )
            for s in found
        ]

    def hand_over(self) -> list[str]:
        """The entries left for the session's end, taken away (a forked test process
        hands them to its parent, which unlinks them then)."""
        deferred, self._deferred = self._deferred, []
        return [segment.entry for segment, _ in deferred]

    def take_over(self, entries: Iterable[str]) -> None:
        """Unlink *entries* at the session's end, as if deferred here; never report them."""
        for entry in entries:
            kind, posix = parse(entry)
            self.seen[entry] = (None, "forked")
            self._deferred.append((Segment(entry, kind, posix, "forked"), "forked"))

    def unlink_deferred(self) -> list[tuple[str, str]]:
        """Unlink what `settle` left for the session's end; (owner, name) of failures."""
        deferred, self._deferred = self._deferred, []
        done = self.unlink(segment for segment, _ in deferred)
        return [(owner, s.name) for s, owner in deferred if not done.get(s.entry)]

    def unlink(self, segments: Iterable[Segment]) -> dict[str, bool]:
        """Unlink each segment and forget it in the resource tracker; entry -> done."""
        done = {}
        for segment in segments:
            done[segment.entry] = unlink(segment)
            self.registrations.forget(segment.posix)
            self._forget(segment.entry)
        return done


def unlink(segment: Segment) -> bool:
    """Remove *segment*'s name; False if that failed (already gone counts as done)."""
    try:
        if LINUX:
            os.unlink(os.path.join(SHM_DIR, segment.entry))
        elif segment.kind == "semaphore":
            importlib.import_module("_multiprocessing").sem_unlink(segment.posix)
        else:
            importlib.import_module("_posixshmem").shm_unlink(segment.posix)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    forget(segment.posix, segment.kind)
    return True
