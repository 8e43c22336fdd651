"""Unit tests of `_seconds.backoff`, the one shape of procsafe's polling waits."""

from __future__ import annotations

import pytest

from pytest_procsafe import _seconds


class Clock:
    """A fake ``time`` for `_seconds`: sleeping moves it, nothing else does."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(_seconds, "time", fake)
    return fake


def test_a_look_at_once_then_doubling_sleeps_up_to_the_cap_and_one_at_the_end(
    clock: Clock,
) -> None:
    looks = []
    for _ in _seconds.backoff(0.1, first=0.01, most=0.03):
        looks.append(round(clock.now - 100.0, 6))
    assert looks[0] == 0.0  # at once
    assert [round(s, 6) for s in clock.sleeps] == [0.01, 0.02, 0.03, 0.03, 0.01]
    assert looks[-1] == pytest.approx(0.1)  # the last sleep ends at the deadline
    assert len(looks) == len(clock.sleeps) + 1


def test_stopping_early_sleeps_no_more(clock: Clock) -> None:
    for count, _ in enumerate(_seconds.backoff(10.0)):
        if count == 2:
            break
    assert len(clock.sleeps) == 2


def test_no_time_is_one_look(clock: Clock) -> None:
    assert len(list(_seconds.backoff(0.0))) == 1
    assert clock.sleeps == []
