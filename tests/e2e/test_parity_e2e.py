"""End-to-end: what runs under fork runs under spawn and forkserver, in every import mode.

The inner project has no ``__init__.py`` anywhere, which is the hard case for
``--import-mode=importlib``: a spawn/forkserver child can import neither the test modules
nor the conftest by name unless procsafe carries the parent's module map into it.
"""

from __future__ import annotations

import textwrap

import pytest

from e2ekit import FAIL_ON_LEAKS
from e2ekit import run
from pytest_procsafe import _methods
from survivors import no_survivors

METHODS = _methods.available()

CONFTEST = """
    import pytest


    def triple(x):
        return 3 * x


    @pytest.fixture
    def conftest_target():
        return triple
"""

TOP = """
    import concurrent.futures

    WAIT = 30


    def cube(x):
        return x ** 3


    def put_cube(queue, x):
        queue.put(cube(x))


    class Greeter:
        def __init__(self, name):
            self.name = name

        def greet(self):
            return f"hi {self.name}"


    def test_module_level_target(mp_process):
        assert mp_process(cube, 2).result() == 8


    def test_conftest_target(mp_process, conftest_target):
        assert mp_process(conftest_target, 5).result() == 15


    def test_bound_method_closure_and_lambda(mp_process):
        greeter = Greeter("there")
        assert mp_process(greeter.greet).result() == "hi there"
        offset = 7
        assert mp_process(lambda: cube(2) + offset).result() == 15


    def test_process_pool_executor(mp_context):
        with concurrent.futures.ProcessPoolExecutor(2, mp_context=mp_context) as executor:
            assert list(executor.map(cube, [1, 2, 3], timeout=WAIT)) == [1, 8, 27]


    def test_pool(mp_context):
        with mp_context.Pool(2) as pool:
            assert pool.map_async(cube, [1, 2]).get(WAIT) == [1, 8]


    def test_plain_process(mp_context):
        queue = mp_context.Queue()
        process = mp_context.Process(target=put_cube, args=(queue, 3))
        process.start()
        try:
            assert queue.get(timeout=WAIT) == 27
        finally:
            process.join(WAIT)
            queue.close()
            queue.join_thread()
        assert process.exitcode == 0
"""

NESTED = """
    import concurrent.futures


    def double(x):
        return 2 * x


    def test_nested_module_level_target(mp_process):
        assert mp_process(double, 21).result() == 42


    def test_nested_process_pool_executor(mp_context):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp_context) as executor:
            assert executor.submit(double, 4).result(30) == 8
"""


@pytest.mark.parametrize("mode", ["prepend", "append", "importlib"])
def test_targets_from_test_files_and_conftests_in_every_import_mode(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # The project is not the current directory: `python -m pytest` puts that one on
    # sys.path, which would let a child import the project's modules by luck.
    project = pytester.mkdir("project")
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text(_dedent(CONFTEST))
    (project / "tests" / "deeper").mkdir(parents=True)
    (project / "tests" / "test_top.py").write_text(_dedent(TOP))
    (project / "tests" / "deeper" / "test_nested.py").write_text(_dedent(NESTED))
    assert not list(project.rglob("__init__.py"))

    with no_survivors(monkeypatch):
        result = run(pytester, f"--import-mode={mode}", "-v", "project", options=FAIL_ON_LEAKS)

    result.assert_outcomes(passed=8 * len(METHODS))
    result.stdout.fnmatch_lines(["rootdir: *project*"])
    for method in METHODS:
        result.stdout.fnmatch_lines(
            [f"*test_top.py::test_module_level_target[[]{method}[]] PASSED*"]
        )


def _dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip()


ENVIRONMENT_HEADER = """
    import os

    NAMES = ("PROBE", "CHANGED", "HOME")
    WAIT = 30


    def environment(*names):
        return {name: os.environ.get(name) for name in names}


    def send_environment(connection):
        connection.send(environment(*NAMES))
        connection.close()


    def own_process(context):
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=send_environment, args=(writer,))
        process.start()
        writer.close()
        try:
            assert reader.poll(WAIT), "the process sent nothing"
            return reader.recv()
        finally:
            process.join(WAIT)
            reader.close()
"""

# Under forkserver the first worker of the run starts the server, which keeps the
# environment of that moment: these run in both orders, the server started before the
# change and during it.
ENVIRONMENT_AS_STARTED = """
    def test_as_started(mp_process, mp_context):
        expected = environment(*NAMES)
        assert expected["PROBE"] is None and expected["CHANGED"] == "old"
        assert expected["HOME"] is not None
        assert mp_process(environment, *NAMES).result() == expected
        assert own_process(mp_context) == expected
"""

ENVIRONMENT_CHANGED = """
    def test_changed(mp_process, mp_context, monkeypatch):
        monkeypatch.setenv("PROBE", "bar")
        monkeypatch.setenv("CHANGED", "new")
        monkeypatch.delenv("HOME")
        expected = {"PROBE": "bar", "CHANGED": "new", "HOME": None}
        assert mp_process(environment, *NAMES).result() == expected
        assert own_process(mp_context) == expected
"""


@pytest.mark.parametrize("server_first", [True, False], ids=["server-first", "change-first"])
def test_every_method_sees_the_environment_as_the_test_has_it_in_any_order(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, server_first: bool
) -> None:
    tests = [ENVIRONMENT_AS_STARTED, ENVIRONMENT_CHANGED]
    if not server_first:
        tests.reverse()
    pytester.makepyfile(test_environment="".join([ENVIRONMENT_HEADER, *tests]))
    monkeypatch.setenv("CHANGED", "old")
    monkeypatch.delenv("PROBE", raising=False)

    with no_survivors(monkeypatch):
        result = run(pytester, "-v", "-p", "no:randomly", options=FAIL_ON_LEAKS)

    result.assert_outcomes(passed=2 * len(METHODS))
    first, second = ("as_started", "changed") if server_first else ("changed", "as_started")
    result.stdout.fnmatch_lines(
        [
            f"*::test_{first}[[]{METHODS[-1]}[]] PASSED*",
            f"*::test_{second}[[]{METHODS[0]}[]] PASSED*",
        ]
    )


# --- multiprocessing first imported inside pytester's in-process runs ----------------------

INLINE_OUTER = '''
    import sys

    pytest_plugins = ["pytester"]

    INNER = """
    import multiprocessing


    def work(queue):
        queue.put(42)


    def test_spawn():
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        process = ctx.Process(target=work, args=(queue,))
        process.start()
        assert queue.get(timeout=30) == 42
        process.join(30)
        assert process.exitcode == 0
    """


    def test_two_inline_runs(pytester):
        assert "multiprocessing" not in sys.modules  # procsafe did not import it
        for _ in range(2):
            pytester.makepyfile(test_inner=INNER)
            result = pytester.inline_run("--import-mode=importlib", "-p", "no:cacheprovider")
            result.assertoutcome(passed=1)
            # The in-process run's copy is dropped: the next run imports another one.
            assert "multiprocessing.spawn" not in sys.modules
'''


def test_each_copy_of_multiprocessing_an_inline_run_imports_carries_the_module_map(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """procsafe wraps multiprocessing when the run imports it, whoever does: here two
    pytester in-process runs in turn, each importing (and dropping) its own copy. A spawn
    child of each finds its target in a test module imported under importlib mode, which
    only the module map carried in the preparation data makes possible."""
    pytester.makepyfile(test_outer=INLINE_OUTER)
    with no_survivors(monkeypatch):
        result = run(pytester, options=FAIL_ON_LEAKS)
    result.assert_outcomes(passed=1)
