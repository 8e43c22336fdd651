"""Segments and semaphores by owner: listing, attribution and unlinking, with real
children under every start method and real ``/dev/shm`` entries."""

from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import pytest
import segment_targets

from pytest_procsafe import _methods
from pytest_procsafe import _owned
from pytest_procsafe import _registrations
from pytest_procsafe import _segments
from pytest_procsafe._segments import SegmentWatch
from pytest_procsafe._shared import SharedMemoryResource

pytestmark = pytest.mark.skipif(not _segments.LINUX, reason="/dev/shm: Linux")

METHODS = _methods.available()
WAIT = 60.0


@pytest.fixture
def watch() -> Iterator[SegmentWatch]:
    watch = SegmentWatch()
    yield watch
    watch.close()


@pytest.fixture
def plain_entry() -> Iterator[str]:
    """A file in /dev/shm that nothing registered (as ``shm_open`` from C would leave)."""
    name = f"procsafe-test-{uuid.uuid4().hex[:8]}"
    path = os.path.join(_segments.SHM_DIR, name)
    yield name
    if os.path.exists(path):
        os.unlink(path)


_multiprocessing: Any = importlib.import_module("_multiprocessing")
LATER = object()  # the session: where what is still in use goes


def tree() -> list[int]:
    return [p.pid for p in multiprocessing.active_children() if p.pid is not None]


def test_names_map_both_ways() -> None:
    assert _segments.parse("sem.mp-abc") == ("semaphore", "/mp-abc")
    assert _segments.parse("psm_abc") == ("shared_memory", "/psm_abc")
    assert _segments.entry_of("/mp-abc", "semaphore") == "sem.mp-abc"
    assert _segments.entry_of("/psm_abc", "shared_memory") == "psm_abc"
    segment = _segments.Segment("sem.mp-abc", "semaphore", "/mp-abc", "call")
    assert segment.name == "/mp-abc"
    record = _segments.as_record(segment, "t.py::test", "unlinked")
    assert record["pid"] is None
    assert record["name"] == "/mp-abc"


def test_a_block_made_and_left_is_its_owners_and_unlinked() -> None:
    before = SharedMemory(create=True, size=8)  # existed before the watch: never a leak
    watch = SegmentWatch()
    owner = object()
    try:
        watch.observe(owner, "setup")
        block = SharedMemory(create=True, size=8)
        block.close()
        watch.observe(owner, "call")
        assert watch.has_candidates(owner)
        found = watch.take(owner, tree, later=LATER)
        assert [(s.name, s.kind, s.phase) for s in found] == [
            (block.name, "shared_memory", "call")
        ]
        assert watch.unlink(found) == {block.name: True}
        assert not os.path.exists(os.path.join(_segments.SHM_DIR, block.name))
        assert block._name not in _registrations.REGISTERED  # type: ignore[attr-defined]
        assert not watch.has_candidates(owner)
    finally:
        watch.close()
        before.close()
        before.unlink()


def test_a_block_unlinked_in_time_and_channels_blocks_are_not_leaks(
    watch: SegmentWatch,
) -> None:
    owner = object()
    block = SharedMemory(create=True, size=8)
    owned = SharedMemoryResource(SharedMemory(create=True, size=8), "shared memory #1")
    try:
        watch.observe(owner, "call")
        block.close()
        block.unlink()
        assert watch.take(owner, tree, later=LATER) == []  # gone: nothing to say
    finally:
        assert owned.close() == []
    assert _owned.segments() == set()


def test_a_block_its_tracker_unlinks_a_moment_later_is_not_a_leak(
    watch: SegmentWatch,
) -> None:
    # A resource tracker unlinks a name shortly after the last process using it let go
    # (loky's): an entry that goes within the grace was not left behind.
    owner = object()
    watch.observe(owner, "setup")
    block = SharedMemory(create=True, size=8)
    block.close()
    watch.observe(owner, "call")
    unlinker = threading.Timer(0.1, block.unlink)
    unlinker.start()
    try:
        assert watch.take(owner, tree, later=LATER) == []
    finally:
        unlinker.join(WAIT)
    assert not watch.has_candidates(owner)


