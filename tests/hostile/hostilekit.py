"""Shared by the hostile suite: run an inner pytest within a bound and read every test's outcome.

Each case runs an inner pytest (`e2ekit.run`, bounded by its ``RUN_LIMIT``), under
``--procsafe-leaks=fail`` and short procsafe timeouts, inside `survivors.no_survivors`, and
then checks each inner test's outcome from the inner run's JUnit XML: what failed, what
errored, what passed, the message, and how long it took. Where one inner run holds many
cases, `Once` shares it between the parametrized checks of its outcomes.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Final
from typing import final

import pytest

import e2ekit
from pytest_procsafe import _methods
from survivors import no_survivors

METHODS: Final = _methods.available()
#: Options of every inner run: fail on leaks, short waits, no cache files.
OPTIONS: Final = (
    *e2ekit.FAIL_ON_LEAKS,
    "-p",
    "no:cacheprovider",
    "--procsafe-timeout=3",
    "--procsafe-kill-grace=0.5",
    "--junitxml=junit.xml",
)


@final
@dataclasses.dataclass(frozen=True)
class Case:
    """One inner test: ``failed`` (call), ``errors`` (setup/teardown), its text and time."""

    failed: bool
    error: bool
    skipped: bool
    text: str
    seconds: float

    @property
    def passed(self) -> bool:
        return not (self.failed or self.error or self.skipped)


def run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[pytest.RunResult, dict[str, Case]]:
    """Run the inner pytest; fail if it outlives ``RUN_LIMIT`` or leaves a process behind."""
    with no_survivors(monkeypatch):
        result = e2ekit.run(pytester, *args, options=OPTIONS)
    return result, cases(pytester.path / "junit.xml", result.stdout.str())


@final
class Once:
    """One inner run shared by the parametrized checks of its outcomes (keep one per run
    in a module-scoped fixture). The first check to ask writes the inner files with
    *setup* and runs it with its own pytester; the others read what it found. Should the
    run itself fail, that check fails with the error and every later one says so."""

    def __init__(self, setup: Callable[[pytest.Pytester], None]) -> None:
        self._setup = setup
        self._ran: tuple[pytest.RunResult, dict[str, Case]] | None = None
        self._error: str | None = None

    def run(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> tuple[pytest.RunResult, dict[str, Case]]:
        if self._error is not None:
            pytest.fail(f"the shared inner run failed in an earlier check: {self._error}")
        if self._ran is None:
            try:
                self._setup(pytester)
                self._ran = run(pytester, monkeypatch)
            except Exception as error:
                self._error = f"{type(error).__name__}: {error}"
                raise
        return self._ran


# A report's header in the terminal: "____ ERROR at teardown of test_x[fork] ____".
_HEADER: Final = re.compile(r"^_{3,} (?:ERROR at \w+ of )?(\S+) _{3,}$", re.MULTILINE)


def sections(output: str) -> dict[str, str]:
    """The terminal's failure and error reports, by test name (sections such as
    "Captured procsafe teardown", which the JUnit XML leaves out, included)."""
    found: dict[str, str] = {}
    heads = list(_HEADER.finditer(output))
    for head, after in zip(heads, [*heads[1:], None][: len(heads)], strict=True):
        end = after.start() if after is not None else len(output)
        found[head.group(1)] = found.get(head.group(1), "") + output[head.end() : end]
    return found


def cases(junit: Path, output: str = "") -> dict[str, Case]:
    """Every test case in a JUnit XML file, by ``name`` (``test_x[fork]``), with the
    terminal *output*'s reports of it."""
    reports = sections(output)
    found: dict[str, Case] = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        texts = []
        kinds = set()
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                kinds.add(child.tag)
                texts.append(f"{child.get('message', '')}\n{child.text or ''}")
        name = case.get("name", "")
        # A test that failed and then errored in teardown has two entries: merge them.
        before = found.get(name)
        texts.append(reports.get(name, "") if before is None else before.text)
        found[name] = Case(
            failed="failure" in kinds or (before is not None and before.failed),
            error="error" in kinds or (before is not None and before.error),
            skipped="skipped" in kinds or (before is not None and before.skipped),
            text="\n".join(texts),
            seconds=float(case.get("time", "0")) + (before.seconds if before else 0.0),
        )
    return found


@final
@dataclasses.dataclass(frozen=True)
class Expected:
    """One inner test's expected outcome, phrases its report holds, and time bound."""

    passed: bool = False
    failed: bool = False
    error: bool = False
    says: tuple[str, ...] = ()
    within: float | None = None


def expect(found: dict[str, Case], name: str, expected: Expected) -> None:
    """Assert one inner test's outcome, the phrases its report holds, and its time bound."""
    assert name in found, f"{name} did not run; ran: {sorted(found)}"
    case = found[name]
    got = (case.passed, case.failed, case.error)
    want = (expected.passed, expected.failed, expected.error)
    assert got == want, f"{name}: (passed, failed, error) = {got}\n{case.text}"
    for phrase in expected.says:
        assert phrase in case.text, f"{name}: {phrase!r} not in its report:\n{case.text}"
    if expected.within is not None:
        bound = expected.within
        assert case.seconds < bound, f"{name} took {case.seconds:.1f}s (bound {bound}s)"


def param(name: str, expected: Expected) -> object:
    """A ``(name, expected)`` parameter of a check of inner test *name*, with a readable id
    (``test_x-fork`` for ``test_x[fork]``)."""
    return pytest.param(name, expected, id=name.replace("[", "-").rstrip("]"))
