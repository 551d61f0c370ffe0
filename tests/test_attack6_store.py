"""Adversary (round 6) on the store's speed changes: the queued-key read per destination
(plans._queued_queries, RAW_QUEUED_KEYS), the partial index of operations in flight
(ix_outbox_inflight, INFLIGHT, revision 0006) and the per-pair queue counts
(admin.outbox_pairs / open_counts) that replaced one GROUP BY."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, insert, select, text, update

from connector.planner import Operation
from connector.store import plans
from connector.store._statements import RAW_QUEUED_KEYS, in_list
from connector.store.abc import PlannedBatch
from connector.store.admin import open_counts, outbox_pairs
from connector.store.schema import INFLIGHT, outbox

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# --- 1. the queued-key read per destination --------------------------------------------------


def _old_queued_queries(
    dispensary: str, operations: Sequence[Operation]
) -> list[tuple[str, Sequence[Any]]]:
    """The read before 9eda6b1: by dispensary and key, any destination (the reference)."""
    keys = list(dict.fromkeys(op.idempotency_key for op in operations))
    sql = (
        "SELECT destination, idempotency_key FROM outbox"
        " WHERE dispensary = ? AND idempotency_key IN "
    )
    return [
        (sql + in_list(len(part)), (dispensary, *part))
        for chunk in range(0, len(keys), 500)
        if (part := keys[chunk : chunk + 500])
    ]


def _write(store: Any, batch: dict[str, list[Operation]]) -> None:
    """A planned batch written as plan_batch writes one after its re-check (the pipelined
    read of locks, states and queued keys, then _write_batch)."""
    planned = PlannedBatch(
        rows=[],
        outcomes={},
        related={},
        loaded={d: {} for d in batch},
        current={d: {} for d in batch},
        operations=batch,
        conflicts={d: [] for d in batch},
        failures=[],
    )
    with store.transaction(durable=False) as conn:
        unchanged, queued = store._recheck(conn, planned)
        assert unchanged
        store._write_batch(conn, planned, queued)


def _outbox(store: Any, prefix: str) -> list[tuple[Any, ...]]:
    with store.snapshot() as conn:
        rows = conn.execute(
            select(
                outbox.c.dispensary,
                outbox.c.destination,
                outbox.c.order_key,
                outbox.c.customer_id,
                outbox.c.op,
                outbox.c.idempotency_key,
                outbox.c.status,
                outbox.c.payload,
            )
            .where(outbox.c.dispensary.startswith(prefix, autoescape=True))
            .order_by(outbox.c.id)
        ).all()
    return [(r[0][len(prefix) :], *r[1:]) for r in rows]


_op = st.builds(
    lambda dest, cust, key, kind, rep, n: Operation(
        destination=dest,
        customer_id=cust,
        order_key=cust,
        op=kind,
        body={"n": n},
        idempotency_key=key,
        replaces_waiting=rep and kind == "upsert",
    ),
    st.sampled_from(["d0", "d1", "D0", "d0 ", "", "é"]),
    st.sampled_from(["c1", "c2", "c3"]),
    st.sampled_from(["k1", "k2", "k3", "K1", "k1 ", "k4"]),
    st.sampled_from(["upsert", "upsert", "unsubscribe"]),
    st.booleans(),
    st.integers(0, 3),
)
_batch = st.dictionaries(st.sampled_from(["x", "y"]), st.lists(_op, max_size=10), max_size=2)


@SETTINGS
@given(batches=st.lists(_batch, min_size=1, max_size=4))
def test_outbox_equals_the_old_per_dispensary_read(
    store: Any, batches: list[dict[str, list[Operation]]]
) -> None:
    """Random batches over several destinations and keys (the same key for two
    destinations, twice in one batch, supersedes across batches) give the outbox the read
    by dispensary alone gave."""
    tag = uuid.uuid4().hex[:8]
    new, old = f"n{tag}/", f"o{tag}/"
    for batch in batches:
        _write(store, {new + d: ops for d, ops in batch.items()})
    saved = plans._queued_queries
    plans._queued_queries = _old_queued_queries  # type: ignore[assignment]
    try:
        for batch in batches:
            _write(store, {old + d: ops for d, ops in batch.items()})
    finally:
        plans._queued_queries = saved
    got, want = _outbox(store, new), _outbox(store, old)
    assert got == want
    keys = [(r[0], r[1], r[5]) for r in got]
    assert len(keys) == len(set(keys))
    wanted = {
        (d, op.destination, op.idempotency_key) for b in batches for d, o in b.items() for op in o
    }
    assert set(keys) <= wanted  # an upsert replaced within its batch is never written


def test_over_500_keys_per_destination_many_destinations_and_repeats(store: Any) -> None:
    """1,201 keys on each of 7 destinations, half of them queued by an earlier batch, each key
    twice in the batch: every (destination, key) queued once, none lost past a chunk."""
    dests = [f"dest{i}" for i in range(7)]

    def op(dest: str, i: int) -> Operation:
        return Operation(dest, f"c{i}", f"c{i}", "upsert", {"i": i}, f"key{i:05d}")

    _write(store, {"big": [op(d, i) for d in dests for i in range(0, 1201, 2)]})
    batch = [op(d, i) for i in range(1201) for d in dests]
    _write(store, {"big": batch + batch[::-1]})
    with store.snapshot() as conn:
        rows = conn.execute(
            select(outbox.c.destination, outbox.c.idempotency_key).where(
                outbox.c.dispensary == "big"
            )
        ).all()
    assert len(rows) == 7 * 1201
    assert {tuple(r) for r in rows} == {(d, f"key{i:05d}") for d in dests for i in range(1201)}
    queries = plans._queued_queries("big", batch)
    assert len(queries) == 7 * 3
    assert all(sql.startswith(RAW_QUEUED_KEYS) for sql, _ in queries)


def test_recheck_bookkeeping_with_many_dispensaries_and_destinations(store: Any) -> None:
    """_recheck slices one pipelined read by counts: dispensaries whose operations need
    0, 1 and several queries each (and one with none) keep their own queued keys."""
    ops = {
        "a": [Operation(f"t{i}", "c", "c", "upsert", {}, "k") for i in range(3)],
        "b": [],
        "c": [Operation("t0", "c", "c", "upsert", {}, f"k{i}") for i in range(1001)],
        "d": [Operation("t1", "c", "c", "upsert", {}, "k")],
    }
    _write(store, {"a": ops["a"][:1], "c": ops["c"][:3], "d": ops["d"]})
    planned = PlannedBatch(
        [], {}, {}, {d: {} for d in ops}, {d: {} for d in ops}, ops, {d: [] for d in ops}, []
    )
    with store.transaction(durable=False) as conn:
        _, queued = store._recheck(conn, planned)
    assert queued == {
        "a": {("t0", "k")},
        "b": set(),
        "c": {("t0", "k0"), ("t0", "k1"), ("t0", "k2")},
        "d": {("t1", "k")},
    }


# --- 2. the partial index of operations in flight --------------------------------------------


def _put(conn: Any, rows: list[dict[str, Any]]) -> None:
    base = {
        "dispensary": "x",
        "destination": "t",
        "customer_id": "c",
        "op": "upsert",
        "payload": "{}",
        "attempts": 0,
        "created_at": 1.0,
        "next_attempt_at": 1.0,
    }
    conn.execute(insert(outbox), [{**base, "order_key": r["idempotency_key"], **r} for r in rows])


def test_heartbeat_renews_and_exit_releases_only_this_process_s_claims(store: Any) -> None:
    me, other = store.process_id, "someone-else"
    rows = [
        {"idempotency_key": "mine", "status": "inflight", "claimed_by": me, "claimed_until": 1.0},
        {
            "idempotency_key": "theirs",
            "status": "inflight",
            "claimed_by": other,
            "claimed_until": 1.0,
        },
        {"idempotency_key": "done", "status": "done", "claimed_by": me, "claimed_until": 1.0},
        {"idempotency_key": "pend", "status": "pending", "claimed_by": me, "claimed_until": 1.0},
    ]
    with store.transaction() as conn:
        _put(conn, rows)

    def state() -> dict[str, tuple[Any, ...]]:
        with store.snapshot() as conn:
            found = conn.execute(
                select(
                    outbox.c.idempotency_key,
                    outbox.c.status,
                    outbox.c.claimed_by,
                    outbox.c.claimed_until,
                )
            ).all()
        return {r[0]: tuple(r[1:]) for r in found}

    store.heartbeat()
    after = state()
    assert after["mine"][0] == "inflight"
    assert after["mine"][2] > 1.0
    assert after["theirs"] == ("inflight", other, 1.0)
    assert after["done"] == ("done", me, 1.0)
    assert after["pend"] == ("pending", me, 1.0)
    assert store.release_claims() == 1
    after = state()
    assert after["mine"] == ("pending", None, None)
    assert after["theirs"] == ("inflight", other, 1.0)
    assert after["done"] == ("done", me, 1.0)


def test_register_process_releases_a_gone_process_s_claims_only(store: Any) -> None:
    from connector.store import open_store
    from connector.store.schema import processes

    with store.transaction() as conn:
        conn.execute(
            insert(processes).values(
                id="gone", host="elsewhere", pid=1, started_at=0.0, heartbeat_at=0.0
            )
        )
        _put(
            conn,
            [
                {"idempotency_key": "g", "status": "inflight", "claimed_by": "gone"},
                {"idempotency_key": "m", "status": "inflight", "claimed_by": store.process_id},
                {"idempotency_key": "gd", "status": "dead", "claimed_by": "gone"},
            ],
        )
    second = open_store(str(store.engine.url.render_as_string(hide_password=False)))
    try:
        assert second.register_process() == 1
    finally:
        second.release_claims()
        second.close()
    with store.snapshot() as conn:
        found = dict(conn.execute(select(outbox.c.idempotency_key, outbox.c.status)).all())
    assert found == {"g": "pending", "m": "inflight", "gd": "dead"}


def _index_sql(store: Any) -> str | None:
    with store.engine.connect() as conn:
        if store.engine.dialect.name == "sqlite":
            return conn.execute(
                text("SELECT sql FROM sqlite_master WHERE name = 'ix_outbox_inflight'")
            ).scalar_one_or_none()
        return conn.execute(
            text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_outbox_inflight'"
                " AND schemaname = current_schema()"
            )
        ).scalar_one_or_none()


def test_downgrade_to_0005_and_upgrade_again_keeps_the_index_partial(store: Any) -> None:
    from alembic import command

    from connector.store.migrate import alembic_config, head, upgrade_sql

    made = _index_sql(store)
    assert made is not None
    assert "WHERE" in made.upper()
    assert "inflight" in made
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(connection=conn), "0005")
    assert _index_sql(store) is None
    url = store.engine.url.render_as_string(hide_password=False)
    ddl = upgrade_sql(url)
    assert "ix_outbox_inflight" in ddl, ddl
    assert "WHERE status = 'inflight'" in ddl, ddl
    assert f"version_num='{head()}'" in ddl
    with store.engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), "head")
    again = _index_sql(store)
    assert again == made


@pytest.mark.postgresql_only
def test_postgresql_uses_the_partial_index_for_claims_after_analyze(store: Any) -> None:
    with store.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (dispensary, destination, order_key, customer_id, op,"
                " payload, idempotency_key, status, attempts, created_at, next_attempt_at,"
                " claimed_by)"
                " SELECT 'x', 't', 'o' || i, 'c', 'upsert', '{}', 'k' || i, 'done', 0, 1, 1,"
                " 'p' || (i % 50) FROM generate_series(1, 30000) AS i"
            )
        )
        _put(
            conn,
            [
                {"idempotency_key": f"f{i}", "status": "inflight", "claimed_by": f"p{i % 3}"}
                for i in range(6)
            ],
        )
    with store.engine.connect() as conn:
        conn.execute(text("ANALYZE outbox"))
        statements = [
            update(outbox).where(INFLIGHT, outbox.c.claimed_by == "p1").values(claimed_until=9.0),
            update(outbox)
            .where(INFLIGHT, outbox.c.claimed_by.in_(["p1", "p2"]))
            .values(status="pending", claimed_by=None, claimed_until=None),
        ]
        for statement in statements:
            compiled = statement.compile(
                dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
            )
            plan = "\n".join(
                r[0] for r in conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params)
            )
            assert "ix_outbox_inflight" in plan, plan
        # psycopg prepares a statement run often (the heartbeat's): its generic plan too
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        conn.exec_driver_sql(
            "PREPARE renew(text, float8) AS UPDATE outbox SET claimed_until = $2"
            " WHERE status = 'inflight' AND claimed_by = $1"
        )
        plan = "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN EXECUTE renew('p1', 9.0)"))
        assert "ix_outbox_inflight" in plan, plan
        conn.rollback()


# --- 3. per-pair counts equal the old GROUP BY -----------------------------------------------

NAMES = [
    "",
    " ",
    "a",
    "a ",
    "A",
    "ab",
    "a b",
    "aB",
    "é",
    "e\u0301",
    "ß",
    "ss",
    "Z",
    "z",
    "😀",
    "a\t",
    "_",
    "%",
]
STATUSES = ["pending", "inflight", "dead", "done", "superseded"]


def _old_counts(conn: Any, statuses: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in conn.execute(
            select(
                outbox.c.dispensary,
                outbox.c.destination,
                outbox.c.status,
                func.count(),
                func.min(outbox.c.created_at),
            )
            .where(outbox.c.status.in_(statuses))
            .group_by(outbox.c.dispensary, outbox.c.destination, outbox.c.status)
        )
    ]


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(NAMES),
            st.sampled_from(NAMES),
            st.sampled_from(STATUSES),
            st.integers(0, 1000),
        ),
        max_size=40,
    )
)
def test_open_counts_equal_the_old_group_by(
    store: Any, rows: list[tuple[str, str, str, int]]
) -> None:
    with store.transaction() as conn:
        conn.execute(outbox.delete())
        if rows:
            _put(
                conn,
                [
                    {
                        "dispensary": d,
                        "destination": t,
                        "status": s,
                        "created_at": float(c),
                        "idempotency_key": f"k{i}",
                    }
                    for i, (d, t, s, c) in enumerate(rows)
                ],
            )
    with store.snapshot() as conn:
        assert sorted(outbox_pairs(conn)) == sorted({(d, t) for d, t, _, _ in rows})
        for statuses in (("pending", "inflight", "dead"), ("pending", "inflight")):
            got = [(d, t, s, c, float(o)) for d, t, s, c, o in open_counts(conn, statuses)]
            want = [(d, t, s, int(c), float(o)) for d, t, s, c, o in _old_counts(conn, statuses)]
            assert sorted(got) == sorted(want)
    open_ops = sum(1 for _, _, s, _ in rows if s in ("pending", "inflight"))
    assert store.pending_work() == open_ops


@pytest.mark.postgresql_only
def test_pending_work_is_one_consistent_count_on_postgresql(store: Any, store_url: str) -> None:
    """Pair A has only a delivered operation, pair B one pending. Between open_counts'
    read of A and of B, another process queues an operation for A and delivers B's (one
    commit: at no moment is nothing open). The old single GROUP BY counted 1; pair by pair
    at READ COMMITTED, 0: a drain (the demo's `pending_work() == 0`) stops with work open."""
    _pending_work_while_work_moves(store, store_url)


@pytest.mark.sqlite_only
def test_pending_work_is_one_consistent_count_on_sqlite(store: Any, store_url: str) -> None:
    """The same on SQLite: its read transaction is one snapshot (WAL), the count holds."""
    _pending_work_while_work_moves(store, store_url)


def _pending_work_while_work_moves(store: Any, store_url: str) -> None:
    with store.transaction() as conn:
        _put(
            conn,
            [
                {"destination": "A", "status": "done", "idempotency_key": "a0"},
                {"destination": "B", "status": "pending", "idempotency_key": "b0"},
            ],
        )
    fired = threading.Event()

    def meanwhile(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        values = params.values() if isinstance(params, dict) else params or ()
        lowered = statement.lower()
        if fired.is_set() or "count" not in lowered or "outbox" not in lowered:
            return
        # the pair-by-pair read: just before B's; one statement over the outbox: before it
        if "destination" in lowered and "B" not in list(values):
            return
        fired.set()
        with _OtherWriter(store_url) as other:
            other.execute(
                "INSERT INTO outbox (dispensary, destination, order_key, customer_id, op,"
                " payload, idempotency_key, status, attempts, created_at, next_attempt_at)"
                " VALUES ('x', 'A', 'a1', 'c', 'upsert', '{}', 'a1', 'pending', 0, 2, 2)"
            )
            other.execute("UPDATE outbox SET status = 'done' WHERE idempotency_key = 'b0'")

    event.listen(store.engine, "before_cursor_execute", meanwhile)
    try:
        count = store.pending_work()
    finally:
        event.remove(store.engine, "before_cursor_execute", meanwhile)
    assert fired.is_set()
    assert count >= 1


def test_a_legacy_store_upgraded_gets_the_partial_index_and_heartbeat_uses_it(
    tmp_path: Any,
) -> None:
    """A store from before Alembic (ab3e061, legacy schema 3) upgraded in place: the index
    is partial and SQLite's plan of the heartbeat's renewal searches it, not the table."""
    import shutil
    from pathlib import Path

    from connector.store import open_store

    path = tmp_path / "old.sqlite"
    shutil.copy(Path(__file__).parent / "data" / "store_ab3e061.sqlite", path)
    store = open_store(f"sqlite:///{path}")
    try:
        made = _index_sql(store)
        assert made is not None
        assert "WHERE status = 'inflight'" in made
        statement = (
            update(outbox).where(INFLIGHT, outbox.c.claimed_by == "p").values(claimed_until=1.0)
        )
        with store.engine.connect() as conn:
            compiled = statement.compile(dialect=conn.dialect)
            plan = " ".join(
                str(r[-1])
                for r in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + str(compiled),
                    tuple(compiled.params[k] for k in compiled.positiontup or ()),
                )
            )
        assert "ix_outbox_inflight" in plan, plan
    finally:
        store.close()


def test_many_destinations_in_one_pipelined_read(store: Any) -> None:
    """1,500 destinations, a statement each in one read (PostgreSQL: one pipeline), half
    queued before: the rest queued once, none twice."""
    ops = [Operation(f"t{i:04d}", "c", "c", "upsert", {}, "k") for i in range(1500)]
    _write(store, {"m": ops[::2]})
    _write(store, {"m": ops + ops})
    with store.snapshot() as conn:
        rows = conn.execute(
            select(outbox.c.destination, func.count())
            .where(outbox.c.dispensary == "m")
            .group_by(outbox.c.destination)
        ).all()
    assert len(rows) == 1500
    assert {count for _, count in rows} == {1}


@pytest.mark.parametrize("path", ["enqueue", "planned"])
def test_enqueue_and_planned_paths_agree_with_supersede_across_destinations(
    store: Any, path: str
) -> None:
    """An upsert that replaces a waiting one supersedes only its own destination's: the
    same customer and order key on another destination stays pending."""
    first = [
        Operation("a", "c", "c", "upsert", {"v": 1}, "k1"),
        Operation("b", "c", "c", "upsert", {"v": 1}, "k1"),
    ]
    newer = [Operation("a", "c", "c", "upsert", {"v": 2}, "k2", replaces_waiting=True)]
    for batch in (first, newer):
        if path == "enqueue":
            with store.transaction(durable=False) as conn:
                store.enqueue(conn, "s", batch)
        else:
            _write(store, {"s": batch})
    with store.snapshot() as conn:
        rows = conn.execute(
            select(outbox.c.destination, outbox.c.idempotency_key, outbox.c.status).order_by(
                outbox.c.id
            )
        ).all()
    assert [tuple(r) for r in rows] == [
        ("a", "k1", "superseded"),
        ("b", "k1", "pending"),
        ("a", "k2", "pending"),
    ]


@pytest.fixture(scope="module")
def icu_store() -> Any:
    """A store on a PostgreSQL database whose default collation is ICU's en-US (as a
    server set up for English sorts text), not the test server's C.UTF-8."""
    from conftest import PG_SERVER

    from connector.store import open_store

    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.Error:
        pytest.skip("no PostgreSQL server")
    name = f"icu_{uuid.uuid4().hex[:12]}"
    with admin:
        try:
            admin.execute(
                f'CREATE DATABASE "{name}" TEMPLATE template0 LOCALE_PROVIDER icu'
                " ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
        except psycopg.Error as exc:
            pytest.skip(f"no ICU database ({exc.__class__.__name__})")
        try:
            opened = open_store(f"{PG_SERVER}/{name}", listen=False)
            with opened.engine.connect() as conn:  # sorted as English, not by code point
                assert conn.execute(text("SELECT 'a' < 'B' AND 'e\u0301' < 'f'")).scalar()
            try:
                yield opened
            finally:
                opened.close()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(NAMES),
            st.sampled_from(NAMES),
            st.sampled_from(STATUSES),
            st.integers(0, 1000),
        ),
        max_size=40,
    )
)
def test_open_counts_equal_the_old_group_by_under_an_icu_collation(
    icu_store: Any, rows: list[tuple[str, str, str, int]]
) -> None:
    test_open_counts_equal_the_old_group_by.hypothesis.inner_test(icu_store, rows)  # type: ignore[attr-defined]


