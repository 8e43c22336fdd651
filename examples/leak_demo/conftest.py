from __future__ import annotations

import logging

import pytest

from pytest_procsafe import LeakedProcess

log = logging.getLogger("leaks")


# start: hook
@pytest.hookimpl(optionalhook=True)  # optional: the suite still runs with -p no:procsafe
def pytest_procsafe_leaks(owner: str, leaks: list[LeakedProcess]) -> None:
    """Log each owner's leaks (for example to ship them to a dashboard)."""
    for leak in leaks:
        log.warning("%s left a %s process: %s", owner, leak.kind, " ".join(leak.cmdline))


# end: hook
