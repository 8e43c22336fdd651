"""pytest-procsafe: test code that uses processes without hangs, leaks or lost failures."""

from __future__ import annotations

from pytest_procsafe._version import __version__

__all__ = [
    "__version__",
]
