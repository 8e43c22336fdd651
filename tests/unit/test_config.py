from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path

import pytest

import badvalues
from pytest_procsafe import _config
from pytest_procsafe import _marker
from pytest_procsafe import _methods


def getter(values: Mapping[str, object]) -> Callable[[str], object]:
    return values.get


def resolve(cli: Mapping[str, object] = {}, ini: Mapping[str, object] = {}) -> _config.Settings:
    return _config.resolve(getter(cli), getter(ini))


def test_defaults() -> None:
    settings = resolve()
    assert settings.leaks == "warn"
    assert settings.start_methods == _methods.available()
    assert settings.timeout == 30.0
    assert settings.kill_grace == 2.0
    assert settings.cleanup == "session"  # auto under warn
    assert settings.ignore == ()
    assert settings.report is None


def test_cli_beats_ini_beats_default() -> None:
    settings = resolve(cli={"timeout": "5"}, ini={"timeout": "7", "kill_grace": "0"})
    assert settings.timeout == 5.0
    assert settings.kill_grace == 0.0


@pytest.mark.parametrize(
    ("leaks", "cleanup", "expected"),
    [
        ("fail", "auto", "kill"),
        ("warn", "auto", "session"),
        ("off", "auto", "session"),
        ("warn", "kill", "kill"),
        ("fail", "keep", "keep"),
        ("fail", "session", "session"),
    ],
)
def test_cleanup_auto_follows_the_leak_mode(leaks: str, cleanup: str, expected: str) -> None:
    assert resolve(cli={"leaks": leaks, "cleanup": cleanup}).cleanup == expected


def test_ignore_patterns_from_ini_and_cli_both_apply() -> None:
    settings = resolve(cli={"ignore": ["redis-server"]}, ini={"ignore": ["^sleep "]})
    assert [p.pattern for p in settings.ignore] == ["^sleep ", "redis-server"]


