"""pytest-procsafe: test code that uses processes without hangs, leaks or lost failures."""

from __future__ import annotations

from pytest_procsafe._channels import Channels
from pytest_procsafe._timeouts import ChannelTimeout
from pytest_procsafe._version import __version__
from pytest_procsafe._workers import Worker
from pytest_procsafe._workers import WorkerCrashed
from pytest_procsafe._workers import WorkerError
from pytest_procsafe._workers import WorkerGroup
from pytest_procsafe._workers import WorkerTimeout

__all__ = [
    "ChannelTimeout",
    "Channels",
    "Worker",
    "WorkerCrashed",
    "WorkerError",
    "WorkerGroup",
    "WorkerTimeout",
    "__version__",
]
