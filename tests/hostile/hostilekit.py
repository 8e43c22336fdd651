"""Shared by the hostile suite: run an inner pytest within a bound and read every test's outcome.

Each case runs an inner pytest (``runpytest_subprocess`` with a ``timeout``), under
``--procsafe-leaks=fail`` and short procsafe timeouts, inside `survivors.no_survivors`, and
then checks each inner test's outcome from the inner run's JUnit XML: what failed, what
errored, what passed, the message, and how long it took.
"""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Final
from typing import final

import pytest

from pytest_procsafe import _methods
from survivors import no_survivors

METHODS: Final = _methods.available()
#: An inner run that takes this long is hung: the case fails instead of waiting.
RUN_LIMIT: Final = 240.0
#: Options of every inner run: fail on leaks, short waits, no cache files.
OPTIONS: Final = (
    "-p",
    "procsafe",
    "-p",
    "no:cacheprovider",
    "--procsafe-leaks=fail",
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
    """Run the inner pytest; fail if it outlives `RUN_LIMIT` or leaves a process behind."""
    with no_survivors(monkeypatch):
        result = pytester.runpytest_subprocess(*OPTIONS, *args, timeout=RUN_LIMIT)
    return result, cases(pytester.path / "junit.xml", result.stdout.str())


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


def expect(
    found: dict[str, Case],
    name: str,
    *,
    passed: bool = False,
    failed: bool = False,
    error: bool = False,
    says: tuple[str, ...] = (),
    within: float | None = None,
) -> None:
    """Assert one inner test's outcome, the phrases its report holds, and its time bound."""
    assert name in found, f"{name} did not run; ran: {sorted(found)}"
    case = found[name]
    got = (case.passed, case.failed, case.error)
    assert got == (passed, failed, error), f"{name}: (passed, failed, error) = {got}\n{case.text}"
    for phrase in says:
        assert phrase in case.text, f"{name}: {phrase!r} not in its report:\n{case.text}"
    if within is not None:
        assert case.seconds < within, f"{name} took {case.seconds:.1f}s (bound {within}s)"


def expect_in(
    found: dict[str, Case],
    method: str,
    test: str,
    *,
    passed: bool = False,
    failed: bool = False,
    error: bool = False,
    says: tuple[str, ...] = (),
    within: float | None = None,
) -> None:
    """`expect` for ``test[method]``."""
    expect(
        found,
        f"{test}[{method}]",
        passed=passed,
        failed=failed,
        error=error,
        says=says,
        within=within,
    )
