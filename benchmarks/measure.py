"""Measuring tools for ``run.py``: running pytest, comparing runs, reporting.

Kept apart from the cases so that each file stays small.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUITES = HERE / "suites"
SRC = HERE.parent  # the package lives at the top level


@dataclasses.dataclass(frozen=True)
class Result:
    case: str
    value: float
    unit: str
    target: str
    met: bool
    detail: str
    #: Whether the suites' runs had bytecode caches (as an installed package does).
    bytecode_cached: bool = True
    #: The 1-minute load average before and after the case (`with_load`).
    load_before: float | None = None
    load_after: float | None = None
    #: Load above the CPU count at either end: not a result to record.
    loaded: bool = False
    #: The base runs of a comparison spread more than `NOISY` (max - min over the
    #: median): something the load average does not show (a neighbour on the host)
    #: disturbed the machine. Not a result to record either.
    noisy: bool = False


#: The spread of a comparison's base runs above which its result is marked noisy.
NOISY = 0.10


def with_load(results: Sequence[Result], before: float, after: float) -> list[Result]:
    """*results* with the machine's load around the case that made them."""
    cpus = os.cpu_count() or 1
    return [
        dataclasses.replace(
            result,
            load_before=round(before, 2),
            load_after=round(after, 2),
            loaded=max(before, after) > cpus,
        )
        for result in results
    ]


# --- running pytest ---------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    """The suites' environment: this checkout's procsafe first, no plugin autoloading
    (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=""`` in *extra* turns it back on)."""
    out = dict(os.environ)
    paths = [str(SUITES), str(SRC), out.get("PYTHONPATH", "")]
    out["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    out["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    # Measure what an installed package costs: with bytecode caches. Without them every
    # run (and every spawn child) compiles procsafe from source, which users never pay.
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    out.update(extra)
    return out


#: The ``pytest`` console script beside this interpreter (how most users start pytest).
SCRIPT = Path(sys.executable).with_name("pytest")


def pytest_cmd(*args: str, script: bool = False) -> list[str]:
    """``python -m pytest ...``, or with *script* the ``pytest`` console script."""
    launcher = [str(SCRIPT)] if script else [sys.executable, "-m", "pytest"]
    return [*launcher, "-q", "-p", "no:cacheprovider", *args]


def instructions(cmd: Sequence[str], cwd: Path) -> int | None:
    """The instructions one run of *cmd* executes (``valgrind --tool=callgrind``, the
    suites' environment); None without valgrind, or when the run or the count failed."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    try:
        done = subprocess.run(
            [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
            check=False,
            cwd=cwd,
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return None
    found = re.search(r"Collected : (\d+)", done.stderr)
    return int(found.group(1)) if done.returncode == 0 and found else None


@dataclasses.dataclass(frozen=True)
class Usage:
    """One run: wall time (s), CPU time (user + system, s) and peak RSS (KiB)."""

    wall: float
    cpu: float
    rss: float


def run(
    cmd: Sequence[str],
    cwd: Path,
    *,
    ok: Sequence[int] = (0,),
    environ: Mapping[str, str] | None = None,
    **extra: str,
) -> Usage:
    """Run *cmd* and measure it (its own rusage, children it waited for included); the
    suites' environment with *environ* and *extra* on top."""
    start = time.perf_counter()
    process = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env(**{**(environ or {}), **extra}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    output = process.stdout.read()
    # wait4 on this very pid: its rusage is this run's alone.
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in ok:
        tail = output.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {process.returncode} in {cwd}:\n{tail}")
    return Usage(wall, usage.ru_utime + usage.ru_stime, float(usage.ru_maxrss))


def abba(count: int) -> Iterator[tuple[str, str]]:
    """base, variant, variant, base, ...: neither side always runs first."""
    for i in range(count):
        yield ("base", "variant") if i % 2 == 0 else ("variant", "base")


@dataclasses.dataclass(frozen=True)
class Pair:
    """Medians of a base and a variant run side by side: wall time and CPU time (s), peak
    RSS (KiB)."""

    base: Usage
    variant: Usage
    samples: dict[str, list[float]]

    @property
    def spread(self) -> float:
        """How far the base runs' wall times spread: (max - min) / median."""
        walls = self.samples["base"]
        return (max(walls) - min(walls)) / statistics.median(walls) if walls else 0.0

    def mark(self, result: Result) -> Result:
        """*result*, marked noisy when this comparison's base runs spread too much."""
        return dataclasses.replace(result, noisy=self.spread > NOISY)


def compare(
    base: Sequence[str],
    variant: Sequence[str],
    cwd: Path,
    repeats: int,
    extra: Mapping[str, str] | None = None,
) -> Pair:
    """Both commands side by side (*extra*: more environment for both)."""
    commands = {"base": base, "variant": variant}
    more = dict(extra or {})
    if repeats > 1:  # --quick only smoke-tests the runner: its numbers are not results
        for cmd in commands.values():
            run(cmd, cwd, environ=more)  # warm the page cache and the bytecode caches
    runs: dict[str, list[Usage]] = {"base": [], "variant": []}
    for order in abba(repeats):
        for key in order:
            runs[key].append(run(commands[key], cwd, environ=more))

    def median(key: str) -> Usage:
        return Usage(
            *(
                statistics.median(getattr(u, field) for u in runs[key])
                for field in ("wall", "cpu", "rss")
            )
        )

    samples = {key: [round(u.wall, 3) for u in values] for key, values in runs.items()}
    return Pair(median("base"), median("variant"), samples)


def at_most(case: str, base: float, variant: float, limit: float, detail: str) -> Result:
    ratio = variant / base
    return Result(case, round(ratio, 3), "x", f"<= {limit}x", ratio <= limit, detail)


def write_trivial_suite(root: Path, count: int) -> None:
    per_file = 500
    for first in range(0, count, per_file):
        body = "".join(
            f"def test_{i}():\n    pass\n\n\n" for i in range(first, min(count, first + per_file))
        )
        (root / f"test_trivial_{first // per_file}.py").write_text(body)
    (root / "pytest.ini").write_text("[pytest]\n")


# --- reporting ----------------------------------------------------------------------------


def log(name: str, samples: dict[str, Any]) -> None:
    print(f"  {name}: {samples}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pytest": version("pytest"),
        "pytest-xdist": version("pytest-xdist"),
        "pytest-procsafe": (SRC / "pytest_procsafe" / "_version.py").read_text().split('"')[1],
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def table(results: Sequence[Result]) -> str:
    rows = [("case", "value", "target", "met", "detail")]
    rows += [
        (
            r.case,
            f"{r.value:g}{r.unit}",
            r.target,
            ("yes" if r.met else "NO")
            + (" (loaded)" if r.loaded else "")
            + (" (noisy)" if r.noisy else ""),
            r.detail,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in rows
    )
