"""procsafe's at-fork callbacks: called around real forks, in os's order, and let go at exit."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
from leakkit import WAIT

from pytest_procsafe import _forkhooks

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")


def test_callbacks_run_around_a_fork_in_os_order(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(_forkhooks, "_BEFORE", [])
    monkeypatch.setattr(_forkhooks, "_PARENT", [])
    monkeypatch.setattr(_forkhooks, "_CHILD", [])
    for name in ("a", "b"):
        _forkhooks.add(
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
    # Last added first before the fork, first added first after it (as os.register_at_fork).
    assert child == ["before b", "before a", "child a", "child b"]
    assert calls == ["before b", "before a", "parent a", "parent b"]


def test_a_callback_that_raises_is_reported_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(_forkhooks, "_PARENT", [])

    def broken() -> None:
        raise RuntimeError("on purpose")

    _forkhooks.add(after_in_parent=broken)
    _forkhooks.add(after_in_parent=lambda: calls.append("after"))
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
            print(len(_forkhooks._BEFORE), len(_forkhooks._PARENT), len(_forkhooks._CHILD))

        atexit.register(check)
        from pytest_procsafe import _forkhooks
        _forkhooks.add(before=print, after_in_parent=print, after_in_child=print)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert done.stdout.split() == ["0", "0", "0"]
