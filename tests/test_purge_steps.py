"""Retention purges in steps (``purge_step``), each its own short transaction: a first purge
of a store holding a month of deliveries (or one after a long stop) held the write lock for
seconds in one transaction (bench figures in issue 17's note), and on SQLite every webhook's
commit waited on it. Whatever the step size, a purge by steps forgets exactly what the
rules say: the bodies of events planned or refused before the raw cutoff (never a pending
event's), the operations delivered or superseded before the delivered cutoff (never a dead
or open one), the failed attempts of operations no longer kept, and nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from connector.store import open_store
from connector.store.abc import PurgeCursor
from connector.store.schema import attempts, inbox, outbox, quarantine

NOW = 2_000_000_000.0
RAW_BEFORE = NOW - 30 * 86_400
DELIVERED_BEFORE = NOW - 7 * 86_400
OLD, NEW = NOW - 40 * 86_400, NOW - 86_400

INBOX = st.tuples(
    st.sampled_from(["pending", "applied", "ignored", "stale"]),
    st.sampled_from([OLD, NEW]),
    st.booleans(),  # has its body
)
QUARANTINE = st.tuples(st.sampled_from([OLD, NEW]), st.booleans())
OUTBOX = st.tuples(
    st.sampled_from(["pending", "inflight", "done", "superseded", "dead"]),
    st.sampled_from([OLD, NEW]),
)


def _fill(store: Any, ins: list[Any], quar: list[Any], outs: list[Any], tries: list[int]) -> None:
    with store.engine.begin() as conn:
        if ins:
            conn.execute(
                insert(inbox),
                [
                    {
                        "dispensary": "d",
                        "source": "webhook",
                        "event_type": "CUSTOMER",
                        "customer_id": str(i),
                        "received_at": at,
                        "body": "{}" if body else None,
                        "status": status,
                    }
                    for i, (status, at, body) in enumerate(ins)
                ],
            )
        if quar:
            conn.execute(
                insert(quarantine),
                [
                    {
                        "dispensary": "d",
                        "received_at": at,
                        "status_code": 422,
                        "reason": "r",
                        "body": b"{}" if body else None,
                    }
                    for at, body in quar
                ],
            )
        if outs:
            conn.execute(
                insert(outbox),
                [
                    {
                        "id": i + 1,
                        "dispensary": "d",
                        "destination": "sink",
                        "order_key": str(i),
                        "customer_id": str(i),
                        "op": "upsert",
                        "payload": "{}",
                        "idempotency_key": f"k{i}",
                        "status": status,
                        "attempts": 1,
                        "created_at": at,
                        "next_attempt_at": at,
                        "done_at": at if status in ("done", "superseded", "dead") else None,
                    }
                    for i, (status, at) in enumerate(outs)
                ],
            )
        if tries:
            conn.execute(
                insert(attempts),
                [{"outbox_id": o, "at": NOW, "result": "retry", "error": "e"} for o in tries],
            )


def _expected(
    ins: list[Any], quar: list[Any], outs: list[Any], tries: list[int]
) -> tuple[list[bool], list[bool], set[int], list[int]]:
    bodies = [body and not (status != "pending" and at < RAW_BEFORE) for status, at, body in ins]
    kept_quarantine = [body and not at < RAW_BEFORE for at, body in quar]
    kept = {
        i + 1
        for i, (status, at) in enumerate(outs)
        if not (status in ("done", "superseded") and at < DELIVERED_BEFORE)
    }
    return bodies, kept_quarantine, kept, sorted(o for o in tries if o in kept)


def _state(store: Any) -> tuple[list[bool], list[bool], set[int], list[int]]:
    with store.engine.connect() as conn:
        bodies = [r.body is not None for r in conn.execute(select(inbox).order_by(inbox.c.id))]
        quar = [
            r.body is not None for r in conn.execute(select(quarantine).order_by(quarantine.c.id))
        ]
        kept = {r.id for r in conn.execute(select(outbox.c.id))}
        tried = sorted(r.outbox_id for r in conn.execute(select(attempts.c.outbox_id)))
    return bodies, quar, kept, tried


def _purge_in_steps(store: Any, limit: int) -> tuple[dict[str, int], int]:
    cursor, totals, steps = PurgeCursor(), {"bodies": 0, "quarantined": 0, "delivered": 0}, 0
    while not cursor.finished:
        step = store.purge_step(
            raw_before=RAW_BEFORE, delivered_before=DELIVERED_BEFORE, cursor=cursor, limit=limit
        )
        assert all(count <= limit for count in step.values()), step
        for key, count in step.items():
            totals[key] += count
        steps += 1
        assert steps < 10_000
    return totals, steps


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(INBOX, max_size=25),
    st.lists(QUARANTINE, max_size=8),
    st.lists(OUTBOX, max_size=25),
    st.data(),
    st.integers(min_value=1, max_value=7),
)
def test_a_purge_in_steps_of_any_size_forgets_exactly_what_the_rules_say(
    tmp_path_factory: pytest.TempPathFactory,
    ins: list[Any],
    quar: list[Any],
    outs: list[Any],
    data: st.DataObject,
    limit: int,
) -> None:
    tries = data.draw(st.lists(st.integers(min_value=1, max_value=len(outs) + 3), max_size=15))
    path: Path = tmp_path_factory.mktemp("purge") / "store.db"
    store = open_store(f"sqlite:///{path}")
    try:
        _fill(store, ins, quar, outs, tries)
        expected = _expected(ins, quar, outs, tries)
        totals, _ = _purge_in_steps(store, limit)
        assert _state(store) == expected
        assert totals["delivered"] == len(outs) - len(expected[2])
        assert totals["bodies"] == sum(b for *_, b in ins) - sum(expected[0])
        # a second purge finds nothing more
        assert _purge_in_steps(store, limit)[0] == dict.fromkeys(totals, 0)
    finally:
        store.close()


def test_a_large_purge_takes_many_bounded_steps_on_both_stores(store: Any) -> None:
    outs = [("done", OLD)] * 230 + [("dead", OLD)] * 5 + [("done", NEW)] * 10
    ins = [("applied", OLD, True)] * 120 + [("pending", OLD, True)] * 3
    tries = [1, 2, 240, 241, 999]
    _fill(store, ins, [], outs, tries)
    totals, steps = _purge_in_steps(store, 50)
    assert totals == {"bodies": 120, "quarantined": 0, "delivered": 230}
    assert steps >= 230 // 50
    assert _state(store) == _expected(ins, [], outs, tries)
    # the one-call form gives the same (nothing left to do)
    assert store.purge(raw_before=RAW_BEFORE, delivered_before=DELIVERED_BEFORE) == dict.fromkeys(
        totals, 0
    )
