"""End-to-end: a start, task or worker that fails to pickle says which part, why, what to do.

Each inner test fails the way a user's would, under fork, spawn and forkserver; the
failure's text must carry procsafe's note naming the exact part. Under fork a process
start pickles nothing, so the same tests pass there and nothing is added.
"""

from __future__ import annotations

import re

import pytest

from e2ekit import FAIL_ON_LEAKS
from e2ekit import PLUGIN
from e2ekit import run
from pytest_procsafe import _methods
from survivors import no_survivors

METHODS = _methods.available()
PICKLING = [method for method in METHODS if method != "fork"]

STARTS = """
    import concurrent.futures
    import sqlite3
    import threading

    WAIT = 30


    def work(*args, **kwargs):
        return len(args) + len(kwargs)


    class Holder:
        def __init__(self):
            self.lock = threading.Lock()


    def start_and_join(ctx, **kwargs):
        process = ctx.Process(**kwargs)
        process.start()
        process.join(WAIT)
        assert process.exitcode == 0


    def test_local_function(mp_context):
        def local_function():
            pass

        mp_context.Process(target=local_function).start()


    def test_lambda(mp_context):
        start_and_join(mp_context, target=lambda: None)


    def test_lock_in_a_nested_argument(mp_context):
        start_and_join(mp_context, target=work, args=(1, Holder()))


    def test_open_file(mp_context, tmp_path):
        with open(tmp_path / "data.txt", "w") as file:
            start_and_join(mp_context, target=work, args=(file,))


    def test_pytest_object(mp_context, request):
        start_and_join(mp_context, target=work, args=(request,))


    def test_kwargs_connection(mp_context):
        conn = sqlite3.connect(":memory:")
        try:
            start_and_join(mp_context, target=work, kwargs={"conn": conn})
        finally:
            conn.close()


    def test_pool_initializer(mp_context):
        def setup():
            pass

        with mp_context.Pool(1, initializer=setup) as pool:
            assert pool.apply(work, (1,)) == 1


    def test_mp_process_closure_over_a_lock(mp_process):
        lock = threading.Lock()

        def holds_it():
            return lock.locked()

        assert mp_process(holds_it).result() is False
"""

TASKS = """
    import concurrent.futures
    import threading

    WAIT = 30


    def work(*args, **kwargs):
        return len(args) + len(kwargs)


    def test_pool_task(mp_context):
        def local_task():
            pass

        with mp_context.Pool(1) as pool:
            pool.apply_async(local_task).get(WAIT)


    def test_pool_map_item(mp_context):
        with mp_context.Pool(1) as pool:
            pool.map(work, [1, threading.Lock(), 3])


    def test_executor_task(mp_context):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=mp_context) as executor:
            executor.submit(work, 1, conn=threading.Lock()).result(WAIT)
"""

# The first line of the note each inner test's failure must show, by test.
HEADS = {
    "test_local_function": (
        "target cannot be pickled: the local function test_local_function.<locals>.local_function"
    ),
    "test_lambda": "target cannot be pickled: a lambda (test_lambda.<locals>.<lambda>",
    "test_lock_in_a_nested_argument": "args[1].lock cannot be pickled: a threading.Lock",
    "test_open_file": "args[0] cannot be pickled: an open file",
    "test_pytest_object": ("args[0] cannot be pickled: a pytest.FixtureRequest (pytest's own)"),
    "test_kwargs_connection": "kwargs['conn'] cannot be pickled: a sqlite3.Connection",
    "test_pool_initializer": (
        "initializer cannot be pickled: the local function test_pool_initializer.<locals>.setup"
        " (the initializer of a Pool)"
    ),
    "test_mp_process_closure_over_a_lock": (
        "target.__closure__[0].cell_contents cannot be pickled: a threading.Lock "
        "(the closure variable 'lock')"
    ),
    "test_pool_task": "func cannot be pickled: the local function test_pool_task.<locals>.local_task",
    "test_pool_map_item": "item cannot be pickled: a threading.Lock",
    "test_executor_task": "kwargs['conn'] cannot be pickled: a threading.Lock",
}

_HEADER = re.compile(r"^_{3,} (\S+) _{3,}$", re.M)


def sections(output: str) -> dict[str, str]:
    """Each failure's text in pytest's output, by test id (``test_x[spawn]``), on one line
    per paragraph: notes are wrapped for the terminal, and pytest prefixes ``E   ``."""
    parts = _HEADER.split(output)
    found = {}
    for name, text in zip(parts[1::2], parts[2::2], strict=True):
        lines = [re.sub(r"^E\s+", "", line).strip() for line in text.splitlines()]
        found[name] = " ".join(line for line in lines if line)
    return found


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    found = {}
    for line in result.stdout.lines:
        match = re.match(r"^\S+::(\S+) (PASSED|FAILED|ERROR)", line)
        if match:
            found[match[1]] = match[2]
    return found


