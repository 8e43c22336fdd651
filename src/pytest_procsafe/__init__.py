"""pytest-procsafe: test code that uses processes without hangs, leaks or lost failures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_procsafe._channels import Channels
from pytest_procsafe._timeouts import ChannelTimeout
from pytest_procsafe._version import __version__
from pytest_procsafe._workers import Worker
from pytest_procsafe._workers import WorkerCrashed
from pytest_procsafe._workers import WorkerError
from pytest_procsafe._workers import WorkerGroup
from pytest_procsafe._workers import WorkerTimeout

if TYPE_CHECKING:
    from pytest_procsafe._leaks import LeakedProcess
    from pytest_procsafe._leaks import ProcessLeakWarning

__all__ = [
    "ChannelTimeout",
    "Channels",
    "LeakedProcess",
    "ProcessLeakWarning",
    "Worker",
    "WorkerCrashed",
    "WorkerError",
    "WorkerGroup",
    "WorkerTimeout",
    "__version__",
]


def __getattr__(name: str) -> object:
    # The leak-check names live with pytest (ProcessLeakWarning is a PytestWarning);
    # worker processes import this package and must not pay for importing pytest.
    if name in ("LeakedProcess", "ProcessLeakWarning"):
        from pytest_procsafe import _leaks

        return getattr(_leaks, name)
    raise AttributeError(f"module 'pytest_procsafe' has no attribute {name!r}")
