"""Reconciliation's records: runs and checkpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from connector.store.abc import (
    NewEvent,
    Rejected,
)
from connector.store.outbox import OutboxSql
from connector.store.schema import (
    checkpoints,
    contacts,
    customers,
    inbox,
    outbox,
    reconcile_runs,
    schedule_ticks,
)

REPLAY_CHUNK = 50  # dead letters per transaction
COUNT_KEYS = (
    "pulled",
    "unchanged",
    "created",
    "updated",
    "opted_out",
    "merged",
    "conflicts",
    "errors",
)


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


class RunsSql(OutboxSql):
    def checkpoint(self, dispensary: str) -> int | None:
        """Microseconds since the epoch: the next pull asks for customers changed after it."""
        with self.snapshot() as conn:
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
        with self.transaction(durable=False) as conn:
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
        with self.transaction() as conn:
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
        with self.transaction() as conn:
            self.insert_events(conn, events, rejected)
            if checkpoint_us is not None:
                self._set_checkpoint(conn, dispensary, checkpoint_us)

    def set_checkpoint(self, dispensary: str, after_us: int) -> None:
        with self.transaction() as conn:
            self._set_checkpoint(conn, dispensary, after_us)

    def pending_in_run(self, run_id: int) -> int:
        with self.snapshot() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(inbox)
                    .where(inbox.c.run_id == run_id, inbox.c.status == "pending")
                ).scalar_one()
            )

    def run_counts(self, run_id: int) -> dict[str, int]:
        with self.snapshot() as conn:
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
        with self.transaction() as conn:
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
        with self.snapshot() as conn:
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
        with self.snapshot() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(select(reconcile_runs).where(reconcile_runs.c.id.in_(latest)))
            ]
        for row in rows:
            row["counts"] = json.loads(row["counts"])
        return {row["dispensary"]: row for row in rows}

    def outbox_high_water(self, dispensary: str) -> int:
        with self.snapshot() as conn:
            found = conn.execute(
                select(func.max(outbox.c.id)).where(outbox.c.dispensary == dispensary)
            ).scalar_one_or_none()
        return int(found or 0)

    def open_operations(self, dispensary: str, up_to: int) -> int:
        """Operations of ``dispensary`` up to outbox id ``up_to`` not yet delivered nor dead."""
        with self.snapshot() as conn:
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
        with self.snapshot() as conn:
            return [(r[0], r[1]) for r in conn.execute(query)]

    def add_conflict(
        self, dispensary: str, customer_id: str, destination: str, kind: str, detail: str
    ) -> None:
        with self.transaction(durable=False) as conn:
            self.add_conflicts(conn, dispensary, [(customer_id, destination, kind, detail)])

    def claim_tick(self, job: str, tick_at: float, holder: str) -> bool:
        """Record that ``holder`` runs the scheduled tick ``tick_at`` of ``job``: True for the
        first process of the cluster to ask, False for every other, for good (a replica whose
        trigger fires late finds the tick taken, even after the run has ended)."""
        try:
            with self.transaction(durable=False) as conn:
                conn.execute(
                    insert(schedule_ticks).values(
                        job=job, tick_at=tick_at, holder=holder, claimed_at=time.time()
                    )
                )
        except IntegrityError:
            return False
        return True
