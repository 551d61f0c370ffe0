"""Attack on a planned batch's writes sent together on PostgreSQL (pipeline mode, the
notification sent with them and its result never read): a lost connection, a statement
timeout or a statement the database refuses among them must leave nothing of the batch
(no state, no operation, its events still pending), and the same store must plan the
batch whole afterwards, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from test_perf_plan_raw import _deployment

from connector.errors import StoreUnavailable
from connector.pipeline import process_batch
from connector.store import Store
from connector.store._statements import Raw
from connector.store.abc import NewEvent
from connector.store.schema import customers, inbox, outbox

SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())


def _events(count: int) -> list[NewEvent]:
    made = []
    for n in range(count):
        body = json.loads(json.dumps(SEED))
        body["data"]["customer_id"] = str(700 + n)
        made.append(NewEvent("d1", "webhook", "CUSTOMER", str(700 + n), None, json.dumps(body)))
    return made


@pytest.mark.postgresql_only
@pytest.mark.parametrize("fault", ["lost connection", "statement timeout", "refused"])
@pytest.mark.parametrize("count", [1, 6])  # the trickle path (under the lock) and a batch
def test_a_fault_among_the_writes_sent_together_leaves_nothing(
    store: Store, store_url: str, tmp_path: Path, fault: str, count: int
) -> None:
    deployment = _deployment(tmp_path, store_url)
    real: Any = store
    store.add_events(_events(count))
    original = real._notify
    admin_url = store_url.split("?")[0]

    def notify(conn: Any, channel: str, payload: str = "") -> None:
        raw = Raw(conn)
        if fault == "lost connection":
            pid = conn.connection.dbapi_connection.info.backend_pid
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        elif fault == "statement timeout":
            raw.run("SET LOCAL statement_timeout = '50ms'")
            raw.run("SELECT pg_sleep(2)")
        else:
            raw.run(
                "INSERT INTO customers (dispensary, customer_id, merges, updated_at)"
                " VALUES (?, NULL, ?, 1.0)",
                ["d1", "[]"],
            )
        original(conn, channel, payload)

    real._notify = notify
    try:
        with pytest.raises((StoreUnavailable, DBAPIError)):
            process_batch(store, deployment, 16)
    finally:
        real._notify = original
    statuses = store.query(sa.select(inbox.c.status))
    assert [s for (s,) in statuses] == ["pending"] * count
    assert store.query(sa.select(outbox.c.id)) == []
    assert store.query(sa.select(customers.c.customer_id)) == []
    # the same store plans the batch whole, once
    result = process_batch(store, deployment, 16)
    assert result.outcomes == {"applied": count}
    queued = store.query(sa.select(outbox.c.customer_id, outbox.c.op, outbox.c.idempotency_key))
    keys = [k for _, _, k in queued]
    assert len(keys) == len(set(keys))  # nothing queued twice
    assert {c for c, _, _ in queued} == {str(700 + n) for n in range(count)}
    # each customer's operations are those of a batch planned without a fault
    ops = {c: sorted(op for c2, op, _ in queued if c2 == c) for c, _, _ in queued}
    assert len({tuple(v) for v in ops.values()}) == 1, ops
