"""The ``procsafe`` marker: per-test overrides, and a bad marker as its test's own error.

``@pytest.mark.procsafe(leaks=..., start_methods=..., timeout=..., kill_grace=...,
ignore=...)`` derives a test's settings from the session's (the closest marker wins;
``ignore`` patterns add up). A bad marker (an unknown keyword, a positional argument, a
value of the wrong type or out of range) is that test's error, once, at its setup: it
names the test, the marker's line, the keyword or value and what is allowed, and the rest
of the module runs. Values have types: seconds are numbers, not strings.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterable
from typing import Any
from typing import Final
from typing import final

import pytest

from pytest_procsafe import _methods
from pytest_procsafe._config import LEAK_MODES
from pytest_procsafe._config import SettingError
from pytest_procsafe._config import Settings
from pytest_procsafe._config import parse_choice
from pytest_procsafe._config import parse_methods
from pytest_procsafe._config import parse_patterns
from pytest_procsafe._config import parse_seconds
from pytest_procsafe._config import session_settings

#: Keywords ``@pytest.mark.procsafe(...)`` accepts.
MARKER_KEYWORDS: Final = ("leaks", "start_methods", "timeout", "kill_grace", "ignore")
#: Options that exist for the whole session only.
_SESSION_ONLY: Final = ("cleanup", "report")

_ITEM_KEY: Final = pytest.StashKey[Settings]()
#: A test's bad-marker error text, found at collection and raised at its setup.
ERROR_KEY: Final = pytest.StashKey[str]()
_MARKED_KEY: Final = pytest.StashKey["Marked"]()


def marker_overrides(
    markers: Iterable[pytest.Mark], base: Settings
) -> tuple[Settings, tuple[str, ...] | None]:
    """Apply ``procsafe`` markers (closest first, as ``iter_markers`` yields them).

    Returns the test's settings and the marker's start methods (None when no marker set
    them; they still have to be intersected with the session's selection). Raises
    `SettingError` naming the keyword on bad input.
    """
    merged: dict[str, object] = {}
    ignore: list[re.Pattern[str]] = []
    for mark in markers:
        if mark.args:
            raise SettingError(
                f"@pytest.mark.procsafe takes keyword arguments only "
                f"({', '.join(MARKER_KEYWORDS)}), got positional {mark.args!r}"
            )
        for key, value in mark.kwargs.items():
            if key not in MARKER_KEYWORDS:
                hint = ""
                if key in _SESSION_ONLY:
                    flag = "--procsafe-" + key.replace("_", "-")
                    hint = f" ({key} is set for the whole session: {flag} or procsafe_{key})"
                raise SettingError(
                    f"@pytest.mark.procsafe: unknown keyword {key!r}; "
                    f"allowed: {', '.join(MARKER_KEYWORDS)}{hint}"
                )
            if key == "ignore":
                ignore.extend(parse_patterns("@pytest.mark.procsafe(ignore=...)", value))
            else:
                merged.setdefault(key, value)  # the closest marker wins
    changes: dict[str, object] = {}
    where = "@pytest.mark.procsafe({}=...)"
    if "leaks" in merged:
        changes["leaks"] = parse_choice(where.format("leaks"), merged["leaks"], LEAK_MODES)
    for key, allow_zero in (("timeout", False), ("kill_grace", True)):
        if key in merged:
            value = merged[key]
            if isinstance(value, str):  # a number of seconds is a number in Python code
                bound = ">= 0" if allow_zero else "> 0"
                raise SettingError(
                    f"{where.format(key)}: invalid value {value!r}; expected a number of "
                    f"seconds {bound} (a number, not a string)"
                )
            changes[key] = parse_seconds(where.format(key), value, allow_zero=allow_zero)
    if ignore:
        changes["ignore"] = base.ignore + tuple(ignore)
    methods = None
    if "start_methods" in merged:
        # Validate the names only: a marker may name a method this platform lacks (a
        # fork-only test on Windows); the intersection then skips it.
        methods = parse_methods(
            where.format("start_methods"), merged["start_methods"], platform=_methods.KNOWN
        )
    settings = base.replace(**changes) if changes else base
    return settings, methods


def item_settings(item: pytest.Item) -> Settings:
    """The settings for one test: the session's, with its markers applied (cached).

    With a bad marker they are the session's: the test errors at its setup (`check`).
    """
    try:
        return item.stash[_ITEM_KEY]
    except KeyError:
        pass
    base = session_settings(item.config)
    try:
        settings, _ = marker_overrides(item.iter_markers("procsafe"), base)
    except SettingError as exc:
        item.stash[ERROR_KEY] = error_text(item, exc)
        settings = base
    item.stash[_ITEM_KEY] = settings
    return settings


@final
class Marked:
    """The collected tests that have a ``procsafe`` marker of their own or of a node above
    them (where ``iter_markers`` looks): the only ones whose setup `check` looks at."""

    def __init__(self) -> None:
        self.items: set[pytest.Item] = set()
        #: Whether a collection was noted: a test run without one is looked at itself.
        self.noted = False

    def note(self, items: Iterable[pytest.Item]) -> None:
        """After collection: each node above the tests is looked at once."""
        found = self.items
        found.clear()
        above: dict[object, bool] = {}
        for item in items:
            parent = item.parent
            parent_marked = above.get(parent)
            if parent_marked is None:
                chain = parent.listchain() if parent is not None else []
                parent_marked = above[parent] = any(_has_own(node) for node in chain)
            if parent_marked or _has_own(item):
                found.add(item)
        self.noted = True


def marked(config: pytest.Config) -> Marked:
    """This session's `Marked` (``pytest_collection_modifyitems`` notes it)."""
    return config.stash.setdefault(_MARKED_KEY, Marked())


def _has_own(node: Any) -> bool:  # a pytest Node
    return any(mark.name == "procsafe" for mark in node.own_markers)


def check(item: pytest.Item, marked: Marked) -> None:
    """Fail the test's setup with its bad marker's error, if it has one."""
    if marked.noted:
        if item not in marked.items:
            return
    elif "procsafe" not in item.keywords:  # a test no collection was noted for
        return
    item_settings(item)
    error = item.stash.get(ERROR_KEY, None)
    if error is not None:
        pytest.fail(error, pytrace=False)


def error_text(item: pytest.Item, exc: SettingError) -> str:
    """``procsafe: bad marker on <test> (<file>:<line>): <what is wrong and allowed>``."""
    line = marker_line(item)
    where = f" ({line})" if line else ""
    return f"procsafe: bad marker on {item.nodeid}{where}: {exc}"


def marker_line(item: pytest.Item) -> str | None:
    """``path:line`` of the ``procsafe`` marker closest to *item*: its decorator, else
    the class's or the module's ``pytestmark``."""
    function = getattr(item, "function", None)
    candidates = [function, getattr(item, "cls", None), getattr(item, "module", None)]
    for obj in candidates:
        if obj is None:
            continue
        try:
            lines, first = inspect.getsourcelines(obj)
            path = inspect.getsourcefile(obj)
        except (OSError, TypeError):
            continue
        if path is None:
            continue
        for offset, text in enumerate(lines):
            stripped = text.strip()
            if obj is function and stripped.startswith(("def ", "async def ")):
                break  # past the decorators
            if "procsafe" in stripped and (
                "mark.procsafe" in stripped or "pytestmark" in stripped
            ):
                shown = (
                    os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
                )
                return f"{shown}:{max(first, 1) + offset}"
    return None
