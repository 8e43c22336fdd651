"""End-to-end: the suites in ``examples/`` and the README's example, as a user runs them.

The docs include their code from ``examples/``, so these runs also test every code sample
of the docs. The leak demo is run twice: in the default warn mode (the README's "main
job": everything passes and the ``procsafe`` section lists each leak) and in fail mode
(exactly the demo tests error, and the JSON report has the shape the docs show).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from e2ekit import run
from pytest_procsafe import _config
from pytest_procsafe import _marker
from pytest_procsafe import _methods
from pytest_procsafe import hookspecs
from pytest_procsafe import plugin
from survivors import no_survivors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
METHODS = _methods.available()
DEMO = "leak_demo/test_leak_demo.py::"


def demo_kinds() -> dict[str, str]:
    """The demo's leaking tests and the kind each leaves here (see its skip markers)."""
    kinds = {DEMO + "test_leaked_process": "leaked"}
    if hasattr(os, "fork"):
        kinds[DEMO + "test_zombie"] = "zombie"
    if sys.platform.startswith("linux"):
        kinds[DEMO + "test_orphan"] = "orphan"
    return kinds


def copy_examples(pytester: pytest.Pytester, subdir: str = "") -> None:
    """Copy ``examples/`` (or one directory of it) as the inner run's root directory."""
    source = EXAMPLES / subdir
    ignore = shutil.ignore_patterns("__pycache__", ".coverage", ".coverage.*")
    shutil.copytree(source, pytester.path, dirs_exist_ok=True, ignore=ignore)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "the README has one Python example"
    return str(blocks[0])


def test_main_job_passes_and_shows_each_demo_leak(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_examples(pytester)
    pytester.makepyfile(test_readme_example=readme_example())
    with no_survivors(monkeypatch):
        result = run(pytester, "--procsafe-report=report.json")

    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    outcomes = result.parseoutcomes()
    assert set(outcomes) <= {"passed", "skipped", "warnings", "warning"}, outcomes
    kinds = demo_kinds()
    # One ProcessLeakWarning per demo test, and only the demo leaks.
    assert outcomes.get("warnings", outcomes.get("warning")) == len(kinds)
    result.stdout.fnmatch_lines(
        [f"*ProcessLeakWarning: procsafe: {test} left 1 process behind:" for test in kinds]
    )
    counts = ", ".join(f"1 {kind}" for kind in kinds.values())
    summary = ["*= procsafe =*", f"{len(kinds)} left behind by {len(kinds)} owners ({counts})"]
    for test, kind in kinds.items():
        action = "reaped" if kind == "zombie" else "killed"  # at session end
        summary += [f"{test}: 1 {kind}", f"    {kind} pid * (appeared in call*, {action}): *"]
    summary.append("next: run with --procsafe-leaks=fail (in CI, say) to make the tests*")
    result.stdout.fnmatch_lines(summary)
    # A newcomer's first run: the section fits a screen and ends with the next step.
    section = result.stdout.str().split("= procsafe =", 1)[1].splitlines()[1:]
    section = section[: next(i for i, line in enumerate(section) if line.startswith("=="))]
    assert len(section) <= 30, section
    assert section[-1].startswith("next: "), section
    report = json.loads((pytester.path / "report.json").read_text())
    assert {leak["owner"]: leak["kind"] for leak in report["leaks"]} == kinds


def test_demo_in_fail_mode_errors_exactly_the_demo_tests(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_examples(pytester)
    with no_survivors(monkeypatch):
        result = run(
            pytester, "--procsafe-leaks=fail", "--procsafe-report=report.json", "leak_demo"
        )

    kinds = demo_kinds()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert outcomes["errors"] == len(kinds)
    assert "failed" not in outcomes
    result.stdout.fnmatch_lines_random([f"ERROR {test} - *" for test in kinds])
    for test in kinds:
        name = test.rpartition("::")[2]
        result.stdout.fnmatch_lines(
            [
                f"*ERROR at teardown of {name}*",
                f"procsafe: {test} left 1 process behind:",
                # The demo's pytest_procsafe_leaks hook logged it (docs: reference/hooks).
                "*Captured log teardown*",
                f"WARNING  leaks:conftest.py:* {test} left a {kinds[test]} process: *",
            ]
        )
    report = json.loads((pytester.path / "report.json").read_text())
    documented = json.loads((DOCS / "reference" / "report-example.json").read_text())
    assert_same_shape(report, documented)
    expected = [
        {"owner": leak["owner"], "kind": leak["kind"], "action": leak["action"]}
        for leak in documented["leaks"]
        if leak["owner"] in kinds
    ]
    assert [
        {"owner": leak["owner"], "kind": leak["kind"], "action": leak["action"]}
        for leak in report["leaks"]
    ] == expected


#: Report keys whose value is a string or null (docs: reference/report).
NULLABLE = frozenset({"name", "held_by", "created_at", "stack"})


def assert_same_shape(real: Any, documented: Any) -> None:
    """The documented report example has the keys and value types of a real report."""
    assert type(real) is type(documented), (real, documented)
    if isinstance(real, dict):
        assert real.keys() == documented.keys()
        for key in real:
            if key in NULLABLE:
                assert real[key] is None or isinstance(real[key], str), (key, real[key])
                assert documented[key] is None or isinstance(documented[key], str)
                continue
            assert_same_shape(real[key], documented[key])
    elif isinstance(real, list) and real and documented:
        for item in real:
            assert_same_shape(item, documented[0])


def test_long_lived_and_demo_conftests_work_without_the_plugin(
    pytester: pytest.Pytester,
) -> None:
    # Their hooks are optionalhook=True, as the docs advise. The demo's tests are
    # deselected (without the plugin their leaks would be real); its conftest still loads.
    copy_examples(pytester)
    args = ("-p", "no:procsafe", "-k", "not test_leak_demo", "long_lived", "leak_demo")
    result = run(pytester, *args, options=())
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=3, deselected=3)


def test_hung_worker_demo_fails_with_the_workers_stack(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_examples(pytester)
    args = ("--procsafe-timeout=3", "--procsafe-kill-grace=0.5")
    with no_survivors(monkeypatch):
        result = run(
            pytester, *args, "--procsafe-start-methods=spawn", "hung_worker/demo_hung_worker.py"
        )

    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_hung_worker[[]spawn[]]*",
            "worker 'next_job-1' (pid *, spawn) of *test_hung_worker[[]spawn[]] was still "
            "running after the 3s timeout, so it was stopped*",
        ]
    )
    if hasattr(os, "kill") and sys.platform != "win32":  # stacks need a signal
        result.stdout.fnmatch_lines(["*demo_hung_worker.py*in next_job"])
    result.stdout.fnmatch_lines(
        ["E       pytest_procsafe.WorkerTimeout: worker 'next_job-1' * still running after 3s*"]
    )