def test_report_path_is_checked(tmp_path: Path) -> None:
    assert resolve(cli={"report": str(tmp_path / "r.json")}).report == tmp_path / "r.json"
    with pytest.raises(pytest.UsageError, match="does not exist"):
        resolve(cli={"report": str(tmp_path / "missing" / "r.json")})
    with pytest.raises(pytest.UsageError, match="is a directory"):
        resolve(cli={"report": str(tmp_path)})


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_report_in_a_read_only_directory(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(pytest.UsageError, match="is not writable"):
            resolve(cli={"report": str(tmp_path / "r.json")})
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("bad", badvalues.given(badvalues.CLI), ids=lambda bad: bad.id)
def test_bad_cli_values_name_option_value_and_allowed(
    bad: badvalues.BadValue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    badvalues.prepare(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.UsageError) as info:
        resolve(cli={bad.option: bad.cli_value()})
    assert str(info.value).startswith("procsafe: ")
    assert bad.refused_in(str(info.value), badvalues.CLI), str(info.value)


def test_bad_ini_value_names_the_ini_key() -> None:
    with pytest.raises(
        pytest.UsageError, match=re.escape("procsafe_leaks (ini): invalid value 'x'")
    ):
        resolve(ini={"leaks": "x"})


def test_zero_kill_grace_is_allowed() -> None:
    assert resolve(cli={"kill_grace": "0"}).kill_grace == 0.0


def test_header_is_one_line() -> None:
    header = resolve(cli={"start_methods": "spawn", "timeout": "2.5"}).header()
    assert header == "procsafe: start methods spawn; leaks warn; timeout 2.5s"


class TestMarker:
    base = _config.resolve(getter({"ignore": ["a"]}), getter({}))

    def apply(
        self, *marks: pytest.MarkDecorator
    ) -> tuple[_config.Settings, tuple[str, ...] | None]:
        return _marker.marker_overrides([m.mark for m in marks], self.base)

    def test_no_marker_keeps_the_session_settings(self) -> None:
        assert self.apply() == (self.base, None)

    def test_closest_marker_wins_and_ignore_accumulates(self) -> None:
        settings, methods = self.apply(
            pytest.mark.procsafe(timeout=3, ignore="b"),
            pytest.mark.procsafe(timeout=9, kill_grace=0, leaks="off", ignore=["c"]),
        )
        assert settings.timeout == 3.0
        assert settings.kill_grace == 0.0
        assert settings.leaks == "off"
        assert [p.pattern for p in settings.ignore] == ["a", "b", "c"]
        assert methods is None

    def test_start_methods_may_name_methods_this_platform_lacks(self) -> None:
        _, methods = self.apply(pytest.mark.procsafe(start_methods=["forkserver", "fork"]))
        assert methods == ("fork", "forkserver")

    @pytest.mark.parametrize(
        ("mark", "message"),
        [
            (
                pytest.mark.procsafe(timeout_s=1),
                "unknown keyword 'timeout_s'; allowed: leaks, start_methods",
            ),
            (pytest.mark.procsafe("fail"), "keyword arguments only"),
            (pytest.mark.procsafe(timeout=True), "procsafe(timeout=...): invalid value True"),
            (pytest.mark.procsafe(timeout="x"), "procsafe(timeout=...): invalid value 'x'"),
            (pytest.mark.procsafe(timeout=-2), "procsafe(timeout=...): invalid value -2"),
            (pytest.mark.procsafe(kill_grace=[1]), "procsafe(kill_grace=...): invalid value [1]"),
            (pytest.mark.procsafe(leaks="loud"), "procsafe(leaks=...): invalid value 'loud'"),
            (pytest.mark.procsafe(start_methods="thread"), "unknown start method 'thread'"),
            (
                pytest.mark.procsafe(start_methods=3),
                "procsafe(start_methods=...): invalid value 3",
            ),
            (pytest.mark.procsafe(ignore=5), "procsafe(ignore=...): invalid value 5"),
        ],
    )
    def test_bad_marker_names_the_keyword(self, mark: pytest.MarkDecorator, message: str) -> None:
        with pytest.raises(_config.SettingError, match=re.escape(message)):
            self.apply(mark)


def test_the_tests_with_a_procsafe_marker_are_noted_once_at_collection(
    pytester: pytest.Pytester,
) -> None:
    """Each test's setup asks only whether it was noted: a marker on the test, its class
    or its module is; none at all, or another marker, is not."""
    pytester.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.procsafe(leaks="off")
        def test_own():
            pass

        @pytest.mark.parametrize("i", [1])
        def test_other_marker(i):
            pass

        def test_plain():
            pass

        @pytest.mark.procsafe(timeout=1)
        class TestMarked:
            def test_in_class(self):
                pass
        """,
        test_module_marked="""
        import pytest
        pytestmark = pytest.mark.procsafe(leaks="warn")

        def test_by_module():
            pass
        """,
    )
    items = pytester.getitems(pytester.path)
    marked = _marker.Marked()
    noted_before = marked.noted
    marked.note(items)
    assert (noted_before, marked.noted) == (False, True)
    assert sorted(item.name for item in marked.items) == [
        "test_by_module",
        "test_in_class",
        "test_own",
    ]
    marked.note(items[:1])  # a new collection replaces what was noted
    assert [item.name for item in marked.items] == [items[0].name]


def test_settings_are_read_only_and_a_marker_copy_leaves_them_as_they_were() -> None:
    base = resolve()
    with pytest.raises(AttributeError, match="read-only"):
        base.timeout = 1.0
    changed = base.replace(timeout=1.5, leaks="fail")
    assert (changed.timeout, changed.leaks) == (1.5, "fail")
    assert (base.timeout, base.leaks) == (30.0, "warn")
    assert changed.start_methods == base.start_methods
    assert "timeout=1.5" in repr(changed)
