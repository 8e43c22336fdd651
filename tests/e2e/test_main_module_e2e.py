"""Spawn and forkserver children import no pytest, however pytest was started.

Under the ``pytest`` console script ``__main__`` is that script, and multiprocessing re-runs
it as ``__mp_main__`` in every spawn and forkserver child: pytest and its plugins imported
for nothing, about 50 ms a child. procsafe's preparation-data hook leaves it out, for its
own workers and for a test's own ``Process`` alike; ``python -m pytest`` never had it.
"""

from __future__ import annotations

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
