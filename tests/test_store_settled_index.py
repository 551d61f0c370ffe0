"""The console's counts of what was delivered (the overview's last hour, the chart's last
day) and the retention purge read the settled operations by when they were settled, along
``ix_outbox_settled`` (revision 0007), never every operation the store keeps: a month of
deliveries (a million rows) made each look at the console's overview read them all, a
quarter of a second of the store's time on SQLite (bench figures: issue 17's note).

The plans are read from the database itself (``EXPLAIN``) for the very statements the store
runs, caught as they run; the counts are checked on both stores against rows placed in and
out of the windows, of every settled status."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, insert, text

from connector.store.schema import customers, inbox, outbox

HOUR = 3600.0
PAIRS = [("d1", "crm"), ("d1", "mail"), ("d2", "crm")]


def _rows(now: float, old: int) -> list[dict[str, Any]]:
    """``old`` operations done over the last 30 days (the last hour's among them counted
    by :func:`_expected`), and in the last hour one of each other status."""
    rows = []
    for i in range(old):
        dispensary, destination = PAIRS[i % len(PAIRS)]
        done_at = now - 30 * 86_400 * (1 - i / old) - 1
        rows.append(_row(i, dispensary, destination, "done", done_at))
    n = old
    for status in ("superseded", "dead"):
        for dispensary, destination in PAIRS:
            rows.append(_row(n, dispensary, destination, status, now - 60))
            n += 1
    for dispensary, destination in PAIRS:
        rows.append(_row(n, dispensary, destination, "pending", None))
        n += 1
    return rows


def _row(i: int, dispensary: str, destination: str, status: str, done_at: float | None) -> Any:
    return {
        "dispensary": dispensary,
        "destination": destination,
        "order_key": f"o{i}",
        "customer_id": f"c{i}",
        "op": "upsert",
        "payload": "{}",
        "idempotency_key": f"k{i}",
        "status": status,
        "attempts": 1,
        "created_at": (done_at or time.time()) - 1,
        "next_attempt_at": done_at or time.time(),
        "done_at": done_at,
    }


def _expected(rows: list[dict[str, Any]], since: float) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for row in rows:
        if row["status"] == "done" and row["done_at"] >= since:
            key = (row["dispensary"], row["destination"])
            found[key] = found.get(key, 0) + 1
    return found


@contextmanager
def _statements(store: Any) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the store runs meanwhile, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def caught(conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
        seen.append((sql, params))

    event.listen(store.engine, "before_cursor_execute", caught)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", caught)


def _filled(store: Any, old: int) -> tuple[float, list[dict[str, Any]]]:
    now = time.time()
    rows = _rows(now, old)
    with store.engine.begin() as conn:
        conn.execute(insert(outbox), rows)
        if store.dialect == "postgresql":
            conn.execute(text("ANALYZE outbox"))
    return now, rows


@pytest.mark.sqlite_only
def test_the_overview_chart_and_purge_read_only_settled_rows_in_their_window(store: Any) -> None:
    _filled(store, 6_000)
    with _statements(store) as seen:
        store.overview(PAIRS)
        store.throughput(time.time() - 86_400, 3600)
        store.purge(
            raw_before=time.time() - 10 * 86_400, delivered_before=time.time() - 10 * 86_400
        )
    settled = [(sql, params) for sql, params in seen if "done_at" in sql]
    assert len(settled) >= 3, [sql for sql, _ in seen]
    with store.engine.connect() as conn:
        for sql, params in settled:
            plan = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            assert any("ix_outbox_settled" in step for step in plan), (sql, plan)
            assert not any(step.startswith("SCAN outbox") for step in plan), (sql, plan)


@pytest.mark.postgresql_only
def test_postgresql_counts_the_last_hour_along_the_settled_index(store: Any) -> None:
    _filled(store, 20_000)
    with _statements(store) as seen:
        store.overview(PAIRS)
    (sql, params), *_ = [(sql, p) for sql, p in seen if "done_at" in sql]
    with store.engine.connect() as conn:
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql, params))
    assert "ix_outbox_settled" in plan, plan
    assert "Seq Scan on outbox" not in plan, plan


def test_the_last_hours_deliveries_are_counted_per_destination_and_status(store: Any) -> None:
    now, rows = _filled(store, 3_000)
    expected = _expected(rows, now - HOUR)
    overview = {(o.dispensary, o.destination): o for o in store.overview(PAIRS)}
    assert {k: o.delivered_last_hour for k, o in overview.items()} == {
        pair: expected.get(pair, 0) for pair in PAIRS
    }
    assert all(o.pending == 1 for o in overview.values())
    day = store.throughput(now - 86_400, 3600)
    assert sum(n for _, n in day) == sum(_expected(rows, now - 86_400).values())


# --- the console's customer search: which dispensaries know a customer ------------------------


def _events(store: Any, rows: list[tuple[str, str]]) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            insert(inbox),
            [
                {
                    "dispensary": d,
                    "source": "webhook",
                    "event_type": "CUSTOMER",
                    "customer_id": c,
                    "received_at": 1.0,
                    "status": "applied",
                }
                for d, c in rows
            ],
        )


@pytest.mark.sqlite_only
def test_finding_a_customers_dispensaries_seeks_never_reads_every_event(store: Any) -> None:
    _events(store, [(f"d{i % 3}", f"c{i}") for i in range(3_000)])
    with _statements(store) as seen:
        assert store.customer_dispensaries("c4") == ["d1"]
    with store.engine.connect() as conn:
        for sql, params in seen:
            plan = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
            # a walk in index order that stops at its first row (the next dispensary) is a seek
            seek = "ORDER BY" in sql and "LIMIT" in sql and "TEMP B-TREE" not in str(plan)
            assert seek or not any(step.startswith("SCAN") for step in plan), (sql, plan)


def test_a_customer_is_found_in_every_dispensary_that_knows_it(store: Any) -> None:
    _events(store, [("north", "7"), ("south", "7"), ("south", "8"), ("west", None)])  # type: ignore[list-item]
    with store.engine.begin() as conn:
        conn.execute(insert(customers).values(dispensary="east", customer_id="7", updated_at=1.0))
    assert store.customer_dispensaries("7") == ["east", "north", "south"]
    assert store.customer_dispensaries("8") == ["south"]
    assert store.customer_dispensaries("9") == []
