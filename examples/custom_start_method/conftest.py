from __future__ import annotations

import pytest


# start: override
@pytest.fixture
def mp_start_method() -> str:
    """Every test in this directory uses spawn, whatever --procsafe-start-methods says."""
    return "spawn"


# end: override
