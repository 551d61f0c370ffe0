"""The operator's port: one customer's record, quarantine and conflicts, the audit log and
the overview the console and ``connector explain`` show. Reads see the whole cluster's store
(any replica's console shows every replica's work)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Integer, cast, func, insert, select, update

from connector.store.abc import (
    STORY_LIMIT,
    Attempt,
    AuditEntry,
    ConflictRecord,
    CustomerRecord,
    DeadLetter,
    DeadLetterDetail,
    DestinationOverview,
    NewEvent,
    Quarantined,
    QuarantineReplay,
    StoredContact,
    StoredEvent,
    StoredOperation,
)
from connector.store.admin import AdminSql, open_counts
from connector.store.dead_letters import dead_letter_of
from connector.store.schema import (
    attempts,
    audit,
    conflicts,
    contacts,
    customers,
    dead_letters,
    inbox,
    outbox,
    pauses,
    quarantine,
)

QUARANTINE_SCAN = 5000  # refused bodies of a dispensary searched for a customer's id


def _quarantined(r: Any) -> Quarantined:
    return Quarantined(
        r.id,
        r.dispensary,
        r.received_at,
        r.status_code,
        r.reason,
        r.content_type,
        r.size,
        r.replayed_at,
        r.replayed_event_id,
    )


def _conflict(r: Any) -> ConflictRecord:
    return ConflictRecord(
        r.id,
        r.dispensary,
        r.customer_id,
        r.destination,
        r.kind,
        r.detail,
        r.created_at,
        r.acked_at,
        r.acked_by,
    )


def _decisions(text: str | None) -> list[tuple[str, str, str]] | None:
    if text is None:
        return None
    return [(str(d), str(k), str(x)) for d, k, x in json.loads(text)]


def _names_customer(body: bytes | None, customer_id: str) -> bool:
    """Whether a refused body is about ``customer_id`` (its ``data.customer_id``, read as the
    receiver reads it: the last copy of a repeated name, escapes decoded, spaces around a
    text id dropped)."""
    if not body:
        return False
    if b"\\" not in body and customer_id.encode() not in body:
        return False  # the id's own bytes are absent and nothing is escaped: not theirs
    try:
        found = json.loads(body)
    except ValueError:
        # not JSON: only a customer_id key naming it (as text or a number) makes it theirs
        pattern = rb'"customer_id"\s*:\s*"?\s*' + re.escape(customer_id.encode()) + rb'["\s,}]'
        return re.search(pattern, body) is not None
    data = found.get("data") if isinstance(found, dict) else None
    if not isinstance(data, dict):
        return False
    named = data.get("customer_id")
    if isinstance(named, str):
        return named.strip() == customer_id
    return isinstance(named, int) and not isinstance(named, bool) and str(named) == customer_id


_QUARANTINE_COLUMNS = (
    quarantine.c.id,
    quarantine.c.dispensary,
    quarantine.c.received_at,
    quarantine.c.status_code,
    quarantine.c.reason,
    quarantine.c.content_type,
    func.length(quarantine.c.body).label("size"),
    quarantine.c.replayed_at,
    quarantine.c.replayed_event_id,
)


class OperatorSql(AdminSql):
    # --- one customer ---

    def customer_dispensaries(self, customer_id: str) -> list[str]:
        """The dispensaries that know ``customer_id``: a seek per dispensary along the
        customers' key and ``ix_inbox_customer`` (both lead with the dispensary), not a read
        of every event kept to find one customer's."""
        with self.snapshot() as conn:
            found: set[str] = set()
            for table in (customers, inbox):
                for dispensary in _dispensaries(conn, table):
                    row = conn.execute(
                        select(table.c.dispensary)
                        .where(table.c.dispensary == dispensary, table.c.customer_id == customer_id)
                        .limit(1)
                    ).first()
                    if row is not None:
                        found.add(dispensary)
        return sorted(found)

    def customer_record(
        self, dispensary: str, customer_id: str, destinations: Iterable[str] = ()
    ) -> CustomerRecord:
        with self.snapshot() as conn:
            state_row = conn.execute(
                select(customers).where(
                    customers.c.dispensary == dispensary, customers.c.customer_id == customer_id
                )
            ).first()
            state = None
            if state_row is not None:
                state = dict(state_row._mapping)
                state["merges"] = json.loads(state.get("merges") or "[]")
            stored_contacts = [
                StoredContact(
                    r.destination,
                    r.contact_id,
                    bool(r.unsubscribed),
                    bool(r.deactivated),
                    r.delivered_hash is not None,
                    int(r.ops_planned or 0),
                )
                for r in conn.execute(
                    select(contacts)
                    .where(
                        contacts.c.dispensary == dispensary,
                        contacts.c.customer_id == customer_id,
                    )
                    .order_by(contacts.c.destination)
                )
            ]
            names = sorted({c.destination for c in stored_contacts} | set(destinations))
            event_rows = conn.execute(
                select(
                    inbox.c.id,
                    inbox.c.source,
                    inbox.c.event_type,
                    inbox.c.received_at,
                    inbox.c.last_update_us,
                    inbox.c.status,
                    inbox.c.processed_at,
                    inbox.c.run_id,
                    inbox.c.decisions,
                    inbox.c.body,
                )
                .where(inbox.c.dispensary == dispensary, inbox.c.customer_id == customer_id)
                .order_by(inbox.c.id.desc())
                .limit(STORY_LIMIT + 1)
            ).all()
            events_cut = len(event_rows) > STORY_LIMIT
            event_rows = event_rows[:STORY_LIMIT]
            events = [
                StoredEvent(
                    r.id,
                    r.source,
                    r.event_type,
                    r.received_at,
                    r.last_update_us,
                    r.status,
                    r.processed_at,
                    r.run_id,
                    _decisions(r.decisions),
                    r.body,
                )
                for r in reversed(event_rows)
            ]
            op_rows: list[Any] = list(
                conn.execute(
                    select(outbox)
                    .where(
                        outbox.c.dispensary == dispensary,
                        outbox.c.destination.in_(names),
                        outbox.c.customer_id == customer_id,
                    )
                    .order_by(outbox.c.id.desc())
                    .limit(STORY_LIMIT + 1)
                )
                if names
                else []
            )
            operations_cut = len(op_rows) > STORY_LIMIT
            op_rows = op_rows[:STORY_LIMIT]
            # operations this customer's events planned under another customer's id (a
            # merge of the customers it absorbed), found by the keys its decisions name
            have = {r.idempotency_key for r in op_rows}
            keys = sorted(
                {
                    key
                    for event in events
                    for _, kind, key in event.decisions or ()
                    if kind not in ("failed", "conflict") and key not in have
                }
            )
            for start in range(0, len(keys), 500):
                op_rows += conn.execute(
                    select(outbox).where(
                        outbox.c.dispensary == dispensary,
                        outbox.c.idempotency_key.in_(keys[start : start + 500]),
                    )
                ).all()
            op_rows.sort(key=lambda r: -r.id)
            failures: dict[int, list[Attempt]] = {}
            ids = [r.id for r in op_rows]
            for start in range(0, len(ids), 500):
                for a in conn.execute(
                    select(attempts)
                    .where(attempts.c.outbox_id.in_(ids[start : start + 500]))
                    .order_by(attempts.c.id)
                ):
                    failures.setdefault(a.outbox_id, []).append(
                        Attempt(a.at, a.result, a.status_code, a.code, a.error)
                    )
            operations = [
                StoredOperation(
                    r.id,
                    r.destination,
                    r.op,
                    r.status,
                    r.attempts,
                    r.created_at,
                    r.first_attempt_at,
                    r.next_attempt_at,
                    r.done_at,
                    r.last_error,
                    r.idempotency_key,
                    json.loads(r.payload),
                    failures.get(r.id, []),
                )
                for r in reversed(op_rows)
            ]
            letters = [
                dead_letter_of(r)
                for r in conn.execute(
                    select(dead_letters)
                    .where(
                        dead_letters.c.dispensary == dispensary,
                        dead_letters.c.destination.in_(names or [""]),
                        dead_letters.c.customer_id == customer_id,
                    )
                    .order_by(dead_letters.c.id)
                )
            ]
            found_conflicts = [
                _conflict(r)
                for r in conn.execute(
                    select(conflicts)
                    .where(
                        conflicts.c.dispensary == dispensary,
                        conflicts.c.customer_id == customer_id,
                    )
                    .order_by(conflicts.c.id)
                )
            ]
            absorbed = sorted(
                conn.execute(
                    select(customers.c.customer_id).where(
                        customers.c.dispensary == dispensary,
                        customers.c.merged_into == customer_id,
                    )
                ).scalars()
            )
            refused = conn.execute(
                select(*_QUARANTINE_COLUMNS, quarantine.c.body)
                .where(quarantine.c.dispensary == dispensary)
                .order_by(quarantine.c.id.desc())
                .limit(QUARANTINE_SCAN)
            ).all()
        quarantined = [
            _quarantined(r) for r in reversed(refused) if _names_customer(r.body, customer_id)
        ]
        return CustomerRecord(
            dispensary,
            customer_id,
            state,
            stored_contacts,
            events,
            operations,
            letters,
            found_conflicts,
            absorbed,
            quarantined,
            events_cut,
            operations_cut,
        )

    # --- dead letters ---

    def dead_letter_detail(self, letter_id: int) -> DeadLetterDetail | None:
        with self.snapshot() as conn:
            r = conn.execute(select(dead_letters).where(dead_letters.c.id == letter_id)).first()
        if r is None:
            return None
        payload = json.loads(r.payload)
        return DeadLetterDetail(dead_letter_of(r), r.code, r.response_body, payload)

    def dead_letter_codes(self, letters: Sequence[DeadLetter]) -> dict[int, str | None]:
        ids = [letter.id for letter in letters]
        codes: dict[int, str | None] = {}
        with self.snapshot() as conn:
            for start in range(0, len(ids), 500):
                for r in conn.execute(
                    select(dead_letters.c.id, dead_letters.c.code).where(
                        dead_letters.c.id.in_(ids[start : start + 500])
                    )
                ):
                    codes[r.id] = r.code
        return codes

    # --- quarantine ---

    def quarantined(
        self,
        *,
        dispensary: str | None = None,
        include_replayed: bool = False,
        ids: Sequence[int] | None = None,
        limit: int = 100,
    ) -> list[Quarantined]:
        query = select(*_QUARANTINE_COLUMNS).order_by(quarantine.c.id)
        if dispensary is not None:
            query = query.where(quarantine.c.dispensary == dispensary)
        if not include_replayed:
            query = query.where(quarantine.c.replayed_at.is_(None))
        if ids is not None:
            query = query.where(quarantine.c.id.in_(list(ids)))
        with self.snapshot() as conn:
            return [_quarantined(r) for r in conn.execute(query.limit(limit))]

    def quarantined_body(self, quarantine_id: int) -> bytes | None:
        with self.snapshot() as conn:
            found = conn.execute(
                select(quarantine.c.body).where(quarantine.c.id == quarantine_id)
            ).scalar_one_or_none()
        return None if found is None else bytes(found)

    def replay_quarantined(
        self,
        judge: Callable[[Quarantined, bytes], NewEvent | str],
        *,
        dispensary: str | None = None,
        ids: Sequence[int] | None = None,
        who: str | None = None,
    ) -> QuarantineReplay:
        """Each open refused body is judged again outside any transaction; one that passes
        is marked replayed and stored as an inbox event in one transaction, on the condition
        that no one marked it meanwhile (two replays at once move it once). With ``who``,
        the same transaction records the move in the audit table: a replay stopped half-way
        leaves a row for every body it moved."""
        query = (
            select(*_QUARANTINE_COLUMNS, quarantine.c.body)
            .where(quarantine.c.replayed_at.is_(None))
            .order_by(quarantine.c.id)
        )
        if dispensary is not None:
            query = query.where(quarantine.c.dispensary == dispensary)
        if ids is not None:
            query = query.where(quarantine.c.id.in_(list(ids)))
        with self.snapshot() as conn:
            rows = conn.execute(query).all()
        moved: list[tuple[int, int]] = []
        refused: list[tuple[int, str]] = []
        skipped = 0
        for row in rows:
            if row.body is None:
                skipped += 1
                continue
            verdict = judge(_quarantined(row), bytes(row.body))
            if isinstance(verdict, str):
                refused.append((row.id, verdict))
                continue
            with self.transaction() as conn:
                now = self._now()
                taken = conn.execute(
                    update(quarantine)
                    .where(quarantine.c.id == row.id, quarantine.c.replayed_at.is_(None))
                    .values(replayed_at=now)
                ).rowcount
                if taken != 1:
                    skipped += 1
                    continue
                event_id: int = conn.execute(
                    insert(inbox).values(
                        dispensary=verdict.dispensary,
                        source=verdict.source,
                        event_type=verdict.event_type,
                        customer_id=verdict.customer_id,
                        last_update_us=verdict.last_update_us,
                        received_at=now,
                        body=verdict.body,
                        status=verdict.status,
                        run_id=None,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
                conn.execute(
                    update(quarantine)
                    .where(quarantine.c.id == row.id)
                    .values(replayed_event_id=event_id)
                )
                if who is not None:
                    conn.execute(
                        insert(audit).values(
                            at=now,
                            who=who[:255],
                            action="quarantine_replay",
                            target=f"quarantine #{row.id}",
                            detail=f"moved to the inbox as event #{event_id}",
                        )
                    )
                self._notify(conn, "inbox")
            moved.append((row.id, int(event_id)))
        missing = sorted(set(ids or ()) - {row.id for row in rows})
        return QuarantineReplay(moved, refused, skipped, missing)

    # --- conflicts ---

    def conflict_records(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        kind: str | None = None,
        customer: str | None = None,
        include_acked: bool = False,
        ids: Sequence[int] | None = None,
        limit: int = 100,
    ) -> list[ConflictRecord]:
        query = select(conflicts).order_by(conflicts.c.id)
        for column, value in (
            (conflicts.c.dispensary, dispensary),
            (conflicts.c.destination, destination),
            (conflicts.c.kind, kind),
            (conflicts.c.customer_id, customer),
        ):
            if value is not None:
                query = query.where(column == value)
        if not include_acked:
            query = query.where(conflicts.c.acked_at.is_(None))
        if ids is not None:
            query = query.where(conflicts.c.id.in_(list(ids)))
        with self.snapshot() as conn:
            return [_conflict(r) for r in conn.execute(query.limit(limit))]

    def ack_conflicts(self, ids: Sequence[int], by: str) -> int:
        """Acknowledge, and audit in the same transaction (``by`` is who)."""
        done = 0
        with self.transaction() as conn:
            now = self._now()
            for start in range(0, len(ids), 500):
                done += conn.execute(
                    update(conflicts)
                    .where(
                        conflicts.c.id.in_(list(ids[start : start + 500])),
                        conflicts.c.acked_at.is_(None),
                    )
                    .values(acked_at=now, acked_by=by[:255])
                ).rowcount
            shown = ", ".join(f"#{i}" for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
            conn.execute(
                insert(audit).values(
                    at=now,
                    who=by[:255],
                    action="conflicts_ack",
                    target=shown or "none",
                    detail=f"acknowledged {done} of {len(ids)}",
                )
            )
        return done

    # --- audit ---

    def audit(self, who: str, action: str, target: str, detail: str = "") -> None:
        with self.transaction() as conn:
            conn.execute(
                insert(audit).values(
                    at=self._now(),
                    who=who[:255],
                    action=action[:64],
                    target=target,
                    detail=detail,
                )
            )

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        with self.snapshot() as conn:
            return [
                AuditEntry(r.id, r.at, r.who, r.action, r.target, r.detail)
                for r in conn.execute(select(audit).order_by(audit.c.id.desc()).limit(limit))
            ]

    # --- overview ---

    def overview(self, destinations: Iterable[tuple[str, str]] = ()) -> list[DestinationOverview]:
        now = self._now()
        with self.snapshot() as conn:
            queue = open_counts(conn, ("pending", "inflight"))
            # the last hour's along ix_outbox_settled, in a subquery kept apart by its OFFSET
            # 0 (neither SQLite nor PostgreSQL merges one into the grouping): grouped at once
            # by pair, SQLite walks ix_outbox_queue for its order instead, reading every
            # operation kept (a month of them: a quarter of a second a look)
            recent = (
                select(outbox.c.dispensary, outbox.c.destination)
                .where(outbox.c.status == "done", outbox.c.done_at >= now - 3600)
                .offset(0)
                .subquery("recent")
            )
            delivered = conn.execute(
                select(recent.c.dispensary, recent.c.destination, func.count()).group_by(
                    recent.c.dispensary, recent.c.destination
                )
            ).all()
            dead = conn.execute(
                select(dead_letters.c.dispensary, dead_letters.c.destination, func.count())
                .where(dead_letters.c.replayed_at.is_(None))
                .group_by(dead_letters.c.dispensary, dead_letters.c.destination)
            ).all()
            open_conflicts = conn.execute(
                select(conflicts.c.dispensary, conflicts.c.destination, func.count())
                .where(conflicts.c.acked_at.is_(None))
                .group_by(conflicts.c.dispensary, conflicts.c.destination)
            ).all()
            paused = conn.execute(
                select(pauses.c.dispensary, pauses.c.destination, pauses.c.paused_until).where(
                    pauses.c.paused_until > now
                )
            ).all()
        rows: dict[tuple[str, str], dict[str, Any]] = {}

        def entry(dispensary: str, destination: str) -> dict[str, Any]:
            return rows.setdefault(
                (dispensary, destination),
                {
                    "pending": 0,
                    "inflight": 0,
                    "oldest_pending_at": None,
                    "delivered_last_hour": 0,
                    "dead": 0,
                    "open_conflicts": 0,
                    "paused_until": None,
                },
            )

        for dispensary, destination in destinations:
            entry(dispensary, destination)
        for dispensary, destination, status, count, oldest in queue:
            found = entry(dispensary, destination)
            found[status] = int(count)
            if oldest is not None:
                prev = found["oldest_pending_at"]
                found["oldest_pending_at"] = oldest if prev is None else min(prev, oldest)
        for key, column in (
            (delivered, "delivered_last_hour"),
            (dead, "dead"),
            (open_conflicts, "open_conflicts"),
        ):
            for dispensary, destination, count in key:
                entry(dispensary, destination)[column] = int(count)
        for dispensary, destination, until in paused:
            entry(dispensary, destination)["paused_until"] = until
        return [DestinationOverview(d, t, **values) for (d, t), values in sorted(rows.items())]

    def throughput(self, since: float, bucket_seconds: int) -> list[tuple[float, int]]:
        size = max(1, int(bucket_seconds))
        if self.dialect == "postgresql":
            bucket: Any = func.floor(outbox.c.done_at / size)
        else:  # SQLite's CAST truncates, which for times after the epoch is the floor
            bucket = cast(outbox.c.done_at / size, Integer)
        with self.snapshot() as conn:
            rows = conn.execute(
                select(bucket.label("b"), func.count())
                .where(outbox.c.status == "done", outbox.c.done_at >= since)
                .group_by(bucket)
                .order_by(bucket)
            ).all()
        return [(float(b) * size, int(n)) for b, n in rows]

    # --- retention ---


def _dispensaries(conn: Connection, table: Any) -> list[str]:
    """The dispensaries ``table`` holds rows of, a seek each to the next along an index that
    leads with the dispensary (a loose index scan)."""
    query = select(table.c.dispensary).order_by(table.c.dispensary).limit(1)
    found: list[str] = []
    row = conn.execute(query).first()
    while row is not None:
        found.append(row[0])
        row = conn.execute(query.where(table.c.dispensary > row[0])).first()
    return found
