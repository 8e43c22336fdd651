"""Start methods: which exist on this platform, selection, parametrization ids.

The global start method is never read or set here: ``get_start_method(allow_none=True)``
is ``None`` when unset, which does *not* mean fork, and Python 3.14 changed the Linux
default to forkserver. Every fixture uses an explicit context instead.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any
from typing import Final

#: Every start method procsafe knows, in the order tests are parametrized.
KNOWN: Final = ("fork", "spawn", "forkserver")

_SEPARATORS: Final = re.compile(r"[\s,]+")


def available() -> tuple[str, ...]:
    """The start methods this platform has, in procsafe's canonical order.

    ``multiprocessing`` says, once it is imported. Before, its rule is applied here, so
    that a run that starts no process does not import it (and ``pickle``) for the header:
    spawn alone on Windows; fork and spawn elsewhere, and forkserver where a Unix socket
    can pass file descriptors (``reduction.HAVE_SEND_HANDLE``). The unit tests hold the
    two to the same answer.
    """
    module = sys.modules.get("multiprocessing")
    if module is not None:
        have = set(module.get_all_start_methods())
    elif sys.platform == "win32":
        have = {"spawn"}
    else:
        import socket

        have = {"fork", "spawn"}
        if all(hasattr(socket, name) for name in ("CMSG_LEN", "SCM_RIGHTS")) and hasattr(
            socket.socket, "sendmsg"
        ):
            have.add("forkserver")
    return tuple(method for method in KNOWN if method in have)


class MethodError(ValueError):
    """A start-method selection that cannot be honoured; the message says why."""


def parse(value: str | Iterable[str], *, platform: Iterable[str] | None = None) -> tuple[str, ...]:
    """Turn a selection (``"fork,spawn"``, ``"all"``, a list of names) into a tuple of methods.

    The result keeps procsafe's canonical order (fork, spawn, forkserver) whatever order
    the user wrote, so test ids are stable. Raises `MethodError` naming the bad value and
    the allowed values.
    """
    here = tuple(platform) if platform is not None else available()
    names = _split(value)
    allowed = ", ".join((*KNOWN, "all"))
    if not names:
        raise MethodError(f"no start method given; allowed: {allowed}")
    if "all" in names:
        if len(names) > 1:
            raise MethodError(f"'all' cannot be combined with other start methods: {names!r}")
        return here
    seen: set[str] = set()
    for name in names:
        if name not in KNOWN:
            raise MethodError(f"unknown start method {name!r}; allowed: {allowed}")
        if name in seen:
            raise MethodError(f"start method {name!r} is given twice")
        if name not in here:
            raise MethodError(
                f"start method {name!r} is not available on this platform; "
                f"available here: {', '.join(here)}"
            )
        seen.add(name)
    return tuple(method for method in KNOWN if method in seen)


def _split(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [part for part in _SEPARATORS.split(value.strip()) if part]
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise MethodError(f"start methods must be strings, got {item!r}")
        names.extend(_split(item))
    return names


def intersect(selected: tuple[str, ...], wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The methods in both, in canonical order (a marker narrows the session's selection)."""
    return tuple(method for method in selected if method in wanted)


def who_chooses(metafunc: Any, *, ours: str) -> str | None:
    """Who else picks a test's ``mp_start_method``, or None when procsafe does.

    Not procsafe when the test parametrizes it itself, or a conftest (or another plugin)
    overrides the fixture, like anyio's ``anyio_backend``. pytest has no public API to ask
    which fixture definition applies to a test, so this reads ``Metafunc._arg2fixturedefs``
    (as other fixture-parametrizing plugins do). *ours* is the module of procsafe's fixture.
    """
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(names, str):
            names = [name.strip() for name in names.split(",")]
        if "mp_start_method" in names:
            return "the test's own parametrize"
    defs = getattr(metafunc, "_arg2fixturedefs", {}).get("mp_start_method")
    if not defs:
        return "pytest itself (no fixture defines it)"
    fixturedef = defs[-1]  # the closest definition wins
    func = getattr(fixturedef, "func", None)
    if getattr(func, "__module__", None) == ours:
        return None
    code = getattr(func, "__code__", None)
    if code is None:
        return "another plugin's mp_start_method fixture"
    root = getattr(getattr(metafunc, "config", None), "rootpath", None)
    path = code.co_filename
    if root is not None and os.path.commonpath([str(root), path]) == str(root):
        path = os.path.relpath(path, root)
    return f"the mp_start_method fixture at {path}:{code.co_firstlineno}"