def _check_note(text: str, name: str, why: str) -> None:
    head = "procsafe: " + HEADS[name]
    assert head in text, f"{name}: no {head!r} in:\n{text}"
    assert text.count("procsafe: ") >= 1
    assert why in text, f"{name}: no {why!r} in:\n{text}"
    assert "What to do: " in text


def test_starts_say_what_cannot_be_pickled_why_and_what_to_do(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_starts=STARTS)
    with no_survivors(monkeypatch):
        result = run(pytester, "-v", "-p", "no:randomly", options=FAIL_ON_LEAKS)
    outcomes, texts = _outcomes(result), sections(result.stdout.str())
    names = [name for name in HEADS if name in STARTS]
    for name in names:
        for method in METHODS:
            test = f"{name}[{method}]"
            if method == "fork":  # fork pickles nothing: the start works, nothing is added
                assert outcomes.get(test) == "PASSED", result.stdout.str()
                continue
            assert outcomes.get(test) == "FAILED", result.stdout.str()
            why = (
                f"under {method}, procsafe sends a worker's target and arguments"
                if name == "test_mp_process_closure_over_a_lock"
                else f"under {method}, a process starts as a fresh interpreter"
            )
            _check_note(texts[test], name, why)
    assert "procsafe: " not in "".join(texts.get(f"{n}[fork]", "") for n in names)
    assert "left behind" not in result.stdout.str()


def test_the_done_when_case_in_full(pytester: pytest.Pytester) -> None:
    # `ctx.Process(target=local_function).start()` under spawn: the failure says that
    # local_function cannot be pickled, why, and what to do, in procsafe's words.
    pytester.makepyfile(test_starts=STARTS)
    result = run(
        pytester,
        "-k",
        "test_local_function",
        "--procsafe-start-methods=spawn",
        options=FAIL_ON_LEAKS,
    )
    result.assert_outcomes(failed=1)
    text = sections(result.stdout.str())["test_local_function[spawn]"]
    for words in [
        "AttributeError: Can't ",  # Python's own error stays first
        "procsafe: target cannot be pickled: the local function "
        "test_local_function.<locals>.local_function",
        "Why: under spawn, a process starts as a fresh interpreter and receives the Process "
        "object (its target, args and kwargs) pickled; fork copies the parent's memory and "
        "pickles nothing, which is why this may work under fork. Python 3.14 made "
        "forkserver, which pickles too, the default start method on Linux.",
        "What to do: define it at the top level of a module (a test module will do: "
        "procsafe lets spawn and forkserver children import test modules), or start it "
        "with procsafe's mp_process fixture, which carries closures and lambdas with "
        "cloudpickle.",
    ]:
        assert words in text, text


def test_tasks_are_explained_under_every_start_method(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_tasks=TASKS)
    with no_survivors(monkeypatch):
        result = run(pytester, "-v", "-p", "no:randomly", options=FAIL_ON_LEAKS)
    outcomes, texts = _outcomes(result), sections(result.stdout.str())
    why = "tasks are pickled under every start method, fork included"
    for name in ("test_pool_task", "test_pool_map_item", "test_executor_task"):
        for method in METHODS:
            test = f"{name}[{method}]"
            assert outcomes.get(test) == "FAILED", result.stdout.str()
            _check_note(texts[test], name, why)
    assert "left behind" not in result.stdout.str()


@pytest.mark.parametrize("method", PICKLING)
def test_a_start_is_explained_with_leak_checks_off(pytester: pytest.Pytester, method: str) -> None:
    # Without leak checks the start wrapper is not installed: the report hook finds the
    # process object in the traceback instead.
    pytester.makepyfile(test_starts=STARTS)
    result = run(
        pytester,
        "-k",
        "test_lock_in_a_nested_argument or test_local_function",
        f"--procsafe-start-methods={method}",
        "--procsafe-leaks=off",
        options=PLUGIN,
    )
    result.assert_outcomes(failed=2)
    texts = sections(result.stdout.str())
    for name in ("test_lock_in_a_nested_argument", "test_local_function"):
        _check_note(texts[f"{name}[{method}]"], name, f"under {method}, a process starts")
        assert texts[f"{name}[{method}]"].count("procsafe: ") == 1


def test_a_caught_start_failure_carries_the_note(pytester: pytest.Pytester) -> None:
    # The note is on the exception itself, so code that catches it (pytest.raises, a
    # retry, a log) sees it too, not only pytest's report.
    pytester.makepyfile(
        test_caught="""
        import pytest

        def test_caught(mp_context):
            def local_function():
                pass

            with pytest.raises(Exception) as info:
                mp_context.Process(target=local_function).start()
            (note,) = info.value.__notes__
            assert note.startswith("procsafe: target cannot be pickled: the local function")
        """
    )
    result = run(pytester, "--procsafe-start-methods=spawn,forkserver", options=FAIL_ON_LEAKS)
    result.assert_outcomes(passed=2)
