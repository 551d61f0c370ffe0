"""The plan-commit port: a planned batch of events written as one store operation."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    insert,
)

from connector.planner import ContactState, CustomerState, Operation
from connector.store._statements import (
    _LAST_OPEN,
    _SUPERSEDE,
    RAW_INSERT_OUTBOX,
    RAW_LOAD_CONTACTS,
    RAW_LOAD_CUSTOMERS,
    RAW_QUEUED_KEYS,
    RAW_SAVE_CONTACTS,
    RAW_SAVE_CUSTOMERS,
    in_list,
)
from connector.store.abc import (
    B,
    InboxRow,
    Plan,
    PlannedBatch,
)
from connector.store.inbox import InboxSql
from connector.store.schema import conflicts, dead_letters

# json.dumps(..., separators=(",", ":"), ensure_ascii=False), without an encoder per call
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# a batch of at most this many events is a trickle: the next one is planned under the lock
TRICKLE_EVENTS = 2


class PlanSql(InboxSql):
    # the last batch was a trickle (see plan_batch)
    _trickle = False
    # a write transaction locks the whole store (SQLite's BEGIN IMMEDIATE): nothing it reads
    # can change before it commits
    _locks_store = True

    def load_states(
        self, conn: Connection, dispensary: str, customer_ids: Iterable[str]
    ) -> dict[str, CustomerState]:
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return {}
        contact_rows, customer_rows = self._read_together(conn, _state_queries(dispensary, ids))
        return _states_from(ids, contact_rows, customer_rows)

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
        rows, contact_rows = [], []
        for cid, state in changed.items():
            rows.append(
                (
                    dispensary,
                    cid,
                    state.last_update_us,
                    state.content_hash,
                    state.opt_out,
                    state.merged_into,
                    json.dumps(sorted(state.merges)) if state.merges else "[]",
                    now,
                    state.opt_out_seen,
                )
            )
            old = before.get(cid)
            old_contacts = old.contacts if old is not None else {}
            for destination, contact in state.contacts.items():
                if old_contacts.get(destination) == contact:
                    continue
                contact_rows.append(
                    (
                        dispensary,
                        cid,
                        destination,
                        contact.contact_id,
                        contact.delivered_hash,
                        contact.unsubscribed,
                        contact.deactivated,
                        contact.planned,
                        now,
                    )
                )
        self._many(conn, RAW_SAVE_CUSTOMERS, rows)
        self._many(conn, RAW_SAVE_CONTACTS, contact_rows)

    def enqueue(
        self,
        conn: Connection,
        dispensary: str,
        operations: Sequence[Operation],
        queued: set[tuple[str, str]] | None = None,
    ) -> int:
        """Add operations; one whose idempotency key is already queued is skipped.
        ``queued``: those of their (destination, key) pairs already queued, when read before
        (:func:`_queued_queries`)."""
        rows = self._outbox_rows(conn, dispensary, operations, queued)
        self._many(conn, RAW_INSERT_OUTBOX, rows)
        return len(rows)

    def _queued_keys(
        self, conn: Connection, dispensary: str, operations: Sequence[Operation]
    ) -> set[tuple[str, str]]:
        found = self._read_together(conn, _queued_queries(dispensary, operations))
        return {(destination, key) for part in found for destination, key in part}

    def _outbox_rows(
        self,
        conn: Connection,
        dispensary: str,
        operations: Sequence[Operation],
        queued: set[tuple[str, str]] | None,
    ) -> list[tuple[Any, ...]]:
        """The outbox rows of ``operations`` to insert (:data:`RAW_INSERT_OUTBOX`): one whose
        idempotency key is already queued is left out, and an older upsert it replaces is
        superseded now (:meth:`_supersede`, before the new rows are inserted)."""
        if not operations:
            return []
        now = self._now()  # due now by the clock claims read
        if queued is None:
            queued = self._queued_keys(conn, dispensary, operations)
        taken = set(queued)
        rows: list[dict[str, Any] | None] = []
        last: dict[tuple[str, str], int] = {}  # (destination, order key) -> index in rows
        # the upserts that replace a waiting one, by index in rows (not by id() of the row:
        # a replaced row is dropped, and the next row made may reuse its id)
        replacing: set[int] = set()
        for op in operations:
            if (op.destination, op.idempotency_key) in taken:
                continue
            taken.add((op.destination, op.idempotency_key))
            order = (op.destination, op.order_key)
            before = rows[last[order]] if order in last else None
            if (
                op.replaces_waiting
                and before is not None
                and before["op"] == "upsert"
                and before["customer_id"] == op.customer_id
            ):
                rows[last[order]] = None  # replaced by this newer one (see _supersede)
            last[order] = len(rows)
            rows.append(
                {
                    "destination": op.destination,
                    "order_key": op.order_key,
                    "customer_id": op.customer_id,
                    "op": op.op,
                    "payload": _COMPACT_JSON(op.body),
                    "idempotency_key": op.idempotency_key,
                }
            )
            if op.replaces_waiting:
                replacing.add(len(rows) - 1)
        kept = [row for row in rows if row is not None]
        if not kept:
            return []
        if replacing:
            self._supersede(conn, dispensary, rows, replacing, now)
        return [
            (
                dispensary,
                r["destination"],
                r["order_key"],
                r["customer_id"],
                r["op"],
                r["payload"],
                r["idempotency_key"],
                now,
                now,
            )
            for r in kept
        ]

    def _supersede(
        self,
        conn: Connection,
        dispensary: str,
        rows: Sequence[dict[str, Any] | None],
        replacing: set[int],
        now: float,
    ) -> None:
        """An upsert in ``replacing`` (its index in ``rows``, where a row replaced in this
        call is None; planned for a destination that coalesces upserts) replaces its
        customer's upsert still waiting in the queue right before it (nothing of that order
        queued between, not claimed yet; in one call, one planned right before it is never
        written): the newer one carries the whole mapped customer, so sending both only puts
        a destination through a state already past. It
        matters for consent: a customer created opted in and opted out before the create
        went (a burst, a paused or failing destination) is created unsubscribed (Braze would
        create it subscribed, and a campaign could fire in between), not created subscribed
        and unsubscribed after."""
        firsts: dict[tuple[str, str], int] = {}
        for index, row in enumerate(rows):  # only a row first of its order in this call
            if row is not None:  # can replace one
                firsts.setdefault((row["destination"], row["order_key"]), index)
        wanted = [row for i in firsts.values() if i in replacing and (row := rows[i]) is not None]
        if not wanted:
            return
        last = {
            (r.destination, r.order_key): r
            for r in conn.execute(
                _LAST_OPEN,
                {"dispensary": dispensary, "keys": sorted({r["order_key"] for r in wanted})},
            )
        }
        older = [
            found.id
            for row in wanted
            if (found := last.get((row["destination"], row["order_key"]))) is not None
            and found.status == "pending"
            and found.op == "upsert"
            and found.customer_id == row["customer_id"]
        ]
        if older:
            # a claim taken meanwhile (another process) leaves it in flight: both are sent
            conn.execute(_SUPERSEDE, {"ids": older, "now": now})

    def add_conflicts(
        self, conn: Connection, dispensary: str, found: Sequence[tuple[str, str, str, str]]
    ) -> None:
        if found:
            now = time.time()
            conn.execute(
                insert(conflicts),
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

    # --- the port ---

    def plan_batch(self, limit: int, plan: Plan[B]) -> B | None:
        """Plan up to ``limit`` pending events, oldest first, and commit the result at once.

        Planning is CPU work, and the write lock is shared with the receiver: so the events
        and their customers' state are read first, planned with no lock held, and only the
        writes take the lock. Under the lock the batch checks that its events are still
        pending and that the state it planned from is still what is stored; if another
        process changed either meanwhile, it plans again under the lock. The new state, the
        operations and the events' outcomes commit together: a crash at any point leaves all
        of a batch's effects or none. How events and customers are locked is the dialect's
        (:meth:`_lock_events`, :meth:`_lock_customers`).

        At a trickle (the last batch had at most :data:`TRICKLE_EVENTS` events) the batch is
        read and planned under the lock at once: planning one or two events holds the lock
        for less than the read, the re-check and the second transaction would cost.
        """
        if self._trickle:
            with self.transaction(durable=False) as conn:
                rows = self._pending_locked(conn, limit)
                if not rows:
                    return None
                planned = self._plan_locked(conn, rows, plan)
                self._write_batch(conn, planned)
            self._trickle = len(rows) <= TRICKLE_EVENTS
            return planned
        with self.snapshot() as conn:
            rows = self.pending_events(conn, limit)
            if not rows:
                return None
            planned = plan(rows, _Reader(self, conn))
        with self.transaction(durable=False) as conn:  # redone from the durable inbox if lost
            ids = [row.id for row in rows]
            unchanged = self._lock_events(conn, ids) == set(ids)
            queued = None
            if unchanged:
                unchanged, queued = self._recheck(conn, planned)
            if not unchanged:
                rows = self._pending_locked(conn, limit)
                if not rows:
                    return None
                planned = self._plan_locked(conn, rows, plan)
                queued = None
            self._write_batch(conn, planned, queued)
        self._trickle = len(rows) <= TRICKLE_EVENTS
        return planned

    def _recheck(
        self, conn: Connection, planned: PlannedBatch
    ) -> tuple[bool, dict[str, set[tuple[str, str]]] | None]:
        """Lock the customers ``planned`` read and tell whether their state is still what it
        was planned from; with it, the idempotency keys of its operations already queued (by
        dispensary), read in the same go: the locks, the states and the keys are sent at
        once (one round trip where the dialect can)."""
        queries: list[tuple[str, Sequence[Any]]] = []
        # in one order for every batch (by dispensary, then key): two batches over the same
        # dispensaries never hold what the other waits for
        locks = 0
        for dispensary, related in sorted(planned.related.items()):
            found = self._lock_queries(dispensary, related)
            queries += found
            locks += len(found)
        loads: list[tuple[str, list[str]]] = []
        for dispensary, related in planned.related.items():
            ids = list(dict.fromkeys(related))
            if ids:
                loads.append((dispensary, ids))
                queries += _state_queries(dispensary, ids)
        keys: list[tuple[str, int]] = []
        for dispensary, operations in planned.operations.items():
            found = _queued_queries(dispensary, operations)
            keys.append((dispensary, len(found)))
            queries += found
        results = iter(self._read_together(conn, queries)[locks:])
        loaded = {d: _states_from(ids, next(results), next(results)) for d, ids in loads}
        unchanged = all(loaded.get(d, {}) == planned.loaded[d] for d in planned.related)
        queued: dict[str, set[tuple[str, str]]] = {}
        for dispensary, count in keys:
            queued[dispensary] = {
                (destination, key) for _ in range(count) for destination, key in next(results)
            }
        return unchanged, queued

    def plan_readonly(self, rows: list[InboxRow], plan: Plan[B]) -> B:
        with self.snapshot() as conn:
            return plan(rows, _Reader(self, conn))

    def _plan_locked(self, conn: Connection, rows: list[InboxRow], plan: Plan[B]) -> B:
        """Plan ``rows`` under the write transaction with every customer it read locked: a
        merge can lead to customers the events do not name, so the customers are locked
        once known and the state re-read; planned again if it changed before the lock."""
        locked: dict[str, set[str]] = {}
        planned = plan(rows, _Reader(self, conn))
        if self._locks_store:
            return planned
        while True:
            wanted = {d: ids - locked.get(d, set()) for d, ids in planned.related.items()}
            if not any(wanted.values()):
                return planned
            for dispensary, ids in sorted(wanted.items()):
                self._lock_customers(conn, dispensary, ids)
                locked.setdefault(dispensary, set()).update(ids)
            if any(
                self.load_states(conn, d, related) != planned.loaded[d]
                for d, related in planned.related.items()
            ):
                planned = plan(rows, _Reader(self, conn))

    def _write_batch(
        self,
        conn: Connection,
        planned: PlannedBatch,
        queued: Mapping[str, set[tuple[str, str]]] | None = None,
    ) -> None:
        """Write a planned batch. ``queued``: the idempotency keys of its operations already
        queued, by dispensary, when read before (:meth:`_recheck`). The statements that need
        SQLAlchemy or a result come first; the hot ones, whose results nothing reads, are
        then sent together (:meth:`_together`)."""
        for dispensary, destination, customer_id, message in planned.failures:
            self.dead_letter_direct(
                conn, dispensary, destination, customer_id, "upsert", f"mapping failed: {message}"
            )
        touched: set[str] = set()
        outbox_rows: list[tuple[Any, ...]] = []
        for dispensary in planned.current:
            operations = planned.operations[dispensary]
            known = queued.get(dispensary) if queued is not None else None
            outbox_rows += self._outbox_rows(conn, dispensary, operations, known)
            self.add_conflicts(conn, dispensary, planned.conflicts[dispensary])
            touched.update(f"{dispensary}/{op.destination}" for op in operations)
        if planned.rejected:
            self.insert_events(conn, [], planned.rejected)
        marks = self._mark_events(conn, planned.outcomes, planned.planned, planned.decisions)
        with self._together(conn):
            for dispensary, states in planned.current.items():
                self.save_states(conn, dispensary, planned.loaded[dispensary], states)
            self._many(conn, RAW_INSERT_OUTBOX, outbox_rows)
            marks()
            if touched:
                self._notify(conn, "outbox", " ".join(sorted(touched)))
        refreshed = 0
        for dispensary, customer_ids in planned.refresh.items():
            refreshed += self.refresh_events(conn, dispensary, customer_ids)
        if refreshed:
            self._notify(conn, "inbox")

    def _lock_events(self, conn: Connection, ids: Sequence[int]) -> set[int]:
        """Those of ``ids`` still pending, locked for this transaction against other planners
        (SQLite: the whole database is, by ``BEGIN IMMEDIATE``)."""
        return self.still_pending(conn, ids)

    def _pending_locked(self, conn: Connection, limit: int) -> list[InboxRow]:
        """Up to ``limit`` pending events that no other planner holds, locked likewise."""
        return self.pending_events(conn, limit)

    def _lock_customers(self, conn: Connection, dispensary: str, ids: Iterable[str]) -> None:
        """Hold the state of these customers until the transaction ends (SQLite: held)."""
        self._read_together(conn, self._lock_queries(dispensary, ids))

    def _lock_queries(self, dispensary: str, ids: Iterable[str]) -> list[tuple[str, Sequence[Any]]]:
        """The statements of :meth:`_lock_customers` (none where the store is locked whole)."""
        return []


class _Reader:
    """The :class:`StateReader` planning reads through: one snapshot or transaction."""

    __slots__ = ("_conn", "_store")

    def __init__(self, store: PlanSql, conn: Connection) -> None:
        self._store = store
        self._conn = conn

    def load_states(self, dispensary: str, customer_ids: Iterable[str]) -> dict[str, CustomerState]:
        return self._store.load_states(self._conn, dispensary, customer_ids)

    def first_received(
        self, dispensary: str, customer_id: str, last_update_us: int
    ) -> float | None:
        return self._store.first_received(self._conn, dispensary, customer_id, last_update_us)


def _queued_queries(
    dispensary: str, operations: Sequence[Operation]
) -> list[tuple[str, Sequence[Any]]]:
    """The reads of which of ``operations``' idempotency keys are queued already (rows of
    destination and key), a statement per destination and few hundred keys."""
    by_destination: dict[str, dict[str, None]] = {}
    for op in operations:
        by_destination.setdefault(op.destination, {})[op.idempotency_key] = None
    queries: list[tuple[str, Sequence[Any]]] = []
    for destination, found in sorted(by_destination.items()):
        keys = list(found)
        for chunk in range(0, len(keys), 500):
            part = keys[chunk : chunk + 500]
            queries.append((RAW_QUEUED_KEYS + in_list(len(part)), (dispensary, destination, *part)))
    return queries


def _state_queries(dispensary: str, ids: Sequence[str]) -> list[tuple[str, Sequence[Any]]]:
    """The two reads of :meth:`PlanSql.load_states`: the customers' contacts, then their
    rows."""
    key = (dispensary, *ids)
    where = in_list(len(ids))
    return [(RAW_LOAD_CONTACTS + where, key), (RAW_LOAD_CUSTOMERS + where, key)]


def _states_from(
    ids: Sequence[str], contact_rows: Iterable[Any], customer_rows: Iterable[Any]
) -> dict[str, CustomerState]:
    """The states :func:`_state_queries`' rows give for ``ids``."""
    found: dict[str, dict[str, ContactState]] = {cid: {} for cid in ids}
    for cid, destination, contact_id, delivered, unsub, deactivated, ops in contact_rows:
        found[cid][destination] = ContactState(
            contact_id, delivered, bool(unsub), bool(deactivated), ops
        )
    states = {}
    for cid, last, digest, opt_out, merged_into, merges, seen in customer_rows:
        states[cid] = CustomerState(
            cid,
            last,
            digest,
            None if opt_out is None else bool(opt_out),
            merged_into,
            frozenset((d, s) for d, s in json.loads(merges)) if merges != "[]" else frozenset(),
            found[cid],
            bool(seen),
        )
    for cid, known in found.items():
        if cid not in states and known:
            states[cid] = CustomerState(cid, contacts=known)
    return states
