"""One table of malformed option values, shared by every suite that checks they are refused.

Each value is refused with a usage error ``procsafe: <named>: <says>``, where ``<named>`` is
how the option was given (``--procsafe-timeout`` on the command line, ``procsafe_timeout
(ini)`` in an ini file or pyproject.toml). Who checks what:

* the unit tests hand every command-line value to ``_config.resolve`` (parse level);
* the end-to-end tests give the values marked ``e2e`` on a real command line or in a
  real ini file, one pytest subprocess each;
* the hostile tests give every value on the command line and in an ini file (the TOML
  ones in pyproject.toml) and check every part of each refusal.

Relative report paths are resolved in a directory `prepare` has set up.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Final
from typing import NamedTuple
from typing import final

CLI: Final = "cli"
INI: Final = "ini"
TOML: Final = "toml"

_SECONDS: Final = "expected a number of seconds"
_LEAKS: Final = "allowed: fail, warn, off"
_METHODS: Final = "allowed: fork, spawn, forkserver, all"
_CLEANUP: Final = "allowed: auto, kill, session, keep"
_JSON: Final = "expected the path of a JSON file"
#: A file, not a directory: a report path inside it is refused.
A_FILE: Final = "a-file"


@final
class BadValue(NamedTuple):
    """One malformed value of one option, and what its usage error says."""

    id: str
    #: The setting's name, as in ``_config.Settings``: ``kill_grace``.
    option: str
    #: As written after ``=`` on the command line or in an ini file; TOML source for the
    #: values only pyproject.toml can hold.
    value: str
    #: An fnmatch pattern of the whole message after ``"<named>: "``.
    says: str
    #: Where the value can be given.
    forms: tuple[str, ...] = (CLI, INI)
    #: The forms the end-to-end suite also gives it in.
    e2e: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--procsafe-" + self.option.replace("_", "-")

    @property
    def key(self) -> str:
        return "procsafe_" + self.option

    def named(self, form: str) -> str:
        """The option as the message names it."""
        return self.flag if form == CLI else f"{self.key} (ini)"

    def arg(self) -> str:
        """The command-line argument."""
        return f"{self.flag}={self.value}"

    def cli_value(self) -> str | list[str]:
        """The value as the command line's parser hands it on (``--procsafe-ignore``
        appends to a list)."""
        return [self.value] if self.option == "ignore" else self.value

    def ini_line(self) -> str:
        """The line (or lines) of an ini file, or of pyproject.toml's
        ``[tool.pytest.ini_options]`` for a TOML value, that give the value."""
        if self.option == "ignore" and TOML not in self.forms:  # one pattern per line
            return f"{self.key} =\n    {self.value}\n"
        return f"{self.key} = {self.value}\n"

    def message(self, form: str) -> str:
        """An fnmatch pattern of the whole usage error."""
        return f"procsafe: {self.named(form)}: {self.says}"

    def refused_in(self, text: str, form: str, *, before: str = "*") -> bool:
        """Whether a line of *text* is the usage error, after what matches *before* (pytest
        shows it after ``ERROR: ``)."""
        pattern = before + self.message(form)
        return any(fnmatchcase(line, pattern) for line in text.splitlines())


BAD_VALUES: Final = (
    BadValue("leaks-empty", "leaks", "", f"invalid value ''; {_LEAKS}"),
    BadValue("leaks-unknown", "leaks", "loud", f"invalid value 'loud'; {_LEAKS}", e2e=(CLI,)),
    BadValue("leaks-unknown-2", "leaks", "often", f"invalid value 'often'; {_LEAKS}", e2e=(INI,)),
    BadValue("leaks-number", "leaks", "1", f"invalid value '1'; {_LEAKS}"),
    BadValue("leaks-toml-bool", "leaks", "true", f"invalid value *; {_LEAKS}", forms=(TOML,)),
    BadValue("start_methods-empty", "start_methods", "", f"no start method given; {_METHODS}"),
    BadValue(
        "start_methods-unknown",
        "start_methods",
        "threads",
        f"unknown start method 'threads'; {_METHODS}",
        e2e=(CLI,),
    ),
    BadValue(
        "start_methods-unknown-2",
        "start_methods",
        "thread",
        f"unknown start method 'thread'; {_METHODS}",
    ),
    BadValue(
        "start_methods-duplicate",
        "start_methods",
        "fork,fork",
        "start method 'fork' is given twice",
    ),
    BadValue(
        "start_methods-duplicate-spaced",
        "start_methods",
        "fork fork",
        "start method 'fork' is given twice",
        e2e=(INI,),
    ),
    BadValue(
        "start_methods-separators-only",
        "start_methods",
        ", ,",
        f"no start method given; {_METHODS}",
    ),
    BadValue("timeout-empty", "timeout", "", f"invalid value ''; {_SECONDS} > 0", e2e=(INI,)),
    BadValue("timeout-wrong-type", "timeout", "soon", f"invalid value 'soon'; {_SECONDS} > 0"),
    BadValue("timeout-negative", "timeout", "-1", f"invalid value '-1'; {_SECONDS} > 0"),
    BadValue(
        "timeout-negative-2", "timeout", "-3", f"invalid value '-3'; {_SECONDS} > 0", e2e=(CLI,)
    ),
    BadValue("timeout-zero", "timeout", "0", f"invalid value '0'; {_SECONDS} > 0"),
    BadValue("timeout-nan", "timeout", "nan", f"invalid value 'nan'; {_SECONDS} > 0"),
    BadValue(
        "timeout-infinite",
        "timeout",
        "inf",
        "invalid value 'inf'; expected a finite number of seconds > 0",
    ),
    BadValue(
        "timeout-toml-list", "timeout", "[1, 2]", f"invalid value *; {_SECONDS} > 0", forms=(TOML,)
    ),
    BadValue("kill_grace-empty", "kill_grace", "", f"invalid value ''; {_SECONDS} >= 0"),
    BadValue(
        "kill_grace-wrong-type", "kill_grace", "a bit", f"invalid value 'a bit'; {_SECONDS} >= 0"
    ),
    BadValue(
        "kill_grace-wrong-type-2",
        "kill_grace",
        "x",
        f"invalid value 'x'; {_SECONDS} >= 0",
        e2e=(CLI,),
    ),
    BadValue(
        "kill_grace-negative", "kill_grace", "-0.5", f"invalid value '-0.5'; {_SECONDS} >= 0"
    ),
    BadValue("kill_grace-nan", "kill_grace", "nan", f"invalid value 'nan'; {_SECONDS} >= 0"),
    BadValue("cleanup-empty", "cleanup", "", f"invalid value ''; {_CLEANUP}"),
    BadValue(
        "cleanup-unknown", "cleanup", "never", f"invalid value 'never'; {_CLEANUP}", e2e=(CLI,)
    ),
    BadValue("cleanup-unknown-2", "cleanup", "later", f"invalid value 'later'; {_CLEANUP}"),
    BadValue(
        "cleanup-toml-table", "cleanup", "{a = 1}", f"invalid value *; {_CLEANUP}", forms=(TOML,)
    ),
    BadValue(
        "ignore-bad-regex",
        "ignore",
        "(unclosed",
        "invalid regular expression '(unclosed': *",
        e2e=(INI,),
    ),
    BadValue("ignore-bad-regex-2", "ignore", "(", "invalid regular expression '(': *", e2e=(CLI,)),
    # An empty pattern would match every process. An ini file cannot give one: pytest
    # drops the empty lines of a line list.
    BadValue(
        "ignore-empty",
        "ignore",
        "",
        "invalid pattern ''; expected a non-empty regular expression (searched in the "
        "process's command line)",
        forms=(CLI,),
    ),
    BadValue("report-empty", "report", "", f"invalid value ''; {_JSON}"),
    BadValue("report-directory", "report", ".", f"'.' is a directory; {_JSON}"),
    BadValue(
        "report-missing-dir",
        "report",
        "missing/report.json",
        "directory * of 'missing/report.json' does not exist",
    ),
    BadValue(
        "report-missing-dirs",
        "report",
        "missing/dir/r.json",
        "directory * of 'missing/dir/r.json' does not exist",
        e2e=(CLI,),
    ),
    BadValue(
        "report-parent-is-a-file",
        "report",
        f"{A_FILE}/report.json",
        f"* of '{A_FILE}/report.json' is not a directory",
    ),
)


def prepare(directory: Path) -> None:
    """Set *directory* up for the relative report paths: it holds `A_FILE`, a file."""
    (directory / A_FILE).write_text("not a directory\n")


def given(form: str) -> list[BadValue]:
    """The values that can be given in *form*."""
    return [bad for bad in BAD_VALUES if form in bad.forms]
