"""What the test process and its guardian (`_guardian`) both know, and nothing else.

The test process needs these three names to start the guardian (`_guardlink`) and to tell
guardians from other processes (`_tracker`); importing the guardian's own module for them
cost every pytest process a module it never runs.
"""

from __future__ import annotations

import signal
from typing import Final

#: The environment variable every process of the run inherits; its value is the run's token.
VARIABLE: Final = "PYTEST_PROCSAFE_RUN"
#: In every guardian's command line: guardians never stop each other.
MARK: Final = "pytest_procsafe._guardian import main"
#: Blocked in the guardian from its start (inherited through exec): see `_guardian`.
SHIELD: Final = frozenset(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
