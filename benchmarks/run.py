"""Benchmarks: what pytest-procsafe costs, against plain pytest and plain multiprocessing.

Usage::

    python benchmarks/run.py            # the full run (about ten minutes on 2 cores)
    python benchmarks/run.py --quick    # a smoke run with small sizes (seconds)
    python benchmarks/run.py --only trivial --only scan

Timings on shared machines are noisy, so every case compares two variants side by side
in the same run, alternating them (ABBA order after a warm-up), and reports the ratio of
their medians. The table is printed and written to ``benchmarks/results.json``
(``--output`` to write elsewhere). The procsafe measured is the one in this checkout's
``src``; the suites run with plugin autoloading off, so other installed plugins weigh on
neither side.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SUITES = HERE / "suites"
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # the scan case imports the checkout's procsafe


@dataclasses.dataclass(frozen=True)
class Result:
    case: str
    value: float
    unit: str
    target: str
    met: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class Sizes:
    trivial: int  # tests in the trivial suite (and the memory case)
    xdist: int  # tests run under -n 2
    repeats: int  # runs of each variant per comparison
    round_trips: int  # worker round trips per variant and start method
    items: int  # items through a queue or pipe per run
    scan_children: int
    scans: int
    hung_timeout: float
    hung_grace: float
    hung_targets: str  # which hanging targets (comma-separated) the hung case runs


FULL = Sizes(
    trivial=5000,
    xdist=500,
    repeats=5,
    round_trips=20,
    items=10_000,
    scan_children=50,
    scans=2000,
    hung_timeout=1.0,
    hung_grace=0.5,
    hung_targets="hang,hang_ignoring_sigterm",
)
QUICK = Sizes(
    trivial=300,
    xdist=20,
    repeats=1,
    round_trips=2,
    items=1000,
    scan_children=50,
    scans=200,
    hung_timeout=0.4,
    hung_grace=0.2,
    hung_targets="hang_ignoring_sigterm",
)


# --- running pytest ---------------------------------------------------------------------


def env(**extra: str) -> dict[str, str]:
    """The suites' environment: this checkout's procsafe first, no plugin autoloading."""
    out = dict(os.environ)
    paths = [str(SUITES), str(SRC), out.get("PYTHONPATH", "")]
    out["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    out["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    # Measure what an installed package costs: with bytecode caches. Without them every
    # run (and every spawn child) compiles procsafe from source, which users never pay.
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    out.update(extra)
    return out


def pytest_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


@dataclasses.dataclass(frozen=True)
class Usage:
    """One run: wall time (s), CPU time (user + system, s) and peak RSS (KiB)."""

    wall: float
    cpu: float
    rss: float


def run(cmd: Sequence[str], cwd: Path, *, ok: Sequence[int] = (0,), **extra: str) -> Usage:
    """Run *cmd* and measure it (its own rusage, children it waited for included)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        cmd, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
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


def compare(base: Sequence[str], variant: Sequence[str], cwd: Path, repeats: int) -> Pair:
    commands = {"base": base, "variant": variant}
    if repeats > 1:  # --quick only smoke-tests the runner: its numbers are not results
        for cmd in commands.values():
            run(cmd, cwd)  # warm the page cache and the bytecode caches
    runs: dict[str, list[Usage]] = {"base": [], "variant": []}
    for order in abba(repeats):
        for key in order:
            runs[key].append(run(commands[key], cwd))

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


# --- the cases ----------------------------------------------------------------------------


def overhead(pair: Pair, count: int) -> str:
    """What the detail column says about a wall-time comparison."""
    base, variant = pair.base, pair.variant
    return (
        f"{variant.wall:.2f}s vs {base.wall:.2f}s without "
        f"(+{(variant.wall - base.wall) / count * 1e6:.0f} us/test); "
        f"CPU {variant.cpu:.2f}s vs {base.cpu:.2f}s ({variant.cpu / base.cpu:.3f}x)"
    )


