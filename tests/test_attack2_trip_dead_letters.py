"""Attack on dead letters recorded by a delivery trip (``record_and_claim``, the driver's
connection for the common path, SQLAlchemy for the dead letters in the same transaction):
each keeps its answer (status, body) and its vendor code, never a "code" that echoes a
customer's value, and the attempt keeps the status and code the call gave; the customer's
next operation is claimed in the same trip."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from test_delivery import DEST, DISPENSARY, enqueue, make_op

from connector.store import Store
from connector.store.schema import attempts, dead_letters


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ('{"code":"VALIDATION_ERROR","message":"bad"}', "VALIDATION_ERROR"),
        ('{"errors":[{"code":"duplicate_profile"}]}', "duplicate_profile"),
        # the customer's e-mail address sent back as the "code": an echo, kept as no code
        ('{"code":"x@example.com"}', None),
        ("not json", None),
        (None, None),
    ],
)
def test_a_dead_letter_recorded_in_a_trip_keeps_its_answer_and_code(
    store: Store, answer: str | None, code: str | None
) -> None:
    enqueue(store, [make_op("x", 1), make_op("x", 2)])
    [row] = store.record_and_claim(DISPENSARY, DEST, 5).rows
    trip = store.record_and_claim(
        DISPENSARY,
        DEST,
        5,
        dead=[(row, "HTTP 400", 400, answer)],
        answers={row.id: (400, code)},
    )
    assert [r.body["fields"]["n"] for r in trip.rows] == [2]
    letters = store.query(
        select(
            dead_letters.c.outbox_id,
            dead_letters.c.status_code,
            dead_letters.c.response_body,
            dead_letters.c.code,
            dead_letters.c.attempts,
        )
    )
    assert letters == [(row.id, 400, answer, code, 1)]
    tried = store.query(select(attempts.c.outbox_id, attempts.c.status_code, attempts.c.code))
    assert tried == [(row.id, 400, code)]
