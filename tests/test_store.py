"""The store's own promises: schema versioning, retention, and reads that never block.

Every test that takes ``store`` or ``store_url`` runs on SQLite and on PostgreSQL
(tests/conftest.py); the few about SQLite's own locking and pid checks say so in their names."""

from __future__ import annotations

import gc
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text, update

from connector.errors import StoreError
from connector.planner import Operation
from connector.store import NewEvent, Rejected, Store, open_store
from connector.store.migrate import head
from connector.store.schema import conflicts, inbox, meta, outbox, quarantine


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    yield opened
    opened.close()


def test_a_new_store_records_its_schema_revision(store: Store) -> None:
    rows = store.query(text("SELECT version_num FROM alembic_version"))
    assert [row.version_num for row in rows] == [head()]


def test_a_store_from_a_newer_connector_is_refused(store_url: str) -> None:
    url = store_url
    first = open_store(url)
    with first.transaction() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    first.close()
    with pytest.raises(StoreError, match="revision 9999, newer than this connector"):
        open_store(url)
    gc.collect()  # a connection the refused store left open warns (and fails) here


def test_opening_twice_keeps_the_data(store_url: str) -> None:
    url = store_url
    first = open_store(url)
    first.add_events([NewEvent("d", "webhook", "CUSTOMER", "1", 1, "{}")])
    first.close()
    again = open_store(url)
    assert len(again.query(select(inbox))) == 1
    again.close()


def _age(store: Store, table: object, column: str, seconds: float) -> None:
    with store.transaction() as conn:
        conn.execute(update(table).values({column: time.time() - seconds}))  # type: ignore[arg-type]


def test_purge_forgets_old_bodies_but_never_a_pending_one(store: Store) -> None:
    store.add_events(
        [
            NewEvent("d", "webhook", "CUSTOMER", "1", 1, '{"old": "applied"}', "applied"),
            NewEvent("d", "webhook", "CUSTOMER", "2", 1, '{"old": "pending"}'),
        ],
        [Rejected("d", 422, "data.last_update: is missing", "application/json", b"{}")],
    )
    _age(store, inbox, "received_at", 40 * 86_400)
    _age(store, quarantine, "received_at", 40 * 86_400)
    store.add_events([NewEvent("d", "webhook", "CUSTOMER", "3", 1, '{"new": 1}', "applied")])
    now = time.time()

    purged = store.purge(raw_before=now - 30 * 86_400, delivered_before=now - 7 * 86_400)

    assert purged == {"bodies": 1, "quarantined": 1, "delivered": 0}
    bodies = {r.customer_id: r.body for r in store.query(select(inbox))}
    assert bodies == {"1": None, "2": '{"old": "pending"}', "3": '{"new": 1}'}
    assert store.query(select(quarantine.c.body))[0].body is None
    assert store.query(select(quarantine.c.reason))[0].reason == "data.last_update: is missing"


def test_purge_deletes_delivered_operations_only(store: Store) -> None:
    ops = [
        Operation(
            "sink", str(i), str(i), "upsert", {"op": "upsert", "customer_id": str(i)}, f"k{i}"
        )
        for i in range(3)
    ]
    with store.transaction() as conn:
        store.enqueue(conn, "d", ops)
    store.register_process()
    claimed = store.claim("d", "sink", 2)
    store.finish("d", "sink", done=[(claimed[0], None)], dead=[(claimed[1], "HTTP 400", 400, "no")])
    _age(store, outbox, "done_at", 10 * 86_400)
    now = time.time()

    purged = store.purge(raw_before=now - 30 * 86_400, delivered_before=now - 7 * 86_400)

    assert purged["delivered"] == 1
    left = {r.idempotency_key: r.status for r in store.query(select(outbox))}
    assert left == {"k1": "dead", "k2": "pending"}


