"""The one rule for durations (options, marker keywords, API arguments) and how they read.

A duration is a finite number of seconds, > 0 or >= 0 depending on what it bounds; a bool
is not a number here, and neither are NaN and infinity (a wait that never ends is what
procsafe exists to prevent: ``timeout=None`` is the spelling for "forever" where a call
allows it). Options and marker keywords may also be strings ("12.5").

Imported inside workers (through shared state): no pytest, no plugin.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator


class SecondsError(ValueError):
    """A bad duration; `str` says what was wrong and what is allowed."""

    def __init__(self, what: str, value: object, expected: str) -> None:
        super().__init__(f"{what} must be {expected}, got {value!r}")
        self.what = what
        self.value = value
        #: "a number of seconds > 0", "a finite number of seconds >= 0"...
        self.expected = expected


def expected(value: object, *, allow_zero: bool) -> str:
    """What a duration must be, worded for *value* (infinity is told it must be finite)."""
    bound = ">= 0" if allow_zero else "> 0"
    infinite = isinstance(value, (int, float, str)) and _is_infinite(value)
    return f"a {'finite ' if infinite else ''}number of seconds {bound}"


def _is_infinite(value: int | float | str) -> bool:
    try:
        return math.isinf(float(value))
    except (ValueError, OverflowError):
        return False


def check(what: str, value: object, *, allow_zero: bool = True, text: bool = False) -> float:
    """*value* as seconds, or a `SecondsError` naming *what* and what is allowed.

    With *text*, a string holding a number is accepted too (options, ini values).
    """
    number: float | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float
            number = None
    elif text and isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if (
        number is None
        or not math.isfinite(number)
        or number < 0
        or (number == 0 and not allow_zero)
    ):
        raise SecondsError(what, value, expected(value, allow_zero=allow_zero))
    return number


def fmt(value: float) -> str:
    """``30s``, ``0.25s``, ``12.5s``: how durations read in every message."""
    return f"{value:g}s"


def backoff(timeout: float, *, first: float = 0.001, most: float = 0.05) -> Iterator[None]:
    """The looks of a wait of at most *timeout* seconds: one at once, then one after each
    sleep, the sleeps doubling from *first* up to *most*; the last sleep ends when
    *timeout* has passed, and one last look follows it. Stop iterating when the wait is
    over."""
    deadline = time.monotonic() + timeout
    pause = first
    yield
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(pause, left))
        pause = min(pause * 2, most)
        yield
