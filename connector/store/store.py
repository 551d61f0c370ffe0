"""The store: every durable fact of the connector, behind one synchronous class.

Callers on the event loop run its methods in one dedicated thread (:class:`AsyncStore`), so
SQLite sees one writer per process and the event loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import BindParameter

from connector.errors import StoreError, StoreUnavailable
from connector.planner import ContactState, CustomerState, Operation, payload_hash
from connector.store._engine import begin_immediate, make_engine, when_unlocked
from connector.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    contacts,
    customers,
    dead_letters,
    inbox,
    meta,
    metadata,
    outbox,
    processes,
    quarantine,
)
from connector.store.schema import conflicts as conflicts_table

P = ParamSpec("P")
T = TypeVar("T")

CLAIM_SECONDS = 30.0  # a claim never outlives this without renewal

# executemany statements, built once (SQLAlchemy caches their compiled form)
_UPDATE_CUSTOMER = (
    update(customers)
    .where(
        customers.c.dispensary == bindparam("k_dispensary"),
        customers.c.customer_id == bindparam("k_customer"),
    )
    .values(
        {c: bindparam(c) for c in
         ("last_update_us", "content_hash", "opt_out", "merged_into", "merges", "updated_at",
          "opt_out_seen")}
    )
)  # fmt: skip
_CONTACT_KEY = (
    contacts.c.dispensary == bindparam("k_dispensary"),
    contacts.c.customer_id == bindparam("k_customer"),
    contacts.c.destination == bindparam("k_destination"),
)
_UPDATE_CONTACT = (
    update(contacts)
    .where(*_CONTACT_KEY)
    .values(
        {c: bindparam(c) for c in
         ("contact_id", "delivered_hash", "unsubscribed", "deactivated", "ops_planned",
          "updated_at")}
    )
)  # fmt: skip
_FILL_CONTACT_ID = (
    update(contacts)
    .where(*_CONTACT_KEY)
    .values(contact_id=bindparam("contact_id"), updated_at=bindparam("updated_at"))
)


@dataclass(slots=True)  # not frozen: built for each webhook, where frozen's __init__ costs 4x
class NewEvent:
    dispensary: str
    source: str
    event_type: str
    customer_id: str | None
    last_update_us: int | None
    body: str
    status: str = "pending"
    run_id: int | None = None  # the reconciliation run that pulled it


@dataclass(frozen=True, slots=True)
class Rejected:
    dispensary: str
    status_code: int
    reason: str
    content_type: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class InboxRow:
    id: int
    dispensary: str
    source: str
    customer_id: str | None
    body: str
    run_id: int | None = None
    received_at: float | None = None  # when it was stored: bounds how far ahead it orders


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    dispensary: str
    destination: str
    customer_id: str
    op: str
    body: dict[str, Any]
    idempotency_key: str
    attempts: int
    first_attempt_at: float | None


class Store:
    """Synchronous access to the schema; one instance per thread that uses it."""

    def __init__(self, url: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> None:
        self.url = url
        self.engine = make_engine(url, synchronous=synchronous, timeout=timeout)
        self.timeout = timeout
        self._sqlite = url.startswith("sqlite")
        self._synchronous = synchronous
        self._sync_levels: dict[int, str] = {}  # per driver connection: what it is set to
        self.process_id = uuid.uuid4().hex
        try:
            self._migrate()
        except OperationalError as exc:
            raise StoreError(
                f"the store cannot be opened ({exc.orig.__class__.__name__})"
            ) from None

    # --- schema ---

    def _migrate(self) -> None:
        # under the write lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so two
        # processes opening an old store at once do not both run its migration steps
        with self.engine.connect() as conn:
            conn.info["immediate"] = self._sqlite
            with conn.begin():
                if not self._sqlite:
                    conn.execute(text("SELECT pg_advisory_xact_lock(7224130)"))
                self._migrate_in(conn)

    def _migrate_in(self, conn: Connection) -> None:
        metadata.create_all(conn)
        found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
        version = found.scalar_one_or_none()
        if version is None:
            conn.execute(insert(meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
            return
        if int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"the store's schema is version {version}, newer than this connector knows "
                f"({SCHEMA_VERSION}): upgrade the connector"
            )
        for step in range(int(version), SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(text(statement))
        if int(version) < SCHEMA_VERSION:
            conn.execute(
                update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
            )

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction; a locked or full database becomes :class:`StoreUnavailable`.

        ``durable=False`` (SQLite) commits without syncing the WAL to disk, for writes that
        can be lost in a power cut without losing anything: claims, delivery results and
        plans are all redone from what is durable (a lost "done" means one more delivery,
        which idempotency keys make harmless). The next durable commit syncs them too, in
        order. Received events always commit durably: they are acknowledged to Treez.
        """
        try:
            with self.engine.connect() as conn:
                if self._sqlite:
                    level = self._synchronous if durable else "NORMAL"
                    raw = conn.connection.dbapi_connection
                    if raw is not None and self._sync_levels.get(id(raw)) != level:
                        raw.execute(f"PRAGMA synchronous={level}")
                        self._sync_levels[id(raw)] = level
                conn.info["immediate"] = True  # take the write lock up front (see _engine)
                try:
                    with conn.begin():
                        yield conn
                finally:
                    conn.info.pop("immediate", None)
        except OperationalError as exc:
            # the driver's text only, never the statement's parameters (customer values)
            reason = str(exc.orig).splitlines()[0][:120] if exc.orig is not None else "unknown"
            raise StoreUnavailable(f"the store cannot take the write ({reason})") from None

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction: one consistent view of the store, and no write lock taken
        (in WAL mode it never blocks a writer, nor waits for one)."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except OperationalError as exc:
            reason = str(exc.orig).splitlines()[0][:120] if exc.orig is not None else "unknown"
            raise StoreUnavailable(f"the store cannot be read ({reason})") from None

    # --- receiving ---

    def add_events(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        """Commit a batch of received events (and refused bodies) in one transaction."""
        with self.transaction() as conn:
            self.insert_events(conn, events, rejected)

    def inbox_writer(self) -> InboxWriter:
        """A writer for the receiver's batches, for one thread (see :class:`InboxWriter`)."""
        return InboxWriter(self)

    def insert_events(
        self, conn: Connection, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()
    ) -> None:
        now = time.time()
        if events and self._sqlite:
            # the receiver's hot path: the driver's executemany, without SQLAlchemy's
            # per-row parameter processing (a third of the cost of a webhook)
            conn.exec_driver_sql(_INSERT_INBOX_SQL, [_inbox_row(e, now) for e in events])
        elif events:
            conn.execute(
                insert(inbox),
                [
                    {
                        "dispensary": e.dispensary,
                        "source": e.source,
                        "event_type": e.event_type,
                        "customer_id": e.customer_id,
                        "last_update_us": e.last_update_us,
                        "received_at": now,
                        "body": e.body,
                        "status": e.status,
                        "processed_at": None if e.status == "pending" else now,
                        "run_id": e.run_id,
                    }
                    for e in events
                ],
            )
        if rejected:
            conn.execute(
                insert(quarantine),
                [
                    {
                        "dispensary": r.dispensary,
                        "received_at": now,
                        "status_code": r.status_code,
                        "reason": r.reason,
                        "content_type": r.content_type,
                        "body": r.body,
                    }
                    for r in rejected
                ],
            )

    # --- planning ---

    def first_received(
        self, conn: Connection, dispensary: str, customer_id: str, last_update_us: int
    ) -> float | None:
        """When a version of a customer (by its ``last_update``) was first received: a
        future-dated event delivered again orders at its first receipt, not its last."""
        found = conn.execute(
            select(func.min(inbox.c.received_at)).where(
                inbox.c.dispensary == dispensary,
                inbox.c.customer_id == customer_id,
                inbox.c.last_update_us == last_update_us,
            )
        ).scalar_one_or_none()
        return None if found is None else float(found)

    def refresh_events(self, conn: Connection, dispensary: str, customer_ids: set[str]) -> int:
        """Queue the current version of each customer again (source ``refresh``): its
        newest applied event, as received. A stale opt-out changed what the customer's
        contact must say about consent, but its own payload is older than what the
        destinations hold; planning the current version again sends the contact with the
        consent the connector now holds. Nothing for a customer whose raw body is gone."""
        rows = []
        for customer_id in sorted(customer_ids):
            found = conn.execute(
                select(
                    inbox.c.event_type, inbox.c.last_update_us, inbox.c.received_at, inbox.c.body
                )
                .where(
                    inbox.c.dispensary == dispensary,
                    inbox.c.customer_id == customer_id,
                    inbox.c.status.in_(("applied", "tie")),
                    inbox.c.body.is_not(None),
                )
                .order_by(inbox.c.id.desc())
                .limit(1)
            ).first()
            if found is not None:
                rows.append(
                    {
                        "dispensary": dispensary,
                        "source": "refresh",
                        "event_type": found.event_type,
                        "customer_id": customer_id,
                        "last_update_us": found.last_update_us,
                        "received_at": found.received_at,
                        "body": found.body,
                        "status": "pending",
                        "processed_at": None,
                        "run_id": None,
                    }
                )
        if rows:
            conn.execute(insert(inbox), rows)
        return len(rows)

    def pending_events(self, conn: Connection, limit: int) -> list[InboxRow]:
        rows = conn.execute(_PENDING_EVENTS, {"limit": limit})
        return [
            InboxRow(r.id, r.dispensary, r.source, r.customer_id, r.body, r.run_id, r.received_at)
            for r in rows
        ]

    def still_pending(self, conn: Connection, ids: Sequence[int]) -> set[int]:
        """Those of ``ids`` that no one has planned yet."""
        found: set[int] = set()
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            found.update(conn.execute(_STILL_PENDING, {"ids": part}).scalars())
        return found

    def mark_events(
        self,
        conn: Connection,
        outcomes: Mapping[int, str],
        planned: Mapping[int, str] | None = None,
    ) -> None:
        """Record each event's outcome; ``planned`` (events of reconciliation runs only) what
        its planning gave, for the run's counts."""
        now = time.time()
        by_status: dict[str, list[int]] = {}
        for event_id, status in outcomes.items():
            by_status.setdefault(status, []).append(event_id)
        for status, ids in by_status.items():
            conn.execute(_MARK_EVENTS, {"ids": ids, "status": status, "now": now})
        if planned:
            conn.execute(_MARK_PLANNED, [{"eid": i, "planned": p} for i, p in planned.items()])

    def load_states(
        self, conn: Connection, dispensary: str, customer_ids: Iterable[str]
    ) -> dict[str, CustomerState]:
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return {}
        found: dict[str, dict[str, ContactState]] = {cid: {} for cid in ids}
        key = {"dispensary": dispensary, "ids": ids}
        for row in conn.execute(_LOAD_CONTACTS, key):
            found[row.customer_id][row.destination] = ContactState(
                row.contact_id,
                row.delivered_hash,
                bool(row.unsubscribed),
                bool(row.deactivated),
                row.ops_planned,
            )
        states = {}
        for row in conn.execute(_LOAD_CUSTOMERS, key):
            states[row.customer_id] = CustomerState(
                row.customer_id,
                row.last_update_us,
                row.content_hash,
                row.opt_out,
                row.merged_into,
                frozenset((d, s) for d, s in json.loads(row.merges)),
                found[row.customer_id],
                bool(row.opt_out_seen),
            )
        for cid, known in found.items():
            if cid not in states and known:
                states[cid] = CustomerState(cid, contacts=known)
        return states

    def save_states(
        self,
        conn: Connection,
        dispensary: str,
        before: Mapping[str, CustomerState],
        after: Mapping[str, CustomerState],
    ) -> None:
        """Write the states that differ from ``before`` (what :meth:`load_states` gave), in
        a few set-wise statements whatever the number of customers."""
        changed = {cid: st for cid, st in after.items() if before.get(cid) != st}
        if not changed:
            return
        now = time.time()
        ids = list(changed)
        key = {"dispensary": dispensary, "ids": ids}
        stored = set(conn.execute(_STORED_CUSTOMERS, key).scalars())
        stored_contacts = {
            (r.customer_id, r.destination) for r in conn.execute(_STORED_CONTACTS, key)
        }
        new_rows, updates, new_contacts, contact_updates = [], [], [], []
        for cid, state in changed.items():
            values = {
                "last_update_us": state.last_update_us,
                "content_hash": state.content_hash,
                "opt_out": state.opt_out,
                "merged_into": state.merged_into,
                "merges": json.dumps(sorted(state.merges)),
                "updated_at": now,
                "opt_out_seen": state.opt_out_seen,
            }
            if cid in stored:
                updates.append({"k_dispensary": dispensary, "k_customer": cid, **values})
            else:
                new_rows.append({"dispensary": dispensary, "customer_id": cid, **values})
            old = before.get(cid)
            old_contacts = old.contacts if old is not None else {}
            for destination, contact in state.contacts.items():
                if old_contacts.get(destination) == contact:
                    continue
                values = {
                    "contact_id": contact.contact_id,
                    "delivered_hash": contact.delivered_hash,
                    "unsubscribed": contact.unsubscribed,
                    "deactivated": contact.deactivated,
                    "ops_planned": contact.planned,
                    "updated_at": now,
                }
                if (cid, destination) in stored_contacts:
                    contact_updates.append(
                        {"k_dispensary": dispensary, "k_customer": cid,
                         "k_destination": destination, **values}
                    )  # fmt: skip
                else:
                    new_contacts.append(
                        {"dispensary": dispensary, "customer_id": cid,
                         "destination": destination, **values}
                    )  # fmt: skip
        if new_rows:
            conn.execute(_INSERT_CUSTOMERS, new_rows)
        if updates:
            conn.execute(_UPDATE_CUSTOMER, updates)
        if new_contacts:
            conn.execute(_INSERT_CONTACTS, new_contacts)
        if contact_updates:
            conn.execute(_UPDATE_CONTACT, contact_updates)

    def enqueue(self, conn: Connection, dispensary: str, operations: Sequence[Operation]) -> int:
        """Add operations; one whose idempotency key is already queued is skipped."""
        if not operations:
            return 0
        now = time.time()
        keys = [op.idempotency_key for op in operations]
        taken = {
            (row.destination, row.idempotency_key)
            for row in conn.execute(_QUEUED_KEYS, {"dispensary": dispensary, "keys": keys})
        }
        rows = []
        for op in operations:
            if (op.destination, op.idempotency_key) in taken:
                continue
            taken.add((op.destination, op.idempotency_key))
            rows.append(
                {
                    "dispensary": dispensary,
                    "destination": op.destination,
                    "order_key": op.order_key,
                    "customer_id": op.customer_id,
                    "op": op.op,
                    "payload": json.dumps(op.body, separators=(",", ":"), ensure_ascii=False),
                    "idempotency_key": op.idempotency_key,
                    "status": "pending",
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                }
            )
        if rows:
            conn.execute(_INSERT_OUTBOX, rows)
        return len(rows)

    def add_conflicts(
        self, conn: Connection, dispensary: str, found: Sequence[tuple[str, str, str, str]]
    ) -> None:
        if found:
            now = time.time()
            conn.execute(
                insert(conflicts_table),
                [
                    {
                        "dispensary": dispensary,
                        "customer_id": c,
                        "destination": d,
                        "kind": k,
                        "detail": t,
                        "created_at": now,
                    }
                    for c, d, k, t in found
                ],
            )

    def dead_letter_direct(
        self,
        conn: Connection,
        dispensary: str,
        destination: str,
        customer_id: str,
        op: str,
        reason: str,
    ) -> None:
        """Record an operation that could not even be built (a mapping failure)."""
        conn.execute(
            insert(dead_letters).values(
                outbox_id=None,
                dispensary=dispensary,
                destination=destination,
                customer_id=customer_id,
                op=op,
                payload="{}",
                idempotency_key="",
                attempts=0,
                reason=reason,
                status_code=None,
                response_body=None,
                created_at=time.time(),
            )
        )

    # --- delivering ---

    def claim(
        self, dispensary: str, destination: str, limit: int, now: float | None = None
    ) -> list[OutboxRow]:
        """Claim up to ``limit`` ready operations, at most one per order key.

        An operation is ready when it is due and no earlier operation with the same order key
        is still pending, waiting for a retry, or in flight: a customer's operations go one at
        a time and in order, and a retry's wait holds up only that customer.
        """
        now = time.time() if now is None else now
        key = {"dispensary": dispensary, "destination": destination, "now": now}
        with self.transaction(durable=False) as conn:
            rows = list(conn.execute(_CLAIM_EXPIRED, {**key, "limit": limit}))
            if len(rows) < limit:
                rows += conn.execute(_CLAIM_DUE, {**key, "limit": limit - len(rows)})
            if not rows:
                return []
            conn.execute(
                _CLAIM_MARK,
                {"ids": [r.id for r in rows], "claimed_by": self.process_id,
                 "claimed_until": now + CLAIM_SECONDS, "now": now},
            )  # fmt: skip
        return [
            OutboxRow(
                r.id,
                r.dispensary,
                r.destination,
                r.customer_id,
                r.op,
                json.loads(r.payload),
                r.idempotency_key,
                r.attempts,
                r.first_attempt_at if r.first_attempt_at is not None else now,
            )
            for r in rows
        ]

    def pending_count(self, dispensary: str, destination: str) -> int:
        """Operations waiting for this destination (due or not)."""
        with self.engine.connect() as conn:
            found = conn.execute(
                select(func.count())
                .select_from(outbox)
                .where(
                    outbox.c.dispensary == dispensary,
                    outbox.c.destination == destination,
                    outbox.c.status == "pending",
                )
            ).scalar_one()
            conn.rollback()
        return int(found)

    def contact_ids(
        self, dispensary: str, destination: str, customer_ids: Iterable[str]
    ) -> dict[str, str]:
        """The destination's contact id of each customer that has one (the identity map)."""
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                _CONTACT_IDS, {"dispensary": dispensary, "destination": destination, "ids": ids}
            ).all()
            conn.rollback()
        return {r.customer_id: r.contact_id for r in rows if r.contact_id is not None}

    def resolve_contact_ids(
        self, dispensary: str, destination: str, customer_ids: Iterable[str]
    ) -> dict[str, str]:
        """The contact each customer resolves to: its own, or for a customer merged away, the
        survivor's (followed through repeated merges). For lookups and reports; delivery
        uses :meth:`contact_ids`, a customer's own entry."""
        resolved: dict[str, str] = {}
        with self.engine.connect() as conn:
            for customer_id in dict.fromkeys(customer_ids):
                current = self._final_in(conn, dispensary, customer_id)
                own = self.contact_ids_in(conn, dispensary, destination, [current])
                if current in own:
                    resolved[customer_id] = own[current]
            conn.rollback()
        return resolved

    def contact_ids_in(
        self, conn: Connection, dispensary: str, destination: str, ids: list[str]
    ) -> dict[str, str]:
        rows = conn.execute(
            _CONTACT_IDS, {"dispensary": dispensary, "destination": destination, "ids": ids}
        ).all()
        return {r.customer_id: r.contact_id for r in rows if r.contact_id is not None}

    def contact_claims(
        self,
        dispensary: str,
        destination: str,
        contact_id: str | None,
        conflict_kind: str | None = None,
    ) -> tuple[list[str], list[tuple[str, str]]]:
        """What the identity map says about a destination's contact, for an adapter that
        must never write one customer's data onto another customer's contact.

        The customers of ``dispensary`` whose entry for ``destination`` is ``contact_id``,
        each resolved through Treez merges to its survivor (an absorbed customer's old
        contact belongs to the survivor); and, when ``conflict_kind`` is given, the
        ``(customer, detail)`` of every conflict of that kind reported for ``destination``
        (what an adapter reported once and must remember, such as identifiers it withheld).
        """
        owners: list[str] = []
        found: list[tuple[str, str]] = []
        with self.engine.connect() as conn:
            if contact_id is not None:
                linked = conn.execute(
                    select(contacts.c.customer_id).where(
                        contacts.c.dispensary == dispensary,
                        contacts.c.destination == destination,
                        contacts.c.contact_id == contact_id,
                    )
                ).scalars()
                for customer_id in linked:
                    current = self._final_in(conn, dispensary, customer_id)
                    if current not in owners:
                        owners.append(current)
            if conflict_kind is not None:
                rows = conn.execute(
                    select(conflicts_table.c.customer_id, conflicts_table.c.detail)
                    .where(
                        conflicts_table.c.dispensary == dispensary,
                        conflicts_table.c.destination == destination,
                        conflicts_table.c.kind == conflict_kind,
                    )
                    .order_by(conflicts_table.c.id)
                )
                found = [(r.customer_id, r.detail) for r in rows]
            conn.rollback()
        return owners, found

    def finish(
        self,
        dispensary: str,
        destination: str,
        done: Sequence[tuple[OutboxRow, str | None]] = (),
        retry: Sequence[tuple[OutboxRow, float, str]] = (),
        dead: Sequence[tuple[OutboxRow, str, int | None, str | None]] = (),
        conflicts: Sequence[tuple[str, str, str]] = (),
        replaced: Mapping[int, str] | None = None,
    ) -> None:
        """Record a round of delivery: successes (with any returned contact id), retries
        (with their next attempt time), dead letters (with the response), and what the
        destination made the adapter work around (customer, kind, detail).

        ``replaced``: by outbox id, the contact id a success's returned id replaces (the
        destination said it is gone: merged away on its side, deleted)."""
        now = time.time()
        with self.transaction(durable=False) as conn:
            if conflicts:
                self.add_conflicts(
                    conn, dispensary, [(c, destination, k, d) for c, k, d in conflicts]
                )
            if done:
                conn.execute(_SETTLE_DONE, {"ids": [row.id for row, _ in done], "now": now})
                returned: dict[str, str] = {}
                gone: dict[str, str] = {}
                for row, contact_id in done:
                    if contact_id:
                        target = row.body.get("into_customer_id") if row.op == "merge" else None
                        customer = str(target or row.customer_id)
                        returned[customer] = contact_id
                        if replaced and row.id in replaced:
                            gone[customer] = replaced[row.id]
                if returned:
                    self._record_contacts(conn, dispensary, destination, returned, now, gone)
            for row, at, error in retry:
                _settle(
                    conn, outbox.c.id == row.id, "pending",
                    next_attempt_at=at, last_error=error[:2000],
                )  # fmt: skip
            for row, reason, status_code, response in dead:
                _settle(conn, outbox.c.id == row.id, "dead", done_at=now, last_error=reason[:2000])
                conn.execute(
                    insert(dead_letters).values(
                        outbox_id=row.id,
                        dispensary=dispensary,
                        destination=destination,
                        customer_id=row.customer_id,
                        op=row.op,
                        payload=json.dumps(row.body, separators=(",", ":")),
                        idempotency_key=row.idempotency_key,
                        attempts=row.attempts + 1,
                        reason=reason[:2000],
                        status_code=status_code,
                        response_body=(response or "")[:8192] or None,
                        created_at=now,
                    )
                )
                fields = row.body.get("fields")
                if row.op == "upsert" and isinstance(fields, dict):
                    # what was planned last did not arrive: forget its hash so the next event
                    # resends. Only if it is still the last one planned: a newer upsert's
                    # hash must stay, or a replay would take this older one for the newest
                    conn.execute(
                        update(contacts)
                        .where(
                            contacts.c.dispensary == dispensary,
                            contacts.c.destination == destination,
                            contacts.c.customer_id == row.customer_id,
                            contacts.c.delivered_hash == payload_hash(fields),
                        )
                        .values(delivered_hash=None, updated_at=now)
                    )

    def _record_contacts(
        self,
        conn: Connection,
        dispensary: str,
        destination: str,
        returned: Mapping[str, str],
        now: float,
        gone: Mapping[str, str] | None = None,
    ) -> None:
        """Record contact ids a destination returned.

        A different id than the map holds is reported as a conflict and not written over
        (which of the two is the person is not ours to decide), unless the destination said
        the held id is gone (``gone``, by customer): then the returned id replaces it, or
        every later operation would name the gone contact again (a 404, a second call to find
        the contact, and a deactivation that never lands), and the replacement is reported.
        """
        known = {
            r.customer_id: r.contact_id
            for r in conn.execute(
                _CONTACT_IDS,
                {"dispensary": dispensary, "destination": destination, "ids": list(returned)},
            )
        }
        new, fill, clash = [], [], []
        moved: list[tuple[str, str, str]] = []  # customer, gone id, its replacement
        # only an id the map does not hold already can be another customer's: the common
        # round (the same ids again) costs no query
        changed = {c: k for c, k in returned.items() if known.get(c) != k}
        held = self._held_by_others(conn, dispensary, destination, changed) if changed else {}
        for cid, contact_id in returned.items():
            if cid in held and known.get(cid) != contact_id:
                detail = (
                    f"the destination matched this customer to contact {contact_id}, which "
                    f"the identity map gives to customer {held[cid]} of this store: not "
                    "recorded for this one"
                )
                row = {"dispensary": dispensary, "customer_id": cid, "destination": destination}
                clash.append({**row, "kind": "shared_contact", "detail": detail, "created_at": now})
                continue
            if cid not in known:
                new.append({"dispensary": dispensary, "customer_id": cid,
                            "destination": destination, "contact_id": contact_id,
                            "delivered_hash": None, "unsubscribed": False,
                            "deactivated": False, "ops_planned": 0,
                            "updated_at": now})  # fmt: skip
            elif known[cid] is None:
                fill.append({"k_dispensary": dispensary, "k_customer": cid,
                             "k_destination": destination, "contact_id": contact_id,
                             "updated_at": now})  # fmt: skip
            elif known[cid] == contact_id:
                continue
            elif gone and gone.get(cid) == known[cid]:
                moved.append((cid, known[cid], contact_id))
            else:
                clash.append({"dispensary": dispensary, "customer_id": cid,
                              "destination": destination, "kind": "contact_id_changed",
                              "detail": "the destination returned another contact id than "
                              "the identity map holds; the map is kept",
                              "created_at": now})  # fmt: skip
        for cid, old, contact_id in moved:
            key = {"k_dispensary": dispensary, "k_customer": cid, "k_destination": destination}
            fill.append({**key, "contact_id": contact_id, "updated_at": now})
            detail = f"contact {old} is gone at the destination; the map now holds {contact_id}"
            clash.append(
                {
                    "dispensary": dispensary,
                    "customer_id": cid,
                    "destination": destination,
                    "kind": "contact_replaced",
                    "detail": detail,
                    "created_at": now,
                }
            )
        if new:
            conn.execute(insert(contacts), new)
        if fill:
            conn.execute(_FILL_CONTACT_ID, fill)
        if clash:
            conn.execute(insert(conflicts_table), clash)

    def _held_by_others(
        self, conn: Connection, dispensary: str, destination: str, returned: Mapping[str, str]
    ) -> dict[str, str]:
        """Of the customers in ``returned``, those whose returned contact the identity map
        gives to another customer of the dispensary, not of the same merge (two people: a
        family sharing a phone the destination matches on); by customer, that other one."""
        rows = conn.execute(
            select(contacts.c.customer_id, contacts.c.contact_id).where(
                contacts.c.dispensary == dispensary,
                contacts.c.destination == destination,
                contacts.c.contact_id.in_(sorted(set(returned.values()))),
            )
        ).all()
        holders: dict[str, set[str]] = {}
        for row in rows:
            holders.setdefault(row.contact_id, set()).add(row.customer_id)
        found = {}
        for cid, contact_id in returned.items():
            others = holders.get(contact_id, set()) - {cid}
            if not others:
                continue
            mine = self._final_in(conn, dispensary, cid)
            strangers = sorted(o for o in others if self._final_in(conn, dispensary, o) != mine)
            if strangers:
                found[cid] = strangers[0]
        return found

    @staticmethod
    def _final_in(conn: Connection, dispensary: str, customer_id: str) -> str:
        """Where a customer's record is now: itself, or the end of its chain of merges."""
        current, visited = customer_id, {customer_id}
        while True:
            into = conn.execute(
                select(customers.c.merged_into).where(
                    customers.c.dispensary == dispensary, customers.c.customer_id == current
                )
            ).scalar_one_or_none()
            if into is None or into in visited:
                return current
            visited.add(into)
            current = into

    def next_due(self, dispensary: str, destination: str) -> float | None:
        """When the next claimable operation falls due (ones waiting behind an earlier
        operation of their customer do not count: they are not claimable when due)."""
        found = self.query(
            select(func.min(outbox.c.next_attempt_at)).where(
                outbox.c.dispensary == dispensary,
                outbox.c.destination == destination,
                outbox.c.status == "pending",
                ~_blocked(),
            )
        )
        value = found[0][0] if found else None
        return None if value is None else float(value)

    # --- processes and claims ---

    def register_process(self) -> int:
        """Record this process and release the claims of processes that are gone.

        Gone: a process on this host whose pid no longer runs (released at once), or any
        process whose heartbeat is older than a claim's lifetime. Returns operations released.
        """
        now = time.time()
        host = socket.gethostname()
        with self.transaction(durable=False) as conn:
            gone = []
            for row in conn.execute(select(processes)):
                stale = row.heartbeat_at < now - CLAIM_SECONDS
                if stale or (row.host == host and not _pid_alive(row.pid)):
                    gone.append(row.id)
            released = 0
            if gone:
                result = conn.execute(
                    update(outbox)
                    .where(outbox.c.status == "inflight", outbox.c.claimed_by.in_(gone))
                    .values(status="pending", claimed_by=None, claimed_until=None)
                )
                released = result.rowcount or 0
                conn.execute(delete(processes).where(processes.c.id.in_(gone)))
            conn.execute(
                insert(processes).values(
                    id=self.process_id, host=host, pid=os.getpid(), started_at=now, heartbeat_at=now
                )
            )
        return released

    def heartbeat(self) -> None:
        """Keep this process known and renew the claims it holds."""
        now = time.time()
        with self.transaction(durable=False) as conn:
            conn.execute(
                update(processes).where(processes.c.id == self.process_id).values(heartbeat_at=now)
            )
            conn.execute(
                update(outbox)
                .where(outbox.c.status == "inflight", outbox.c.claimed_by == self.process_id)
                .values(claimed_until=now + CLAIM_SECONDS)
            )

    def release_claims(self) -> int:
        """Give back this process's in-flight operations (on shutdown)."""
        with self.transaction(durable=False) as conn:
            result = conn.execute(
                update(outbox)
                .where(outbox.c.status == "inflight", outbox.c.claimed_by == self.process_id)
                .values(status="pending", claimed_by=None, claimed_until=None)
            )
            conn.execute(delete(processes).where(processes.c.id == self.process_id))
        return result.rowcount or 0

    # --- retention ---

    def purge(self, *, raw_before: float, delivered_before: float) -> dict[str, int]:
        """Forget what is no longer needed: the raw bodies of events planned (or refused)
        before ``raw_before``, and operations delivered before ``delivered_before``.

        Pending events keep their bodies whatever their age (they are still to be planned);
        dead letters are kept until they are replayed or dealt with.
        """
        with self.transaction(durable=False) as conn:
            bodies = conn.execute(
                update(inbox)
                .where(
                    inbox.c.status != "pending",
                    inbox.c.received_at < raw_before,
                    inbox.c.body.is_not(None),
                )
                .values(body=None)
            ).rowcount
            refused = conn.execute(
                update(quarantine)
                .where(quarantine.c.received_at < raw_before, quarantine.c.body.is_not(None))
                .values(body=None)
            ).rowcount
            delivered = conn.execute(
                delete(outbox).where(outbox.c.status == "done", outbox.c.done_at < delivered_before)
            ).rowcount
        return {"bodies": bodies or 0, "quarantined": refused or 0, "delivered": delivered or 0}

    # --- reading, for status, metrics and tests ---

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.rollback()

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per (dispensary, destination): pending, inflight and dead counts, oldest pending."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    outbox.c.dispensary,
                    outbox.c.destination,
                    outbox.c.status,
                    func.count(),
                    func.min(outbox.c.created_at),
                )
                .where(outbox.c.status.in_(("pending", "inflight", "dead")))
                .group_by(outbox.c.dispensary, outbox.c.destination, outbox.c.status)
            ).all()
            conn.rollback()
        stats: dict[tuple[str, str], dict[str, Any]] = {}
        for dispensary, destination, status, count, oldest in rows:
            entry = stats.setdefault(
                (dispensary, destination),
                {
                    "dispensary": dispensary,
                    "destination": destination,
                    "pending": 0,
                    "inflight": 0,
                    "dead": 0,
                    "oldest_pending_at": None,
                },
            )
            entry[status] = count
            if status in ("pending", "inflight") and oldest is not None:
                prev = entry["oldest_pending_at"]
                entry["oldest_pending_at"] = oldest if prev is None else min(prev, oldest)
        return list(stats.values())

    def pending_work(self) -> int:
        """Events not yet planned plus operations not yet delivered or dead-lettered."""
        with self.engine.connect() as conn:
            events = conn.execute(
                select(func.count()).select_from(inbox).where(inbox.c.status == "pending")
            ).scalar_one()
            ops = conn.execute(
                select(func.count())
                .select_from(outbox)
                .where(outbox.c.status.in_(("pending", "inflight")))
            ).scalar_one()
            conn.rollback()
        return int(events) + int(ops)

    def query(self, statement: Any) -> list[Any]:
        """Run a read-only statement (tests and the CLI)."""
        with self.engine.connect() as conn:
            rows = conn.execute(statement).all()
            conn.rollback()
        return list(rows)


