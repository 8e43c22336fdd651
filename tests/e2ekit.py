"""Shared by the end-to-end and hostile suites: run an inner pytest in a subprocess, bounded.

Every inner run goes through `run`, which always passes `RUN_LIMIT` as the timeout: a hung
inner run fails its test instead of hanging the suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pytest

#: An inner run that takes this long is hung: the test fails instead of waiting.
RUN_LIMIT: Final = 240.0
#: Load procsafe explicitly (it is also found by its entry point, unless autoload is off).
PLUGIN: Final = ("-p", "procsafe")
#: `PLUGIN`, with leaks failing the inner run: a process left behind is one more error.
FAIL_ON_LEAKS: Final = (*PLUGIN, "--procsafe-leaks=fail")


def run(
    pytester: pytest.Pytester, *args: str, options: Sequence[str] = PLUGIN
) -> pytest.RunResult:
    """Run pytest in a subprocess with *options* (a file's defaults), then *args*; fail if
    it outlives `RUN_LIMIT`. ``options=()`` runs it with no option at all."""
    return pytester.runpytest_subprocess(*options, *args, timeout=RUN_LIMIT)
