"""Hooks other plugins and conftests implement (registered in ``pytest_addhooks``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_procsafe._leaked import LeakedProcess


@pytest.hookspec(firstresult=True)
def pytest_procsafe_ignore(process: LeakedProcess) -> bool | None:
    """Return True to exempt *process* from the leak checks (it is neither reported nor
    cleaned up); None to let the next implementation, then procsafe, decide.

    :param process: the candidate, with its ``pid``, ``ppid``, ``cmdline``, ``kind``,
        ``owner`` (a test node id, ``fixture <name>`` or ``session``), ``phase`` and the
        ``action`` the cleanup policy will take.
    """


@pytest.hookspec
def pytest_procsafe_leaks(owner: str, leaks: list[LeakedProcess]) -> None:
    """Called with each owner's leaks once they are found, before they are cleaned up
    (for logging and custom reports).

    :param owner: a test node id, ``fixture <name>`` or ``session``.
    :param leaks: what that owner left behind.
    """