def test_a_semaphore_alive_here_is_not_a_leak_and_moves_on(watch: SegmentWatch) -> None:
    owner = object()
    lock = multiprocessing.get_context("spawn").Lock()
    watch.observe(owner, "call")
    name = lock._semlock.name  # type: ignore[attr-defined]
    assert name in _segments.in_use()
    assert watch.take(owner, tree, later=LATER) == []
    assert watch.has_candidates(LATER)  # looked at again at the session's end
    del lock  # its finalizer unlinks it
    assert name not in _segments.in_use()
    assert watch.take(LATER, tree, later=LATER) == []


class SemLock:
    """Another multiprocessing implementation's lock (loky, multiprocess, billiard keep
    their own SemLock class around the same C semaphore)."""

    def __init__(self) -> None:
        name = f"/mp-procsafe-{os.getpid()}-{id(self)}"
        self._semlock = _multiprocessing.SemLock(1, 1, 1, name, False)
        self.name = name

    def close(self) -> None:
        _multiprocessing.sem_unlink(self.name)


def test_a_relatives_lock_in_use_is_never_unlinked(watch: SegmentWatch) -> None:
    owner = object()
    lock = SemLock()
    try:
        watch.observe(owner, "call")
        assert lock.name in _segments.in_use()
        assert watch.take(owner, tree, later=LATER) == []
        assert os.path.exists(os.path.join(_segments.SHM_DIR, "sem." + lock.name[1:]))
    finally:
        lock.close()


def test_an_entry_a_spared_process_maps_moves_on(watch: SegmentWatch, plain_entry: str) -> None:
    owner = object()
    path = os.path.join(_segments.SHM_DIR, plain_entry)
    with open(path, "wb") as file:
        file.write(b"\0" * 4096)
    watch.observe(owner, "call")
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=segment_targets.hold_mapped, args=(path, there))
    child.start()
    try:
        assert here.poll(WAIT)
        assert here.recv() == "mapped"
        pid = child.pid
        assert pid is not None
        # A held pool's worker maps it: not this test's, whatever registered it.
        assert watch.take(owner, tree, later=LATER, spare=lambda: {pid}) == []
        assert watch.has_candidates(LATER)
    finally:
        here.send("stop")
        child.join(WAIT)
        os.unlink(path)


@pytest.mark.parametrize("method", METHODS)
def test_a_semaphore_a_child_leaked_is_found_under_every_method(
    watch: SegmentWatch, method: str
) -> None:
    ctx: Any = multiprocessing.get_context(method)
    owner = object()
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=segment_targets.leak_a_semaphore, args=(writer,))
    child.start()
    writer.close()
    assert reader.poll(WAIT)
    name = reader.recv()
    child.join(WAIT)
    watch.observe(owner, "call")
    found = watch.take(owner, tree, later=LATER)
    assert [(s.name, s.kind) for s in found] == [(name, "semaphore")]
    assert watch.unlink(found) == {"sem." + name[1:]: True}
    assert watch.registrations.names().get(name) is None


@pytest.mark.parametrize("method", METHODS)
def test_a_child_that_cleans_up_leaves_nothing_registered(
    watch: SegmentWatch, method: str
) -> None:
    ctx: Any = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=segment_targets.tidy_semaphore, args=(writer,))
    child.start()
    writer.close()
    assert reader.poll(WAIT)
    name = reader.recv()
    child.join(WAIT)
    assert child.exitcode == 0
    assert name not in watch.registrations.names()
    assert not os.path.exists(os.path.join(_segments.SHM_DIR, "sem." + name[1:]))


