from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

from pytest_procsafe import _methods


def test_available_is_the_platform_set_in_canonical_order() -> None:
    here = _methods.available()
    assert set(here) == set(multiprocessing.get_all_start_methods()) & set(_methods.KNOWN)
    assert list(here) == [m for m in _methods.KNOWN if m in here]


def test_available_before_multiprocessing_is_imported_is_what_it_says_after() -> None:
    """Before the import, `available` applies multiprocessing's rule itself: the two
    answers must not drift apart on any Python this runs on."""
    code = (
        "import sys; from pytest_procsafe import _methods; before = _methods.available(); "
        "assert 'multiprocessing' not in sys.modules, 'imported'; "
        "import multiprocessing; print(before == _methods.available(), before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("True "), out.stdout + out.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("all", ("fork", "spawn", "forkserver")),
        ("spawn", ("spawn",)),
        ("forkserver,fork", ("fork", "forkserver")),
        (" spawn  fork ", ("fork", "spawn")),
        ("fork, spawn,forkserver", ("fork", "spawn", "forkserver")),
        (["spawn", "fork"], ("fork", "spawn")),
        (("forkserver",), ("forkserver",)),
    ],
)
def test_parse_valid(value: str | list[str], expected: tuple[str, ...]) -> None:
    assert _methods.parse(value, platform=_methods.KNOWN) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no start method given"),
        (" , ", "no start method given"),
        ("threads", "unknown start method 'threads'"),
        ("Fork", "unknown start method 'Fork'"),
        ("fork,fork", "start method 'fork' is given twice"),
        ("all,fork", "'all' cannot be combined"),
        ([1], "start methods must be strings"),
    ],
)
def test_parse_invalid(value: str | list[object], message: str) -> None:
    with pytest.raises(_methods.MethodError, match=message) as info:
        _methods.parse(value, platform=_methods.KNOWN)  # type: ignore[arg-type]
    if "unknown" in message:
        assert "allowed: fork, spawn, forkserver, all" in str(info.value)


def test_a_method_the_platform_lacks_is_refused() -> None:
    with pytest.raises(_methods.MethodError, match="'fork' is not available on this platform"):
        _methods.parse("fork", platform=("spawn",))
    assert _methods.parse("all", platform=("spawn",)) == ("spawn",)


def test_intersect_keeps_the_session_order() -> None:
    assert _methods.intersect(("fork", "spawn"), ("spawn", "forkserver")) == ("spawn",)
    assert _methods.intersect(("fork",), ("spawn",)) == ()