def bench_trivial(sizes: Sizes, work: Path) -> list[Result]:
    write_trivial_suite(work, sizes.trivial)
    off = pytest_cmd("-p", "no:procsafe")
    results = []
    memory: Pair | None = None
    for mode in ("warn", "fail"):
        pair = compare(
            off, pytest_cmd("-p", "procsafe", f"--procsafe-leaks={mode}"), work, sizes.repeats
        )
        log(f"trivial {mode}", pair.samples)
        memory = memory or pair  # the warn runs: the default mode
        results.append(
            at_most(
                f"{sizes.trivial} trivial tests, leaks={mode}",
                pair.base.wall,
                pair.variant.wall,
                1.03,
                overhead(pair, sizes.trivial),
            )
        )
    assert memory is not None
    base_rss, variant_rss = memory.base.rss, memory.variant.rss
    results.append(
        at_most(
            f"peak memory, {sizes.trivial} tests",
            base_rss,
            variant_rss,
            1.05,
            f"{variant_rss / 1024:.1f} MiB vs {base_rss / 1024:.1f} MiB (maxrss)",
        )
    )
    return results


def bench_xdist(sizes: Sizes, work: Path) -> list[Result]:
    write_trivial_suite(work, sizes.xdist)
    pair = compare(
        pytest_cmd("-p", "xdist", "-n", "2", "-p", "no:procsafe"),
        pytest_cmd("-p", "xdist", "-n", "2", "-p", "procsafe"),
        work,
        sizes.repeats,
    )
    log("xdist", pair.samples)
    return [
        at_most(
            f"{sizes.xdist} tests under -n 2",
            pair.base.wall,
            pair.variant.wall,
            1.05,
            overhead(pair, sizes.xdist),
        )
    ]


def bench_workers(sizes: Sizes, work: Path) -> list[Result]:
    out = work / "samples.json"
    for name in ("bench_targets.py", "test_workers_bench.py"):
        shutil.copy(SUITES / name, work / name)
    (work / "pytest.ini").write_text("[pytest]\n")
    run(
        pytest_cmd("-p", "procsafe", "-x", "test_workers_bench.py"),
        work,
        PROCSAFE_BENCH_OUT=str(out),
        PROCSAFE_BENCH_ROUND_TRIPS=str(sizes.round_trips),
        PROCSAFE_BENCH_ITEMS=str(sizes.items),
        # A channel run takes a fraction of a second: more of them, for a steadier median.
        PROCSAFE_BENCH_REPEATS=str(sizes.repeats * 2 - 1),
    )
    data: dict[str, dict[str, Any]] = json.loads(out.read_text())
    results = []
    for key, entry in sorted(data.items()):
        log(key, {"raw": entry["raw"], "ours": entry["ours"]})
        base, variant = statistics.median(entry["raw"]), statistics.median(entry["ours"])
        if key.startswith("round trip"):
            method = key.rpartition(" ")[2]
            heavy = entry.get("heavy") or []
            detail = f"{variant * 1000:.1f} ms vs {base * 1000:.1f} ms raw"
            if heavy:
                detail += f"; the worker imported {', '.join(heavy)}"
            result = at_most(f"worker round trip, {method}", base, variant, 1.15, detail)
            results.append(dataclasses.replace(result, met=result.met and not heavy))
        else:
            kind, method = key.split()
            throughput = base / variant  # the same number of items: the time ratio inverted
            results.append(
                Result(
                    f"{sizes.items} items through mp_{kind}, {method}",
                    round(throughput, 3),
                    "x",
                    ">= 0.9x",
                    throughput >= 0.9,
                    f"{(sizes.items - 1) / variant:,.0f}/s vs {(sizes.items - 1) / base:,.0f}/s raw",
                )
            )
    return results


