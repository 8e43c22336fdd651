"""Targets for the segment tests' children (a small module: spawn children skip pytest)."""

from __future__ import annotations

import mmap
import multiprocessing
import os
from multiprocessing.connection import Connection


def leak_a_semaphore(conn: Connection) -> None:
    """Make a named semaphore and exit without the finalizer that would unlink it."""
    lock = multiprocessing.get_context("spawn").Lock()
    conn.send(lock._semlock.name)  # type: ignore[attr-defined]
    conn.close()
    os._exit(0)


def tidy_semaphore(conn: Connection) -> None:
    """Make a named semaphore and exit normally: its finalizer unlinks it."""
    lock = multiprocessing.get_context("spawn").Lock()
    conn.send(lock._semlock.name)  # type: ignore[attr-defined]


def hold_mapped(path: str, conn: Connection) -> None:
    """Map *path* and keep it mapped until told to stop."""
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0)
    conn.send("mapped")
    conn.recv()
    mapping.close()
