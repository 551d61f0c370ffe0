"""The statements the hot paths run, built once: building a statement (and its cache key) costs
far more than the database takes to run it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import BindParameter

from connector.store.schema import contacts, inbox, outbox

CLAIM_SECONDS = 25.0  # a claim never outlives this without renewal (heartbeat: every 5 s)
LEASE_SECONDS = 20.0  # a destination's delivery lease, renewed by its holder every 5 s


def _settle(conn: Connection, where: Any, status: str, **values: Any) -> int:
    """End an attempt: count it, give back the claim, set the new status. Returns the
    operations settled."""
    result = conn.execute(
        update(outbox)
        .where(where)
        .values(
            status=status,
            attempts=outbox.c.attempts + 1,
            claimed_by=None,
            claimed_until=None,
            **values,
        )
    )
    return result.rowcount or 0


def _going_first(other: Any, now: Any) -> tuple[Any, ...]:
    """``other`` (an alias of the outbox) is an operation of the same customer that goes
    first: an earlier one still pending or in flight, or any one in flight whose claim has
    not expired at ``now``.

    The second half is for a dead operation replayed: it goes back under its old id, behind
    which a later operation of the customer may be in flight already (claimed while the
    first was dead); it waits for that one to end, not be sent beside it. An expired claim
    does not hold it up (its holder is gone; both would otherwise wait for each other)."""
    return (
        other.c.dispensary == outbox.c.dispensary,
        other.c.destination == outbox.c.destination,
        other.c.order_key == outbox.c.order_key,
        other.c.id != outbox.c.id,
        or_(
            and_(other.c.id < outbox.c.id, other.c.status.in_(("pending", "inflight"))),
            and_(other.c.status == "inflight", other.c.claimed_until >= now),
        ),
    )


def _blocked(now: Any = None) -> Any:
    """Another operation of the same customer goes first (:func:`_going_first`)."""
    now = bindparam("now") if now is None else now
    return exists().where(*_going_first(aliased(outbox), now))


def first_of_customer() -> Any:
    """No other operation of the same customer goes first (:func:`_going_first`), as a
    scalar subquery probed once per candidate row through ``ix_outbox_order`` (PostgreSQL
    turns ``NOT EXISTS`` into an anti-join whose plan, on a table without statistics yet, can
    scan every operation of the destination for each claim)."""
    other = aliased(outbox)
    return (
        select(other.c.id)
        .where(*_going_first(other, bindparam("now")))
        .limit(1)
        .scalar_subquery()
        .is_(None)
    )


# The delivery loop's statements, built once: building a statement (and its cache key) costs
# far more than SQLite takes to run it (measured: 350 us an operation before, bench/pipeline).
_QUEUE = and_(
    outbox.c.dispensary == bindparam("dispensary"),
    outbox.c.destination == bindparam("destination"),
)


def claim_statements(claimable: Any) -> tuple[Any, Any, Any]:
    """The claim of expired and of due operations, and the next due time, for a customer's
    "nothing earlier in the way" condition ``claimable``. Each claim is an index walk in id
    order that stops at the limit (an OR of both would scan and sort every pending row)."""
    expired = (
        select(outbox)
        .where(
            _QUEUE,
            outbox.c.status == "inflight",
            outbox.c.claimed_until < bindparam("now"),
            claimable,
        )
        .order_by(outbox.c.id)
        .limit(bindparam("limit"))
    )
    due = (
        select(outbox)
        .where(
            _QUEUE,
            outbox.c.status == "pending",
            outbox.c.next_attempt_at <= bindparam("now"),
            claimable,
        )
        .order_by(outbox.c.id)
        .limit(bindparam("limit"))
    )
    next_due = select(func.min(outbox.c.next_attempt_at)).where(
        _QUEUE, outbox.c.status == "pending", claimable
    )
    return expired, due, next_due


_CLAIM_EXPIRED, _CLAIM_DUE, _NEXT_DUE = claim_statements(~_blocked())
# the planner's statements, likewise
_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
_MARK_EVENTS = (
    update(inbox)
    .where(inbox.c.id.in_(_IDS))
    .values(status=bindparam("status"), processed_at=bindparam("now"))
)
# per (destination, order key) of a dispensary, its last operation not yet settled
_OPEN = outbox.c.status.in_(("pending", "inflight"))
_last = (
    select(func.max(outbox.c.id))
    .where(
        outbox.c.dispensary == bindparam("dispensary"),
        outbox.c.order_key.in_(bindparam("keys", expanding=True)),
        _OPEN,
    )
    .group_by(outbox.c.destination, outbox.c.order_key)
)
_LAST_OPEN = select(
    outbox.c.id,
    outbox.c.destination,
    outbox.c.order_key,
    outbox.c.customer_id,
    outbox.c.op,
    outbox.c.status,
).where(outbox.c.id.in_(_last))
_SUPERSEDE = (
    update(outbox)
    .where(outbox.c.id.in_(bindparam("ids", expanding=True)), outbox.c.status == "pending")
    .values(
        status="superseded", done_at=bindparam("now"), last_error="superseded by a newer upsert"
    )
)
_INSERT_INBOX = insert(inbox)
_CONTACT_IDS = select(contacts.c.customer_id, contacts.c.contact_id).where(
    contacts.c.dispensary == bindparam("dispensary"),
    contacts.c.destination == bindparam("destination"),
    contacts.c.customer_id.in_(bindparam("ids", expanding=True)),
)


class Raw:
    """Hot statements (a planned batch's, PostgreSQL's per-transaction ones) on the driver's
    own connection, inside the transaction of a SQLAlchemy connection: SQLAlchemy's
    execution (compiled cache lookup, parameter processing, result wrapping) costs several
    times what either database takes to run these short statements, and a batch runs a
    dozen of them whatever its size.

    Statements are plain SQL that both dialects read alike, written with ``?`` placeholders
    (PostgreSQL's driver is given ``%s``); a list of values is :func:`in_list`. A driver
    error is raised as SQLAlchemy raises it (wrapped, a lost connection invalidated), never
    with its parameters (customer values)."""

    __slots__ = ("_conn", "_driver", "_error", "_pg")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._driver: Any = conn.connection.dbapi_connection
        self._error: Any = conn.dialect.loaded_dbapi.Error
        self._pg = conn.dialect.name == "postgresql"

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows ``sql`` selects, as tuples."""
        text = _for_psycopg(sql) if self._pg else sql
        cursor = self._driver.cursor()
        try:
            cursor.execute(text, params)
            found: list[Any] = cursor.fetchall()
        except self._error as exc:
            self._conn._handle_dbapi_exception(exc, text, None, cursor, None)
        cursor.close()
        return found

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement that returns no rows."""
        text = _for_psycopg(sql) if self._pg else sql
        cursor = self._driver.cursor()
        try:
            cursor.execute(text, params)
        except self._error as exc:
            self._conn._handle_dbapi_exception(exc, text, None, cursor, None)
        cursor.close()

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each of ``params``."""
        if not params:
            return
        text = _for_psycopg(sql) if self._pg else sql
        cursor = self._driver.cursor()
        try:
            cursor.executemany(text, params)
        except self._error as exc:
            self._conn._handle_dbapi_exception(exc, text, None, cursor, None)
        cursor.close()


@lru_cache(maxsize=256)
def _for_psycopg(sql: str) -> str:
    return sql.replace("?", "%s")


@lru_cache(maxsize=1024)
def in_list(count: int) -> str:
    """``(?,?,...)``: ``count`` placeholders for ``IN``; ``count`` at least 1."""
    return "(" + ",".join("?" * count) + ")"


RAW_PENDING_EVENTS = (
    "SELECT id, dispensary, source, customer_id, body, run_id, received_at FROM inbox"
    " WHERE status = 'pending' ORDER BY id LIMIT ?"
)
RAW_STILL_PENDING = "SELECT id FROM inbox WHERE status = 'pending' AND id IN "
RAW_MARK_DECIDED = "UPDATE inbox SET status = ?, processed_at = ?, decisions = ? WHERE id = ?"
RAW_MARK_PLANNED = "UPDATE inbox SET planned = ? WHERE id = ?"
RAW_LOAD_CONTACTS = (
    "SELECT customer_id, destination, contact_id, delivered_hash, unsubscribed, deactivated,"
    " ops_planned FROM contacts WHERE dispensary = ? AND customer_id IN "
)
RAW_LOAD_CUSTOMERS = (
    "SELECT customer_id, last_update_us, content_hash, opt_out, merged_into, merges,"
    " opt_out_seen FROM customers WHERE dispensary = ? AND customer_id IN "
)
# a changed state is written whether its row exists or not: one statement, no read first
RAW_SAVE_CUSTOMERS = (
    "INSERT INTO customers (dispensary, customer_id, last_update_us, content_hash, opt_out,"
    " merged_into, merges, updated_at, opt_out_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (dispensary, customer_id) DO UPDATE SET"
    " last_update_us = excluded.last_update_us, content_hash = excluded.content_hash,"
    " opt_out = excluded.opt_out, merged_into = excluded.merged_into,"
    " merges = excluded.merges, updated_at = excluded.updated_at,"
    " opt_out_seen = excluded.opt_out_seen"
)
RAW_SAVE_CONTACTS = (
    "INSERT INTO contacts (dispensary, customer_id, destination, contact_id, delivered_hash,"
    " unsubscribed, deactivated, ops_planned, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (dispensary, customer_id, destination) DO UPDATE SET"
    " contact_id = excluded.contact_id, delivered_hash = excluded.delivered_hash,"
    " unsubscribed = excluded.unsubscribed, deactivated = excluded.deactivated,"
    " ops_planned = excluded.ops_planned, updated_at = excluded.updated_at"
)
# by destination too, so the read walks uq_outbox_key to each key: without it, it scanned
# every operation the dispensary ever queued, done ones included, once a planned batch
RAW_QUEUED_KEYS = (
    "SELECT destination, idempotency_key FROM outbox"
    " WHERE dispensary = ? AND destination = ? AND idempotency_key IN "
)
RAW_INSERT_OUTBOX = (
    "INSERT INTO outbox (dispensary, destination, order_key, customer_id, op, payload,"
    " idempotency_key, status, attempts, created_at, next_attempt_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?)"
)

# the delivery loop's claims and results (connector/store/outbox.py), likewise
_CLAIMED_COLUMNS = (
    "SELECT id, dispensary, destination, customer_id, op, payload, idempotency_key, attempts,"
    " first_attempt_at FROM outbox"
)
# no other operation of the same customer goes first (_going_first): an earlier one pending
# or in flight, or any one in flight whose claim has not expired (the parameter: now)
_OTHER_FIRST = (
    " FROM outbox AS o2 WHERE o2.dispensary = outbox.dispensary"
    " AND o2.destination = outbox.destination AND o2.order_key = outbox.order_key"
    " AND o2.id != outbox.id AND (o2.id < outbox.id AND o2.status IN"
    " ('pending', 'inflight') OR o2.status = 'inflight' AND o2.claimed_until >= ?)"
)
_FIRST_SQLITE = " AND NOT EXISTS (SELECT 1" + _OTHER_FIRST + ")"
# PostgreSQL: a scalar subquery probed once per candidate row (see first_of_customer)
_FIRST_PG = " AND (SELECT o2.id" + _OTHER_FIRST + " LIMIT 1) IS NULL"
_EXPIRED_WHERE = (
    " WHERE dispensary = ? AND destination = ? AND status = 'inflight' AND claimed_until < ?"
)
_DUE_WHERE = (
    " WHERE dispensary = ? AND destination = ? AND status = 'pending' AND next_attempt_at <= ?"
)
_IN_ID_ORDER = " ORDER BY id LIMIT ?"
_LOCKED = " FOR UPDATE OF outbox SKIP LOCKED"
# parameters: dispensary, destination, now, now, limit
RAW_CLAIM_EXPIRED = _CLAIMED_COLUMNS + _EXPIRED_WHERE + _FIRST_SQLITE + _IN_ID_ORDER
RAW_CLAIM_DUE = _CLAIMED_COLUMNS + _DUE_WHERE + _FIRST_SQLITE + _IN_ID_ORDER
RAW_CLAIM_EXPIRED_PG = _CLAIMED_COLUMNS + _EXPIRED_WHERE + _FIRST_PG + _IN_ID_ORDER + _LOCKED
RAW_CLAIM_DUE_PG = _CLAIMED_COLUMNS + _DUE_WHERE + _FIRST_PG + _IN_ID_ORDER + _LOCKED
# parameters: claimed_by, claimed_until, now, then the ids (in_list)
RAW_CLAIM_MARK = (
    "UPDATE outbox SET status = 'inflight', claimed_by = ?, claimed_until = ?,"
    " first_attempt_at = COALESCE(first_attempt_at, ?) WHERE id IN "
)
# parameters: now, this process, then the ids: only what this process still holds
RAW_SETTLE_DONE = (
    "UPDATE outbox SET status = 'done', attempts = attempts + 1, claimed_by = NULL,"
    " claimed_until = NULL, done_at = ?, last_error = NULL"
    " WHERE status = 'inflight' AND claimed_by = ? AND id IN "
)
# parameters: dispensary, destination, then the customer ids (or contact ids)
RAW_CONTACT_IDS = (
    "SELECT customer_id, contact_id FROM contacts"
    " WHERE dispensary = ? AND destination = ? AND customer_id IN "
)
RAW_CONTACT_HOLDERS = (
    "SELECT customer_id, contact_id FROM contacts"
    " WHERE dispensary = ? AND destination = ? AND contact_id IN "
)
RAW_FILL_CONTACT_ID = (
    "UPDATE contacts SET contact_id = ?, updated_at = ?"
    " WHERE dispensary = ? AND customer_id = ? AND destination = ?"
)
RAW_NEW_CONTACT = (
    "INSERT INTO contacts (dispensary, customer_id, destination, contact_id, delivered_hash,"
    " unsubscribed, deactivated, ops_planned, updated_at) VALUES (?, ?, ?, ?, NULL, ?, ?, 0, ?)"
)
