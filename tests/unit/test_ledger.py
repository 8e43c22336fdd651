"""Unit tests of `_ledger`: what each owner answers for until it is checked."""

from __future__ import annotations

from pytest_procsafe._ledger import Ledger


def test_items_belong_to_their_owner_until_taken() -> None:
    ledger: Ledger[str, int] = Ledger()
    ledger.add("test_a", 30)
    ledger.add("session", 7)
    ledger.add("test_a", 12)

    assert ledger.owners() == ["test_a", "session"]  # in the order they first had one
    assert ledger.has("test_a")
    assert ledger.take("test_a") == [12, 30]  # sorted: reports list them stably
    assert not ledger.has("test_a")
    assert ledger.take("test_a") == []  # checked once
    assert ledger.owners() == ["session"]


def test_what_went_away_is_no_longer_anyones() -> None:
    ledger: Ledger[object, str] = Ledger()
    owner = object()
    ledger.add(owner, "psm_x")
    ledger.discard(owner, "psm_x")
    ledger.discard(None, "psm_y")  # seen before the session: nobody's
    ledger.discard(object(), "psm_z")  # an owner it never had

    assert not ledger.has(owner)
    assert ledger.owners() == []