def test_an_unregistered_entry_counts_only_when_this_tree_maps_it(
    watch: SegmentWatch, plain_entry: str
) -> None:
    owner = object()
    path = os.path.join(_segments.SHM_DIR, plain_entry)
    with open(path, "wb") as file:
        file.write(b"\0" * 4096)
    watch.observe(owner, "call")
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=segment_targets.hold_mapped, args=(path, there))
    child.start()
    try:
        assert here.poll(WAIT)
        assert here.recv() == "mapped"
        found = watch.take(owner, tree, later=LATER)
        assert [s.entry for s in found] == [plain_entry]
    finally:
        here.send("stop")
        child.join(WAIT)
    # Seen again under a new owner, mapped by nobody: no evidence it is ours.
    os.unlink(path)
    with open(path, "wb") as file:
        file.write(b"\0" * 16)
    later = object()
    watch.observe(later, "call")
    assert watch.take(later, tree, later=LATER) == []


def test_an_entry_nobody_here_made_or_maps_costs_no_walk_of_objects(
    watch: SegmentWatch, plain_entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run's entries appear in ``/dev/shm`` during our tests all the time (xdist's
    other workers, parallel jobs): telling them apart must not walk this process's
    objects, which only matters for an entry that would be ours."""
    walks: list[int] = []

    def in_use() -> set[str]:
        walks.append(1)
        return set()

    monkeypatch.setattr(_segments, "in_use", in_use)
    owner = object()
    path = os.path.join(_segments.SHM_DIR, plain_entry)
    with open(path, "wb") as file:  # made here, but neither registered nor mapped
        file.write(b"\0" * 16)
    watch.observe(owner, "call")
    assert watch.take(owner, tree, later=LATER) == []
    assert walks == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's entry takes root")
def test_another_users_entry_is_never_ours(watch: SegmentWatch, plain_entry: str) -> None:
    owner = object()
    path = os.path.join(_segments.SHM_DIR, plain_entry)
    with open(path, "wb") as file:
        file.write(b"\0" * 4096)
    os.chown(path, 65534, 65534)
    watch.observe(owner, "call")
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=segment_targets.hold_mapped, args=(path, there))
    child.start()
    try:
        assert here.poll(WAIT)
        assert here.recv() == "mapped"
        assert watch.take(owner, tree, later=LATER) == []
    finally:
        here.send("stop")
        child.join(WAIT)


def test_an_unchanged_directory_is_not_listed(
    watch: SegmentWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = object()
    # Read first: any change from here on (another test process's segment) skips below.
    ctime = os.stat(_segments.SHM_DIR).st_ctime_ns
    time.sleep(_segments.RACY / 1e9 * 2)  # past the racy window of the last change
    watch.observe(owner, "setup")
    listings: list[int] = []
    entries = watch._entries

    def counting() -> object:
        listings.append(1)
        return entries()

    monkeypatch.setattr(watch, "_entries", counting)
    for _ in range(100):
        watch.observe(owner, "call")
    if os.stat(_segments.SHM_DIR).st_ctime_ns != ctime:
        pytest.skip("another process changed /dev/shm meanwhile")
    assert len(listings) <= 1  # at most the look after a change inside the racy window
    block = SharedMemory(create=True, size=8)  # a change is always seen
    try:
        watch.observe(owner, "call")
        assert len(listings) >= 1
        assert block.name in watch.seen
    finally:
        block.close()
        block.unlink()


def test_the_tracker_forgets_what_was_unlinked(watch: SegmentWatch) -> None:
    """After an unlink, multiprocessing's tracker holds nothing: its exit would warn."""
    owner = object()
    watch.observe(owner, "setup")
    block = SharedMemory(create=True, size=8)
    block.close()
    watch.observe(owner, "call")
    posix = block._name  # type: ignore[attr-defined]
    assert posix in watch.registrations.names()
    watch.unlink(watch.take(owner, tree, later=LATER))
    assert posix not in watch.registrations.names()
    # A second forget of a name the tracker no longer has is harmless too.
    _segments.forget(posix, "shared_memory")