@pytest.mark.skipif(
    importlib.util.find_spec("xdist") is None or importlib.util.find_spec("pytest_cov") is None,
    reason="needs pytest-xdist and pytest-cov (the test extra)",
)
def test_xdist_coverage_example_measures_the_pool_children(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from inside the example's directory, as its docs say: its pytest.ini turns on
    # xdist and coverage, its .coveragerc measures the Pool's children.
    copy_examples(pytester, "xdist_coverage")
    for name in list(os.environ):
        if name.startswith(("COV_CORE_", "COVERAGE_")):  # an outer measured run
            monkeypatch.delenv(name)
    with no_survivors(monkeypatch):
        result = run(pytester, options=())

    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.assert_outcomes(passed=2 * len(METHODS))
    result.stdout.fnmatch_lines(["*created: 2/2 workers*", "stats.py * 0 * 100%*"])


# --- the docs describe every option, fixture, hook and public name -----------------------


def test_docs_and_readme_name_every_option_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    options = (DOCS / "reference" / "options.md").read_text(encoding="utf-8")
    for name in (option.name for option in _config.OPTIONS):
        flag = "--procsafe-" + name.replace("_", "-")
        assert f"`{flag}`" in options, name
        assert f"`procsafe_{name}`" in options, name
        assert f"| `{name}` |" in readme, name
        default = _config.DEFAULTS.get(name)
        if default is not None:
            assert re.search(rf"\| `{name}` \|[^\n]*\| `{default}` \|", readme), name
            assert re.search(rf"\| `{flag}` \|[^\n]*\| `{default}`", options), name
    for keyword in _marker.MARKER_KEYWORDS:
        assert f"`{keyword}=`" in options, keyword


def test_docs_name_every_fixture_hook_and_public_name() -> None:
    fixtures = (DOCS / "reference" / "fixtures.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    reference = "\n".join(
        path.read_text(encoding="utf-8") for path in (DOCS / "reference").glob("*.md")
    )
    names = [name for name in vars(plugin) if name.startswith("mp_")]
    assert len(names) == 7, names
    for name in names:
        assert f"## `{name}`" in fixtures or f", `{name}`" in fixtures, name
        assert f"`{name}`" in readme, name
    for hook in ("pytest_procsafe_ignore", "pytest_procsafe_leaks"):
        assert hasattr(hookspecs, hook)
        assert f"pytest_procsafe.hookspecs.{hook}" in reference, hook
    import pytest_procsafe

    for name in pytest_procsafe.__all__:
        if name != "__version__":
            assert f"pytest_procsafe.{name}" in reference, name
