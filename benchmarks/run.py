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
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from measure import HERE
from measure import SRC
from measure import SUITES
from measure import Pair
from measure import Result
from measure import abba
from measure import at_most
from measure import compare
from measure import env
from measure import instructions
from measure import log
from measure import machine
from measure import pytest_cmd
from measure import run
from measure import table
from measure import with_load
from measure import write_trivial_suite

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # the scan case imports the checkout's procsafe


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
    starts: int  # process starts of each variant, per start method, in the pickling case
    interpreters: int  # fresh interpreters per case that starts them (guardian, dumps)
    guardian_idle: float  # seconds each of them leaves its guardian idle
    count_instructions: bool  # the fixed case also counts instructions (valgrind, if any)


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
    starts=60,
    interpreters=20,
    guardian_idle=2.0,
    count_instructions=True,
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
    starts=3,
    interpreters=2,
    guardian_idle=0.2,
    count_instructions=False,
)


# --- the cases ----------------------------------------------------------------------------


def overhead(pair: Pair, count: int) -> str:
    """What the detail column says about a wall-time comparison."""
    base, variant = pair.base, pair.variant
    return (
        f"{variant.wall:.2f}s vs {base.wall:.2f}s without "
        f"(+{(variant.wall - base.wall) / count * 1e6:.0f} us/test); "
        f"CPU {variant.cpu:.2f}s vs {base.cpu:.2f}s ({variant.cpu / base.cpu:.3f}x); "
        f"base runs spread {pair.spread:.0%}"
    )


