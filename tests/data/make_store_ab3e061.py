"""How tests/data/store_ab3e061.sqlite was made: a store written by the connector at commit
ab3e061 (schema version 3, before Alembic), with rows in every table, for the test that it
upgrades in place (tests/test_migrate.py). Kept as documentation; run it again only to remake
the file:

    git worktree add /tmp/old-ab3 ab3e061
    PYTHONPATH=/tmp/old-ab3 .venv/bin/python tests/data/make_store_ab3e061.py OUT.sqlite

Every value is made up (no real customer). The rows go in through the old store's own methods
where it has one, else through its transactions with its own schema's tables.
"""

from __future__ import annotations

import sqlite3
import sys
import time

from sqlalchemy import insert

from connector.store import NewEvent, Rejected, Store
from connector.store.runs import RunStore
from connector.store.schema import contacts, customers, dead_letters, outbox

NOW = 1_780_000_000.0


def main(path: str) -> None:
    store = Store(f"sqlite:///{path}")
    store.add_events(
        [
            NewEvent("d1", "webhook", "CUSTOMER", "c1", 1_700_000_000_000_000, '{"id": "c1"}'),
            NewEvent("d1", "webhook", "CUSTOMER", "c2", 1_700_000_000_000_001, '{"id": "c2"}'),
        ],
        [Rejected("d1", 400, "not JSON", "text/plain", b"nope")],
    )
    store.register_process()
    runs = RunStore(store)
    assert runs.acquire("reconcile:d1", store.process_id, 60.0)
    run_id = runs.start_run("d1", "command", {"full": True}, None)
    runs.add_pulled(
        "d1",
        [NewEvent("d1", "reconcile", "CUSTOMER", "c3", 5, '{"id": "c3"}', run_id=run_id)],
        [],
        5,
    )
    runs.add_conflict("d1", "c1", "klaviyo", "contact_id_changed", "X -> Y")
    with store.transaction() as conn:
        conn.execute(
            insert(customers),
            [
                {
                    "dispensary": "d1",
                    "customer_id": "c1",
                    "last_update_us": 1,
                    "opt_out": False,
                    "merges": "[]",
                    "updated_at": NOW,
                    "opt_out_seen": False,
                },
                {
                    "dispensary": "d1",
                    "customer_id": "c2",
                    "last_update_us": 2,
                    "opt_out": True,
                    "merges": "[]",
                    "updated_at": NOW,
                    "opt_out_seen": True,
                },
            ],
        )
        conn.execute(
            insert(contacts).values(
                dispensary="d1",
                customer_id="c1",
                destination="klaviyo",
                contact_id="K1",
                delivered_hash="h1",
                unsubscribed=False,
                deactivated=False,
                ops_planned=1,
                updated_at=NOW,
            )
        )
        conn.execute(
            insert(outbox).values(
                dispensary="d1",
                destination="klaviyo",
                order_key="c1",
                customer_id="c1",
                op="upsert",
                payload="{}",
                idempotency_key="k1",
                status="pending",
                attempts=0,
                created_at=NOW,
                next_attempt_at=NOW,
            )
        )
        conn.execute(
            insert(dead_letters).values(
                outbox_id=None,
                dispensary="d1",
                destination="klaviyo",
                customer_id="c2",
                op="unsubscribe",
                payload="{}",
                idempotency_key="k2",
                attempts=5,
                reason="400 Bad Request",
                status_code=400,
                response_body="{}",
                created_at=NOW,
            )
        )
    store.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # one file, no -wal beside it
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    print(f"{path}: written at {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main(sys.argv[1])
