"""What a running connector asks its SQLite store again and again must not read a whole
table that grows with its history (the outbox keeps every delivered operation until
retention): issue 17 found the planner's "queued already?" read and each heartbeat's renewal
of its claims each scanning the outbox. The statements are caught as the driver runs them and
each is asked for its query plan."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest
from test_delivery import DEST, DISPENSARY, make_op

from connector.store import open_store

# tables that grow with the customers and events a store has seen
GROWING = ("outbox", "inbox", "contacts", "customers", "attempts", "dead_letters")


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every statement a store opened from here on runs (driver-level, both SQLAlchemy's and
    the raw paths), values left out."""
    seen: set[str] = set()
    real = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real(*args, **kwargs)  # type: ignore[arg-type]
        conn.set_trace_callback(seen.add)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)
    return seen


# the operations' statuses: written into some statements as literals (a partial index needs
# it), so kept as such; this test's customer values are none of them
_STATUSES = {"'pending'", "'inflight'", "'done'", "'dead'", "'superseded'"}


def _shape(statement: str) -> str:
    """A traced statement (values expanded into it) back to one with parameters."""
    statement = re.sub(r"'(?:[^']|'')*'", lambda m: m[0] if m[0] in _STATUSES else "?", statement)
    statement = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "?", statement)
    return re.sub(r"\bX\?", "?", statement)


def test_steady_state_statements_read_no_growing_table_whole(
    statements: set[str], tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        store.register_process()
        ops = [make_op(f"c{i}") for i in range(20)]
        with store.transaction() as conn:
            store.enqueue(conn, DISPENSARY, ops[:10])
        with store.transaction() as conn:  # some queued already: the "queued?" read
            store.enqueue(conn, DISPENSARY, ops)
        claimed = store.record_and_claim(DISPENSARY, DEST, 8)
        store.heartbeat()
        done = [(row, f"contact-{row.customer_id}") for row in claimed.rows[:4]]
        retry = [(row, time.time() + 60, "HTTP 503") for row in claimed.rows[4:6]]
        store.record_and_claim(DISPENSARY, DEST, 8, done, retry)
        store.heartbeat()
        store.release_claims()
    finally:
        store.close()
    shapes = {
        _shape(s)
        for s in statements
        if s.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT"))
    }
    checked = 0
    conn = sqlite3.connect(tmp_path / "store.db")
    try:
        for sql in sorted(shapes):
            if sql.upper().startswith("INSERT") and " SELECT " not in sql.upper():
                continue
            plan = conn.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?")).fetchall()
            checked += 1
            for *_, detail in plan:
                table = re.match(r"SCAN (\w+)", detail)
                assert not (table and table.group(1) in GROWING), (detail, sql)
                # a search by the dispensary alone walks all its rows: as bad
                assert not re.search(r"\(dispensary=\?\)$", detail), (detail, sql)
    finally:
        conn.close()
    assert checked >= 8  # the heartbeat, the claims, the settling and the "queued?" read
