"""The inbox port: received events in, pending events out for planning."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import (
    Connection,
    func,
    insert,
    select,
)

from connector.store._base import SqlBase
from connector.store._statements import (
    _INSERT_INBOX,
    _MARK_EVENTS,
    RAW_MARK_DECIDED,
    RAW_MARK_PLANNED,
    RAW_PENDING_EVENTS,
    RAW_STILL_PENDING,
    Raw,
    in_list,
)
from connector.store.abc import (
    InboxRow,
    InboxWriterPort,
    NewEvent,
    Rejected,
)
from connector.store.schema import (
    inbox,
    quarantine,
)

CONTENT_TYPE_LENGTH = 255  # quarantine.content_type: VARCHAR(255)


class InboxSql(SqlBase):
    def add_events(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        """Commit a batch of received events (and refused bodies) in one transaction."""
        with self.transaction() as conn:
            self.insert_events(conn, events, rejected)

    def insert_events(
        self, conn: Connection, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()
    ) -> None:
        now = time.time()
        if events:
            self._insert_inbox(conn, events, now)
        if rejected:
            conn.execute(
                insert(quarantine),
                [
                    {
                        "dispensary": r.dispensary,
                        "received_at": now,
                        "status_code": r.status_code,
                        "reason": r.reason,
                        # as the request sent it, cut to its column (PostgreSQL refuses more)
                        "content_type": r.content_type[:CONTENT_TYPE_LENGTH]
                        if r.content_type is not None
                        else None,
                        "body": r.body,
                    }
                    for r in rejected
                ],
            )

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
        applied event with the latest ``last_update``, as received. A stale opt-out changed
        what the customer's contact must say about consent, but its own payload is older than
        what the destinations hold; planning the current version again sends the contact with
        the consent the connector now holds. Nothing for a customer whose raw body is gone."""
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
                # the newest version, not the newest row: with several replicas, ids do not
                # follow the order in which events were committed
                .order_by(inbox.c.last_update_us.desc(), inbox.c.id.desc())
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
        # through _read_together: a transaction's first statement goes with its BEGIN
        (found,) = self._read_together(conn, [(RAW_PENDING_EVENTS, (limit,))])
        return [InboxRow(*r) for r in found]

    def still_pending(self, conn: Connection, ids: Sequence[int]) -> set[int]:
        """Those of ``ids`` that no one has planned yet."""
        found: set[int] = set()
        raw = Raw(conn)
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            found.update(r[0] for r in raw.rows(RAW_STILL_PENDING + in_list(len(part)), part))
        return found

    def mark_events(
        self,
        conn: Connection,
        outcomes: Mapping[int, str],
        planned: Mapping[int, str] | None = None,
        decisions: Mapping[int, str] | None = None,
    ) -> None:
        """Record each event's outcome; ``planned`` (events of reconciliation runs only) what
        its planning gave, for the run's counts; ``decisions`` what it decided per
        destination (``connector explain``)."""
        self._mark_events(conn, outcomes, planned, decisions)()

    def _mark_events(
        self,
        conn: Connection,
        outcomes: Mapping[int, str],
        planned: Mapping[int, str] | None = None,
        decisions: Mapping[int, str] | None = None,
    ) -> Callable[[], None]:
        """:meth:`mark_events` in two: its SQLAlchemy statements (events with no decisions,
        ignored or failed) run now; the driver's statements it returns to run later, in the
        same transaction (in a :meth:`_together` block)."""
        now = time.time()
        by_status: dict[str, list[int]] = {}
        decided = []
        for event_id, status in outcomes.items():
            found = decisions.get(event_id) if decisions else None
            if found is None:
                by_status.setdefault(status, []).append(event_id)
            else:
                decided.append((status, now, found, event_id))
        for status, ids in by_status.items():
            conn.execute(_MARK_EVENTS, {"ids": ids, "status": status, "now": now})
        summaries = [(p, i) for i, p in planned.items()] if planned else []

        def write() -> None:
            self._many(conn, RAW_MARK_DECIDED, decided)
            self._many(conn, RAW_MARK_PLANNED, summaries)

        return write

    def _insert_inbox(self, conn: Connection, events: Sequence[NewEvent], now: float) -> None:
        """Insert received events (a dialect may take a faster path)."""
        conn.execute(
            _INSERT_INBOX,
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
        self._notify(conn, "inbox")

    def _read_together(
        self, conn: Connection, queries: Sequence[tuple[str, Sequence[Any]]]
    ) -> list[list[Any]]:
        """The rows of each of ``queries`` (as :meth:`Raw.rows`), run in this order. A
        dialect that talks to a server sends them at once (one round trip)."""
        raw = Raw(conn)
        return [raw.rows(sql, params) for sql, params in queries]

    def _many(self, conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """``Raw.many``: ``sql`` (one of the statements in ``_statements``) for each of
        ``rows``; a dialect may run it as one statement over all of them."""
        Raw(conn).many(sql, rows)

    def _together(self, conn: Connection) -> AbstractContextManager[object]:
        """Statements run in this block whose results are not read in it (``Raw.many``,
        ``Raw.run``) may be sent to the database together, and their errors raised at the
        end of the block (PostgreSQL's pipeline mode). No SQLAlchemy statement in it."""
        return nullcontext()

    def inbox_writer(self) -> InboxWriterPort:
        """A writer for the receiver's batches, for one thread."""
        return _Writer(self)


class _Writer:
    """The portable inbox writer: each batch is :meth:`InboxSql.add_events`."""

    def __init__(self, store: InboxSql) -> None:
        self._store = store

    def add(self, events: Sequence[NewEvent], rejected: Sequence[Rejected] = ()) -> None:
        self._store.add_events(events, rejected)

    def close(self) -> None:
        pass
