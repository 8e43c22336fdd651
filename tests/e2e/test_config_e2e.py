"""End-to-end: options, ini keys, the marker, parametrization and loading, through pytester."""

from __future__ import annotations

import pytest

import badvalues
from e2ekit import run
from pytest_procsafe import _methods

ALL = _methods.available()

CONTEXT_TEST = """
    import pytest

    def test_ctx(mp_context, mp_start_method):
        assert mp_context.get_start_method() == mp_start_method
"""


def test_help_lists_every_option_and_ini_key(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--help")
    for name in ("leaks", "start-methods", "timeout", "kill-grace", "cleanup", "ignore", "report"):
        result.stdout.fnmatch_lines([f"*--procsafe-{name}*"])
        result.stdout.fnmatch_lines([f"*procsafe_{name.replace('-', '_')} *"])


def test_context_test_runs_once_per_available_method(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONTEXT_TEST)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=len(ALL))
    for method in ALL:
        result.stdout.fnmatch_lines([f"*test_ctx[[]{method}[]] PASSED*"])


@pytest.mark.parametrize("how", ["cli", "ini", "override-ini"])
def test_selection_by_cli_and_ini(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(CONTEXT_TEST)
    if how == "cli":
        result = run(pytester, "-v", "--procsafe-start-methods=spawn")
    elif how == "ini":
        pytester.makeini("[pytest]\nprocsafe_start_methods = spawn\n")
        result = run(pytester, "-v")
    else:
        pytester.makeini("[pytest]\nprocsafe_start_methods = fork\n")
        result = run(pytester, "-v", "-o", "procsafe_start_methods=spawn")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_ctx[[]spawn[]] PASSED*"])


def test_cli_beats_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nprocsafe_start_methods = fork\nprocsafe_timeout = 4\n")
    pytester.makepyfile(CONTEXT_TEST)
    result = run(pytester, "-v", "--procsafe-start-methods", "spawn")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["procsafe: start methods spawn; leaks warn; timeout 4s"])


