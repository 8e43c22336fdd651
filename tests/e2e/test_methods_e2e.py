"""Who chooses a test's start method: procsafe's parametrization, or a conftest's own."""

from __future__ import annotations

import pytest

from e2ekit import run

OVERRIDDEN = """
import pytest

@pytest.fixture
def mp_start_method():
    return "spawn"
"""

MARKED = """
import pytest

@pytest.mark.procsafe(start_methods="fork")
def test_marked(mp_context):
    assert mp_context.get_start_method() == "spawn"

def test_unmarked(mp_context):
    assert mp_context.get_start_method() == "spawn"
"""


def test_a_marker_a_conftest_overrides_is_not_silently_ignored(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(OVERRIDDEN)
    pytester.makepyfile(test_marked=MARKED)
    result = run(pytester, "-W", "default")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*PytestConfigWarning: procsafe: @pytest.mark.procsafe(start_methods=...) on "
            "test_marked.py::test_marked has no effect: the mp_start_method fixture at "
            "conftest.py:3 chooses its mp_start_method (fork asked for)",
        ]
    )
