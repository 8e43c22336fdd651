"""Who owns a survivor: the holder, the fixture, or the test that really leaked it.

One inner suite has every kind of long-lived process real suites keep on purpose (a pool
made at import and started lazily in a test, a lazily cached pool, a reusable
module-global executor that tests replace and finally shut down), a sloppy module
fixture finalizer, a ``setUpClass`` that leaves a process behind, and one real ``Popen``
leak. Only the real leaks may be reported where they happened; the held pools once, at
the session's end, with their holder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2ekit import run
from pytest_procsafe import _proctable
from survivors import no_survivors

pytestmark = pytest.mark.skipif(not _proctable.LINUX, reason="the leak checks' fullest form")

REUSE = """
import concurrent.futures
import multiprocessing

_executor = None
_workers = None


def get_reusable_executor(workers):
    # Like loky's: one module-global executor, replaced when the options change (the old
    # one shuts down in the background), kept across tests on purpose.
    global _executor, _workers
    if _executor is None or _workers != workers:
        if _executor is not None:
            _executor.shutdown(wait=False)
        context = multiprocessing.get_context("fork")
        _executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
        _workers = workers
    return _executor


def shutdown():
    global _executor
    if _executor is not None:
        _executor.shutdown(wait=True)
        _executor = None
"""

POOLS = """
import multiprocessing
import os
import subprocess
import sys
import unittest

import pytest

import reuse

CONTEXT = multiprocessing.get_context("fork")
SLEEP = [sys.executable, "-c", f"import time; time.sleep({os.environ.get('E2E_SLEEP', 60)})"]


def square(x):
    return x * x


class LazyPool:
    # Like pebble's @concurrent.process(pool=ProcessPool(1)): made at import, its worker
    # starts inside the first test that uses it and serves the whole session.
    def __init__(self):
        self._pool = None

    def apply(self, function, *args):
        if self._pool is None:
            self._pool = CONTEXT.Pool(1)
        return self._pool.apply(function, args)


WORKERS = LazyPool()
CACHE = {}


def cached_pool():
    if "pool" not in CACHE:
        CACHE["pool"] = CONTEXT.Pool(1)
    return CACHE["pool"]


@pytest.fixture(scope="module")
def sloppy():
    yield
    subprocess.Popen(SLEEP)  # started by the finalizer and left running


def test_module_pool_first():
    assert WORKERS.apply(square, 3) == 9


def test_module_pool_again():
    assert WORKERS.apply(square, 4) == 16


def test_cached_pool():
    assert cached_pool().apply(square, (5,)) == 25


def test_executor_one():
    assert reuse.get_reusable_executor(1).submit(square, 2).result() == 4


def test_executor_replaced():
    assert reuse.get_reusable_executor(2).submit(square, 3).result() == 9


def test_executor_shut_down():
    reuse.get_reusable_executor(2).submit(square, 1).result()
    reuse.shutdown()


def test_popen_leak():
    subprocess.Popen(SLEEP)


def test_uses_sloppy(sloppy):
    pass


