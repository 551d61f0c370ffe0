"""Adversarial review of the purge by steps (``purge_step``, ``PurgeCursor``), the console's
settled counts and loose index scans (``overview``, ``throughput``, ``customer_dispensaries``)
and revision 0007 (``ix_outbox_settled``) on a store with data, on both stores. Its findings
(a failed step that moved the cursor, counts of rows another replica deleted, ticks deleted
in one unbounded statement, IN lists past an older SQLite's 999 variables) are fixed; these
tests guard them."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import pytest
from alembic import command
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.exc import OperationalError

from connector.errors import StoreUnavailable
from connector.store import open_store
from connector.store.abc import PurgeCursor
from connector.store.migrate import alembic_config, head
from connector.store.schema import attempts, customers, inbox, outbox, quarantine, schedule_ticks

NOW = 2_000_000_000.0
RAW_BEFORE = NOW - 30 * 86_400
DELIVERED_BEFORE = NOW - 7 * 86_400
OLD, NEW = NOW - 40 * 86_400, NOW - 86_400
CUT = {"raw_before": RAW_BEFORE, "delivered_before": DELIVERED_BEFORE}


def _event(status: str, at: float, body: bool = True, **extra: Any) -> dict[str, Any]:
    row = {"dispensary": "d", "source": "webhook", "event_type": "CUSTOMER", "customer_id": "c"}
    return {**row, "received_at": at, "body": "{}" if body else None, "status": status, **extra}


def _op(i: int, status: str, done_at: float | None, **extra: Any) -> dict[str, Any]:
    row = {"dispensary": "d", "destination": "sink", "order_key": f"o{i}", "op": "upsert"}
    return {
        **row,
        "id": i,
        "customer_id": f"c{i}",
        "payload": "{}",
        "idempotency_key": f"k{i}",
        "status": status,
        "attempts": 1,
        "created_at": done_at or NOW,
        "next_attempt_at": done_at or NOW,
        "done_at": done_at,
        **extra,
    }


def _write(store: Any, table: Any, rows: list[dict[str, Any]]) -> None:
    with store.engine.begin() as conn:
        conn.execute(insert(table), rows)


def _tries(store: Any, ids: list[int]) -> None:
    _write(
        store, attempts, [{"outbox_id": o, "at": NOW, "result": "retry", "error": "e"} for o in ids]
    )


def _state(store: Any) -> tuple[dict[int, tuple[str, bool]], dict[int, str], list[int]]:
    with store.engine.connect() as conn:
        events = {r.id: (r.status, r.body is not None) for r in conn.execute(select(inbox))}
        ops = {r.id: r.status for r in conn.execute(select(outbox))}
        tried = sorted(conn.execute(select(attempts.c.outbox_id)).scalars())
    return events, ops, tried


def _steps(
    store: Any, limit: int, between: Callable[[int, PurgeCursor], None] | None = None
) -> tuple[dict[str, int], int]:
    cursor, totals, steps = PurgeCursor(), {"bodies": 0, "quarantined": 0, "delivered": 0}, 0
    while not cursor.finished:
        if between is not None:
            between(steps, cursor)
        for key, n in store.purge_step(**CUT, cursor=cursor, limit=limit).items():
            assert n <= limit
            totals[key] += n
        steps += 1
        assert steps < 500, "the purge does not end"
    return totals, steps


def _kept_by_rules(store: Any) -> None:
    """Nothing the rules keep is gone: every pending event has its body, every open or dead
    operation is there, and every attempt belongs to an operation kept."""
    events, ops, tried = _state(store)
    assert all(body for status, body in events.values() if status == "pending"), events
    assert set(tried) <= set(ops), (tried, ops)


# --- 1. the purge by steps ---------------------------------------------------------------------


def test_writers_between_steps_never_make_a_step_forget_what_the_rules_keep(store: Any) -> None:
    _write(store, inbox, [_event("pending", OLD)] * 3 + [_event("applied", OLD)] * 4)
    ops = [_op(1, "done", OLD), _op(2, "dead", OLD), _op(3, "done", OLD), _op(4, "pending", None)]
    ops += [_op(5, "inflight", None), _op(6, "superseded", OLD), _op(7, "dead", OLD)]
    _write(store, outbox, [*ops, _op(8, "done", OLD)])
    _tries(store, [1, 2, 2, 3, 4, 5, 6, 7])

    def writers(step: int, cursor: PurgeCursor) -> None:
        with store.engine.begin() as conn:
            if step == 1:  # a pending event planned below the cursor, a new pending one above
                conn.execute(update(inbox).where(inbox.c.id == 1).values(status="applied"))
                conn.execute(insert(inbox).values(**_event("pending", OLD)))
            elif step == 2:  # a dead letter replayed (keeps its old done_at), retried again
                conn.execute(update(outbox).where(outbox.c.id == 2).values(status="pending"))
                conn.execute(
                    insert(attempts).values(outbox_id=2, at=NOW, result="retry", error="e")
                )
            elif step == 3:  # an operation superseded now, another settled dead
                conn.execute(
                    update(outbox).where(outbox.c.id == 4).values(status="superseded", done_at=NOW)
                )
                conn.execute(
                    update(outbox).where(outbox.c.id == 5).values(status="dead", done_at=OLD)
                )
            elif step == 4:  # new operations queued, one failing (ids above every one purged)
                conn.execute(insert(outbox).values(**_op(20, "pending", None)))
                conn.execute(
                    insert(attempts).values(outbox_id=20, at=NOW, result="retry", error="e")
                )

    _steps(store, 1, writers)
    _kept_by_rules(store)
    events, ops, tried = _state(store)
    assert set(ops) == {2, 4, 5, 7, 20}
    assert tried == [2, 2, 2, 4, 5, 7, 20]
    # event 1 became purgeable behind the cursor: the next hourly purge forgets its body
    assert events[1] == ("applied", True)
    assert _steps(store, 1)[0]["bodies"] == 1
    _kept_by_rules(store)


@pytest.mark.parametrize("limit", [1, 3, 4])
def test_a_step_size_equal_to_below_or_above_the_rows_purges_exactly_them(
    store: Any, limit: int
) -> None:
    _write(store, inbox, [_event("applied", OLD)] * 3 + [_event("pending", OLD)])
    _write(
        store, quarantine, [{"dispensary": "d", "received_at": OLD, "status_code": 4, "reason": "r",
                             "body": b"x"}] * 3
    )  # fmt: skip
    _write(store, outbox, [_op(i, "done", OLD) for i in (1, 2, 3)] + [_op(4, "dead", OLD)])
    _tries(store, [1, 2, 3, 4, 99])
    totals, steps = _steps(store, limit)
    assert totals == {"bodies": 3, "quarantined": 3, "delivered": 3}
    assert steps == 3 // limit + 1 + (1 if limit == 1 else 0)  # the orphan walk last
    assert _state(store)[1:] == ({4: "dead"}, [4])
    assert _steps(store, limit) == (dict.fromkeys(totals, 0), 1)


def _failing(store: Any, marker: str) -> Callable[[], None]:
    """The next statement containing ``marker`` fails as a lost store would: undo."""

    fired: list[str] = []

    def fail(conn: Any, cursor: Any, sql: str, *_: Any) -> None:
        if marker in sql and not fired:
            fired.append(sql)
            raise OperationalError(sql, {}, Exception("the server closed the connection"))

    event.listen(store.engine, "before_cursor_execute", fail)
    return lambda: event.remove(store.engine, "before_cursor_execute", fail)


def test_a_store_lost_mid_step_rolls_the_whole_step_back(store: Any) -> None:
    _write(store, inbox, [_event("applied", OLD)] * 2)
    _write(store, outbox, [_op(1, "done", OLD), _op(2, "done", OLD)])
    _tries(store, [1, 2])
    undo = _failing(store, "DELETE FROM attempts")
    try:
        with pytest.raises(StoreUnavailable):
            store.purge_step(**CUT, cursor=PurgeCursor(), limit=5)
    finally:
        undo()
    events, ops, tried = _state(store)
    assert all(body for _, body in events.values())
    assert set(ops) == {1, 2}
    assert tried == [1, 2]
    assert store.purge(**CUT) == {"bodies": 2, "quarantined": 0, "delivered": 2}
    assert _state(store)[1:] == ({}, [])


def test_retrying_a_failed_step_with_its_cursor_purges_what_the_step_would_have(
    store: Any,
) -> None:
    _write(store, inbox, [_event("applied", OLD)] * 2)
    _write(store, outbox, [_op(1, "done", OLD)])
    cursor = PurgeCursor()
    undo = _failing(store, "DELETE FROM outbox")
    try:
        with pytest.raises(StoreUnavailable):
            store.purge_step(**CUT, cursor=cursor, limit=5)
    finally:
        undo()
    while not cursor.finished:
        store.purge_step(**CUT, cursor=cursor, limit=5)
    events, ops, _ = _state(store)
    assert ops == {}
    assert not any(body for _, body in events.values()), events


@pytest.mark.postgresql_only
def test_two_replicas_purging_at_once_count_each_deleted_operation_once(
    store: Any, store_url: str
) -> None:
    _write(store, outbox, [_op(i, "done", OLD) for i in range(1, 6)])
    other = open_store(store_url)
    seen: dict[str, int] = {}

    def replica(conn: Any, cursor: Any, sql: str, *_: Any) -> None:
        if sql.startswith("DELETE FROM outbox") and not seen:
            # the other replica's hourly purge runs (and commits) between this one's
            # select and its delete: no lock is taken on the rows selected
            done = threading.Thread(target=lambda: seen.update(other.purge(**CUT)))
            done.start()
            done.join(30)

    event.listen(store.engine, "before_cursor_execute", replica)
    try:
        mine = store.purge(**CUT)
    finally:
        event.remove(store.engine, "before_cursor_execute", replica)
        other.close()
    assert _state(store)[1] == {}
    assert seen["delivered"] + mine["delivered"] == 5, (seen, mine)


# --- 2. the console's counts against naive reference queries ----------------------------------

ODD = ["B", "a", "a ", " a", "A", "é", "É", "e\u0301", "ß", "ss", "z", "Ω", "😀", "a%", "a_b", "'"]


def test_the_dispensaries_of_a_customer_match_a_naive_query_for_odd_names(store: Any) -> None:
    rows = [_event("applied", OLD, dispensary=d, customer_id=c) for d in ODD for c in ("7", None)]
    rows += [_event("applied", OLD, dispensary=d + "x", customer_id="8") for d in ODD]
    _write(store, inbox, rows)
    _write(store, customers, [{"dispensary": d + "y", "customer_id": "7", "updated_at": 1.0}
                              for d in ODD[::2]])  # fmt: skip
    for customer in ("7", "8", "9", ""):
        with store.engine.connect() as conn:
            naive = set(
                conn.execute(
                    select(inbox.c.dispensary).where(inbox.c.customer_id == customer)
                ).scalars()
            ) | set(
                conn.execute(
                    select(customers.c.dispensary).where(customers.c.customer_id == customer)
                ).scalars()
            )
        assert store.customer_dispensaries(customer) == sorted(naive), customer


def test_the_last_hour_counts_match_a_naive_query_at_the_boundary(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = NOW
    monkeypatch.setattr(store, "_now", lambda: now)
    ops, i = [], 0
    for d in ODD[:6]:
        for status in ("done", "dead", "superseded", "pending", "inflight"):
            for at in (now - 3600, now - 3600 - 1e-6, now - 3599.5, now, now + 5, None):
                i += 1
                ops.append(_op(i, status, at, dispensary=d, customer_id=f"c{i}"))
    _write(store, outbox, ops)
    with store.engine.connect() as conn:
        naive = {
            (d, t): n
            for d, t, n in conn.execute(
                select(outbox.c.dispensary, outbox.c.destination, func.count())
                .where(outbox.c.status == "done", outbox.c.done_at >= now - 3600)
                .group_by(outbox.c.dispensary, outbox.c.destination)
            )
        }
    got = {(o.dispensary, o.destination): o.delivered_last_hour for o in store.overview()}
    assert {k: v for k, v in got.items() if v} == naive
    assert all(n == 4 for n in naive.values())  # the boundary, twice in the hour, the future
    day = store.throughput(now - 3600, 3600)
    assert sum(n for _, n in day) == sum(naive.values())
    assert day[0][0] <= now - 3600


# --- 3. revision 0007 on a store at 0006 with data ----------------------------------------------


def test_a_store_at_revision_0006_with_data_upgrades_and_reads_along_the_new_index(
    store_url: str,
) -> None:
    first = open_store(store_url)
    try:
        with first.engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "0006")
        _write(first, outbox, [_op(i, "done", NOW if i % 100 else OLD) for i in range(1, 20_001)])
        _write(first, inbox, [_event("applied", OLD)] * 10)
        _tries(first, [100, 200, 201])
        with first.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0006"
    finally:
        first.close()
    store = open_store(store_url)
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()
            if store.dialect == "postgresql":
                conn.execute(text("ANALYZE outbox"))
                conn.commit()
        seen: list[tuple[str, Any]] = []

        def caught(conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
            seen.append((sql, params))

        event.listen(store.engine, "before_cursor_execute", caught)
        try:
            assert store.purge(**CUT) == {"bodies": 10, "quarantined": 0, "delivered": 200}
        finally:
            event.remove(store.engine, "before_cursor_execute", caught)
        assert _state(store)[2] == [201]
        (sql, params), *_ = [(s, p) for s, p in seen if "done_at <" in s]
        explain = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
        with store.engine.connect() as conn:
            plan = str(conn.exec_driver_sql(explain + sql, params).all())
        assert "ix_outbox_settled" in plan, plan
    finally:
        store.close()


# --- more of the step's bounds -----------------------------------------------------------------


def test_a_step_deletes_at_most_limit_scheduled_ticks(store: Any) -> None:
    ticks = [{"job": "j", "tick_at": float(i), "holder": "h", "claimed_at": OLD} for i in range(9)]
    _write(store, schedule_ticks, ticks)
    store.purge_step(**CUT, cursor=PurgeCursor(), limit=3)
    with store.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(schedule_ticks)).scalar_one()
    assert left >= 6


@pytest.mark.sqlite_only
def test_a_purge_stays_within_sqlites_older_limit_of_bound_variables(store: Any) -> None:
    _write(store, outbox, [_op(i, "done", OLD) for i in range(1, 1_201)])

    def limited(conn: Any, *_: Any) -> None:
        conn.connection.dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)

    event.listen(store.engine, "before_cursor_execute", limited)
    try:
        assert store.purge(**CUT)["delivered"] == 1_200
    finally:
        event.remove(store.engine, "before_cursor_execute", limited)
