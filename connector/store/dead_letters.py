"""The dead-letter queue seen from people's side: list, count, replay."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    func,
    select,
    update,
)

from connector.planner import payload_hash
from connector.store.abc import (
    DeadLetter,
    Replayed,
)
from connector.store.runs import REPLAY_CHUNK, RunsSql
from connector.store.schema import (
    contacts,
    customers,
    dead_letters,
    outbox,
)


def dead_letter_of(r: Any) -> DeadLetter:
    """A ``dead_letters`` row as the record callers get."""
    return DeadLetter(
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


class DeadLettersSql(RunsSql):
    def _dead_query(
        self,
        dispensary: str | None,
        destination: str | None,
        customer: str | None,
        older_than: float | None,
        include_replayed: bool,
        op: str | None = None,
        status_code: int | None = None,
        ids: Sequence[int] | None = None,
        code: str | None = None,
    ) -> Any:
        query = select(dead_letters).order_by(dead_letters.c.id)
        if op is not None:
            query = query.where(dead_letters.c.op == op)
        if status_code is not None:
            query = query.where(dead_letters.c.status_code == status_code)
        if code is not None:
            query = query.where(dead_letters.c.code == code)
        if ids is not None:
            query = query.where(dead_letters.c.id.in_(list(ids)))
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
        op: str | None = None,
        status_code: int | None = None,
        ids: Sequence[int] | None = None,
        code: str | None = None,
    ) -> list[DeadLetter]:
        query = self._dead_query(
            dispensary, destination, customer, None, include_replayed, op, status_code, ids, code
        )
        with self.snapshot() as conn:
            return [dead_letter_of(r) for r in conn.execute(query.limit(limit))]

    def replay(
        self,
        *,
        dispensary: str | None = None,
        destination: str | None = None,
        customer: str | None = None,
        older_than: float | None = None,
        limit: int | None = None,
        op: str | None = None,
        status_code: int | None = None,
        ids: Sequence[int] | None = None,
        progress: Callable[[int], None] | None = None,
        code: str | None = None,
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

        ``progress``: called after each chunk's transaction with how many are done so far.
        """
        query = self._dead_query(
            dispensary, destination, customer, older_than, False, op, status_code, ids, code
        )
        if limit is not None:
            query = query.limit(limit)
        with self.snapshot() as conn:
            letters = conn.execute(query).all()
        replayed = superseded = unreplayable = 0
        for start in range(0, len(letters), REPLAY_CHUNK):
            now = self._now()  # due now by the clock claims read
            with self.transaction() as conn:
                for row in letters[start : start + REPLAY_CHUNK]:
                    if row.outbox_id is None:
                        unreplayable += 1
                        continue
                    # taken first, and only while still open: another replay (the console's
                    # and the CLI's at once) may have replayed it since it was read, and its
                    # operation may have died again since, under a letter of its own
                    taken = conn.execute(
                        update(dead_letters)
                        .where(dead_letters.c.id == row.id, dead_letters.c.replayed_at.is_(None))
                        .values(replayed_at=now)
                    )
                    if not taken.rowcount:  # that replay counts it
                        continue
                    verdict = self._replay_one(conn, row, now)
                    if verdict == "replayed":
                        replayed += 1
                    elif verdict == "superseded":
                        superseded += 1
                    else:
                        unreplayable += 1
            if progress is not None:
                progress(min(start + REPLAY_CHUNK, len(letters)))
        return Replayed(replayed, superseded, unreplayable)

    def _replay_one(self, conn: Any, row: Any, now: float) -> str:
        found = conn.execute(
            select(outbox.c.payload, outbox.c.status).where(
                outbox.c.id == row.outbox_id,
                # the letter's own operation, never one given its id since (a store whose
                # links predate revision 0008's repair)
                outbox.c.dispensary == row.dispensary,
                outbox.c.destination == row.destination,
                outbox.c.idempotency_key == row.idempotency_key,
            )
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
            "status": "pending",
            "attempts": 0,
            "first_attempt_at": None,
            "next_attempt_at": now,
            "claimed_by": None,
            "claimed_until": None,
        }
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
        with self.snapshot() as conn:
            rows = conn.execute(
                select(dead_letters.c.dispensary, dead_letters.c.destination, func.count())
                .where(dead_letters.c.replayed_at.is_(None))
                .group_by(dead_letters.c.dispensary, dead_letters.c.destination)
            ).all()
        return {(r[0], r[1]): int(r[2]) for r in rows}
