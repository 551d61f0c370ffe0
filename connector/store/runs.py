"""Reconciliation's records in the store: runs, checkpoints, the cross-process lock that keeps
two runs of one dispensary apart, and the dead-letter queue seen from people's side (list,
replay). Portable SQL: SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from connector.planner import payload_hash
from connector.store.schema import (
    checkpoints,
    conflicts,
    contacts,
    customers,
    dead_letters,
    inbox,
    locks,
    outbox,
    reconcile_runs,
)
from connector.store.store import NewEvent, Rejected, Store

REPLAY_CHUNK = 50  # dead letters per transaction
COUNT_KEYS = (
    "pulled", "unchanged", "created", "updated", "opted_out", "merged", "conflicts", "errors",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    outbox_id: int | None
    dispensary: str
    destination: str
    customer_id: str
    op: str
    attempts: int
    reason: str
    status_code: int | None
    created_at: float
    replayed_at: float | None


@dataclass(frozen=True, slots=True)
class Replayed:
    replayed: int  # back in the outbox, pending
    superseded: int  # a later operation of the same kind for that contact exists: not resent
    unreplayable: int  # no operation to resend (a mapping failure): fix the mapping, --resend


def counts_from(rows: Sequence[tuple[str, str | None, int]]) -> dict[str, int]:
    """A run's counts from (status, planned, how many) of its events."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    for status, planned, number in rows:
        counts["pulled"] += number
        words = set((planned or "").split())
        if status == "failed":
            counts["errors"] += number
            continue
        if status == "pending":
            continue
        ops = words - {"new", "conflict", "merged"}
        if status not in ("applied", "tie") or (not ops and "merged" not in words):
            counts["unchanged"] += number
        elif "new" in words:
            counts["created"] += number
        else:
            counts["updated"] += number
        if "unsubscribe" in words:
            counts["opted_out"] += number
        if "merge" in words or "merged" in words:
            counts["merged"] += number
        if "conflict" in words:
            counts["conflicts"] += number
    return counts


