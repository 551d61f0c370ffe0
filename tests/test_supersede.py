"""A newer upsert replaces the customer's upsert still waiting right before it in the queue
(connector/store/plans.py, ``enqueue``), on both stores: never one that is claimed, never one
with another operation of its order between them, never another customer's."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from test_delivery import DEST, DISPENSARY, enqueue, make_op

from connector.planner import Operation
from connector.store import Store
from connector.store.schema import outbox


def statuses(store: Store) -> list[tuple[str, str, str]]:
    """(idempotency key, op, status) in queue order."""
    rows = store.query(
        select(outbox.c.idempotency_key, outbox.c.op, outbox.c.status).order_by(outbox.c.id)
    )
    return [(r.idempotency_key, r.op, r.status) for r in rows]


def op(
    customer: str,
    n: int,
    kind: str = "upsert",
    order_key: str | None = None,
    *,
    coalesce: bool = True,
) -> Operation:
    base = make_op(customer, n, order_key=order_key)
    return Operation(
        base.destination,
        base.customer_id,
        base.order_key,
        kind,
        {**base.body, "op": kind},
        f"k-{customer}-{n}-{kind}",
        replaces_waiting=kind == "upsert" and coalesce,
    )


def test_a_newer_upsert_replaces_the_waiting_one(store: Store) -> None:
    enqueue(store, [op("c1", 1)])
    enqueue(store, [op("c1", 2)])
    assert statuses(store) == [
        ("k-c1-1-upsert", "upsert", "superseded"),
        ("k-c1-2-upsert", "upsert", "pending"),
    ]
    assert store.queue_stats()[0]["pending"] == 1


def test_in_one_call_the_older_upsert_is_never_written(store: Store) -> None:
    enqueue(store, [op("c1", 1), op("c2", 1), op("c1", 2), op("c1", 2, "unsubscribe")])
    assert statuses(store) == [
        ("k-c2-1-upsert", "upsert", "pending"),
        ("k-c1-2-upsert", "upsert", "pending"),
        ("k-c1-2-unsubscribe", "unsubscribe", "pending"),
    ]


@pytest.mark.parametrize("between", ["unsubscribe", "deactivate", "merge", "subscribe"])
def test_an_operation_between_keeps_both(store: Store, between: str) -> None:
    enqueue(store, [op("c1", 1), op("c1", 2, between)])
    enqueue(store, [op("c1", 3)])
    enqueue(store, [op("c2", 1), op("c2", 2, between), op("c2", 3)])
    assert [s for _, _, s in statuses(store)] == ["pending"] * 6


def test_a_claimed_upsert_is_sent_and_the_newer_one_too(store: Store) -> None:
    enqueue(store, [op("c1", 1)])
    (claimed,) = store.claim(DISPENSARY, DEST, 10)
    enqueue(store, [op("c1", 2)])
    assert statuses(store) == [
        ("k-c1-1-upsert", "upsert", "inflight"),
        ("k-c1-2-upsert", "upsert", "pending"),
    ]
    store.finish(DISPENSARY, DEST, done=[(claimed, None)])
    assert statuses(store)[0][2] == "done"


def test_another_customer_of_the_same_order_is_never_replaced(store: Store) -> None:
    """Operations of several customers can share an order (a merge survivor's): only the
    same customer's upsert is replaced."""
    enqueue(store, [op("c1", 1, order_key="k")])
    enqueue(store, [op("c2", 1, order_key="k")])
    assert [s for _, _, s in statuses(store)] == ["pending", "pending"]


def test_a_dead_upsert_is_left_for_its_replay(store: Store) -> None:
    enqueue(store, [op("c1", 1)])
    (claimed,) = store.claim(DISPENSARY, DEST, 10)
    store.finish(DISPENSARY, DEST, dead=[(claimed, "refused", 400, "{}")])
    enqueue(store, [op("c1", 2)])
    assert [s for _, _, s in statuses(store)] == ["dead", "pending"]


def test_superseded_operations_are_purged_with_the_delivered(store: Store) -> None:
    enqueue(store, [op("c1", 1)])
    enqueue(store, [op("c1", 2)])
    found = store.purge(raw_before=0.0, delivered_before=store._now() + 1)
    assert found["delivered"] == 1
    assert [s for _, _, s in statuses(store)] == ["pending"]


def test_a_feed_destination_keeps_every_upsert(store: Store) -> None:
    """http and jsonl (contract 4) are feeds of every change: nothing is replaced there."""
    enqueue(store, [op("c1", 1, coalesce=False), op("c1", 2, coalesce=False)])
    enqueue(store, [op("c1", 3, coalesce=False)])
    assert [s for _, _, s in statuses(store)] == ["pending"] * 3