class _OtherWriter:
    """Another process's connection, autocommitting each statement as given."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> Any:
        if self.url.startswith("sqlite"):
            import sqlite3

            self.conn: Any = sqlite3.connect(self.url.removeprefix("sqlite:///"))
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            self.conn = psycopg.connect(self.url)
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.commit()
        self.conn.close()


def test_recheck_slices_locks_states_and_keys_of_unsorted_dispensaries(store: Any) -> None:
    """Related customers (locks and state reads first in the one read, PostgreSQL: FOR
    UPDATE) named in an order that is not sorted, dispensaries with operations and none:
    each dispensary's queued keys are its own after the slicing."""
    ops = {
        "z": [Operation(f"t{i}", "c", "c", "upsert", {}, f"k{i}") for i in range(4)],
        "a": [Operation("t0", "c", "c", "upsert", {}, f"k{i}") for i in range(600)],
        "m": [],
    }
    _write(store, {"z": ops["z"][1:3], "a": ops["a"][499:502]})
    related = {"m": {"c9"}, "z": {"c1", "c2"}, "a": {f"c{i}" for i in range(700)}}
    planned = PlannedBatch([], {}, related, {d: {} for d in ops}, {d: {} for d in ops}, ops, {}, [])
    with store.transaction(durable=False) as conn:
        unchanged, queued = store._recheck(conn, planned)
    assert unchanged
    assert queued == {
        "z": {("t1", "k1"), ("t2", "k2")},
        "a": {("t0", "k499"), ("t0", "k500"), ("t0", "k501")},
        "m": set(),
    }