class TestLeakyClass(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        subprocess.Popen(SLEEP)

    def test_inside(self):
        pass
"""

FAILING = """
import multiprocessing


def square(x):
    return x * x


def test_fails_holding_a_pool():
    pool = multiprocessing.get_context("fork").Pool(1)
    assert pool.apply(square, (2,)) == 5
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(reuse=REUSE, test_pools=POOLS)
    return pytester


def line_of(path: Path, text: str, after: str = "") -> int:
    """The number of the first line of *path* holding *text* (below one holding *after*)."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after else 0
    return next(i for i, line in enumerate(lines) if i >= start and text in line) + 1


def _records(path: Path) -> list[dict[str, object]]:
    data = json.loads(path.read_text())
    assert data["version"] == 1
    for record in data["leaks"]:
        assert {"held_by", "created_at", "stack", "name"} <= set(record), record
    return list(data["leaks"])


def test_fail_mode_errors_only_the_real_leak(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = suite.path / "leaks.json"
    with no_survivors(monkeypatch):
        result = run(suite, "--procsafe-leaks=fail", f"--procsafe-report={report}", "-rA")
    # The pools' and executors' tests pass; only the Popen test errors. The fixture's
    # and setUpClass's leaks fail the run, not the test whose teardown ran them.
    result.assert_outcomes(passed=9, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_popen_leak*"])
    by_owner: dict[str, list[dict[str, object]]] = {}
    for record in _records(report):
        by_owner.setdefault(str(record["owner"]), []).append(record)
    assert set(by_owner) == {
        "test_pools.py::test_popen_leak",
        "fixture sloppy",
        "fixture TestLeakyClass.setUpClass",
        "session",
    }, by_owner
    (popen,) = by_owner["test_pools.py::test_popen_leak"]
    source = suite.path / "test_pools.py"
    popen_line = line_of(source, "subprocess.Popen(SLEEP)", after="def test_popen_leak")
    assert popen["created_at"] == f"test_pools.py:{popen_line}"
    assert popen["held_by"] is None
    held = sorted(str(record["held_by"]) for record in by_owner["session"])
    # One worker of each pool still running at the end, each named by its holder; the
    # executors that were replaced or shut down are not reported at all.
    assert held == ["test_pools.CACHE['pool']", "test_pools.WORKERS"], by_owner["session"]
    for record in by_owner["session"]:
        assert str(record["name"]).startswith("ForkPoolWorker-")
        assert str(record["name"]).endswith(" of a multiprocessing.pool.Pool")
    result.stdout.fnmatch_lines(["*held by test_pools.WORKERS*"])


def test_warn_mode_changes_no_outcome_and_points_at_the_holders(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as short:
        short.setenv("E2E_SLEEP", "0")  # without procsafe nothing stops what leaks
        plain = run(suite, "-p", "no:procsafe", options=())
    with no_survivors(monkeypatch):
        result = run(suite, "--procsafe-leaks=warn")
    plain.assert_outcomes(passed=9)
    result.assert_outcomes(passed=9, warnings=4)
    assert result.ret == pytest.ExitCode.OK
    source = suite.path / "test_pools.py"
    where = {
        "test": line_of(source, "def test_popen_leak"),
        "fixture": line_of(source, '@pytest.fixture(scope="module")'),  # its decorator
        "class": line_of(source, "@classmethod"),
        "holder": line_of(source, "WORKERS = LazyPool()"),
    }
    result.stdout.fnmatch_lines_random(
        [
            f"*test_pools.py:{where['test']}: ProcessLeakWarning: procsafe: "
            "test_pools.py::test_popen_leak left 1 process behind*",
            f"*test_pools.py:{where['fixture']}: ProcessLeakWarning: procsafe: "
            "fixture sloppy left 1 process behind*",
            f"*test_pools.py:{where['class']}: ProcessLeakWarning: procsafe: "
            "fixture TestLeakyClass.setUpClass left 1 process behind*",
            f"*test_pools.py:{where['holder']}: ProcessLeakWarning: procsafe: "
            "session left 2 processes behind*",
        ]
    )


def test_a_test_that_fails_while_holding_a_pool_still_leaked_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_failing=FAILING)
    with no_survivors(monkeypatch):
        result = run(pytester, "--procsafe-leaks=fail")
    result.assert_outcomes(failed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*test_failing.py::test_fails_holding_a_pool left 1 process behind*"]
    )


ORDERINGS = """
import os
import subprocess
import sys

import pytest

SLEEP = [sys.executable, "-c", f"import time; time.sleep({os.environ.get('E2E_SLEEP', 60)})"]


@pytest.fixture(scope="session")
def base():
    subprocess.Popen(SLEEP)  # base's setup
    yield
    subprocess.Popen(SLEEP)  # base's teardown, at the session's end


@pytest.fixture(scope="module", params=[1, 2])
def dependent(request, base):
    # Set up after base (its dependency): finalized before base, and again when its
    # parameter changes, inside the next test's setup.
    yield request.param
    subprocess.Popen(SLEEP)


@pytest.fixture(scope="module")
def nested(request):
    request.getfixturevalue("base")  # base's whole setup runs inside this one's
    yield
    subprocess.Popen(SLEEP)


@pytest.fixture
def per_test():
    subprocess.Popen(SLEEP)  # a function-scoped fixture's: the test's own
    yield
    subprocess.Popen(SLEEP)  # and in its teardown, the test's too


def test_late(late):  # first: nothing runs yet when its teardown starts one
    pass


def test_dependent(dependent, per_test):
    pass


@pytest.fixture
def late():
    yield
    subprocess.Popen(SLEEP)  # only in its teardown: the test had nothing before


def test_nested(nested):
    pass

"""


@pytest.mark.parametrize("mode", ["warn", "fail"])
def test_wider_fixtures_own_what_their_setups_and_finalizers_leave(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Dependencies, a parameter change that finalizes a fixture inside the next test's
    setup, and a setup nested in another (``getfixturevalue``): each process goes to the
    fixture whose setup or finalizer started it, and the tests own only their own."""
    pytester.makepyfile(test_orderings=ORDERINGS)
    report = pytester.path / "leaks.json"
    with no_survivors(monkeypatch):
        result = run(pytester, f"--procsafe-leaks={mode}", f"--procsafe-report={report}")
    if mode == "fail":  # the tests' own leaks error their teardowns; the fixtures', the run
        result.assert_outcomes(passed=4, errors=3)
    else:
        result.assert_outcomes(passed=4, warnings=7)
    found = sorted((str(r["owner"]), str(r["phase"])) for r in _records(report))
    assert found == [
        ("fixture base", "setup"),
        ("fixture base", "teardown"),
        ("fixture dependent", "teardown"),
        ("fixture dependent", "teardown"),
        ("fixture nested", "teardown"),
        ("test_orderings.py::test_dependent[1]", "setup"),
        ("test_orderings.py::test_dependent[1]", "teardown"),
        ("test_orderings.py::test_dependent[2]", "setup"),
        ("test_orderings.py::test_dependent[2]", "teardown"),
        ("test_orderings.py::test_late", "teardown"),
    ], found
