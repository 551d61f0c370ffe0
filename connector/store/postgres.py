"""The PostgreSQL adapter: the scale-out store, several ``connector serve`` replicas on one
database, on any hosts.

- Durable means committed: a webhook's events are acknowledged after their commit.
- Planning: a planner locks the pending events it plans (``FOR UPDATE SKIP LOCKED``: two
  replicas plan different events) and, before it re-checks and writes, every customer whose
  state it read (a transaction advisory lock on a hash of dispensary and customer id, taken
  in one order); delivery results lock the customers whose contacts they write the same way.
- Claims: ``FOR UPDATE OF outbox SKIP LOCKED``, with the rule that a customer's operation
  waits for every earlier one of it and for any one in flight (at most one in flight per
  customer and destination); a destination's claims take a transaction advisory lock, one
  after the other, so that a claim sees every claim committed before it (a replayed
  operation is earlier than one another claim is taking: the rule alone cannot see that
  claim before it commits). The delivery lease makes one process claim a destination anyway.
- Wake-ups: ``NOTIFY`` once per committed batch (``connector_inbox``, ``connector_outbox``),
  heard by a listening thread per process (:class:`_Listener`); every loop also polls, and
  ``listen=False`` (PgBouncer in transaction mode has no ``LISTEN``) polls only.
- Each process keeps a small pool (``pool_size`` connections, a couple more at a peak).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import psycopg
from sqlalchemy import Connection, text

from connector.store._engine import connection_settings, postgres_engine
from connector.store._statements import (
    RAW_INSERT_OUTBOX,
    RAW_MARK_DECIDED,
    RAW_MARK_PLANNED,
    RAW_PENDING_EVENTS,
    RAW_SAVE_CONTACTS,
    RAW_SAVE_CUSTOMERS,
    RAW_STILL_PENDING,
    Raw,
    claim_statements,
    first_of_customer,
    in_list,
)
from connector.store.abc import InboxRow
from connector.store.operator import OperatorSql
from connector.store.schema import outbox

log = logging.getLogger("connector.store.postgres")

STOP_POLL_SECONDS = 0.1  # the listener thread checks for stop() so often
# a host's clock within this of the database's is used as it is: leases and claims have 15 s
# and more to spare, and a correction measured across a network's round trip is no better
CLOCK_TOLERANCE_SECONDS = 1.0
_DATABASE_TIME = "SELECT EXTRACT(EPOCH FROM clock_timestamp())"
CHANNELS = {"inbox": "connector_inbox", "outbox": "connector_outbox"}
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more (the transaction fails with it)
NOTIFY_PAYLOAD_LIMIT = 7999


def customer_key(dispensary: str, customer_id: str) -> int:
    """The advisory-lock key of one customer: 64 bits of a hash of both ids."""
    digest = hashlib.blake2b(f"{dispensary}\0{customer_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_LOCK_KEYS = (
    "SELECT pg_advisory_xact_lock(k)"
    " FROM unnest(CAST(? AS bigint[])) WITH ORDINALITY AS t(k, n) ORDER BY n"
)
_LOCK_QUEUE = text("SELECT pg_advisory_xact_lock(:space, :key)")
QUEUE_LOCKS = 0x636C  # the two-key advisory lock space of claims ("cl"), apart from customers'
_ANALYZED = ("inbox", "outbox", "customers", "contacts")
_STALE_STATISTICS = text(
    "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema()"
    " AND relname IN ('inbox', 'outbox', 'customers', 'contacts')"
    " AND n_mod_since_analyze > GREATEST(200, 0.1 * n_live_tup)"
)
_SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
# pipeline mode needs libpq 14 or later (the binary package bundles one)
_PIPELINE = psycopg.Pipeline.is_supported()


# The planner's executemany statements as one statement over arrays of their columns (one
# array a column, in the order of the executemany's values): psycopg sends an executemany
# as one statement per row, and its Python per row costs more than the database's work.
# Each writes what its executemany form writes, rows in the same order (outbox ids, which
# order a customer's operations, follow the order of the rows; see
# tests/test_perf2_plan_pg.py).
_UNNEST = {
    RAW_SAVE_CUSTOMERS: (
        "INSERT INTO customers (dispensary, customer_id, last_update_us, content_hash, opt_out,"
        " merged_into, merges, updated_at, opt_out_seen) SELECT * FROM unnest("
        "CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS bigint[]), CAST(%b AS text[]),"
        " CAST(%b AS boolean[]), CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS float8[]),"
        " CAST(%b AS boolean[]))"
        " ON CONFLICT (dispensary, customer_id) DO UPDATE SET"
        " last_update_us = excluded.last_update_us, content_hash = excluded.content_hash,"
        " opt_out = excluded.opt_out, merged_into = excluded.merged_into,"
        " merges = excluded.merges, updated_at = excluded.updated_at,"
        " opt_out_seen = excluded.opt_out_seen"
    ),
    RAW_SAVE_CONTACTS: (
        "INSERT INTO contacts (dispensary, customer_id, destination, contact_id, delivered_hash,"
        " unsubscribed, deactivated, ops_planned, updated_at) SELECT * FROM unnest("
        "CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS text[]),"
        " CAST(%b AS text[]), CAST(%b AS boolean[]), CAST(%b AS boolean[]), CAST(%b AS int[]),"
        " CAST(%b AS float8[]))"
        " ON CONFLICT (dispensary, customer_id, destination) DO UPDATE SET"
        " contact_id = excluded.contact_id, delivered_hash = excluded.delivered_hash,"
        " unsubscribed = excluded.unsubscribed, deactivated = excluded.deactivated,"
        " ops_planned = excluded.ops_planned, updated_at = excluded.updated_at"
    ),
    RAW_INSERT_OUTBOX: (
        "INSERT INTO outbox (dispensary, destination, order_key, customer_id, op, payload,"
        " idempotency_key, status, attempts, created_at, next_attempt_at)"
        " SELECT d, t, o, c, op, p, k, 'pending', 0, ca, na FROM unnest("
        "CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS text[]),"
        " CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS text[]), CAST(%b AS float8[]),"
        " CAST(%b AS float8[])) WITH ORDINALITY AS v(d, t, o, c, op, p, k, ca, na, n)"
        " ORDER BY n"
    ),
    RAW_MARK_DECIDED: (
        "UPDATE inbox SET status = v.s, processed_at = v.a, decisions = v.d FROM unnest("
        "CAST(%b AS text[]), CAST(%b AS float8[]), CAST(%b AS text[]), CAST(%b AS bigint[]))"
        " AS v(s, a, d, i) WHERE inbox.id = v.i"
    ),
    RAW_MARK_PLANNED: (
        "UPDATE inbox SET planned = v.p FROM unnest(CAST(%b AS text[]), CAST(%b AS bigint[]))"
        " AS v(p, i) WHERE inbox.id = v.i"
    ),
}
_PENDING_LOCKED = RAW_PENDING_EVENTS + _SKIP_LOCKED
_CLAIM_EXPIRED_PG, _CLAIM_DUE_PG, _NEXT_DUE_PG = claim_statements(first_of_customer())
_CLAIM_EXPIRED_LOCKED = _CLAIM_EXPIRED_PG.with_for_update(skip_locked=True, of=outbox)
_CLAIM_DUE_LOCKED = _CLAIM_DUE_PG.with_for_update(skip_locked=True, of=outbox)


class PostgresStore(OperatorSql):
    dialect = "postgresql"
    _locks_store = False  # rows are locked one by one (events) and by key (customers)
    _claim_expired = _CLAIM_EXPIRED_LOCKED
    _claim_due = _CLAIM_DUE_LOCKED
    _next_due = _NEXT_DUE_PG

    def __init__(self, url: str, *, timeout: float = 5.0, listen: bool = True) -> None:
        # polling only is how the store runs behind PgBouncer in transaction mode (README)
        engine = postgres_engine(url, timeout=timeout, pooled=not listen)
        super().__init__(url, engine, timeout=timeout)
        self.listen = listen
        self._listener: _Listener | None = None
        try:
            self.open()
            with self.snapshot() as conn:
                self._sync_clock(conn)
        except BaseException:
            self.engine.dispose()  # a refused store (a newer schema) keeps no server connection
            raise

    def _sync_clock(self, conn: Connection) -> None:
        # replicas on several hosts: a lease or claim one writes by its clock, another judges
        # by its own; with a clock a minute ahead a replica took live leases and claims. All
        # of them read the database's clock instead (measured at open and every heartbeat)
        before = time.time()
        database = float(conn.exec_driver_sql(_DATABASE_TIME).scalar_one())
        after = time.time()
        offset = database - (before + after) / 2
        self._clock_offset = offset if abs(offset) >= CLOCK_TOLERANCE_SECONDS else 0.0

    def _started_write(self, conn: Connection, durable: bool) -> None:
        if not durable:
            # as SQLite's synchronous=NORMAL for these: claims, plans and delivery results are
            # redone from what is durable if a crash loses them; received events always wait
            # for the WAL flush (202 only after it). Sent with the BEGIN (one round trip)
            with self._together(conn):
                Raw(conn).run("SET LOCAL synchronous_commit = off")

    @contextlib.contextmanager
    def _together(self, conn: Connection) -> Iterator[object]:
        """psycopg's pipeline mode: what the block sends goes in one round trip at its end
        (or at the first result read), a transaction's BEGIN with it. An error of the
        database is raised at the end of the block as SQLAlchemy raises it (wrapped, a lost
        connection invalidated), never with parameters (customer values)."""
        driver = conn.connection.dbapi_connection
        assert driver is not None
        if not _PIPELINE:
            yield None
            return
        try:
            with driver.pipeline():
                yield None
        except psycopg.Error as exc:
            conn._handle_dbapi_exception(exc, "(pipeline)", None, None, None)

    def _many(self, conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement over arrays of the rows' columns (:data:`_UNNEST`), where ``sql``
        has that form; otherwise ``Raw.many``."""
        unnest = _UNNEST.get(sql)
        if unnest is None or len(rows) < 2:
            Raw(conn).many(sql, rows)
            return
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursor = driver.cursor()
        try:
            cursor.execute(unnest, [list(column) for column in zip(*rows, strict=True)])
        except psycopg.Error as exc:
            conn._handle_dbapi_exception(exc, unnest, None, cursor, None)
        cursor.close()

    def _read_together(
        self, conn: Connection, queries: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[list[Any]]:
        """The rows of each of ``queries``, all sent in one round trip."""
        if not _PIPELINE:
            return super()._read_together(conn, queries)
        if not queries:
            return []
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursors = []
        text = ""
        try:
            with driver.pipeline():
                for sql, params in queries:
                    text = sql.replace("?", "%s")
                    cursor = driver.cursor()
                    cursor.execute(text, params)
                    cursors.append(cursor)
                found: list[Any] = []
                for cursor in cursors:
                    found.append(cursor.fetchall())
                    cursor.close()
        except psycopg.Error as exc:
            conn._handle_dbapi_exception(exc, text, None, None, None)
        return found

    def _notify(self, conn: Connection, channel: str, payload: str = "") -> None:
        # delivered at commit, once per transaction for the same payload
        if len(payload.encode()) > NOTIFY_PAYLOAD_LIMIT:
            # a batch over a few hundred destinations: it would fail to commit, at every
            # try, and planning would stop; an empty payload wakes every worker instead
            payload = ""
        # no result read: sent with the batch's writes (see _together)
        Raw(conn).run("SELECT pg_notify(?, ?)", (CHANNELS[channel], payload))

    def on_commit(self, channel: str, callback: Callable[[str], None]) -> None:
        super().on_commit(channel, callback)
        if self.listen and self._listener is None:
            self._listener = _Listener(self.engine.url, self._listeners, self.timeout)
            self._listener.start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        super().close()

    def _lock_events(self, conn: Connection, ids: Sequence[int]) -> set[int]:
        if not ids:
            return set()
        sql = RAW_STILL_PENDING + in_list(len(ids)) + _SKIP_LOCKED
        return {r[0] for r in Raw(conn).rows(sql, list(ids))}

    def _pending_locked(self, conn: Connection, limit: int) -> list[InboxRow]:
        return [InboxRow(*r) for r in Raw(conn).rows(_PENDING_LOCKED, (limit,))]

    def _lock_queue(self, conn: Connection, dispensary: str, destination: str) -> None:
        digest = hashlib.blake2b(f"{dispensary}\0{destination}".encode(), digest_size=4).digest()
        key = int.from_bytes(digest, "big", signed=True)
        conn.execute(_LOCK_QUEUE, {"space": QUEUE_LOCKS, "key": key})

    def _lock_queries(self, dispensary: str, ids: Iterable[str]) -> list[tuple[str, Sequence[Any]]]:
        keys = sorted({customer_key(dispensary, c) for c in ids})
        return [(_LOCK_KEYS, (keys,))] if keys else []

    def maintain(self) -> None:
        """``ANALYZE`` the busy tables whose statistics fell behind (or never were): without
        them PostgreSQL plans a lookup of 64 customers by key as a scan of the dispensary's
        every customer (3.7 ms instead of 0.07 at 1,200 customers), and autovacuum analyzes
        a new table only after its first minute of changes."""
        with self.engine.connect() as conn:
            for name in conn.execute(_STALE_STATISTICS).scalars().all():
                if name in _ANALYZED:
                    conn.exec_driver_sql(f"ANALYZE {name}")
            conn.commit()

    @property
    def listening(self) -> bool:
        return self._listener is not None and self._listener.connected


class _Listener:
    """A thread with its own connection that ``LISTEN``\\s on the store's channels and calls
    the callbacks registered for them; reconnects with a backoff when the database goes."""

    def __init__(
        self, url: Any, callbacks: dict[str, list[Callable[[str], None]]], timeout: float = 5.0
    ) -> None:
        self.dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        # the pool's keepalives and TCP timeout: a connection that only ever reads, on a
        # network that drops it silently, would otherwise wait for notifications for good
        self.settings = connection_settings(timeout)
        self.callbacks = callbacks
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        names = {v: k for k, v in CHANNELS.items()}
        delay = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, **self.settings) as conn:
                    for channel in CHANNELS.values():
                        conn.execute(f"LISTEN {channel}")
                    self.connected, delay = True, 0.5
                    self._wake_all()  # what was committed while nobody listened
                    while not self._stop.is_set():
                        # the wait is also how soon stop() is heard: a store's close (a
                        # service's shutdown, every test) waited up to a second for it
                        for note in conn.notifies(timeout=STOP_POLL_SECONDS, stop_after=64):
                            for callback in self.callbacks.get(names.get(note.channel, ""), ()):
                                callback(note.payload)
            except psycopg.Error as exc:
                if self.connected:
                    log.warning("store listener lost its connection: %s", exc.__class__.__name__)
            self.connected = False
            self._stop.wait(delay)
            delay = min(delay * 2, 10.0)

    def _wake_all(self) -> None:
        for callbacks in self.callbacks.values():
            for callback in callbacks:
                with contextlib.suppress(Exception):
                    callback("")
