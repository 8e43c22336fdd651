"""The tutorial stays true: its code is the examples' code, its output a real run's.

The tutorial shows its code inline (so it reads on the repository's web view too); each
block follows a ``<!-- example: PATH (REGION) -->`` comment and must equal that region of
the example file. Each console block after a ``<!-- checked: ... -->`` comment is run, as
its ``$`` line says, from a copy of the repository's layout, and its lines must appear in
the real output in order ("..." stands for lines left out; pids, paths and times vary).
"""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest

from e2ekit import run
from pytest_procsafe import _proctable
from survivors import no_survivors

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "tutorial" / "index.md"

_EXAMPLE = re.compile(
    r"<!-- example: (?P<path>\S+) \((?P<region>[^)]+)\) -->\n\n```python\n(?P<code>.*?)```",
    re.DOTALL,
)
_CHECKED = re.compile(
    r"<!-- checked:[^>]*-->\n\n```console\n\$ (?P<command>[^\n]+)\n(?P<output>.*?)```", re.DOTALL
)


def region(path: Path, name: str) -> str:
    source = path.read_text(encoding="utf-8")
    if name.startswith("def "):
        tree = ast.parse(source)
        node = next(n for n in tree.body if getattr(n, "name", None) == name[4:])
        assert isinstance(node, (ast.FunctionDef, ast.ClassDef))
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        return "\n".join(source.splitlines()[first - 1 : node.end_lineno])
    lines = source.splitlines()
    start = lines.index(f"# start: {name}")
    end = lines.index(f"# end: {name}")
    return textwrap.dedent("\n".join(lines[start + 1 : end])).strip("\n")


EXAMPLES = [m.groupdict() for m in _EXAMPLE.finditer(TUTORIAL.read_text(encoding="utf-8"))]
CHECKED = [m.groupdict() for m in _CHECKED.finditer(TUTORIAL.read_text(encoding="utf-8"))]


def test_the_tutorial_has_code_and_checked_output() -> None:
    assert len(EXAMPLES) >= 5
    assert len(CHECKED) >= 3
    assert "literalinclude" not in TUTORIAL.read_text(encoding="utf-8")


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"{b['path']}:{b['region']}" for b in EXAMPLES])
def test_each_code_block_is_the_examples_code(block: dict[str, str]) -> None:
    assert block["code"].rstrip("\n") == region(ROOT / block["path"], block["region"])


def pattern(line: str) -> str:
    """A sample line as an fnmatch pattern: what varies between runs is a wildcard."""
    text = re.sub(r"[\[\]]", lambda m: "[[]" if m.group(0) == "[" else "[]]", line)
    text = re.sub(r"\bpid \d+", "pid *", text)
    text = text.replace("/path/to/.venv/bin/python3", "*").replace("/path/to/", "*")
    text = re.sub(r"in \d+\.\d+s\b", "in *s", text)
    return re.sub(r"\d+(?=%)", "*", text)


@pytest.mark.skipif(not _proctable.LINUX, reason="the sample output is Linux's")
@pytest.mark.parametrize("block", CHECKED, ids=[b["command"] for b in CHECKED])
def test_each_sample_output_is_what_a_real_run_prints(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, block: dict[str, str]
) -> None:
    shutil.copytree(
        ROOT / "examples",
        pytester.path / "examples",
        ignore=shutil.ignore_patterns("__pycache__", ".coverage", ".coverage.*"),
    )
    argv = shlex.split(block["command"])
    assert argv[0] == "pytest"
    with no_survivors(monkeypatch):
        result = run(pytester, *argv[1:])
    expected = [pattern(line) for line in block["output"].splitlines() if line.strip() != "..."]
    result.stdout.fnmatch_lines(expected)
