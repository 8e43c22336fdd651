"""Count words in many texts at once: split the work over a process pool.

The code under test takes the multiprocessing context as an argument instead of using
the global start method, so a test can run it under fork, spawn and forkserver.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext

WORD = re.compile(r"[a-z']+")


def count_words(text: str) -> Counter[str]:
    """Words of one text, lower-cased, with how often each occurs."""
    return Counter(WORD.findall(text.lower()))


def count_all(ctx: BaseContext, texts: Iterable[str], processes: int = 2) -> Counter[str]:
    """Word counts over all *texts*, counted by a pool of *processes* workers."""
    total: Counter[str] = Counter()
    with ctx.Pool(processes) as pool:
        for counts in pool.imap_unordered(count_words, texts):
            total.update(counts)
    return total


def count_all_futures(ctx: BaseContext, texts: Iterable[str], workers: int = 2) -> Counter[str]:
    """The same with `concurrent.futures`."""
    total: Counter[str] = Counter()
    with ProcessPoolExecutor(workers, mp_context=ctx) as executor:
        for counts in executor.map(count_words, texts):
            total.update(counts)
    return total
