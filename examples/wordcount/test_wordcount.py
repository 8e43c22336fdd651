"""Tests for the word counter, run once per start method by pytest-procsafe."""

from __future__ import annotations

from collections import Counter
from multiprocessing.context import BaseContext

import pytest
from wordcount import count_all
from wordcount import count_all_futures
from wordcount import count_words

from pytest_procsafe import WorkerGroup

TEXTS = ["the cat sat", "The dog sat", "a cat, a dog"]
EXPECTED = Counter({"the": 2, "cat": 2, "sat": 2, "dog": 2, "a": 2})


# start: pool
def test_count_all(mp_context: BaseContext) -> None:  # [fork], [spawn], [forkserver]
    assert count_all(mp_context, TEXTS) == EXPECTED


def test_count_all_futures(mp_context: BaseContext) -> None:
    assert count_all_futures(mp_context, TEXTS) == EXPECTED


# end: pool


# start: worker
def test_count_words_in_a_worker(mp_process: WorkerGroup) -> None:
    worker = mp_process(count_words, "to be or not to be")
    assert worker.result() == Counter({"to": 2, "be": 2, "or": 1, "not": 1})


def test_a_bad_input_fails_in_the_worker(mp_process: WorkerGroup) -> None:
    worker = mp_process(count_words, None)  # None has no .lower()
    with pytest.raises(AttributeError, match="lower"):  # the worker's own exception type
        worker.result()


# end: worker
