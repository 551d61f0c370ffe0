"""Status, metrics, readiness and retention."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    Connection,
    delete,
    func,
    insert,
    literal,
    select,
    tuple_,
    union_all,
    update,
)

from connector.store.abc import Lease, PurgeCursor, RegisteredProcess
from connector.store.processes import ProcessesSql
from connector.store.schema import (
    attempts,
    audit,
    conflicts,
    dead_letters,
    inbox,
    locks,
    outbox,
    processes,
    quarantine,
    reconcile_runs,
    schedule_ticks,
)

PROBE_BYTES = 16 * 1024
"""The row an allocating write probe inserts and rolls back: a few pages."""
PURGE_STEP_ROWS = 5_000
"""The most rows of each kind one step of a purge changes (one transaction)."""


def _forget_bodies(
    conn: Connection, table: Any, after: int, limit: int, *terms: Any
) -> tuple[int, int | None]:
    """Clear the bodies of at most ``limit`` rows of ``table`` past id ``after`` that meet
    ``terms``: how many, and where the next step starts (``None``: the table's end)."""
    ids = _walk(conn, table.c.id, after, limit, *terms, table.c.body.is_not(None))
    cleared = _by_ids(
        conn, ids, lambda part: update(table).where(table.c.id.in_(part)).values(body=None)
    )
    return cleared, ids[-1] if len(ids) == limit else None


_IDS_A_STATEMENT = 500  # bound values: an older SQLite takes at most 999 in one statement


def _by_ids(conn: Connection, ids: Sequence[Any], statement: Callable[[Sequence[Any]], Any]) -> int:
    """Run ``statement`` for ``ids`` a few hundred at a time: the rows it changed (the real
    count: another replica's purge may have taken some of them since they were read)."""
    changed = 0
    for start in range(0, len(ids), _IDS_A_STATEMENT):
        result = conn.execute(statement(ids[start : start + _IDS_A_STATEMENT]))
        changed += max(result.rowcount or 0, 0)
    return changed


def _walk(conn: Connection, key: Any, after: int, limit: int, *terms: Any) -> list[int]:
    """The ids of at most ``limit`` rows past ``after``, in id order, that meet ``terms``:
    the primary key walked, never a scan of the whole table a step."""
    query = select(key).where(key > after, *terms).order_by(key).limit(limit)
    return list(conn.execute(query).scalars())


def outbox_pairs(conn: Connection) -> list[tuple[str, str]]:
    """The (dispensary, destination) pairs the outbox holds operations of: a seek each along
    ``ix_outbox_queue`` to the next pair (a loose index scan), not a read of every operation
    the store keeps."""
    query = (
        select(outbox.c.dispensary, outbox.c.destination)
        .order_by(outbox.c.dispensary, outbox.c.destination)
        .limit(1)
    )
    pairs: list[tuple[str, str]] = []
    row = conn.execute(query).first()
    while row is not None:
        dispensary, destination = row[0], row[1]
        pairs.append((dispensary, destination))
        # two seeks, not a row value's (dispensary, destination) > (...): SQLite seeks that
        # by the dispensary alone and walks its operations to the next destination
        row = (
            conn.execute(
                query.where(outbox.c.dispensary == dispensary, outbox.c.destination > destination)
            ).first()
            or conn.execute(query.where(outbox.c.dispensary > dispensary)).first()
        )
    return pairs


# pairs counted in one statement: SQLite takes at most 500 terms in a compound SELECT
_PAIRS_A_STATEMENT = 250


def open_counts(
    conn: Connection, statuses: tuple[str, ...]
) -> list[tuple[str, str, str, int, Any]]:
    """Rows of dispensary, destination, status, count and oldest ``created_at`` of the
    operations in ``statuses``: per pair (:func:`outbox_pairs`), along ``ix_outbox_queue``,
    so reading the few operations open costs no read of the many delivered.

    The counts of every pair are one statement (a ``UNION ALL`` of one ``SELECT`` a pair), so
    they are of one moment on PostgreSQL too, whose snapshot reads at READ COMMITTED: an
    operation queued for one pair and another settled for a second pair in one commit are
    never counted half. A pair whose first operation is queued after the pairs were found
    is counted by the next call."""
    found: list[tuple[str, str, str, int, Any]] = []
    pairs = outbox_pairs(conn)
    for start in range(0, len(pairs), _PAIRS_A_STATEMENT):
        arms = [
            select(
                literal(dispensary).label("dispensary"),
                literal(destination).label("destination"),
                outbox.c.status,
                func.count().label("n"),
                func.min(outbox.c.created_at).label("oldest"),
            )
            .where(
                outbox.c.dispensary == dispensary,
                outbox.c.destination == destination,
                outbox.c.status.in_(statuses),
            )
            .group_by(outbox.c.status)
            for dispensary, destination in pairs[start : start + _PAIRS_A_STATEMENT]
        ]
        for dispensary, destination, status, count, oldest in conn.execute(union_all(*arms)):
            found.append((dispensary, destination, status, int(count), oldest))
    return found


class _RolledBack(Exception):
    """Ends a probe's transaction in a rollback."""


class AdminSql(ProcessesSql):
    def ping(self) -> None:
        with self.snapshot() as conn:
            conn.exec_driver_sql("SELECT 1")

    def probe_write(self, *, allocate: bool = False) -> None:
        """Whether the store takes a write now, changing nothing: the write lock (SQLite's
        ``BEGIN IMMEDIATE``, within the store timeout) and a write statement, which a
        read-only store refuses even when it matches no row. StoreUnavailable if not.
        ``allocate``: also a row of a few pages, rolled back (a database at its page cap
        refuses it); a full disk is the adapter's to see (the row never reaches the WAL)."""
        try:
            with self.transaction(durable=False) as conn:
                conn.execute(update(processes).where(processes.c.id == "").values(heartbeat_at=0.0))
                if allocate:
                    row = {"at": 0.0, "who": "probe", "action": "probe", "target": ""}
                    conn.execute(insert(audit).values(**row, detail="x" * PROBE_BYTES))
                    raise _RolledBack
        except _RolledBack:
            pass

    def queue_stats(self) -> list[dict[str, Any]]:
        """Per (dispensary, destination): pending, inflight and dead counts, oldest pending."""
        with self.snapshot() as conn:
            rows = open_counts(conn, ("pending", "inflight", "dead"))
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
        with self.snapshot() as conn:
            events = conn.execute(
                select(func.count()).select_from(inbox).where(inbox.c.status == "pending")
            ).scalar_one()
            ops = sum(int(count) for *_, count, _ in open_counts(conn, ("pending", "inflight")))
        return int(events) + ops

    def purge(self, *, raw_before: float, delivered_before: float) -> dict[str, int]:
        """Forget what is no longer needed: the raw bodies of events planned (or refused)
        before ``raw_before``, and operations delivered before ``delivered_before``.

        Pending events keep their bodies whatever their age (they are still to be planned);
        dead letters are kept until they are replayed or dealt with (a letter whose operation,
        replayed and delivered since, is purged keeps its record, no longer linked to it).
        Scheduled ticks claimed before ``delivered_before`` go too. In steps of
        :meth:`purge_step`, each its own short transaction."""
        cursor = PurgeCursor()
        while not cursor.finished:
            self.purge_step(raw_before=raw_before, delivered_before=delivered_before, cursor=cursor)
        return cursor.counts

    def purge_step(
        self,
        *,
        raw_before: float,
        delivered_before: float,
        cursor: PurgeCursor,
        limit: int = PURGE_STEP_ROWS,
    ) -> dict[str, int]:
        """One step of :meth:`purge`: at most ``limit`` rows of each kind, in one transaction
        (a first purge of a large store, or one after a long stop, never holds the store's
        write lock for seconds: on SQLite every webhook's commit would wait on it). The
        tables without an index on what is purged are walked once, in id order, through
        ``cursor``; ``cursor.finished`` once nothing is left."""
        if limit < 1:
            raise ValueError(f"a purge step takes at least 1 row of each kind, not {limit}")
        moved = replace(cursor)  # the cursor moves once the step has committed
        with self.transaction(durable=False) as conn:
            bodies = refused = delivered = 0
            if moved.inbox is not None:  # never a pending event's: it is still to be planned
                terms = (inbox.c.status != "pending", inbox.c.received_at < raw_before)
                bodies, moved.inbox = _forget_bodies(conn, inbox, moved.inbox, limit, *terms)
            if moved.quarantine is not None:
                old = quarantine.c.received_at < raw_before
                refused, moved.quarantine = _forget_bodies(
                    conn, quarantine, moved.quarantine, limit, old
                )
            if moved.outbox:
                # along ix_outbox_settled: what is left is never read again
                ids = list(
                    conn.execute(
                        select(outbox.c.id)
                        .where(
                            outbox.c.done_at < delivered_before,
                            outbox.c.status.in_(("done", "superseded")),
                        )
                        .limit(limit)
                    ).scalars()
                )
                # their failed attempts with them (along ix_attempts_outbox), and their dead
                # letters (replayed since) unlinked (along ix_dead_letters_outbox): an id the
                # outbox gives again must never inherit another operation's attempts, nor
                # have a letter of another operation name it
                _by_ids(
                    conn, ids, lambda part: delete(attempts).where(attempts.c.outbox_id.in_(part))
                )
                _by_ids(
                    conn,
                    ids,
                    lambda part: (
                        update(dead_letters)
                        .where(dead_letters.c.outbox_id.in_(part))
                        .values(outbox_id=None)
                    ),
                )
                delivered = _by_ids(
                    conn, ids, lambda part: delete(outbox).where(outbox.c.id.in_(part))
                )
                moved.outbox = len(ids) == limit
            if moved.attempts is not None and not moved.outbox:
                # attempts whose operation is gone otherwise (an earlier version's purge, or
                # a late failure recorded after its operation was purged), once the outbox
                # is purged
                gone = ~select(outbox.c.id).where(outbox.c.id == attempts.c.outbox_id).exists()
                ids = _walk(conn, attempts.c.id, moved.attempts, limit, gone)
                _by_ids(conn, ids, lambda part: delete(attempts).where(attempts.c.id.in_(part)))
                moved.attempts = ids[-1] if len(ids) == limit else None
            if moved.ticks:
                # a tick is claimed within the scheduler's misfire grace or never: its row is
                # needed minutes, not for good (one a minute is half a million rows a year)
                key = tuple_(schedule_ticks.c.job, schedule_ticks.c.tick_at)
                ticks = conn.execute(
                    select(schedule_ticks.c.job, schedule_ticks.c.tick_at)
                    .where(schedule_ticks.c.claimed_at < delivered_before)
                    .limit(limit)
                ).all()
                pairs = [tuple(t) for t in ticks]
                _by_ids(conn, pairs, lambda part: delete(schedule_ticks).where(key.in_(part)))
                moved.ticks = len(pairs) == limit
        step = {"bodies": bodies, "quarantined": refused, "delivered": delivered}
        moved.counts = {key: cursor.counts.get(key, 0) + count for key, count in step.items()}
        vars(cursor).update(vars(moved))
        return step

    def query(self, statement: Any) -> list[Any]:
        """Run a read-only statement (tests and the CLI)."""
        with self.snapshot() as conn:
            rows = conn.execute(statement).all()
        return list(rows)

    def conflict_counts(self, since: float = 0.0) -> dict[tuple[str, str], int]:
        """Open conflicts (not acknowledged) by dispensary and kind."""
        with self.snapshot() as conn:
            rows = conn.execute(
                select(conflicts.c.dispensary, conflicts.c.kind, func.count())
                .where(conflicts.c.created_at >= since, conflicts.c.acked_at.is_(None))
                .group_by(conflicts.c.dispensary, conflicts.c.kind)
            ).all()
        return {(r[0], r[1]): int(r[2]) for r in rows}

    def latest_operations(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` operations, newest first: id, dispensary, destination, op,
        customer and status (the demo's report; never a payload)."""
        query = (
            select(
                outbox.c.id,
                outbox.c.dispensary,
                outbox.c.destination,
                outbox.c.op,
                outbox.c.customer_id,
                outbox.c.status,
            )
            .order_by(outbox.c.id.desc())
            .limit(limit)
        )
        return [dict(r._mapping) for r in self._read(query)]

    def leases(self) -> list[Lease]:
        """The named leases on record, expired ones included, by name."""
        rows = self._read(
            select(locks.c.name, locks.c.holder, locks.c.expires_at).order_by(locks.c.name)
        )
        return [Lease(r.name, r.holder, float(r.expires_at)) for r in rows]

    def registered_processes(self) -> list[RegisteredProcess]:
        """The processes registered in the cluster, oldest first."""
        query = select(
            processes.c.id,
            processes.c.host,
            processes.c.pid,
            processes.c.started_at,
            processes.c.heartbeat_at,
        ).order_by(processes.c.started_at, processes.c.id)
        return [
            RegisteredProcess(r.id, r.host, int(r.pid), float(r.started_at), float(r.heartbeat_at))
            for r in self._read(query)
        ]

    def maintain(self) -> None:
        """Nothing for SQLite (its planner needs no statistics for these queries)."""

    def last_webhook_times(self) -> dict[str, float]:
        """Per dispensary, when (Unix time) its latest webhook event was stored: what
        ``connector_last_webhook_timestamp_seconds`` starts from after a restart. Read once
        per process (it reads every webhook row of the inbox)."""
        rows = self._read(
            select(inbox.c.dispensary, func.max(inbox.c.received_at))
            .where(inbox.c.source == "webhook")
            .group_by(inbox.c.dispensary)
        )
        return {r[0]: float(r[1]) for r in rows if r[1] is not None}

    def reconcile_times(self) -> dict[str, dict[str, Any]]:
        """Per dispensary with a finished reconciliation run: ``outcome`` and ``ended_at`` of
        the latest one, ``succeeded_at`` of the latest success (None when none succeeded).
        A run still going is left out; an interrupted one, closed without an end, counts as
        ended when it started."""
        finished = reconcile_runs.c.outcome != "running"
        latest = (
            select(func.max(reconcile_runs.c.id))
            .where(finished)
            .group_by(reconcile_runs.c.dispensary)
            .scalar_subquery()
        )
        with self.snapshot() as conn:  # one snapshot: a run ending between reads shows once
            last = conn.execute(
                select(
                    reconcile_runs.c.dispensary,
                    reconcile_runs.c.outcome,
                    func.coalesce(reconcile_runs.c.ended_at, reconcile_runs.c.started_at),
                ).where(reconcile_runs.c.id.in_(latest))
            ).all()
            succeeded = dict(
                conn.execute(
                    select(reconcile_runs.c.dispensary, func.max(reconcile_runs.c.ended_at))
                    .where(reconcile_runs.c.outcome == "succeeded")
                    .group_by(reconcile_runs.c.dispensary)
                ).all()
            )
        times: dict[str, dict[str, Any]] = {}
        for dispensary, outcome, ended_at in last:
            at = succeeded.get(dispensary)
            times[dispensary] = {
                "outcome": outcome,
                "ended_at": float(ended_at),
                "succeeded_at": None if at is None else float(at),
            }
        return times
