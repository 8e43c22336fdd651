from __future__ import annotations

from collections.abc import Iterator

import cache_server
import pytest

from pytest_procsafe import LeakedProcess


# start: hook
@pytest.hookimpl(optionalhook=True)  # optional: the suite still runs with -p no:procsafe
def pytest_procsafe_ignore(process: LeakedProcess) -> bool | None:
    """The shared cache server is long-lived on purpose: never a leak."""
    if cache_server.TAG in process.cmdline:
        return True
    return None  # let procsafe decide


# end: hook


# start: fixture
@pytest.fixture(scope="session", autouse=True)
def stop_helpers() -> Iterator[None]:
    """Exempt from the leak checks means procsafe does not stop them: we do."""
    yield
    cache_server.stop_all()


# end: fixture