def test_header_shows_the_session_settings(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = run(pytester, "--procsafe-leaks=fail", "--procsafe-timeout=12.5")
    result.stdout.fnmatch_lines(
        [f"procsafe: start methods {', '.join(ALL)}; leaks fail; timeout 12.5s"]
    )


@pytest.mark.parametrize(
    ("bad", "form"),
    [
        pytest.param(bad, form, id=f"{form}-{bad.id}")
        for bad in badvalues.BAD_VALUES
        for form in bad.e2e
    ],
)
def test_bad_values_stop_the_run_with_a_usage_error(
    pytester: pytest.Pytester, bad: badvalues.BadValue, form: str
) -> None:
    badvalues.prepare(pytester.path)
    if form == badvalues.INI:
        pytester.makeini("[pytest]\n" + bad.ini_line())
    pytester.makepyfile("def test_never_runs(): raise AssertionError")
    result = run(pytester, *([bad.arg()] if form == badvalues.CLI else []))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*" + bad.message(form)])
    result.stdout.no_fnmatch_line("*test_never_runs*")


def test_marker_narrows_and_an_empty_intersection_skips(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.procsafe(start_methods="spawn")
        def test_spawn_only(mp_start_method):
            assert mp_start_method == "spawn"

        @pytest.mark.procsafe(start_methods=["fork"])
        class TestForkOnly:
            def test_a(self, mp_context):
                assert mp_context.get_start_method() == "fork"
        """
    )
    result = run(pytester, "-v", "-rs", "--procsafe-start-methods=spawn,forkserver")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*test_spawn_only[[]spawn[]] PASSED*",
            "*procsafe: none of the marker's start methods (fork) is selected for this run (spawn, forkserver)*",
        ]
    )


def test_a_bad_marker_is_its_tests_error_once_and_the_module_runs(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_bad="""
        import pytest

        def test_before(mp_context):
            pass

        @pytest.mark.procsafe(timoutt=3)
        def test_typo():
            pass

        @pytest.mark.procsafe("fail")
        def test_positional():
            pass

        @pytest.mark.procsafe(timeout="5")
        def test_string_seconds(mp_context):
            pass

        @pytest.mark.procsafe(kill_grace=-1)
        def test_value(mp_process):
            raise AssertionError("ran despite its bad marker")

        @pytest.mark.procsafe(cleanup="kill")
        def test_session_only():
            pass

        def test_after():
            pass
        """,
    )
    result = run(pytester, "--procsafe-start-methods=fork,spawn")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # The good tests run (test_before twice: one per start method); each bad one errors
    # once, not once per start method, and nothing is lost at collection.
    result.assert_outcomes(passed=3, errors=5)
    output = result.stdout.str()
    assert "ERROR collecting" not in output
    assert "ran despite its bad marker" not in output
    allowed = "allowed: leaks, start_methods, timeout, kill_grace, ignore"
    result.stdout.fnmatch_lines_random(
        [
            "*procsafe: bad marker on test_bad.py::test_typo (test_bad.py:6): "
            f"@pytest.mark.procsafe: unknown keyword 'timoutt'; {allowed}",
            "*procsafe: bad marker on test_bad.py::test_positional (test_bad.py:10): "
            "@pytest.mark.procsafe takes keyword arguments only*",
            "*procsafe: bad marker on test_bad.py::test_string_seconds[[]bad-marker[]] "
            "(test_bad.py:14): @pytest.mark.procsafe(timeout=...): invalid value '5'; "
            "expected a number of seconds > 0 (a number, not a string)",
            "*procsafe: bad marker on test_bad.py::test_value[[]bad-marker[]] "
            "(test_bad.py:18): @pytest.mark.procsafe(kill_grace=...): invalid value -1; "
            "expected a number of seconds >= 0",
            f"*unknown keyword 'cleanup'; {allowed} (cleanup is set for the whole session: "
            "--procsafe-cleanup or procsafe_cleanup)",
        ]
    )
    # Said once per test, in its setup error (no second "During handling" copy).
    assert output.count("unknown keyword 'timoutt'") == 1, output


def test_conftest_override_wins(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def mp_start_method():
            return "spawn"
        """
    )
    pytester.makepyfile(CONTEXT_TEST)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_ctx PASSED*"])


def test_conftest_override_may_parametrize_itself(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(params=["forkserver", "spawn"])
        def mp_start_method(request):
            return request.param
        """
    )
    pytester.makepyfile(CONTEXT_TEST)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["*test_ctx[[]forkserver[]] PASSED*", "*test_ctx[[]spawn[]] PASSED*"]
    )


def test_direct_parametrization_wins(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("mp_start_method", ["spawn"])
        def test_ctx(mp_context, mp_start_method):
            assert mp_context.get_start_method() == "spawn"
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_override_returning_garbage_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def mp_start_method():
            return "threads"
        """
    )
    pytester.makepyfile(CONTEXT_TEST)
    result = run(pytester)
    result.stdout.fnmatch_lines(
        ["*mp_start_method returned 'threads'; allowed: fork, spawn, forkserver*"]
    )


def test_global_start_method_is_left_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import multiprocessing

        def test_ctx(mp_context):
            assert multiprocessing.get_start_method(allow_none=True) is None
        """
    )
    run(pytester).assert_outcomes(passed=len(ALL))


def test_explicit_loading_with_autoload_disabled(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(CONTEXT_TEST)
    run(pytester, "--procsafe-start-methods=spawn").assert_outcomes(passed=1)
    result = run(pytester, options=())
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'mp_context' not found*"])


def test_disabling_with_no_procsafe(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(CONTEXT_TEST)
    result = run(pytester, "-p", "no:procsafe", options=())
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'mp_context' not found*"])
    result.stdout.no_fnmatch_line("procsafe: start methods*")
