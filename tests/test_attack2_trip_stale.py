"""Attack on a trip whose worker stalled past its claims (its lease lost meanwhile, another
replica took the destination over and claimed the same operation again): the late results
it records in its next trip (``record_and_claim``) must not end, put back or dead-letter the
operation under its new holder, and its claim in the same trip must not take the
customer's next operation while the new holder's call is still out."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select
from test_delivery import DEST, DISPENSARY, enqueue, make_op

from connector.store import Store, open_store
from connector.store.schema import dead_letters, outbox

T = 2_000_000.0


@pytest.mark.parametrize("late", ["done", "retry", "dead", "paused"])
def test_a_stale_workers_late_results_leave_the_new_holders_claim_alone(
    store: Store, store_url: str, late: str
) -> None:
    clock = {"now": T}
    first: Any = store
    second: Any = open_store(store_url)
    second.register_process()
    try:
        for s in (first, second):
            s._now = lambda: clock["now"]
        enqueue(store, [make_op("x", 1), make_op("x", 2)])
        held = first.record_and_claim(DISPENSARY, DEST, 5).rows
        assert [r.body["fields"]["n"] for r in held] == [1]
        clock["now"] = T + 60  # the first stalled past its claim
        taken = second.record_and_claim(DISPENSARY, DEST, 5).rows
        assert [r.id for r in taken] == [held[0].id]
        row = held[0]
        results: dict[str, Any] = {
            "done": {"done": [(row, "c-late")]},
            "retry": {"retry": [(row, 0.0, "HTTP 500")]},
            "dead": {"dead": [(row, "HTTP 400", 400, '{"code":"E1"}')]},
            "paused": {"paused": [(row, 0.0, "quota")]},
        }[late]
        again = first.record_and_claim(DISPENSARY, DEST, 5, **results)
        # the customer's next operation waits for the new holder's call
        assert again.rows == []
        with store.engine.connect() as conn:
            status, holder = conn.execute(
                select(outbox.c.status, outbox.c.claimed_by).where(outbox.c.id == row.id)
            ).one()
            letters = conn.execute(select(dead_letters.c.outbox_id)).all()
        assert (status, holder) == ("inflight", second.process_id)
        assert letters == []
        # the new holder's result ends it; then the next one goes
        after = second.record_and_claim(DISPENSARY, DEST, 5, done=[(taken[0], "c-x")])
        assert [r.body["fields"]["n"] for r in after.rows] == [2]
    finally:
        second.close()
