"""A planned batch's statements sent together (PostgreSQL's pipeline mode) and its executemany
statements as one statement over arrays (``postgres._UNNEST``): what issue 17's second
planning pass must keep. Each runs on both stores; SQLite takes the statements one by one."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import IntegrityError
from test_perf_plan_raw import _deployment

from connector.pipeline import process_batch
from connector.planner import ContactState, CustomerState, Operation
from connector.store import Store
from connector.store._statements import RAW_SAVE_CONTACTS, RAW_SAVE_CUSTOMERS, Raw
from connector.store.abc import NewEvent
from connector.store.schema import inbox, outbox

_examples = itertools.count()
# PostgreSQL's text takes no NUL
_chars = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
_text = st.one_of(st.none(), st.text(_chars, min_size=0, max_size=12))
_short = st.text(_chars, max_size=5)
_contacts = st.builds(
    ContactState,
    contact_id=_text,
    delivered_hash=_text,
    unsubscribed=st.booleans(),
    deactivated=st.booleans(),
    planned=st.integers(min_value=0, max_value=2**31 - 1),
)
_states = st.dictionaries(
    st.text(_chars, min_size=1, max_size=8),
    st.tuples(
        st.one_of(st.none(), st.integers(min_value=-(2**62), max_value=2**62)),
        _text,
        st.one_of(st.none(), st.booleans()),
        _text,
        st.frozensets(
            st.tuples(st.text(_chars, max_size=5), st.text(_chars, max_size=5)), max_size=3
        ),
        st.dictionaries(st.text(_chars, min_size=1, max_size=6), _contacts, max_size=3),
        st.booleans(),
    ),
    max_size=6,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=_states, second=_states)
def test_states_written_at_once_read_back_as_written_one_by_one(
    store: Store, first: dict[str, Any], second: dict[str, Any]
) -> None:
    """Whatever the values (nulls in every column of every row, one row or several), states
    saved by the store (one statement over arrays on PostgreSQL) read back as the same
    states saved row by row with the executemany statements, and as what was saved."""

    def states(spec: dict[str, Any]) -> dict[str, CustomerState]:
        return {
            cid: CustomerState(cid, last, digest, opt, into, merges, contacts, seen)
            for cid, (last, digest, opt, into, merges, contacts, seen) in spec.items()
        }

    def by_rows(conn: Any, dispensary: str, after: dict[str, CustomerState]) -> None:
        raw = Raw(conn)
        for cid, s in after.items():
            merges = json.dumps(sorted(s.merges))
            raw.many(
                RAW_SAVE_CUSTOMERS,
                [
                    (
                        dispensary,
                        cid,
                        s.last_update_us,
                        s.content_hash,
                        s.opt_out,
                        s.merged_into,
                        merges,
                        1.0,
                        s.opt_out_seen,
                    )
                ],
            )
            raw.many(
                RAW_SAVE_CONTACTS,
                [
                    (
                        dispensary,
                        cid,
                        d,
                        c.contact_id,
                        c.delivered_hash,
                        c.unsubscribed,
                        c.deactivated,
                        c.planned,
                        1.0,
                    )
                    for d, c in s.contacts.items()
                ],
            )

    before, after = states(first), states({**first, **second})
    tag = str(next(_examples))  # the store is the same for every example
    with store.transaction() as conn:  # type: ignore[attr-defined]
        store.save_states(conn, "a" + tag, {}, before)  # type: ignore[attr-defined]
        by_rows(conn, "b" + tag, before)
    with store.snapshot() as conn:  # type: ignore[attr-defined]
        assert store.load_states(conn, "a" + tag, list(before)) == before  # type: ignore[attr-defined]
    with store.transaction() as conn:  # type: ignore[attr-defined]
        store.save_states(conn, "a" + tag, before, after)  # type: ignore[attr-defined]
        by_rows(conn, "b" + tag, after)
    ids = [*after, "never-seen"]
    with store.snapshot() as conn:  # type: ignore[attr-defined]
        at_once = store.load_states(conn, "a" + tag, ids)  # type: ignore[attr-defined]
        one_by_one = store.load_states(conn, "b" + tag, ids)  # type: ignore[attr-defined]
    assert at_once == one_by_one
    assert set(at_once) == set(after)


def test_operations_queued_at_once_keep_their_order(store: Store) -> None:
    """Outbox ids (the order a customer's operations are delivered in) follow the order of
    the operations, in one call and across calls; a key already queued is skipped."""
    ops = [
        Operation("crm", f"c{i % 3}", f"c{i % 3}", "upsert", {"n": i}, f"k{i}") for i in range(40)
    ]
    with store.transaction() as conn:  # type: ignore[attr-defined]
        assert store.enqueue(conn, "d", ops[:25]) == 25  # type: ignore[attr-defined]
    with store.transaction() as conn:  # type: ignore[attr-defined]
        assert store.enqueue(conn, "d", ops) == 15  # type: ignore[attr-defined]
    rows = store.query(sa.select(outbox.c.idempotency_key, outbox.c.payload).order_by(outbox.c.id))
    assert [k for k, _ in rows] == [f"k{i}" for i in range(40)]
    assert [json.loads(p)["n"] for _, p in rows] == list(range(40))


def test_a_failing_statement_sent_together_is_raised_without_its_values(store: Store) -> None:
    """An error among statements sent together is raised as SQLAlchemy raises it, without
    the parameters, and nothing of the transaction stays; the store is usable after."""
    rows = [("d", "secret-1", None, None, None, None, "[]", 1.0, False)]

    def write() -> None:
        with store.transaction() as conn, store._together(conn):  # type: ignore[attr-defined]
            store._many(conn, RAW_SAVE_CUSTOMERS, rows)  # type: ignore[attr-defined]
            # a customer without an id: refused (NOT NULL), as the batch's last statement
            Raw(conn).run(
                "INSERT INTO customers (dispensary, customer_id, merges, updated_at)"
                " VALUES (?, NULL, ?, 1.0)",
                ["d", "secret-2"],
            )

    with pytest.raises(IntegrityError) as caught:
        write()
    # no parameters go with it (PostgreSQL's own detail may name the refused row, as for
    # any statement: that is the database's message, not the connector's)
    assert caught.value.params is None
    assert "secret-1" not in str(caught.value)
    with store.snapshot() as conn:  # type: ignore[attr-defined]
        assert store.load_states(conn, "d", ["secret-1"]) == {}  # type: ignore[attr-defined]


def test_a_planned_batch_marks_its_events_and_queues_in_order(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """A batch of several events (the optimistic path: read, then lock, re-check and write
    in a few round trips) records every event's outcome and decisions, and queues their
    operations in the order of the events."""
    deployment = _deployment(tmp_path, store_url)
    seed = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
    events = []
    for n in range(12):
        body = json.loads(json.dumps(seed))
        body["data"]["customer_id"] = str(500 + n)
        events.append(NewEvent("d1", "webhook", "CUSTOMER", str(500 + n), None, json.dumps(body)))
    store.add_events(events)
    result = process_batch(store, deployment, 16)
    assert result.events == 12
    assert result.outcomes == {"applied": 12}
    marked = store.query(sa.select(inbox.c.status, inbox.c.decisions).order_by(inbox.c.id))
    assert [s for s, _ in marked] == ["applied"] * 12
    assert all(json.loads(d) for _, d in marked)
    queued = store.query(sa.select(outbox.c.customer_id).order_by(outbox.c.id))
    # each customer's operations after the ones of the events before it
    assert list(dict.fromkeys(c for (c,) in queued)) == [str(500 + n) for n in range(12)]
    # the same events again: duplicates, nothing more queued
    store.add_events(events)
    assert process_batch(store, deployment, 16).outcomes == {"duplicate": 12}
    assert len(store.query(sa.select(outbox.c.id))) == len(queued)