class RunStore:
    """Reconciliation's view of a :class:`Store` (same engine, same transactions)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- the lock ---

    def acquire(self, name: str, holder: str, ttl: float) -> bool:
        """Take ``name`` for ``holder`` until ``ttl`` seconds from now, unless another holder
        has it and has renewed it in time."""
        now = time.time()
        try:
            with self.store.transaction(durable=False) as conn:
                taken = conn.execute(
                    update(locks)
                    .where(
                        locks.c.name == name,
                        (locks.c.holder == holder) | (locks.c.expires_at < now),
                    )
                    .values(holder=holder, expires_at=now + ttl)
                ).rowcount
                if taken:
                    return True
                if conn.execute(select(locks.c.name).where(locks.c.name == name)).first():
                    return False
                conn.execute(insert(locks).values(name=name, holder=holder, expires_at=now + ttl))
                return True
        except IntegrityError:  # another process inserted it first
            return False

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        with self.store.transaction(durable=False) as conn:
            return bool(
                conn.execute(
                    update(locks)
                    .where(locks.c.name == name, locks.c.holder == holder)
                    .values(expires_at=time.time() + ttl)
                ).rowcount
            )

    def release(self, name: str, holder: str) -> None:
        with self.store.transaction(durable=False) as conn:
            conn.execute(delete(locks).where(locks.c.name == name, locks.c.holder == holder))

    # --- checkpoints and runs ---

    def checkpoint(self, dispensary: str) -> int | None:
        """Microseconds since the epoch: the next pull asks for customers changed after it."""
        with self.store.engine.connect() as conn:
            found = conn.execute(
                select(checkpoints.c.after_us).where(checkpoints.c.dispensary == dispensary)
            ).scalar_one_or_none()
        return None if found is None else int(found)

    def _set_checkpoint(self, conn: Any, dispensary: str, after_us: int) -> None:
        """Move the checkpoint forward to ``after_us`` (never back: a full or resumed run
        pulling old pages must not make the next incremental run start earlier)."""
        now = time.time()
        found = conn.execute(
            select(checkpoints.c.after_us).where(checkpoints.c.dispensary == dispensary)
        ).scalar_one_or_none()
        if found is not None:
            if after_us > found:
                conn.execute(
                    update(checkpoints)
                    .where(checkpoints.c.dispensary == dispensary)
                    .values(after_us=after_us, updated_at=now)
                )
        else:
            conn.execute(
                insert(checkpoints).values(dispensary=dispensary, after_us=after_us, updated_at=now)
            )

    def close_interrupted(self, dispensary: str) -> int:
        """Mark the dispensary's runs still "running" as interrupted: called by the holder of
        its lock, so none of them is really running (a killed process, a power cut)."""
        with self.store.transaction(durable=False) as conn:
            return int(
                conn.execute(
                    update(reconcile_runs)
                    .where(
                        reconcile_runs.c.dispensary == dispensary,
                        reconcile_runs.c.outcome == "running",
                    )
                    .values(outcome="interrupted", error="the process running it stopped")
                ).rowcount
                or 0
            )

    def start_run(
        self, dispensary: str, trigger: str, options: dict[str, Any], before_us: int | None
    ) -> int:
        with self.store.transaction() as conn:
            result = conn.execute(
                insert(reconcile_runs).values(
                    dispensary=dispensary,
                    trigger=trigger,
                    options=json.dumps(options, sort_keys=True),
                    started_at=time.time(),
                    checkpoint_before_us=before_us,
                    counts=json.dumps({}),
                    outcome="running",
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def add_pulled(
        self,
        dispensary: str,
        events: Sequence[NewEvent],
        rejected: Sequence[Rejected],
        checkpoint_us: int | None,
    ) -> None:
        """Commit a page's events (and refused records) and, with them, the checkpoint they
        allow: durably, so a crash after this loses nothing and repeats nothing needed."""
        with self.store.transaction() as conn:
            self.store.insert_events(conn, events, rejected)
            if checkpoint_us is not None:
                self._set_checkpoint(conn, dispensary, checkpoint_us)

    def set_checkpoint(self, dispensary: str, after_us: int) -> None:
        with self.store.transaction() as conn:
            self._set_checkpoint(conn, dispensary, after_us)

    def pending_in_run(self, run_id: int) -> int:
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(inbox)
                    .where(inbox.c.run_id == run_id, inbox.c.status == "pending")
                ).scalar_one()
            )

    def run_counts(self, run_id: int) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                select(inbox.c.status, inbox.c.planned, func.count())
                .where(inbox.c.run_id == run_id)
                .group_by(inbox.c.status, inbox.c.planned)
            ).all()
        return counts_from([(r[0], r[1], int(r[2])) for r in rows])

    def finish_run(
        self,
        run_id: int,
        outcome: str,
        counts: dict[str, int],
        after_us: int | None,
        error: str | None = None,
    ) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                update(reconcile_runs)
                .where(reconcile_runs.c.id == run_id)
                .values(
                    ended_at=time.time(),
                    outcome=outcome,
                    counts=json.dumps(counts),
                    checkpoint_after_us=after_us,
                    error=error,
                )
            )

    def runs(self, dispensary: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        query = select(reconcile_runs).order_by(reconcile_runs.c.id.desc()).limit(limit)
        if dispensary is not None:
            query = query.where(reconcile_runs.c.dispensary == dispensary)
        with self.store.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(query)]
        for row in rows:
            row["counts"] = json.loads(row["counts"])
            row["options"] = json.loads(row["options"])
        return rows

    def last_runs(self) -> dict[str, dict[str, Any]]:
        """The latest run of each dispensary."""
        latest = (
            select(func.max(reconcile_runs.c.id))
            .group_by(reconcile_runs.c.dispensary)
            .scalar_subquery()
        )
        with self.store.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(select(reconcile_runs).where(reconcile_runs.c.id.in_(latest)))
            ]
        for row in rows:
            row["counts"] = json.loads(row["counts"])
        return {row["dispensary"]: row for row in rows}

    def outbox_high_water(self, dispensary: str) -> int:
        with self.store.engine.connect() as conn:
            found = conn.execute(
                select(func.max(outbox.c.id)).where(outbox.c.dispensary == dispensary)
            ).scalar_one_or_none()
        return int(found or 0)

    def open_operations(self, dispensary: str, up_to: int) -> int:
        """Operations of ``dispensary`` up to outbox id ``up_to`` not yet delivered nor dead."""
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(outbox)
                    .where(
                        outbox.c.dispensary == dispensary,
                        outbox.c.id <= up_to,
                        outbox.c.status.in_(("pending", "inflight")),
                    )
                ).scalar_one()
            )

    def sample_contacts(
        self, dispensary: str, destination: str, run_id: int, limit: int
    ) -> list[tuple[str, str]]:
        """Up to ``limit`` (customer, contact id) pairs of customers this run pulled, merged
        away ones left out (their own contact is gone by design)."""
        pulled = (
            select(inbox.c.customer_id)
            .where(inbox.c.run_id == run_id, inbox.c.customer_id.is_not(None))
            .limit(limit * 4)
            .scalar_subquery()
        )
        query = (
            select(contacts.c.customer_id, contacts.c.contact_id)
            .where(
                contacts.c.dispensary == dispensary,
                contacts.c.destination == destination,
                contacts.c.contact_id.is_not(None),
                contacts.c.customer_id.in_(pulled),
                contacts.c.customer_id.not_in(
                    select(customers.c.customer_id).where(
                        customers.c.dispensary == dispensary, customers.c.merged_into.is_not(None)
                    )
                ),
            )
            .limit(limit)
        )
        with self.store.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(query)]

    def add_conflict(
        self, dispensary: str, customer_id: str, destination: str, kind: str, detail: str
    ) -> None:
        with self.store.transaction(durable=False) as conn:
            self.store.add_conflicts(conn, dispensary, [(customer_id, destination, kind, detail)])

    def conflict_counts(self, since: float = 0.0) -> dict[tuple[str, str], int]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                select(conflicts.c.dispensary, conflicts.c.kind, func.count())
                .where(conflicts.c.created_at >= since)
                .group_by(conflicts.c.dispensary, conflicts.c.kind)
            ).all()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    # --- dead letters ---

    def _dead_query(
        self,
        dispensary: str | None,
        destination: str | None,
        customer: str | None,
        older_than: float | None,
        include_replayed: bool,
    ) -> Any:
        query = select(dead_letters).order_by(dead_letters.c.id)
        if not include_replayed:
            query = query.where(dead_letters.c.replayed_at.is_(None))
        if dispensary is not None:
            query = query.where(dead_letters.c.dispensary == dispensary)
        if destination is not None:
            query = query.where(dead_letters.c.destination == destination)
        if customer is not None:
            query = query.where(dead_letters.c.customer_id == customer)
        if older_than is not None:
            query = query.where(dead_letters.c.created_at < older_than)
        return query

    def dead_letters(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        customer: str | None = None,
        include_replayed: bool = False,
        limit: int = 100,
    ) -> list[DeadLetter]:
        query = self._dead_query(dispensary, destination, customer, None, include_replayed)
        with self.store.engine.connect() as conn:
            return [
                DeadLetter(
                    r.id,
                    r.outbox_id,
                    r.dispensary,
                    r.destination,
                    r.customer_id,
                    r.op,
                    r.attempts,
                    r.reason,
                    r.status_code,
                    r.created_at,
                    r.replayed_at,
                )
                for r in conn.execute(query.limit(limit))
            ]

    def replay(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        customer: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
    ) -> Replayed:
        """Put dead operations back in the outbox (pending, attempts from zero), oldest first,
        in transactions of :data:`REPLAY_CHUNK` so the write lock is never held for long.

        Judged against the customer's current state, not only the outbox (delivered rows are
        purged), an operation is superseded, marked replayed and not resent, when:

        - its customer was merged away (nothing goes to an absorbed contact but the merge,
          and an ``unsubscribe``: an owed opt-out is never superseded);
        - it is a ``subscribe`` and the contact is unsubscribed or the customer opted out;
        - it is an ``unsubscribe`` and a subscribe was planned since (``on_source_opt_in``);
        - it is an ``upsert`` whose fields are not the last ones planned for the contact (a
          newer upsert exists or existed: resending would put old data over new);
        - a later operation of the same kind exists.

        A resent ``unsubscribe`` (or ``subscribe``) loses its mapped fields when an upsert was
        planned after it, so consent is sent without stale data. Mapping failures have no
        operation to resend: they stay open for ``reconcile --resend``.
        """
        query = self._dead_query(dispensary, destination, customer, older_than, False)
        if limit is not None:
            query = query.limit(limit)
        with self.store.engine.connect() as conn:
            letters = conn.execute(query).all()
        replayed = superseded = unreplayable = 0
        for start in range(0, len(letters), REPLAY_CHUNK):
            now = time.time()
            with self.store.transaction() as conn:
                for row in letters[start : start + REPLAY_CHUNK]:
                    if row.outbox_id is None:
                        unreplayable += 1
                        continue
                    verdict = self._replay_one(conn, row, now)
                    if verdict == "replayed":
                        replayed += 1
                    elif verdict == "superseded":
                        superseded += 1
                    else:
                        unreplayable += 1
                    conn.execute(
                        update(dead_letters)
                        .where(dead_letters.c.id == row.id)
                        .values(replayed_at=now)
                    )
        return Replayed(replayed, superseded, unreplayable)

    def _replay_one(self, conn: Any, row: Any, now: float) -> str:
        found = conn.execute(
            select(outbox.c.payload, outbox.c.status).where(outbox.c.id == row.outbox_id)
        ).first()
        if found is None or found.status != "dead":
            return "unreplayable"
        body = json.loads(found.payload)
        state = conn.execute(
            select(customers.c.opt_out, customers.c.merged_into).where(
                customers.c.dispensary == row.dispensary,
                customers.c.customer_id == row.customer_id,
            )
        ).first()
        contact = conn.execute(
            select(
                contacts.c.unsubscribed, contacts.c.delivered_hash, contacts.c.deactivated
            ).where(
                contacts.c.dispensary == row.dispensary,
                contacts.c.destination == row.destination,
                contacts.c.customer_id == row.customer_id,
            )
        ).first()
        if (
            state is not None
            and state.merged_into is not None
            and row.op not in ("merge", "unsubscribe")
        ):
            # an owed opt-out is never superseded: it goes where it was planned to go (the
            # survivor is owed its own unsubscribe since the merge was planned)
            return "superseded"
        if row.op == "subscribe" and (
            (contact is not None and contact.unsubscribed) or (state and state.opt_out is True)
        ):
            return "superseded"
        if row.op == "unsubscribe" and contact is not None and not contact.unsubscribed:
            # a subscribe was planned since (resubscribe: on_source_opt_in, Treez flipped
            # true → false): the customer's newer word stands
            return "superseded"
        fields = body.get("fields")
        planned_hash = contact.delivered_hash if contact is not None else None
        newer_planned = (
            isinstance(fields, dict)
            and planned_hash is not None
            and payload_hash(fields) != planned_hash
        )
        if row.op == "upsert" and newer_planned:
            return "superseded"
        later = (
            conn.execute(
                select(outbox.c.op).where(
                    outbox.c.dispensary == row.dispensary,
                    outbox.c.destination == row.destination,
                    outbox.c.customer_id == row.customer_id,
                    outbox.c.id > row.outbox_id,
                    outbox.c.status != "dead",
                )
            )
            .scalars()
            .all()
        )
        if row.op in later:
            return "superseded"
        if row.op == "upsert" and (
            "deactivate" in later or (contact is not None and contact.deactivated)
        ):
            return "superseded"  # never reactivate a customer Treez has deactivated since
        values: dict[str, Any] = {
            "status": "pending", "attempts": 0, "first_attempt_at": None,
            "next_attempt_at": now, "claimed_by": None, "claimed_until": None,
        }  # fmt: skip
        stale_fields = isinstance(fields, dict) and (
            "upsert" in later or (planned_hash is not None and payload_hash(fields) != planned_hash)
        )
        if row.op in ("unsubscribe", "subscribe") and stale_fields:
            values["payload"] = json.dumps(
                {k: v for k, v in body.items() if k != "fields"}, separators=(",", ":")
            )
        conn.execute(update(outbox).where(outbox.c.id == row.outbox_id).values(**values))
        return "replayed"

    def dead_counts(self) -> dict[tuple[str, str], int]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(
                select(dead_letters.c.dispensary, dead_letters.c.destination, func.count())
                .where(dead_letters.c.replayed_at.is_(None))
                .group_by(dead_letters.c.dispensary, dead_letters.c.destination)
            ).all()
        return {(r[0], r[1]): int(r[2]) for r in rows}
