"""Settings: CLI > ini > defaults, marker overrides, validation.

Everything is resolved once per session into a frozen `Settings` kept in
``config.stash``; a test's ``@pytest.mark.procsafe(...)`` marker derives a per-test copy.
Bad values stop the run with a `pytest.UsageError` naming the option, the bad value and
what is allowed; bad marker values are a collection error naming the keyword.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from typing import Final
from typing import Literal
from typing import cast
from typing import final

import pytest

from pytest_procsafe import _methods
from pytest_procsafe import _seconds

LeakMode = Literal["fail", "warn", "off"]
CleanupMode = Literal["kill", "session", "keep"]

LEAK_MODES: Final = ("fail", "warn", "off")
CLEANUP_MODES: Final = ("auto", "kill", "session", "keep")


@final
class Option:
    """One procsafe option: ``--procsafe-<name>`` on the command line, ``procsafe_<name>``
    in the ini file. (Plain classes here and for `Settings`: generating a named tuple's or
    a dataclass's methods cost every pytest process tenths of a millisecond at import.)"""

    __slots__ = ("default", "help", "metavar", "name", "repeatable")

    def __init__(
        self,
        name: str,
        metavar: str,
        help: str,
        default: str | None = None,
        repeatable: bool = False,
    ) -> None:
        self.name = name
        self.metavar = metavar
        #: The help text; ``{default}`` stands for the default.
        self.help = help
        self.default = default
        #: An ini ``linelist`` and a repeatable flag (``ignore``), or one value.
        self.repeatable = repeatable

    @property
    def flag(self) -> str:
        return "--procsafe-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "procsafe_" + self.name

    def help_text(self) -> str:
        return self.help.format(default=self.default)


#: Every option, in the order ``--help`` lists them. The defaults live here only.
OPTIONS: Final = (
    Option(
        "leaks",
        "MODE",
        "What to do about processes, zombies and orphans a test leaves behind: "
        "fail, warn or off (default: {default})",
        "warn",
    ),
    Option(
        "start_methods",
        "METHODS",
        "Start methods to run the mp_* fixtures under: a comma- or space-separated subset "
        "of fork, spawn, forkserver, or all (default: {default}, those this platform has)",
        "all",
    ),
    Option(
        "timeout",
        "SECONDS",
        "Seconds any procsafe wait may block before it fails, > 0 (default: {default})",
        "30",
    ),
    Option(
        "kill_grace",
        "SECONDS",
        "Seconds between terminating a process and killing it, >= 0 (default: {default})",
        "2",
    ),
    Option(
        "cleanup",
        "POLICY",
        "When leaked processes are stopped: auto, kill (right after the report), "
        "session (at session end) or keep (never); auto (the default) is kill under "
        "leaks=fail and session under leaks=warn",
        "auto",
    ),
    Option(
        "ignore",
        "REGEX",
        "Regular expression searched in a process's command line (or a leaked shared "
        "memory segment's or semaphore's name); matches are never reported (repeatable)",
        repeatable=True,
    ),
    Option("report", "PATH", "Write a JSON report of the leaks found to this path"),
)
DEFAULTS: Final[Mapping[str, str]] = {
    option.name: option.default for option in OPTIONS if option.default is not None
}


def is_xdist_worker(config: pytest.Config) -> bool:
    """Whether this pytest process is an xdist worker (not the controller).

    Asked of the config, not the environment: children inherit ``PYTEST_XDIST_WORKER``.
    """
    return hasattr(config, "workerinput")


@final
class Settings:
    """procsafe's resolved settings for the session or for one test: read-only once made
    (a marker's copy comes from `replace`). A plain class (see `Option`)."""

    __slots__ = (
        "cleanup",
        "cleanup_auto",
        "ignore",
        "kill_grace",
        "leaks",
        "report",
        "start_methods",
        "timeout",
    )
    leaks: LeakMode
    start_methods: tuple[str, ...]
    timeout: float
    kill_grace: float
    cleanup: CleanupMode
    ignore: tuple[re.Pattern[str], ...]
    report: Path | None
    #: Whether ``cleanup`` is what ``auto`` resolved to (messages then say why).
    cleanup_auto: bool

    def __init__(
        self,
        *,
        leaks: LeakMode,
        start_methods: tuple[str, ...],
        timeout: float,
        kill_grace: float,
        cleanup: CleanupMode,
        ignore: tuple[re.Pattern[str], ...],
        report: Path | None,
        cleanup_auto: bool = False,
    ) -> None:
        values = {
            "leaks": leaks,
            "start_methods": start_methods,
            "timeout": timeout,
            "kill_grace": kill_grace,
            "cleanup": cleanup,
            "ignore": ignore,
            "report": report,
            "cleanup_auto": cleanup_auto,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"procsafe's Settings are read-only ({name})")

    def replace(self, **changes: Any) -> Settings:
        """A copy with *changes* (a marker's overrides)."""
        values: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return Settings(**values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Settings({inner})"

    def header(self) -> str:
        """The one line ``pytest_report_header`` shows."""
        return (
            f"procsafe: start methods {', '.join(self.start_methods)}; "
            f"leaks {self.leaks}; timeout {_seconds.fmt(self.timeout)}"
        )


SETTINGS_KEY: Final = pytest.StashKey[Settings]()


class SettingError(ValueError):
    """A bad value; the message names the option, the value and what is allowed."""


# --- parsing of single values (shared by CLI, ini and marker) -----------------------------


def parse_choice(option: str, value: object, allowed: Iterable[str]) -> str:
    choices = tuple(allowed)
    if not isinstance(value, str) or value.strip() not in choices:
        raise SettingError(f"{option}: invalid value {value!r}; allowed: {', '.join(choices)}")
    return value.strip()


def parse_seconds(option: str, value: object, *, allow_zero: bool) -> float:
    try:
        return _seconds.check(option, value, allow_zero=allow_zero, text=True)
    except _seconds.SecondsError as exc:
        raise SettingError(f"{option}: invalid value {value!r}; expected {exc.expected}") from None


def parse_methods(
    option: str, value: object, *, platform: Iterable[str] | None = None
) -> tuple[str, ...]:
    if not isinstance(value, (str, list, tuple)):
        raise SettingError(
            f"{option}: invalid value {value!r}; expected start methods out of "
            f"{', '.join(_methods.KNOWN)} or 'all'"
        )
    try:
        return _methods.parse(cast("str | Iterable[str]", value), platform=platform)
    except _methods.MethodError as exc:
        raise SettingError(f"{option}: {exc}") from None


def parse_patterns(option: str, value: object) -> tuple[re.Pattern[str], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise SettingError(
            f"{option}: invalid value {value!r}; expected a regular expression or a list of them"
        )
    patterns = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise SettingError(
                f"{option}: invalid pattern {item!r}; expected a non-empty regular expression "
                "(searched in the process's command line)"
            )
        try:
            patterns.append(re.compile(item))
        except re.error as exc:
            raise SettingError(f"{option}: invalid regular expression {item!r}: {exc}") from None
    return tuple(patterns)


def parse_report(option: str, value: str) -> Path:
    if not value.strip():
        raise SettingError(f"{option}: invalid value {value!r}; expected the path of a JSON file")
    path = Path(value).expanduser().absolute()
    if path.is_dir():
        raise SettingError(f"{option}: {value!r} is a directory; expected the path of a JSON file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise SettingError(f"{option}: {str(parent)!r} of {value!r} is not a directory")
    if not parent.is_dir():
        raise SettingError(f"{option}: directory {str(parent)!r} of {value!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise SettingError(f"{option}: directory {str(parent)!r} of {value!r} is not writable")
    return path


# --- session settings -------------------------------------------------------------------


def resolve(
    cli: Callable[[str], object],
    ini: Callable[[str], object],
    *,
    check_report: bool = True,
) -> Settings:
    """Resolve the session's settings; CLI beats ini beats the default.

    ``cli(name)`` and ``ini(name)`` return the raw value or None when not given.
    Raises `pytest.UsageError` on the first bad value.
    """

    def raw(name: str) -> tuple[str, object]:
        value = cli(name)
        if value is not None:
            return f"--procsafe-{name.replace('_', '-')}", value
        value = ini(name)
        if value is not None:
            return f"procsafe_{name} (ini)", value
        return f"procsafe_{name} (default)", DEFAULTS.get(name)

    try:
        leaks = cast(LeakMode, parse_choice(*raw("leaks"), LEAK_MODES))
        methods = parse_methods(*raw("start_methods"))
        timeout = parse_seconds(*raw("timeout"), allow_zero=False)
        grace = parse_seconds(*raw("kill_grace"), allow_zero=True)
        cleanup = parse_choice(*raw("cleanup"), CLEANUP_MODES)
        ignore: list[re.Pattern[str]] = []
        for source in (ini, cli):  # ini patterns and CLI patterns both apply
            value = source("ignore")
            if value is not None:
                name = "--procsafe-ignore" if source is cli else "procsafe_ignore (ini)"
                ignore.extend(parse_patterns(name, value))
        report_name, report_value = raw("report")
        report = None
        if report_value is not None:
            if not isinstance(report_value, str):
                raise SettingError(f"{report_name}: invalid value {report_value!r}")
            report = (
                parse_report(report_name, report_value) if check_report else Path(report_value)
            )
    except SettingError as exc:
        raise pytest.UsageError(f"procsafe: {exc}") from None
    auto = cleanup == "auto"
    if auto:
        cleanup = "kill" if leaks == "fail" else "session"
    return Settings(
        leaks=leaks,
        start_methods=methods,
        timeout=timeout,
        kill_grace=grace,
        cleanup=cast(CleanupMode, cleanup),
        cleanup_auto=auto,
        ignore=tuple(ignore),
        report=report,
    )


def session_settings(config: pytest.Config) -> Settings:
    return config.stash[SETTINGS_KEY]
