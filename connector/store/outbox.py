"""The outbox port: claims, delivery results, and the identity map the workers read."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    case,
    delete,
    func,
    insert,
    select,
    update,
)

from connector.delivery._http import vendor_code
from connector.planner import payload_hash
from connector.store._statements import (
    _CLAIM_DUE,
    _CLAIM_EXPIRED,
    _CONTACT_IDS,
    _NEXT_DUE,
    CLAIM_SECONDS,
    RAW_CLAIM_DUE,
    RAW_CLAIM_DUE_PG,
    RAW_CLAIM_EXPIRED,
    RAW_CLAIM_EXPIRED_PG,
    RAW_CLAIM_MARK,
    RAW_CONTACT_HOLDERS,
    RAW_CONTACT_IDS,
    RAW_FILL_CONTACT_ID,
    RAW_NEW_CONTACT,
    RAW_SETTLE_DONE,
    Raw,
    _settle,
    in_list,
)
from connector.store.abc import (
    Claimed,
    OutboxRow,
    Pause,
)
from connector.store.plans import PlanSql
from connector.store.schema import (
    attempts,
    contacts,
    customers,
    dead_letters,
    outbox,
    pauses,
)
from connector.store.schema import conflicts as conflicts_table


class OutboxSql(PlanSql):
    _claim_expired: Any = _CLAIM_EXPIRED
    _claim_due: Any = _CLAIM_DUE
    _next_due: Any = _NEXT_DUE

    def claim(
        self, dispensary: str, destination: str, limit: int, now: float | None = None
    ) -> list[OutboxRow]:
        """Claim up to ``limit`` ready operations, at most one per order key.

        An operation is ready when it is due and no earlier operation with the same order key
        is still pending, waiting for a retry, or in flight: a customer's operations go one at
        a time and in order, and a retry's wait holds up only that customer.
        """
        now = self._now() if now is None else now
        with self.transaction(durable=False) as conn:
            return self._claim_in(conn, Raw(conn), dispensary, destination, limit, now)

    def _claim_in(
        self,
        conn: Connection,
        raw: Raw,
        dispensary: str,
        destination: str,
        limit: int,
        now: float,
    ) -> list[OutboxRow]:
        """:meth:`claim` in a write transaction (``raw``: its driver connection)."""
        self._lock_queue(conn, dispensary, destination)
        if self.dialect == "postgresql":
            expired, due = RAW_CLAIM_EXPIRED_PG, RAW_CLAIM_DUE_PG
        else:
            expired, due = RAW_CLAIM_EXPIRED, RAW_CLAIM_DUE
        key = (dispensary, destination, now, now)
        rows = raw.rows(expired, (*key, limit))
        if len(rows) < limit:
            rows += raw.rows(due, (*key, limit - len(rows)))
        if not rows:
            return []
        ids = [r[0] for r in rows]
        raw.run(
            RAW_CLAIM_MARK + in_list(len(ids)),
            (self.process_id, now + CLAIM_SECONDS, now, *ids),
        )
        offset = self._clock_offset
        loads = json.loads
        # in this host's time, as the worker reads it
        return [
            OutboxRow(
                id_,
                dispensary_,
                destination_,
                customer,
                op,
                loads(payload),
                key_,
                attempts,
                (first if first is not None else now) - offset,
            )
            for (
                id_,
                dispensary_,
                destination_,
                customer,
                op,
                payload,
                key_,
                attempts,
                first,
            ) in rows
        ]

    def record_and_claim(
        self,
        dispensary: str,
        destination: str,
        limit: int,
        done: Sequence[tuple[OutboxRow, str | None]] = (),
        retry: Sequence[tuple[OutboxRow, float, str]] = (),
        dead: Sequence[tuple[OutboxRow, str, int | None, str | None]] = (),
        conflicts: Sequence[tuple[str, str, str]] = (),
        replaced: Mapping[int, str] | None = None,
        paused: Sequence[tuple[OutboxRow, float, str]] = (),
        pause: tuple[float, str, int | None] | None = None,
        answers: Mapping[int, tuple[int | None, str | None]] | None = None,
        *,
        due_if_none: bool = False,
    ) -> Claimed:
        """:meth:`finish` then :meth:`claim` in one write transaction (a customer's next
        operation is claimable once its last one is recorded, which the claim sees), with
        the contact ids the claimed operations are sent with; when nothing is claimed and
        ``due_if_none``, when the next operation falls due. Either all of it commits or
        none of it."""
        recording = bool(done or retry or dead or conflicts or paused or pause is not None)
        claimed = Claimed([], {}, {})
        with self.transaction(durable=False) as conn:
            raw = Raw(conn)
            now = self._now()
            if recording:
                self._finish_in(
                    conn,
                    raw,
                    dispensary,
                    destination,
                    done,
                    retry,
                    dead,
                    conflicts,
                    replaced,
                    paused,
                    pause,
                    answers,
                    now,
                )
            rows = self._claim_in(conn, raw, dispensary, destination, limit, now) if limit else []
            claimed.rows = rows
            if rows:
                claimed.contacts = self._contact_ids_raw(
                    raw, dispensary, destination, list(dict.fromkeys(r.customer_id for r in rows))
                )
                survivors = {str(r.body["into_customer_id"]) for r in rows if r.op == "merge"}
                for customer_id in survivors:
                    # a merge goes into the final survivor: if the survivor was itself merged
                    # away since this merge was planned (B into C after A into B), into C's
                    current = self._final_in(conn, dispensary, customer_id)
                    own = self._contact_ids_raw(raw, dispensary, destination, [current])
                    if current in own:
                        claimed.survivors[customer_id] = own[current]
            elif due_if_none:
                found = conn.execute(
                    self._next_due,
                    {"dispensary": dispensary, "destination": destination, "now": now},
                ).all()
                value = found[0][0] if found else None
                if value is not None:
                    claimed.next_due = float(value) - self._clock_offset  # this host's time
        return claimed

    def _lock_queue(self, conn: Connection, dispensary: str, destination: str) -> None:
        """Hold a destination's claims until the transaction ends: each claim then sees every
        one committed before it (SQLite: the whole database is held, by ``BEGIN IMMEDIATE``)."""

    def pending_count(self, dispensary: str, destination: str) -> int:
        """Operations waiting for this destination (due or not)."""
        with self.snapshot() as conn:
            found = conn.execute(
                select(func.count())
                .select_from(outbox)
                .where(
                    outbox.c.dispensary == dispensary,
                    outbox.c.destination == destination,
                    outbox.c.status == "pending",
                )
            ).scalar_one()
        return int(found)

    def contact_ids(
        self, dispensary: str, destination: str, customer_ids: Iterable[str]
    ) -> dict[str, str]:
        """The destination's contact id of each customer that has one (the identity map)."""
        ids = list(dict.fromkeys(customer_ids))
        if not ids:
            return {}
        with self.snapshot() as conn:
            return self._contact_ids_raw(Raw(conn), dispensary, destination, ids)

    @staticmethod
    def _contact_ids_raw(
        raw: Raw, dispensary: str, destination: str, ids: list[str]
    ) -> dict[str, str]:
        """:meth:`contact_ids` of distinct ``ids`` (not empty), in a transaction."""
        rows = raw.rows(RAW_CONTACT_IDS + in_list(len(ids)), (dispensary, destination, *ids))
        return {customer: contact for customer, contact in rows if contact is not None}

    def resolve_contact_ids(
        self, dispensary: str, destination: str, customer_ids: Iterable[str]
    ) -> dict[str, str]:
        """The contact each customer resolves to: its own, or for a customer merged away, the
        survivor's (followed through repeated merges). For lookups and reports; delivery
        uses :meth:`contact_ids`, a customer's own entry."""
        resolved: dict[str, str] = {}
        with self.snapshot() as conn:
            for customer_id in dict.fromkeys(customer_ids):
                current = self._final_in(conn, dispensary, customer_id)
                own = self.contact_ids_in(conn, dispensary, destination, [current])
                if current in own:
                    resolved[customer_id] = own[current]
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
        with self.snapshot() as conn:
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
        return owners, found

    def merged_away(self, dispensary: str, customer_id: str) -> bool:
        """Whether Treez merged the customer into another (its record lives on in the
        survivor's): asked by an adapter before a consent change could make a contact."""
        with self.snapshot() as conn:
            into = conn.execute(
                select(customers.c.merged_into).where(
                    customers.c.dispensary == dispensary, customers.c.customer_id == customer_id
                )
            ).scalar_one_or_none()
        return into is not None

    def finish(
        self,
        dispensary: str,
        destination: str,
        done: Sequence[tuple[OutboxRow, str | None]] = (),
        retry: Sequence[tuple[OutboxRow, float, str]] = (),
        dead: Sequence[tuple[OutboxRow, str, int | None, str | None]] = (),
        conflicts: Sequence[tuple[str, str, str]] = (),
        replaced: Mapping[int, str] | None = None,
        paused: Sequence[tuple[OutboxRow, float, str]] = (),
        pause: tuple[float, str, int | None] | None = None,
        answers: Mapping[int, tuple[int | None, str | None]] | None = None,
    ) -> None:
        """Record a round of delivery: successes (with any returned contact id), retries
        (with their next attempt time), dead letters (with the response), and what the
        destination made the adapter work around (customer, kind, detail).

        ``replaced``: by outbox id, the contact id a success's returned id replaces (the
        destination said it is gone: merged away on its side, deleted).
        ``paused``: operations that met the destination's used-up quota, due again at the
        given time with no attempt counted (one that had never been tried before keeps no
        first attempt time either); ``pause``: the destination's pause (until, reason,
        status), which every process delivering for it honours. ``answers``: by outbox
        id, the status and vendor code of a failed or paused attempt, kept in ``attempts``."""
        with self.transaction(durable=False) as conn:
            self._finish_in(
                conn,
                Raw(conn),
                dispensary,
                destination,
                done,
                retry,
                dead,
                conflicts,
                replaced,
                paused,
                pause,
                answers,
                self._now(),
            )

    def _finish_in(
        self,
        conn: Connection,
        raw: Raw,
        dispensary: str,
        destination: str,
        done: Sequence[tuple[OutboxRow, str | None]],
        retry: Sequence[tuple[OutboxRow, float, str]],
        dead: Sequence[tuple[OutboxRow, str, int | None, str | None]],
        conflicts: Sequence[tuple[str, str, str]],
        replaced: Mapping[int, str] | None,
        paused: Sequence[tuple[OutboxRow, float, str]],
        pause: tuple[float, str, int | None] | None,
        answers: Mapping[int, tuple[int | None, str | None]] | None,
        now: float,
    ) -> None:
        """:meth:`finish` in a write transaction (``raw``: its driver connection)."""
        offset = self._clock_offset  # a retry's time is this host's; stored in the store's
        written = {
            str(row.body.get("into_customer_id") or row.customer_id)
            if row.op == "merge"
            else row.customer_id
            for row, contact_id in done
            if contact_id
        } | {row.customer_id for row, *_ in dead if row.op == "upsert"}
        # only what this process still holds is settled: a claim that expired (this process
        # stalled past it) may be another's now, and a late result must not put it back or
        # end it under the new holder; a late success still records the contact it returned
        mine: Any = None
        if retry or paused or dead:
            mine = (outbox.c.status == "inflight") & (outbox.c.claimed_by == self.process_id)
        # the contacts written here are customer state a planner may be writing too
        self._lock_customers(conn, dispensary, written)
        if conflicts:
            self.add_conflicts(conn, dispensary, [(c, destination, k, d) for c, k, d in conflicts])
        if done:
            ids = [row.id for row, _ in done]
            raw.run(RAW_SETTLE_DONE + in_list(len(ids)), (now, self.process_id, *ids))
            # recorded as one trip per call would record them: a customer returned twice (a
            # merge into a survivor and the survivor's own upsert), or a contact returned for
            # two customers, goes to a later round, which sees the earlier one's writes (a
            # second id for a customer, a contact another customer holds: conflicts)
            rounds: list[tuple[dict[str, str], dict[str, str]]] = []
            customer_round: dict[str, int] = {}
            contact_round: dict[str, int] = {}
            for row, contact_id in done:
                if contact_id:
                    target = row.body.get("into_customer_id") if row.op == "merge" else None
                    customer = str(target or row.customer_id)
                    slot = customer_round.get(customer, -1)
                    if slot >= 0 and rounds[slot][0][customer] == contact_id:
                        continue  # the same answer again
                    slot = max(slot, contact_round.get(contact_id, -1)) + 1
                    if slot == len(rounds):
                        rounds.append(({}, {}))
                    returned, gone = rounds[slot]
                    returned[customer] = contact_id
                    customer_round[customer] = contact_round[contact_id] = slot
                    if replaced and row.id in replaced:
                        gone[customer] = replaced[row.id]
            for returned, gone in rounds:
                self._record_contacts(conn, dispensary, destination, returned, now, gone, raw=raw)
        # each settled only while this process holds it (``mine``): what is settled here has
        # its attempt recorded, and a dead one its letter
        settled: set[int] = set()
        for row, at, error in retry:
            if _settle(
                conn,
                (outbox.c.id == row.id) & mine,
                "pending",
                next_attempt_at=at + offset,
                last_error=error[:2000],
            ):
                settled.add(row.id)
        for row, at, reason in paused:
            back = conn.execute(
                update(outbox)
                .where((outbox.c.id == row.id) & mine)
                .values(
                    status="pending",
                    claimed_by=None,
                    claimed_until=None,
                    next_attempt_at=at + offset,
                    last_error=reason[:2000],
                    first_attempt_at=case(
                        (outbox.c.attempts == 0, None), else_=outbox.c.first_attempt_at
                    ),
                )
            )
            if back.rowcount:
                settled.add(row.id)
        buried = [
            (row, reason, status_code, response)
            for row, reason, status_code, response in dead
            if _settle(
                conn, (outbox.c.id == row.id) & mine, "dead", done_at=now, last_error=reason[:2000]
            )
        ]
        settled.update(row.id for row, *_ in buried)
        failed = (
            [(row, "retry", error) for row, _, error in retry]
            + [(row, "dead", reason) for row, reason, *_ in dead]
            + [(row, "paused", reason) for row, _, reason in paused]
        )
        failed = self._still_theirs(conn, dispensary, destination, failed, settled)
        if failed:
            known = answers or {}
            conn.execute(
                insert(attempts),
                [
                    {
                        "outbox_id": row.id,
                        "at": now,
                        "result": result,
                        "status_code": known.get(row.id, (None, None))[0],
                        "code": known.get(row.id, (None, None))[1],
                        "error": error[:500],
                    }
                    for row, result, error in failed
                ],
            )
        if pause is not None:
            until, reason, status_code = pause
            self._set_pause(conn, dispensary, destination, until + offset, reason, status_code, now)
        for row, reason, status_code, response in buried:
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
                    code=vendor_code(response, [row.body]),
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

    @staticmethod
    def _still_theirs(
        conn: Connection,
        dispensary: str,
        destination: str,
        failed: list[tuple[OutboxRow, str, str]],
        settled: set[int],
    ) -> list[tuple[OutboxRow, str, str]]:
        """The failed attempts to record: those of the operations settled here, and a late
        one (its claim expired, another process holds or ended the operation) where its
        operation is still there, and still the same: an id the purge deleted can be given
        to another operation, which must never inherit this one's answer."""
        late = [row.id for row, *_ in failed if row.id not in settled]
        if not late:
            return failed
        found = {
            r.id: r.idempotency_key
            for r in conn.execute(
                select(outbox.c.id, outbox.c.idempotency_key).where(
                    outbox.c.id.in_(late),
                    outbox.c.dispensary == dispensary,
                    outbox.c.destination == destination,
                )
            )
        }
        return [
            entry
            for entry in failed
            if entry[0].id in settled or found.get(entry[0].id) == entry[0].idempotency_key
        ]

    def _set_pause(
        self,
        conn: Connection,
        dispensary: str,
        destination: str,
        until: float,
        reason: str,
        status_code: int | None,
        now: float,
    ) -> None:
        key = (pauses.c.dispensary == dispensary) & (pauses.c.destination == destination)
        held = conn.execute(select(pauses.c.paused_until).where(key)).scalar()
        if held is not None and held >= until:
            return  # a longer pause already stands (another batch met the quota first)
        conn.execute(delete(pauses).where(key))
        conn.execute(
            insert(pauses).values(
                dispensary=dispensary,
                destination=destination,
                paused_until=until,
                reason=reason[:2000],
                status_code=status_code,
                paused_at=now,
            )
        )

    def pause_of(self, dispensary: str, destination: str) -> Pause | None:
        """The destination's pause, if it has one that has not ended."""
        found = self._pauses(
            (pauses.c.dispensary == dispensary) & (pauses.c.destination == destination)
        )
        return found[0] if found else None

    def pauses(self) -> list[Pause]:
        """The destinations paused now (their pause not yet over), by name."""
        return self._pauses(None)

    def _pauses(self, where: Any) -> list[Pause]:
        now, offset = self._now(), self._clock_offset
        query = select(pauses).where(pauses.c.paused_until > now)
        if where is not None:
            query = query.where(where)
        rows = self._read(query.order_by(pauses.c.dispensary, pauses.c.destination))
        return [
            Pause(
                dispensary=r.dispensary,
                destination=r.destination,
                until=float(r.paused_until) - offset,
                reason=r.reason,
                status_code=r.status_code,
                since=float(r.paused_at) - offset,
            )
            for r in rows
        ]

    def _record_contacts(
        self,
        conn: Connection,
        dispensary: str,
        destination: str,
        returned: Mapping[str, str],
        now: float,
        gone: Mapping[str, str] | None = None,
        *,
        raw: Raw | None = None,
    ) -> None:
        """Record contact ids a destination returned.

        A different id than the map holds is reported as a conflict and not written over
        (which of the two is the person is not ours to decide), unless the destination said
        the held id is gone (``gone``, by customer): then the returned id replaces it, or
        every later operation would name the gone contact again (a 404, a second call to find
        the contact, and a deactivation that never lands), and the replacement is reported.
        """
        raw = Raw(conn) if raw is None else raw
        ids = list(returned)
        known: dict[str, str | None] = dict(
            raw.rows(RAW_CONTACT_IDS + in_list(len(ids)), (dispensary, destination, *ids))
        )
        new: list[tuple[Any, ...]] = []
        fill: list[tuple[Any, ...]] = []
        clash: list[dict[str, Any]] = []
        moved: list[tuple[str, str | None, str]] = []  # customer, gone id, its replacement
        # only an id the map does not hold already can be another customer's: the common
        # round (the same ids again) costs no query
        changed = {c: k for c, k in returned.items() if known.get(c) != k}
        held = self._held_by_others(conn, raw, dispensary, destination, changed) if changed else {}
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
                new.append((dispensary, cid, destination, contact_id, False, False, now))
            elif known[cid] is None:
                fill.append((contact_id, now, dispensary, cid, destination))
            elif known[cid] == contact_id:
                continue
            elif gone and gone.get(cid) == known[cid]:
                moved.append((cid, known[cid], contact_id))
            else:
                clash.append(
                    {
                        "dispensary": dispensary,
                        "customer_id": cid,
                        "destination": destination,
                        "kind": "contact_id_changed",
                        "detail": "the destination returned another contact id than "
                        "the identity map holds; the map is kept",
                        "created_at": now,
                    }
                )
        for cid, old, contact_id in moved:
            fill.append((contact_id, now, dispensary, cid, destination))
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
        raw.many(RAW_NEW_CONTACT, new)
        raw.many(RAW_FILL_CONTACT_ID, fill)
        if clash:
            conn.execute(insert(conflicts_table), clash)

    def _held_by_others(
        self,
        conn: Connection,
        raw: Raw,
        dispensary: str,
        destination: str,
        returned: Mapping[str, str],
    ) -> dict[str, str]:
        """Of the customers in ``returned``, those whose returned contact the identity map
        gives to another customer of the dispensary, not of the same merge (two people: a
        family sharing a phone the destination matches on); by customer, that other one."""
        wanted = sorted(set(returned.values()))
        rows = raw.rows(
            RAW_CONTACT_HOLDERS + in_list(len(wanted)), (dispensary, destination, *wanted)
        )
        holders: dict[str, set[str]] = {}
        for customer_id, contact_id in rows:
            holders.setdefault(contact_id, set()).add(customer_id)
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
        found = self._read(
            self._next_due,
            {"dispensary": dispensary, "destination": destination, "now": self._now()},
        )
        value = found[0][0] if found else None
        return None if value is None else float(value) - self._clock_offset  # this host's time
