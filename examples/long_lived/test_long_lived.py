"""Tests that share long-lived helper processes (see conftest.py)."""

from __future__ import annotations

import cache_server
import pytest


def test_first_user_starts_it() -> None:
    assert cache_server.server().poll() is None


def test_second_user_shares_it() -> None:
    assert cache_server.server().pid == cache_server.server().pid


# start: marker
@pytest.mark.procsafe(ignore="example-log-shipper")
def test_with_a_marker() -> None:
    # The marker exempts a process for this test only (the regex is searched in the
    # process's command line); the session fixture in conftest.py stops it.
    assert cache_server.server("example-log-shipper").poll() is None


# end: marker
