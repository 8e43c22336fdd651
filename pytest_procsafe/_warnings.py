"""`ProcessLeakWarning`, and where a leak warning points.

Findings in warn mode are ordinary pytest warnings, so ``-W error::...`` and
``filterwarnings`` escalate or silence them with no extra machinery.
"""

from __future__ import annotations

import warnings

import pytest


class ProcessLeakWarning(pytest.PytestWarning):
    """A test, fixture or the session left processes behind (``--procsafe-leaks=warn``)."""

    __module__ = "pytest_procsafe"


def warn(message: str, where: tuple[str, int] | None, *, escalate: bool) -> bool:
    """Issue the warning at *where*; False when ``-W error`` turned it into an error
    outside a test (the run then fails). Inside a test (*escalate*) the error propagates
    and errors the test's teardown.

    Shown at the test's, the fixture's, the holder's or the creating line; never at
    procsafe's own (a session-wide leak that nothing locates reads "session").
    """
    filename, lineno = where if where is not None else ("session", 0)
    try:
        warnings.warn_explicit(ProcessLeakWarning(message), ProcessLeakWarning, filename, lineno)
    except ProcessLeakWarning:
        if escalate:
            raise
        return False
    return True
