"""Attack on identity in a delivery trip (``record_and_claim`` records the contact ids the
calls that ended returned): two customers of the store, not merged, to whom the destination
returned the same contact (it matched both on a shared phone or e-mail) must never both be
mapped to it, whether their calls ended in one trip or in two."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from test_delivery import DEST, DISPENSARY, enqueue, make_op

from connector.planner import Operation
from connector.store import Store
from connector.store.schema import conflicts, contacts


def _mapped(store: Store) -> list[tuple[str, str | None]]:
    return sorted(store.query(select(contacts.c.customer_id, contacts.c.contact_id)))


def test_a_contact_returned_for_two_customers_in_two_trips_is_mapped_once(store: Store) -> None:
    enqueue(store, [make_op("A", 1), make_op("B", 1)])
    rows = store.record_and_claim(DISPENSARY, DEST, 5).rows
    assert len(rows) == 2
    for row in rows:
        store.record_and_claim(DISPENSARY, DEST, 5, done=[(row, "K")])
    holders = [c for c, k in _mapped(store) if k == "K"]
    assert len(holders) == 1
    kinds = [k for (k,) in store.query(select(conflicts.c.kind))]
    assert kinds == ["shared_contact"]


# held since one trip records its contacts in rounds, as one trip per call would
def test_a_contact_returned_for_two_customers_in_one_trip_is_mapped_once(store: Store) -> None:
    enqueue(store, [make_op("A", 1), make_op("B", 1)])
    rows = store.record_and_claim(DISPENSARY, DEST, 5).rows
    assert len(rows) == 2
    store.record_and_claim(DISPENSARY, DEST, 5, done=[(row, "K") for row in rows])
    holders = [c for c, k in _mapped(store) if k == "K"]
    assert len(holders) == 1, holders


def _merge_and_upsert(store: Store) -> list[Any]:
    """A merged away into B (the merge's key is A's) and B's own upsert: both claimed at
    once (two order keys), both recording a contact for B."""
    body = {"op": "merge", "dispensary": DISPENSARY, "customer_id": "A", "into_customer_id": "B"}
    enqueue(store, [Operation(DEST, "A", "A", "merge", body, "k-merge-A"), make_op("B", 1)])
    rows = {r.op: r for r in store.record_and_claim(DISPENSARY, DEST, 5).rows}
    assert sorted(rows) == ["merge", "upsert"]
    return [(rows["merge"], "K1"), (rows["upsert"], "K2")]


def test_two_contacts_returned_for_a_survivor_in_two_trips_are_reported(store: Store) -> None:
    for result in _merge_and_upsert(store):
        store.record_and_claim(DISPENSARY, DEST, 5, done=[result])
    assert _mapped(store) == [("B", "K1")]
    kinds = [k for (k,) in store.query(select(conflicts.c.kind))]
    assert kinds == ["contact_id_changed"]


# held since one trip records its contacts in rounds, as one trip per call would
def test_two_contacts_returned_for_a_survivor_in_one_trip_are_reported(store: Store) -> None:
    store.record_and_claim(DISPENSARY, DEST, 5, done=_merge_and_upsert(store))
    kinds = [k for (k,) in store.query(select(conflicts.c.kind))]
    assert kinds == ["contact_id_changed"], _mapped(store)
