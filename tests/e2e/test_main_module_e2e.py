"""Spawn and forkserver children import no pytest, however pytest was started.

Under the ``pytest`` console script ``__main__`` is that script, and multiprocessing re-runs
it as ``__mp_main__`` in every spawn and forkserver child: pytest and its plugins imported
for nothing, about 50 ms a child. procsafe's preparation-data hook leaves it out, for its
own workers and for a test's own ``Process`` alike; ``python -m pytest`` never had it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from e2ekit import RUN_LIMIT
from e2ekit import run

PROBES = """
import sys

WAIT = 60


def probe(queue=None):
    heavy = sorted(n for n in sys.modules if n.partition(".")[0] in ("pytest", "_pytest", "pluggy"))
    main = getattr(sys.modules.get("__mp_main__"), "__file__", None)
    if queue is not None:
        queue.put((heavy, main))
    return heavy, main


def test_a_procsafe_worker(mp_process):
    assert mp_process(probe).result() == ([], None)


def test_a_plain_process(mp_context):
    queue = mp_context.Queue()
    process = mp_context.Process(target=probe, args=(queue,))
    process.start()
    try:
        assert queue.get(timeout=WAIT) == ([], None)
    finally:
        process.join(WAIT)
        queue.close()
        queue.join_thread()
"""

SCRIPT = Path(sys.executable).with_name("pytest")


@pytest.mark.parametrize("how", ["pytest", "python -m pytest"])
def test_children_import_no_pytest(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(test_probes=PROBES)
    options = (
        "-p",
        "procsafe",
        "--procsafe-leaks=fail",
        "--procsafe-start-methods=spawn,forkserver",
    )
    if how == "pytest":
        if not SCRIPT.exists():
            pytest.skip(f"no pytest console script beside {sys.executable}")
        result = pytester.run(
            str(SCRIPT), f"--basetemp={pytester.path / 'inner-tmp'}", *options, timeout=RUN_LIMIT
        )
    else:
        result = run(pytester, options=options)
    result.assert_outcomes(passed=4)


LEAN_PROBE = """
import json
import sys

WAIT = 60


def imported(path):  # no queue or pipe: their modules import tempfile themselves
    with open(path, "w") as file:
        json.dump(sorted(n for n in sys.modules if n in ("typing", "tempfile", "sysconfig")
                         or n.partition(".")[0] == "pytest_procsafe"), file)


def test_a_plain_process(mp_context, mp_start_method):
    path = f"imported-{mp_start_method}.json"
    process = mp_context.Process(target=imported, args=(path,))
    process.start()
    process.join(WAIT)
    assert process.exitcode == 0
"""

#: What procsafe's riders import in a spawn or forkserver child: nothing more.
CHILD_SIDE = {
    "pytest_procsafe",
    "pytest_procsafe._afterimport",
    "pytest_procsafe._dumps",
    "pytest_procsafe._environ",
    "pytest_procsafe._forkhooks",
    "pytest_procsafe._imports",
    "pytest_procsafe._notyping",
    "pytest_procsafe._registrations",
    "pytest_procsafe._spawnhook",
    "pytest_procsafe._stacks",
    "pytest_procsafe._version",
}


def test_a_child_pays_for_no_module_its_riders_do_not_use(pytester: pytest.Pytester) -> None:
    """A test's own spawn or forkserver child imports procsafe's child side only: not
    ``typing`` (3 ms a child), ``tempfile`` (6 ms) or ``sysconfig``, which only the test
    process's side needs."""
    pytester.makepyfile(test_lean=LEAN_PROBE)
    result = run(
        pytester,
        options=(
            "-p",
            "procsafe",
            "--procsafe-leaks=fail",
            "--procsafe-start-methods=spawn,forkserver",
        ),
    )
    result.assert_outcomes(passed=2)
    for method in ("spawn", "forkserver"):
        found = set(json.loads((pytester.path / f"imported-{method}.json").read_text()))
        if method == "forkserver":  # the server imports multiprocessing.connection: tempfile
            found.discard("tempfile")
        assert found <= CHILD_SIDE, (method, sorted(found - CHILD_SIDE))
        assert "pytest_procsafe._dumps" in found, method  # the riders did arrive