def _settle(conn: Connection, where: Any, status: str, **values: Any) -> None:
    """End an attempt: count it, give back the claim, set the new status."""
    conn.execute(
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


def _blocked() -> Any:
    """An earlier operation of the same customer is still pending or in flight."""
    earlier = aliased(outbox)
    return exists().where(
        earlier.c.dispensary == outbox.c.dispensary,
        earlier.c.destination == outbox.c.destination,
        earlier.c.order_key == outbox.c.order_key,
        earlier.c.id < outbox.c.id,
        earlier.c.status.in_(("pending", "inflight")),
    )


# The delivery loop's statements, built once: building a statement (and its cache key) costs
# far more than SQLite takes to run it (measured: 350 us an operation before, bench/pipeline).
_QUEUE = and_(
    outbox.c.dispensary == bindparam("dispensary"),
    outbox.c.destination == bindparam("destination"),
)
# two queries, each an index walk in id order that stops at the limit (an OR of both would
# scan and sort every pending row)
_CLAIM_EXPIRED = (
    select(outbox)
    .where(
        _QUEUE,
        outbox.c.status == "inflight",
        outbox.c.claimed_until < bindparam("now"),
        ~_blocked(),
    )
    .order_by(outbox.c.id)
    .limit(bindparam("limit"))
)
_CLAIM_DUE = (
    select(outbox)
    .where(
        _QUEUE,
        outbox.c.status == "pending",
        outbox.c.next_attempt_at <= bindparam("now"),
        ~_blocked(),
    )
    .order_by(outbox.c.id)
    .limit(bindparam("limit"))
)
_CLAIM_MARK = (
    update(outbox)
    .where(outbox.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        status="inflight",
        claimed_by=bindparam("claimed_by"),
        claimed_until=bindparam("claimed_until"),
        first_attempt_at=func.coalesce(outbox.c.first_attempt_at, bindparam("now")),
    )
)
_SETTLE_DONE = (
    update(outbox)
    .where(outbox.c.id.in_(bindparam("ids", expanding=True)))
    .values(
        status="done",
        attempts=outbox.c.attempts + 1,
        claimed_by=None,
        claimed_until=None,
        done_at=bindparam("now"),
        last_error=None,
    )
)
# the planner's statements, likewise
_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
_PENDING_EVENTS = (
    select(
        inbox.c.id,
        inbox.c.dispensary,
        inbox.c.source,
        inbox.c.customer_id,
        inbox.c.body,
        inbox.c.run_id,
        inbox.c.received_at,
    )
    .where(inbox.c.status == "pending")
    .order_by(inbox.c.id)
    .limit(bindparam("limit"))
)
_STILL_PENDING = select(inbox.c.id).where(inbox.c.id.in_(_IDS), inbox.c.status == "pending")
_INSERT_INBOX_VALUES = (
    "INSERT INTO inbox (dispensary, source, event_type, customer_id, last_update_us,"
    " received_at, body, status, processed_at, run_id) VALUES "
)
_INSERT_INBOX_SQL = _INSERT_INBOX_VALUES + "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_MARK_PLANNED = (
    update(inbox).where(inbox.c.id == bindparam("eid")).values(planned=bindparam("planned"))
)
_MARK_EVENTS = (
    update(inbox)
    .where(inbox.c.id.in_(_IDS))
    .values(status=bindparam("status"), processed_at=bindparam("now"))
)
_LOAD_CONTACTS = select(contacts).where(
    contacts.c.dispensary == bindparam("dispensary"), contacts.c.customer_id.in_(_IDS)
)
_LOAD_CUSTOMERS = select(customers).where(
    customers.c.dispensary == bindparam("dispensary"), customers.c.customer_id.in_(_IDS)
)
_STORED_CUSTOMERS = select(customers.c.customer_id).where(
    customers.c.dispensary == bindparam("dispensary"), customers.c.customer_id.in_(_IDS)
)
_STORED_CONTACTS = select(contacts.c.customer_id, contacts.c.destination).where(
    contacts.c.dispensary == bindparam("dispensary"), contacts.c.customer_id.in_(_IDS)
)
_QUEUED_KEYS = select(outbox.c.destination, outbox.c.idempotency_key).where(
    outbox.c.dispensary == bindparam("dispensary"),
    outbox.c.idempotency_key.in_(bindparam("keys", expanding=True)),
)
_INSERT_CUSTOMERS = insert(customers)
_INSERT_CONTACTS = insert(contacts)
_INSERT_OUTBOX = insert(outbox)
_CONTACT_IDS = select(contacts.c.customer_id, contacts.c.contact_id).where(
    contacts.c.dispensary == bindparam("dispensary"),
    contacts.c.destination == bindparam("destination"),
    contacts.c.customer_id.in_(bindparam("ids", expanding=True)),
)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not: in a container without an init that reaps,
    a killed connector stays one, and its claims must be released all the same."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rpartition(")")[2].split()[:1]
    except OSError:
        return True  # no /proc (macOS): trust the signal
    return state != ["Z"]