def _autoloaded() -> list[str]:
    """The pytest plugins installed here that a user's run would load (procsafe aside)."""
    from importlib import metadata

    names = {
        entry.dist.name if entry.dist is not None else entry.name
        for entry in metadata.entry_points(group="pytest11")
    }
    return sorted(name for name in names if name.lower() != "pytest-procsafe")


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
            pair.mark(
                at_most(
                    f"{sizes.trivial} trivial tests, leaks={mode}",
                    pair.base.wall,
                    pair.variant.wall,
                    1.03,
                    overhead(pair, sizes.trivial),
                )
            )
        )
    # As users run it: the plugins they have installed load too (pytest-xdist, pytest-cov,
    # pytest-timeout with this project's test extra), and procsafe through its entry point.
    plugins = _autoloaded()
    pair = compare(
        off,
        pytest_cmd("--procsafe-leaks=warn"),
        work,
        sizes.repeats,
        {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": ""},
    )
    log("trivial warn, autoloaded plugins", pair.samples)
    results.append(
        pair.mark(
            at_most(
                f"{sizes.trivial} trivial tests, leaks=warn, autoloaded plugins",
                pair.base.wall,
                pair.variant.wall,
                1.03,
                f"{overhead(pair, sizes.trivial)}; plugins: {', '.join(plugins) or 'none'}",
            )
        )
    )
    # As some CI machines run it: no bytecode written or read (an empty cache prefix).
    prefix = work / "no-pycache"
    prefix.mkdir()
    pair = compare(
        off,
        pytest_cmd("-p", "procsafe", "--procsafe-leaks=warn"),
        work,
        sizes.repeats,
        {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(prefix)},
    )
    log("trivial warn, no bytecode cache", pair.samples)
    result = at_most(
        f"{sizes.trivial} trivial tests, leaks=warn, no bytecode cache",
        pair.base.wall,
        pair.variant.wall,
        1.03,
        overhead(pair, sizes.trivial),
    )
    results.append(dataclasses.replace(pair.mark(result), bytecode_cached=False))
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


def bench_hooks(sizes: Sizes, work: Path) -> list[Result]:
    """The per-test half of the trivial suite's figure, apart from the fixed half: the
    bodies of procsafe's per-test hook implementations, timed inside real runs (between
    pytest's own work, with the caches as cold as a run leaves them), the timer's own
    cost taken off. Machine noise slows both a run and what it times, so this moves far
    less than a difference of two whole runs."""
    write_trivial_suite(work, sizes.trivial)
    out = work / "hooks.json"
    results = []
    for mode in ("warn", "fail"):
        per_test: list[float] = []
        parts: dict[str, list[float]] = {}
        for _ in range(max(1, (sizes.repeats + 1) // 2)):
            run(
                pytest_cmd("-p", "bench_hooktime", "-p", "procsafe", f"--procsafe-leaks={mode}"),
                work,
                PROCSAFE_BENCH_OUT=str(out),
            )
            data = json.loads(out.read_text())
            calls, spent = data["empty"]
            timer = spent / calls if calls else 0.0
            tests = max(1, int(data["tests"]))
            total = 0.0
            for name, (count, ns) in data["hooks"].items():
                cost = max(0.0, ns - count * timer) / tests / 1000
                parts.setdefault(name.split(".", 1)[1], []).append(cost)
                total += cost
            per_test.append(total)
        log(f"hooks {mode}", {"per_test_us": [round(x, 2) for x in per_test]})
        value = statistics.median(per_test)
        detail = ", ".join(
            f"{name.removeprefix('pytest_runtest_')} {statistics.median(costs):.1f}"
            for name, costs in sorted(parts.items())
        )
        results.append(
            Result(
                f"procsafe's hooks per clean test, leaks={mode}",
                round(value, 2),
                "us",
                "<= 8 us",
                value <= 8,
                f"median of {len(per_test)} runs of {sizes.trivial} trivial tests, timed "
                f"inside each; us per test: {detail} (pluggy's own call of each of the "
                f"five implementations comes on top)",
            )
        )
    return results


def bench_fixed(sizes: Sizes, work: Path) -> list[Result]:
    """The fixed half: what procsafe adds to a pytest process that runs one test (its
    import, its configuration, its end), leak checks on. The base runs load a plugin that
    does nothing through ``-p`` as well: pytest's own lookup of a ``-p`` name, the same for
    any plugin, is not procsafe's."""
    (work / "test_one.py").write_text("def test_one():\n    pass\n")
    (work / "pytest.ini").write_text("[pytest]\n")
    base_cmd = pytest_cmd("-p", "no:procsafe", "-p", "bench_noop", "test_one.py")
    variant_cmd = pytest_cmd("-p", "procsafe", "--procsafe-leaks=warn", "test_one.py")
    pair = compare(base_cmd, variant_cmd, work, sizes.repeats * 3)
    log("fixed", pair.samples)
    extra = (pair.variant.wall - pair.base.wall) * 1000
    cpu = (pair.variant.cpu - pair.base.cpu) * 1000
    detail = (
        f"a one-test run: {pair.variant.wall * 1000:.0f} ms vs {pair.base.wall * 1000:.0f} ms "
        f"without (CPU +{cpu:.0f} ms), medians of {sizes.repeats * 3}; base runs spread "
        f"{pair.spread:.0%}"
    )
    if sizes.count_instructions:
        # What no other guest of the host moves: the instructions of one run of each.
        counted = [instructions(cmd, work) for cmd in (base_cmd, variant_cmd)]
        if None not in counted:
            base_count, variant_count = (count / 1e6 for count in counted if count is not None)
            log("fixed instructions", {"base": [base_count], "procsafe": [variant_count]})
            detail += (
                f"; instructions (callgrind): {variant_count:.1f} M vs {base_count:.1f} M "
                f"without, +{variant_count - base_count:.1f} M"
            )
    result = Result(
        "procsafe's fixed cost per pytest process, leaks=warn",
        round(extra, 1),
        "ms",
        "<= 10 ms",
        extra <= 10,
        detail,
    )
    return [pair.mark(result)]


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
        pair.mark(
            at_most(
                f"{sizes.xdist} tests under -n 2",
                pair.base.wall,
                pair.variant.wall,
                1.05,
                overhead(pair, sizes.xdist),
            )
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
        PROCSAFE_BENCH_REPEATS=str(sizes.repeats * 3),
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
        elif key.startswith("pipe-waiting"):
            method = key.rpartition(" ")[2]
            items = entry["reads"]
            results.append(
                Result(
                    f"mp_pipe reads of waiting items, {method}",
                    round(base / variant, 3),
                    "x",
                    f">= {PIPE_FLOOR}x",
                    base / variant >= PIPE_FLOOR,
                    f"{variant / items * 1e6:.2f} us vs {base / items * 1e6:.2f} us raw per recv()",
                )
            )
        else:
            kind, method = key.split()
            throughput = base / variant  # the same number of items: the time ratio inverted
            floor = PIPE_FLOOR if kind == "pipe" else QUEUE_FLOOR
            results.append(
                Result(
                    f"{sizes.items} items through mp_{kind}, {method}",
                    round(throughput, 3),
                    "x",
                    f">= {floor}x",
                    throughput >= floor,
                    f"{(sizes.items - 1) / variant:,.0f}/s vs {(sizes.items - 1) / base:,.0f}/s raw",
                )
            )
    return results


#: Throughput floors against raw multiprocessing: a pipe's read is one ``recv`` either way
#: (procsafe's makes the same system calls when the item is there, and one ``poll`` more
#: when it must wait), a queue's ``get`` already does more than one system call.
PIPE_FLOOR = 0.95
QUEUE_FLOOR = 0.9


def bench_launchers(sizes: Sizes, work: Path) -> list[Result]:
    """A spawn worker's round trip under the ``pytest`` script and ``python -m pytest``."""
    for name in ("bench_targets.py", "test_workers_bench.py"):
        shutil.copy(SUITES / name, work / name)
    (work / "pytest.ini").write_text("[pytest]\n")
    medians: dict[str, float] = {}
    for label, script in (("pytest", True), ("python -m pytest", False)):
        out = work / f"launch-{script}.json"
        run(
            pytest_cmd(
                "-p",
                "procsafe",
                "--procsafe-start-methods=spawn",
                "-k",
                "round_trip",
                script=script,
            ),
            work,
            PROCSAFE_BENCH_OUT=str(out),
            PROCSAFE_BENCH_ROUND_TRIPS=str(sizes.round_trips),
        )
        entry = json.loads(out.read_text())["round trip spawn"]
        log(f"round trip spawn under {label}", entry)
        medians[label] = statistics.median(entry["ours"])
    script_time, module_time = medians["pytest"], medians["python -m pytest"]
    return [
        at_most(
            "spawn worker round trip, pytest script vs python -m pytest",
            module_time,
            script_time,
            1.10,
            f"{script_time * 1000:.1f} ms under pytest vs {module_time * 1000:.1f} ms "
            "under python -m pytest",
        )
    ]


def bench_scan(sizes: Sizes, work: Path) -> list[Result]:
    """What one leak check costs while a test has live children: `Tracker.observe`, which
    runs at the end of every test phase, with every child already known (the steady state)."""
    from pytest_procsafe._ledger import Owner
    from pytest_procsafe._proctable import ProcTable
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
        steady = []
        for _ in range(sizes.scans):
            tracker._walked = None  # as after a birth anywhere: the tree is walked
            start = time.perf_counter()
            tracker.observe(owner, "call")
            samples.append(time.perf_counter() - start)
            start = time.perf_counter()
            tracker.observe(owner, "call")  # nothing born since: no walk
            steady.append(time.perf_counter() - start)
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
            f"median of {sizes.scans}, each a walk of the tree (a pid was handed out "
            f"since the last); with none handed out: {statistics.median(steady) * 1000:.4f} "
            f"ms; first sight of all {sizes.scan_children}: {first * 1000:.2f} ms",
        )
    ]


def bench_holders(sizes: Sizes, work: Path) -> list[Result]:
    """What the held check costs when a test leaves a candidate, in a process with 200,000
    live objects: the walk of the Python objects plus the referrer walk (`_holders`), and
    what noting where a child was born costs at each start (`_births.where`)."""
    import types

    from pytest_procsafe import _births
    from pytest_procsafe import _holders

    objects = [[index] for index in range(200_000)]  # gc-tracked, like a real suite's
    module = types.ModuleType("bench_holder_module")
    sys.modules[module.__name__] = module
    held = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    loose = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    module.SERVER = held  # type: ignore[attr-defined]
    try:
        samples = []
        for _ in range(max(3, sizes.repeats)):
            start = time.perf_counter()
            found = _holders.objects()
            names = _holders.holders({pid: found.processes[pid] for pid in (held.pid, loose.pid)})
            samples.append(time.perf_counter() - start)
        if names != {held.pid: "bench_holder_module.SERVER"}:
            raise RuntimeError(f"the holder walk found {names}")
        births = []
        for _ in range(2000):
            start = time.perf_counter()
            _births.where()
            births.append(time.perf_counter() - start)
    finally:
        del sys.modules[module.__name__]
        for child in (held, loose):
            child.kill()
            child.wait()
    live = len(objects)
    per_check = statistics.median(samples) * 1000
    per_birth = statistics.median(births) * 1e6
    return [
        Result(
            f"held check, one candidate, {live:,} live objects",
            round(per_check, 2),
            "ms",
            "<= 50 ms",
            per_check <= 50,
            f"median of {len(samples)}: object walk + referrer walk",
        ),
        Result(
            "where a child was born, per start",
            round(per_birth, 2),
            "us",
            "<= 20 us",
            per_birth <= 20,
            "median of 2000 `_births.where()` from the benchmark's own stack",
        ),
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


def _start_and_join(method: str) -> float:
    """Seconds for ``Process.start()`` + ``join()`` of a module-level target."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    process = context.Process(target=time.sleep, args=(0,))  # type: ignore[attr-defined]
    began = time.perf_counter()
    process.start()
    process.join(60)
    took = time.perf_counter() - began
    if process.exitcode != 0:
        raise RuntimeError(f"{method}: the child exited with {process.exitcode}")
    return took


class _NoLaunch:
    """A launch that starts no child: what is left of ``start()`` is Python bookkeeping and
    procsafe's wrapper around it."""

    pid = 1
    sentinel = -1
    returncode = 0

    def __init__(self, process: object) -> None:
        pass

    def poll(self, flag: int = 0) -> int:
        return 0  # so multiprocessing forgets it at the next start


def _wrapper_cost(blocks: int, per_block: int = 1000) -> tuple[float, float]:
    """Median microseconds of one ``start()`` that launches nothing, bare and wrapped."""
    from multiprocessing import process

    from pytest_procsafe import _births

    class Unlaunched(process.BaseProcess):
        _Popen = staticmethod(_NoLaunch)

    samples: dict[str, list[float]] = {"base": [], "variant": []}
    for order in abba(blocks):
        for key in order:
            undo = _births.listen(lambda pid, where, direct: None) if key == "variant" else None
            try:
                unstarted = [Unlaunched(target=time.sleep, args=(0,)) for _ in range(per_block)]
                began = time.perf_counter()
                for one in unstarted:
                    one.start()
                samples[key].append((time.perf_counter() - began) / per_block * 1e6)
            finally:
                if undo is not None:
                    undo()
    return statistics.median(samples["base"]), statistics.median(samples["variant"])


def bench_pickling(sizes: Sizes, work: Path) -> list[Result]:
    """What a start that pickles fine pays for the notes on starts that fail to: a
    ``Process.start()`` + ``join()`` of a module-level target with procsafe's start wrapper
    (`_births`, which also explains a failure to pickle) against the bare start, alternating,
    per start method. A start that pickles must not even import `_pickling`."""
    import multiprocessing

    from pytest_procsafe import _births

    results = []
    for method in multiprocessing.get_all_start_methods():
        for _ in range(3):  # warm up: the forkserver, the resource tracker, the caches
            _start_and_join(method)
        samples: dict[str, list[float]] = {"base": [], "variant": []}
        for order in abba(sizes.starts):
            for key in order:
                undo = None
                if key == "variant":
                    undo = _births.listen(lambda pid, where, direct: None)
                try:
                    samples[key].append(_start_and_join(method))
                finally:
                    if undo is not None:
                        undo()
        shown = {key: [round(v * 1000, 2) for v in values] for key, values in samples.items()}
        log(f"start + join, {method} (ms)", shown)
        base, variant = statistics.median(samples["base"]), statistics.median(samples["variant"])
        results.append(
            at_most(
                f"picklable start + join, {method}",
                base,
                variant,
                1.05,
                f"{variant * 1000:.2f} ms vs {base * 1000:.2f} ms bare "
                f"({(variant - base) * 1e6:+.0f} us), medians of {sizes.starts}",
            )
        )
    bare, wrapped = _wrapper_cost(max(4, sizes.starts // 2))
    results.append(
        Result(
            "start wrapper, per start",
            round(wrapped - bare, 2),
            "us",
            "<= 20 us",
            wrapped - bare <= 20,
            f"{wrapped:.2f} us vs {bare:.2f} us bare: start() with a launch that starts "
            "no child, medians of 1000-start blocks",
        )
    )
    if "pytest_procsafe._pickling" in sys.modules:
        raise RuntimeError("a start that pickled fine imported _pickling")
    return results


# One fresh interpreter per sample: the guardian is started once per pytest process.
_GUARDIAN_SAMPLE = """
import json, os, sys, time
from pytest_procsafe import _guardlink
start = time.perf_counter()
guardian = _guardlink.acquire(grace=2.0, keep=False)
started = time.perf_counter() - start
assert guardian is not None
time.sleep(float(sys.argv[1]))  # past its own start-up: from here on it only waits
with open(f"/proc/{guardian.pid}/stat", "rb") as file:
    fields = file.read().rsplit(b")", 1)[1].split()
before = int(fields[11]) + int(fields[12])
time.sleep(float(sys.argv[2]))
with open(f"/proc/{guardian.pid}/stat", "rb") as file:
    fields = file.read().rsplit(b")", 1)[1].split()
idle = int(fields[11]) + int(fields[12]) - before
start = time.perf_counter()
_guardlink.release(guardian, done=True)
done = time.perf_counter() - start
print(json.dumps({"start": started, "done": done, "idle_ticks": idle}))
"""


# What a spawn or forkserver child does with the stack-dump handler's rider: import the
# module (multiprocessing is already imported there, and the package is, for the module
# map's rider that every procsafe child gets), install the handler.
_DUMPS_SAMPLE = """
import multiprocessing.spawn, sys, time
start = time.perf_counter()
import pytest_procsafe._imports  # the module map's rider, unpickled first in every child
package = time.perf_counter()
from pytest_procsafe import _dumps
imported = time.perf_counter()
assert _dumps.install_here(sys.argv[1])
done = time.perf_counter()
print(package - start, imported - package, done - imported)
"""


def bench_dumps(sizes: Sizes, work: Path) -> list[Result]:
    """What the stack-dump handler costs each child at its start: in fresh interpreters
    (as a spawn or forkserver child is), importing `_dumps` and installing the handler;
    a fork child only installs it."""
    if not hasattr(signal, "SIGRTMIN"):
        return []
    packages, imports, installs = [], [], []
    for _ in range(sizes.interpreters):
        out = subprocess.run(
            [sys.executable, "-c", _DUMPS_SAMPLE, str(work)],
            cwd=work,
            env=env(),
            capture_output=True,
            text=True,
            check=True,
        )
        package, imported, installed = (float(x) * 1000 for x in out.stdout.split())
        packages.append(package)
        imports.append(imported)
        installs.append(installed)
    log("dumps", {"package_ms": packages, "import_ms": imports, "install_ms": installs})
    total = statistics.median(a + b for a, b in zip(imports, installs, strict=True))
    return [
        Result(
            "stack-dump handler, per child start",
            round(total, 3),
            "ms",
            "<= 1 ms",
            total <= 1.0,
            f"median of {len(imports)} fresh interpreters: importing _dumps "
            f"{statistics.median(imports):.3f} ms and installing the handler "
            f"{statistics.median(installs):.3f} ms (a fork child: the install only), "
            f"beyond what the module map's rider imports first in every procsafe "
            f"spawn/forkserver child (the package, `_imports`, `_spawnhook`): "
            f"{statistics.median(packages):.3f} ms",
        )
    ]


def bench_guardian(sizes: Sizes, work: Path) -> list[Result]:
    """What the guardian costs the pytest process: its start (once per process), telling it
    "done" at the end (it exits, and is reaped), and the CPU it uses while it waits."""
    if not sys.platform.startswith("linux"):
        return []
    samples = []
    for _ in range(sizes.interpreters):
        done = subprocess.run(
            [sys.executable, "-c", _GUARDIAN_SAMPLE, "0.3", str(sizes.guardian_idle)],
            cwd=work,
            env=env(),
            capture_output=True,
            text=True,
            check=True,
        )
        samples.append(json.loads(done.stdout))
    starts = [sample["start"] * 1000 for sample in samples]
    dones = [sample["done"] * 1000 for sample in samples]
    ticks = sum(sample["idle_ticks"] for sample in samples)
    idle = sizes.guardian_idle * len(samples)
    log(
        "guardian",
        {"start ms": [round(v, 2) for v in starts], "done ms": [round(v, 2) for v in dones]},
    )
    start, finish = statistics.median(starts), statistics.median(dones)
    return [
        Result(
            "guardian start, in the pytest process",
            round(start, 2),
            "ms",
            "<= 5 ms, and no CPU while idle",
            start <= 5.0 and ticks == 0,
            f"median of {len(samples)}, max {max(starts):.2f} ms; idle: {ticks} clock "
            f"ticks of CPU in {idle:g} s",
        ),
        Result(
            "guardian done, at pytest's exit",
            round(finish, 2),
            "ms",
            "<= 5 ms",
            finish <= 5.0,
            f"median of {len(samples)}, max {max(dones):.2f} ms (it exits and is reaped)",
        ),
    ]


CASES: dict[str, Callable[[Sizes, Path], list[Result]]] = {
    "trivial": bench_trivial,
    "hooks": bench_hooks,
    "fixed": bench_fixed,
    "xdist": bench_xdist,
    "workers": bench_workers,
    "launchers": bench_launchers,
    "scan": bench_scan,
    "holders": bench_holders,
    "hung": bench_hung,
    "pickling": bench_pickling,
    "guardian": bench_guardian,
    "dumps": bench_dumps,
}


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
            before = os.getloadavg()[0]
            made = CASES[name](sizes, work)
            results.extend(with_load(made, before, os.getloadavg()[0]))
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