def test_sqlite_reads_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = open_store(f"sqlite:///{path}", timeout=0.2)
    store.add_events([NewEvent("d", "webhook", "CUSTOMER", "1", 1, "{}")])
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO connector_meta (key, value) VALUES ('held', 'yes')")
    try:
        store.ping()
        assert store.pending_work() == 1
        assert store.queue_stats() == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        store.close()


def test_sqlite_a_write_under_a_held_lock_is_store_unavailable(tmp_path: Path) -> None:
    from connector.errors import StoreUnavailable

    path = tmp_path / "store.db"
    store = open_store(f"sqlite:///{path}", timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="database is locked"):
            store.add_events([NewEvent("d", "webhook", "CUSTOMER", "1", 1, "{}")])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.add_events([NewEvent("d", "webhook", "CUSTOMER", "1", 1, "{}")])
    assert store.pending_work() == 1
    with store.transaction() as conn:
        conn.execute(insert(meta).values(key="after", value="ok"))
    store.close()


def test_sqlite_a_zombie_process_counts_as_gone() -> None:
    """SQLite's pid check (PostgreSQL has heartbeats only): a killed connector that nobody
    reaps (a container without init) must not keep its claims: its pid answers signals but it
    runs no more."""
    import subprocess
    import time

    from connector.store.sqlite import _pid_alive

    child = subprocess.Popen(["sleep", "0.05"])
    deadline = time.monotonic() + 5
    while _pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _pid_alive(child.pid)  # exited, not yet reaped: a zombie
    child.wait()
    assert not _pid_alive(child.pid)
    assert _pid_alive(os.getpid())


# ---- the identity map after delivery -----------------------------------------------------------


def _delivered(store: Store, returned: dict[str, str], replaced: dict[str, str]) -> None:
    """One round: an upsert of each customer in ``returned`` accepted with that contact id,
    which replaces the gone id in ``replaced`` (by customer) when there is one."""
    ops = [
        Operation(
            "sink", c, c, "upsert", {"op": "upsert", "customer_id": c}, f"k-{c}-{time.time()}"
        )
        for c in returned
    ]
    with store.transaction() as conn:
        store.enqueue(conn, "d", ops)
    claimed = store.claim("d", "sink", len(ops))
    assert len(claimed) == len(ops)
    store.finish(
        "d",
        "sink",
        done=[(row, returned[row.customer_id]) for row in claimed],
        replaced={r.id: replaced[r.customer_id] for r in claimed if r.customer_id in replaced},
    )


def _reports(store: Store) -> list[tuple[str, str, str]]:
    rows = store.query(select(conflicts).order_by(conflicts.c.id))
    return [(r.customer_id, r.kind, r.detail) for r in rows]


def test_defect_8_a_contact_the_destination_says_is_gone_is_replaced_and_reported(
    store: Store,
) -> None:
    store.register_process()
    _delivered(store, {"a": "X", "b": "P", "c": "Q"}, {})
    assert store.contact_ids("d", "sink", ["a", "b", "c"]) == {"a": "X", "b": "P", "c": "Q"}

    # a: X is gone, Y answered; b: another id without a word about P; c: a gone id that is
    # not the one the map holds (the map moved meanwhile): nothing to replace
    _delivered(store, {"a": "Y", "b": "R", "c": "S"}, {"a": "X", "c": "T"})
    assert store.contact_ids("d", "sink", ["a", "b", "c"]) == {"a": "Y", "b": "P", "c": "Q"}
    reports = sorted(_reports(store))
    assert [(c, k) for c, k, _ in reports] == [
        ("a", "contact_replaced"),
        ("b", "contact_id_changed"),
        ("c", "contact_id_changed"),
    ]
    assert "X" in reports[0][2]
    assert "Y" in reports[0][2]

    # the map moved: the survivor's id again is no news
    _delivered(store, {"a": "Y"}, {})
    assert store.contact_ids("d", "sink", ["a"]) == {"a": "Y"}
    assert len(_reports(store)) == 3
