"""pytest-procsafe: test code that uses processes without hangs, leaks or lost failures."""

from __future__ import annotations

import importlib

from pytest_procsafe._version import __version__

TYPE_CHECKING = False  # no typing at run time: a spawn child imports this (`_notyping`)
if TYPE_CHECKING:
    from typing import Final

    from pytest_procsafe._channels import Channels
    from pytest_procsafe._leaked import LeakedProcess
    from pytest_procsafe._timeouts import ChannelTimeout
    from pytest_procsafe._warnings import ProcessLeakWarning
    from pytest_procsafe._worker import Worker
    from pytest_procsafe._worker import WorkerCrashed
    from pytest_procsafe._worker import WorkerError
    from pytest_procsafe._worker import WorkerTimeout
    from pytest_procsafe._workers import WorkerGroup

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

# Public name -> the private module defining it, imported on first access. Every spawn
# and forkserver worker imports this package (its bootstrap lives here): importing the
# parent side eagerly cost each worker about 100 ms, and the leak-check names would
# import pytest (ProcessLeakWarning is a PytestWarning).
_LAZY: Final = {
    "ChannelTimeout": "_timeouts",
    "Channels": "_channels",
    "LeakedProcess": "_leaked",
    "ProcessLeakWarning": "_warnings",
    "Worker": "_worker",
    "WorkerCrashed": "_worker",
    "WorkerError": "_worker",
    "WorkerGroup": "_workers",
    "WorkerTimeout": "_worker",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_procsafe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"pytest_procsafe.{module}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
