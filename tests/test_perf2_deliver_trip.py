"""A delivery worker's trip to the store as one write transaction (issue 17, perf 2): the
results of the calls that ended recorded, then the next claim and its contact ids, on the
driver's connection (``Raw``). It must leave the store exactly as recording (``finish``),
then claiming (``claim``) and reading the contact ids (``contact_ids``,
``resolve_contact_ids``) one after the other did, on both stores. A store failing in a trip
losing nothing is tests/test_attack_perf_worker.py's
``test_a_store_failing_mid_record_loses_nothing``."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, select
from test_attack_perf_worker import (
    DISPENSARY,
    make_op,
    open_ops,
    service,  # noqa: F401 (a fixture)
)
from test_attack_perf_worker import mapping_dir as mapping_dir
from test_delivery import DEST, enqueue

from connector.store import OutboxRow, Store
from connector.store.schema import attempts, conflicts, contacts, customers, dead_letters, outbox

OTHER = "someone-else"
NOW = 1_000_000.0
PEOPLE = ("a", "b", "c", "d")

row_states = st.fixed_dictionaries(
    {
        "customer": st.sampled_from(PEOPLE),
        "op": st.sampled_from(["upsert", "upsert", "merge"]),
        "into": st.sampled_from(PEOPLE),
        "status": st.sampled_from(["pending", "inflight", "done", "dead"]),
        "due": st.sampled_from([NOW - 10, NOW, NOW + 10]),
        "mine": st.booleans(),
        "claim_ends": st.sampled_from([NOW - 1, NOW + 10]),
        "tried": st.sampled_from([None, NOW - 50]),
        "attempts": st.integers(0, 3),
        # what a call for it gave, when this process holds it: done with or without a
        # contact id, a retry, a dead letter
        "result": st.sampled_from(["k1", "k2", "k3", None, "retry", "dead"]),
        "replaces": st.booleans(),
    }
)
states = st.fixed_dictionaries(
    {
        "rows": st.lists(row_states, max_size=10),
        # the identity map: no entry, an entry without a contact id, or one
        "map": st.fixed_dictionaries(
            {p: st.sampled_from(["none", "empty", "k1", "k2", "k3"]) for p in PEOPLE}
        ),
        "merged": st.fixed_dictionaries({p: st.sampled_from([None, *PEOPLE]) for p in PEOPLE}),
        "limit": st.integers(0, 5),
        "conflict": st.booleans(),
    }
)


def load(store: Any, state: dict[str, Any]) -> list[tuple[OutboxRow, Any]]:
    """Write ``state`` into the (emptied) store; the rows this process holds, with the result
    a call gave each."""
    mine: list[tuple[OutboxRow, Any]] = []
    with store.engine.begin() as conn:
        for table in (attempts, dead_letters, conflicts, contacts, customers, outbox):
            conn.execute(delete(table))
        for n, row in enumerate(state["rows"], start=1):
            body: dict[str, Any] = {"op": row["op"], "customer_id": row["customer"], "n": n}
            if row["op"] == "merge":
                body["into_customer_id"] = row["into"]
            inflight = row["status"] == "inflight"
            conn.execute(
                insert(outbox).values(
                    id=n,
                    dispensary=DISPENSARY,
                    destination=DEST,
                    order_key=row["customer"],
                    customer_id=row["customer"],
                    op=row["op"],
                    payload=json.dumps(body),
                    idempotency_key=f"key-{n}",
                    status=row["status"],
                    attempts=row["attempts"],
                    created_at=NOW - 100,
                    first_attempt_at=row["tried"],
                    next_attempt_at=row["due"],
                    claimed_by=(store.process_id if row["mine"] else OTHER) if inflight else None,
                    claimed_until=row["claim_ends"] if inflight else None,
                )
            )
            if inflight:
                held = OutboxRow(
                    n,
                    DISPENSARY,
                    DEST,
                    row["customer"],
                    row["op"],
                    body,
                    f"key-{n}",
                    row["attempts"],
                    row["tried"],
                )
                mine.append((held, row))
        for person, entry in state["map"].items():
            if entry != "none":
                conn.execute(
                    insert(contacts).values(
                        dispensary=DISPENSARY,
                        customer_id=person,
                        destination=DEST,
                        contact_id=None if entry == "empty" else entry,
                        delivered_hash=None,
                        unsubscribed=False,
                        deactivated=False,
                        ops_planned=0,
                        updated_at=NOW,
                    )
                )
        for person, into in state["merged"].items():
            conn.execute(
                insert(customers).values(
                    dispensary=DISPENSARY,
                    customer_id=person,
                    merged_into=into,
                    merges="[]",
                    updated_at=NOW,
                )
            )
    return mine


def results(held: list[tuple[OutboxRow, Any]], conflict: bool) -> tuple[dict[str, Any], list[str]]:
    """``finish``'s arguments for what the calls gave (one result per customer: a customer
    has at most one call), and the customers of the claims to read contacts for."""
    done: list[tuple[OutboxRow, str | None]] = []
    retry: list[tuple[OutboxRow, float, str]] = []
    dead: list[tuple[OutboxRow, str, int | None, str | None]] = []
    replaced: dict[int, str] = {}
    answers: dict[int, tuple[int | None, str | None]] = {}
    seen: set[str] = set()
    for row, state in held:
        if row.customer_id in seen:
            continue
        seen.add(row.customer_id)
        result = state["result"]
        if result == "retry":
            retry.append((row, NOW + 30, "HTTP 500"))
            answers[row.id] = (500, None)
        elif result == "dead":
            dead.append((row, "HTTP 400", 400, "bad"))
            answers[row.id] = (400, "E1")
        else:
            done.append((row, result))
            if result and state["replaces"]:
                replaced[row.id] = "k1"
    found = [("a", "shared_contact", "detail")] if conflict else []
    return {
        "done": done,
        "retry": retry,
        "dead": dead,
        "conflicts": found,
        "replaced": replaced,
        "answers": answers,
    }, [r.customer_id for r, _ in held]


def dump(store: Any) -> dict[str, Any]:
    """Every table the trip writes."""
    found: dict[str, Any] = {}
    with store.engine.connect() as conn:
        for table in (outbox, contacts, conflicts, attempts, dead_letters):
            # generated ids, and a conflict's time (the clock's, not the store's)
            columns = [
                c
                for c in table.c
                if not (c.name == "id" and table is not outbox)
                and not (c.name == "created_at" and table is conflicts)
            ]
            rows = conn.execute(select(*columns)).all()
            found[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return found


def sqlalchemy_claim(store: Any, limit: int) -> list[int]:
    """The ids the claim's SQLAlchemy statements select (the store's own before they went to
    the driver's connection), in a transaction rolled back."""
    key = {"dispensary": DISPENSARY, "destination": DEST, "now": NOW, "limit": limit}
    with store.engine.connect() as conn, conn.begin() as transaction:
        ids = [r.id for r in conn.execute(store._claim_expired, key)]
        if len(ids) < limit:
            key["limit"] = limit - len(ids)
            ids += [r.id for r in conn.execute(store._claim_due, key)]
        transaction.rollback()
    return ids


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=states)
def test_record_and_claim_is_finish_then_claim(store: Store, state: dict[str, Any]) -> None:
    """The same state, the same results: one transaction leaves every table as recording,
    claiming and reading the contacts one after the other did, claims the same operations
    (due or expired, one per customer, none behind an earlier one) and gives the same
    contact ids, the merges' survivors resolved."""
    real: Any = store
    real._now = lambda: NOW
    held = load(real, state)
    finished, _ = results(held, state["conflict"])
    limit = state["limit"]
    store.finish(DISPENSARY, DEST, **finished)
    expected = sqlalchemy_claim(real, limit) if limit else []
    rows = store.claim(DISPENSARY, DEST, limit) if limit else []
    assert [r.id for r in rows] == expected
    customers_of = {r.customer_id for r in rows}
    contacts_before = store.contact_ids(DISPENSARY, DEST, customers_of) if rows else {}
    survivors = {str(r.body["into_customer_id"]) for r in rows if r.op == "merge"}
    resolved_before = store.resolve_contact_ids(DISPENSARY, DEST, survivors)
    due_before = None if rows else store.next_due(DISPENSARY, DEST)
    before = dump(real)

    held = load(real, state)
    finished, _ = results(held, state["conflict"])
    claimed = store.record_and_claim(DISPENSARY, DEST, limit, **finished, due_if_none=True)
    assert [r.id for r in claimed.rows] == [r.id for r in rows]
    assert claimed.rows == rows
    assert claimed.contacts == contacts_before
    assert claimed.survivors == resolved_before
    assert claimed.next_due == due_before
    assert dump(real) == before


def test_a_trip_records_and_claims_in_one_transaction(store: Store) -> None:
    """A customer's next operation is claimed in the same trip that records its last one."""
    enqueue(store, [make_op("x", 1), make_op("x", 2)])
    first = store.record_and_claim(DISPENSARY, DEST, 5)
    assert [r.body["fields"]["n"] for r in first.rows] == [1]
    second = store.record_and_claim(DISPENSARY, DEST, 5, [(first.rows[0], "c-x")])
    assert [r.body["fields"]["n"] for r in second.rows] == [2]
    assert second.contacts == {"x": "c-x"}
    third = store.record_and_claim(DISPENSARY, DEST, 5, [(second.rows[0], "c-x")], due_if_none=True)
    assert third.rows == []
    assert third.next_due is None
    assert open_ops(store) == 0