def bench_scan(sizes: Sizes, work: Path) -> list[Result]:
    """What one leak check costs while a test has live children: `Tracker.observe`, which
    runs at the end of every test phase, with every child already known (the steady state)."""
    from pytest_procsafe._proctable import ProcTable
    from pytest_procsafe._tracker import Owner
    from pytest_procsafe._tracker import Tracker

    children = [
        subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        for _ in range(sizes.scan_children)
    ]
    tracker = Tracker(ProcTable())
    try:
        owner = Owner("bench", "test")
        first = time.perf_counter()
        tracker.observe(owner, "call")
        first = time.perf_counter() - first
        missing = {child.pid for child in children} - set(tracker.seen)
        if missing:
            raise RuntimeError(f"the scan missed children {sorted(missing)}")
        samples = []
        for _ in range(sizes.scans):
            start = time.perf_counter()
            tracker.observe(owner, "call")
            samples.append(time.perf_counter() - start)
        tracker.take(owner)
    finally:
        tracker.close()
        for child in children:
            child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait()
    per_scan = statistics.median(samples) * 1000
    return [
        Result(
            f"leak scan, {sizes.scan_children} live children",
            round(per_scan, 4),
            "ms",
            "<= 1 ms",
            per_scan <= 1.0,
            f"median of {sizes.scans}; first sight of all {sizes.scan_children}: "
            f"{first * 1000:.2f} ms",
        )
    ]


def bench_hung(sizes: Sizes, work: Path) -> list[Result]:
    out = work / "teardowns.json"
    for name in ("bench_targets.py", "test_hung_bench.py"):
        shutil.copy(SUITES / name, work / name)
    (work / "pytest.ini").write_text("[pytest]\n")
    timeout, grace = sizes.hung_timeout, sizes.hung_grace
    run(
        pytest_cmd(
            "-p",
            "procsafe",
            "-p",
            "bench_timing",
            f"--procsafe-timeout={timeout}",
            f"--procsafe-kill-grace={grace}",
            "test_hung_bench.py",
        ),
        work,
        ok=(1,),  # every test errors in its teardown: that is the behaviour measured
        PROCSAFE_BENCH_OUT=str(out),
        PROCSAFE_BENCH_HUNG=sizes.hung_targets,
    )
    teardowns: dict[str, dict[str, Any]] = json.loads(out.read_text())
    for nodeid, entry in teardowns.items():
        if entry["outcome"] != "failed" or "was still running after" not in entry["text"]:
            raise RuntimeError(f"{nodeid}: procsafe did not report the hang:\n{entry['text']}")
    log("hung", {k: [round(v["seconds"], 3)] for k, v in teardowns.items()})
    slowest = max(teardowns, key=lambda k: teardowns[k]["seconds"])
    worst = teardowns[slowest]["seconds"]
    bound = timeout + grace + 0.5
    return [
        Result(
            "hung worker, test end to teardown done",
            round(worst, 3),
            "s",
            f"<= {timeout:g} + {grace:g} + 0.5 = {bound:g} s",
            worst <= bound,
            f"slowest of {len(teardowns)}: {slowest.partition('::')[2]}",
        )
    ]


CASES: dict[str, Callable[[Sizes, Path], list[Result]]] = {
    "trivial": bench_trivial,
    "xdist": bench_xdist,
    "workers": bench_workers,
    "scan": bench_scan,
    "hung": bench_hung,
}


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
        (r.case, f"{r.value:g}{r.unit}", r.target, "yes" if r.met else "NO", r.detail)
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True))
        + "  "
        + row[4]
        for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes, one repeat")
    parser.add_argument(
        "--only", action="append", choices=sorted(CASES), help="Run only this case (repeatable)"
    )
    parser.add_argument(
        "--repeats", type=int, help="Runs of each variant per comparison (default: 5, quick: 1)"
    )
    parser.add_argument(
        "--output", type=Path, default=HERE / "results.json", help="Where to write the JSON"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    results: list[Result] = []
    host = machine()  # the load average before the run
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="procsafe-bench-") as tmp:
        for name in args.only or list(CASES):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            work = Path(tmp) / name
            work.mkdir()
            results.extend(CASES[name](sizes, work))
    print(table(results))
    missed = [r.case for r in results if not r.met]
    payload = {
        "machine": {**host, "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "sizes": dataclasses.asdict(sizes),
        "results": [dataclasses.asdict(r) for r in results],
        "missed": missed,
    }
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"{len(results) - len(missed)} of {len(results)} targets met; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