def _inbox_row(event: NewEvent, now: float) -> tuple[Any, ...]:
    """An inbox row in the column order of :data:`_INSERT_INBOX_VALUES`."""
    e = event
    return (e.dispensary, e.source, e.event_type, e.customer_id, e.last_update_us, now,
            e.body, e.status, None if e.status == "pending" else now, e.run_id)  # fmt: skip


_INBOX_COLUMNS = 10


@functools.lru_cache(maxsize=128)
def _inbox_insert(rows: int) -> str:
    """The ``INSERT`` of ``rows`` inbox rows (:func:`_inbox_row`)."""
    return _INSERT_INBOX_VALUES + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)


class InboxWriter:
    """Commits the receiver's batches of events: what :meth:`Store.add_events` does, faster.

    With SQLite it owns a driver connection. A batch is one multi-row ``INSERT`` in
    autocommit mode: a single statement is its own transaction, so SQLite takes the write
    lock, inserts and commits (``synchronous`` as the store's: FULL by default) in one step,
    and the thread running it gives the interpreter lock up and must win it back from a busy
    event loop once a batch. SQLAlchemy's path (pragmas around the begin, a step per row, the
    pool) took it back a dozen times, and ``BEGIN IMMEDIATE``, ``INSERT``, ``COMMIT`` three
    times; each could wait a switch interval. A batch with more values than the SQLite build
    takes in one statement is written in chunks between ``BEGIN IMMEDIATE`` and ``COMMIT``.
    A batch with refused bodies, and every other database, goes through
    :meth:`Store.add_events`. One thread only: the one that commits the receiver's batches.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._raw: sqlite3.Connection | None = None
        self._variables = 0  # the most values one statement takes (SQLITE_LIMIT_VARIABLE_NUMBER)
        database = store.engine.url.database if store._sqlite else None
        self._path = database if database and database != ":memory:" else None

    def add(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        """Commit ``events`` (and ``rejected``) in one transaction, or raise
        :class:`StoreUnavailable` having committed none of them."""
        if self._path is None or rejected or not events:
            self.store.add_events(events, rejected)
            return
        try:
            self._add(events)
        except sqlite3.Error as exc:
            self.close()  # a fresh connection for the next batch
            # the driver's text only, never the statement's parameters (customer values)
            reason = str(exc).splitlines()[0][:120] or exc.__class__.__name__
            raise StoreUnavailable(f"the store cannot take the write ({reason})") from None

    def _connect(self) -> sqlite3.Connection:
        raw = self._raw
        if raw is None:
            assert self._path is not None
            raw = sqlite3.connect(
                self._path, timeout=0, isolation_level=None, check_same_thread=False
            )
            try:
                raw.execute(f"PRAGMA synchronous={self.store._synchronous}")
                self._variables = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            except BaseException:
                raw.close()
                raise
            self._raw = raw
        return raw

    def _add(self, events: Sequence[NewEvent]) -> None:
        raw = self._connect()
        if len(events) * _INBOX_COLUMNS <= self._variables:
            statement = _inbox_insert(len(events))

            def write() -> None:
                now = time.time()  # at each try: the arrival, just before the write lock
                raw.execute(statement, [value for e in events for value in _inbox_row(e, now)])

            if not when_unlocked(write, self.store.timeout):
                raise sqlite3.OperationalError("database is locked")
            return
        if not begin_immediate(raw, self.store.timeout):
            raise sqlite3.OperationalError("database is locked")
        try:
            now = time.time()  # under the write lock: arrival times follow the ids
            rows = [_inbox_row(e, now) for e in events]
            per_statement = max(1, self._variables // _INBOX_COLUMNS)
            for start in range(0, len(rows), per_statement):
                chunk = rows[start : start + per_statement]
                raw.execute(_inbox_insert(len(chunk)), [value for row in chunk for value in row])
            raw.execute("COMMIT")
        except BaseException:
            if raw.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    raw.execute("ROLLBACK")
            raise

    def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            with contextlib.suppress(sqlite3.Error):
                raw.close()


class AsyncStore:
    """Runs a :class:`Store`'s methods in one dedicated thread, for the event loop."""

    def __init__(self, store: Store, *, name: str = "store") -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._owner = True

    def lane(self, name: str) -> AsyncStore:
        """The same store through a thread of its own: long calls in one lane (planning a
        batch) do not hold up short ones in another (claims). Closing a lane leaves the
        store open."""
        other = AsyncStore(self.store, name=name)
        other._owner = False
        return other

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"the store failed ({exc.__class__.__name__})") from None

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._owner:
            self.store.close()
