"""procsafe's at-fork callbacks: called around real forks, in os's order, and let go at exit."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from collections.abc import Iterator

import pytest
from leakkit import WAIT

from pytest_procsafe import _forkhooks

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")


@pytest.fixture
def added() -> Iterator[list[Callable[[], object]]]:
    """The callbacks a test adds, taken out again after it (procsafe's own stay)."""
    callbacks: list[Callable[[], object]] = []
    yield callbacks
    lists = (_forkhooks._PREPARE, _forkhooks._BEFORE, _forkhooks._PARENT, _forkhooks._CHILD)
    for callback in callbacks:
        for listed in lists:
            while callback in listed:
                listed.remove(callback)


def _add(added: list[Callable[[], object]], **callbacks: Callable[[], object]) -> None:
    added.extend(callbacks.values())
    _forkhooks.add(**callbacks)


def test_callbacks_run_around_a_fork_in_os_order(added: list[Callable[[], object]]) -> None:
    calls: list[str] = []
    for name in ("a", "b"):
        _add(
            added,
            prepare=functools.partial(calls.append, f"prepare {name}"),
            before=functools.partial(calls.append, f"before {name}"),
            after_in_parent=functools.partial(calls.append, f"parent {name}"),
            after_in_child=functools.partial(calls.append, f"child {name}"),
        )
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports what it ran
        os.write(write, ",".join(calls).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split(",")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # What may start processes first, in order; then last added first just before the
    # fork, and first added first after it (as os.register_at_fork).
    before = ["prepare a", "prepare b", "before b", "before a"]
    assert [call for call in child if call] == [*before, "child a", "child b"]
    assert calls == [*before, "parent a", "parent b"]


def test_a_callback_that_raises_is_reported_and_the_others_still_run(
    added: list[Callable[[], object]], capfd: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("on purpose")

    _add(added, after_in_parent=broken)
    _add(added, after_in_parent=functools.partial(calls.append, "after"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    assert calls == ["after"]
    assert "RuntimeError: on purpose" in capfd.readouterr().err


def test_nothing_is_kept_past_the_exit_handlers() -> None:
    # An exit handler registered before procsafe's runs after it: the lists are empty by
    # then, so the interpreter's last collections do not walk what the callbacks reach.
    code = textwrap.dedent(
        """
        import atexit
        import sys

        def check():
            from pytest_procsafe import _forkhooks
            lists = (_forkhooks._PREPARE, _forkhooks._BEFORE, _forkhooks._PARENT, _forkhooks._CHILD)
            print(*(len(callbacks) for callbacks in lists))

        atexit.register(check)
        from pytest_procsafe import _forkhooks
        _forkhooks.add(prepare=print, before=print, after_in_parent=print, after_in_child=print)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert done.stdout.split() == ["0", "0", "0", "0"]
