"""The planner's statements on the driver's connection (``_statements.Raw``) and the planning
loop at a trickle: what issue 17's planning changes must keep."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from test_delivery import make_op

from connector.config import load_config
from connector.pipeline import BatchResult, Deployment, Processor, process_batch
from connector.planner import ContactState, CustomerState
from connector.store import Store
from connector.store._statements import Raw, in_list
from connector.store.abc import NewEvent
from connector.store.schema import outbox


def test_a_driver_error_is_raised_as_sqlalchemy_raises_it_without_its_values(
    store: Store,
) -> None:
    engine = store.engine  # type: ignore[attr-defined]
    with pytest.raises(DBAPIError) as caught, engine.connect() as conn, conn.begin():
        Raw(conn).rows("SELECT no_such_column FROM inbox WHERE id IN " + in_list(1), ["secret"])
    assert "secret" not in str(caught.value)
    # the store is usable after it: the failed transaction was rolled back
    with store.snapshot() as conn:
        assert Raw(conn).rows("SELECT count(*) FROM inbox") == [(0,)]


def test_states_saved_over_stored_rows_and_new_ones_read_back_alike(store: Store) -> None:
    """A changed state is written by one upsert whether its rows exist or not."""
    first = {
        "a": CustomerState("a", 1, "h1", True, None, frozenset(), {"d": ContactState("c1")}),
        "b": CustomerState("b", 2, "h2", None, None, frozenset({("d", "z")}), {}, True),
    }
    with store.transaction() as conn:
        store.save_states(conn, "x", {}, first)
    with store.snapshot() as conn:
        before = store.load_states(conn, "x", ["a", "b", "c"])
    assert before == first
    assert before["a"].opt_out is True
    assert before["b"].opt_out is None
    after = {
        "a": CustomerState(
            "a", 5, "h5", False, None, frozenset(), {"d": ContactState("c1", "p", True, False, 2)}
        ),
        "b": before["b"],
        "c": CustomerState("c", 3, "h3", False, "a", frozenset(), {"e": ContactState(None, "q")}),
    }
    with store.transaction() as conn:
        store.save_states(conn, "x", before, after)
    with store.snapshot() as conn:
        assert store.load_states(conn, "x", ["a", "b", "c"]) == after
        # another dispensary's customers of the same ids are not touched
        assert store.load_states(conn, "y", ["a", "b", "c"]) == {}


def test_queued_keys_are_skipped_across_many_keys(store: Store) -> None:
    """More operations than one statement's list of keys takes: every queued one is found."""
    ops = [make_op(f"c{i}", i) for i in range(1200)]
    with store.transaction() as conn:
        assert store.enqueue(conn, "d", ops[:700]) == 700
    with store.transaction() as conn:
        assert store.enqueue(conn, "d", ops) == 500


class _Batches:
    """An AsyncStore whose planning calls give the results queued in it, then nothing."""

    def __init__(self, results: list[BatchResult]) -> None:
        self.results = results
        self.calls = 0
        self.store = object()

    async def call(self, _fn: Any, *_args: Any) -> BatchResult:
        self.calls += 1
        return self.results.pop(0) if self.results else BatchResult()


async def _until(check: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


def test_at_a_trickle_the_planner_polls_again_only_when_events_were_committed() -> None:
    async def main() -> None:
        batches = _Batches([BatchResult(events=1), BatchResult(events=1)])
        processor = Processor(
            batches,  # type: ignore[arg-type]
            Deployment(),
            on_enqueued=lambda _touched: None,
            idle_poll=60.0,
            linger=0.001,
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(processor.run(stopping))
        await _until(lambda: batches.calls == 1)
        await asyncio.sleep(0.2)
        assert batches.calls == 1  # nothing committed meanwhile: no empty poll
        processor.wake.set()  # a commit
        await _until(lambda: batches.calls == 2)
        processor.wake.set()
        await _until(lambda: batches.calls == 3)
        stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def test_a_batch_that_queued_events_again_is_followed_by_another() -> None:
    async def main() -> None:
        batches = _Batches([BatchResult(events=1, requeued=1)])
        processor = Processor(
            batches,  # type: ignore[arg-type]
            Deployment(),
            on_enqueued=lambda _touched: None,
            idle_poll=60.0,
            linger=0.001,
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(processor.run(stopping))
        await _until(lambda: batches.calls == 2)  # the refresh events, without a wake-up
        stopping.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())


def _deployment(work: Path, store_url: str) -> Deployment:
    root = Path(__file__).resolve().parent.parent
    (work / "http.yaml").write_text((root / "mappings" / "http.yaml").read_text())
    (work / "config.yaml").write_text(
        f"store: '{store_url}'\n"
        "dispensaries:\n  d1:\n    webhook_token: tok\n    destinations:\n"
        f"      - {{name: crm, type: http, url: 'http://127.0.0.1:9/ops', "
        f"mapping: '{work / 'http.yaml'}'}}\n"
    )
    return Deployment.from_config(load_config(work / "config.yaml"))


def _events(store: Store, first: int, count: int) -> None:
    seed = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
    events = []
    for n in range(first, first + count):
        body = json.loads(json.dumps(seed))
        body["data"]["customer_id"] = str(n)
        events.append(NewEvent("d1", "webhook", "CUSTOMER", str(n), None, json.dumps(body)))
    store.add_events(events)


def test_a_burst_after_a_trickle_is_planned_whole_and_alike(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    """After a batch of one event the next is planned under the lock at once; a burst met
    that way is planned in one batch, as the optimistic path would, and the batches after it
    are optimistic again."""
    deployment = _deployment(tmp_path, store_url)
    _events(store, 100, 1)
    assert process_batch(store, deployment).outcomes == {"applied": 1}
    assert store._trickle  # type: ignore[attr-defined]
    _events(store, 200, 5)
    result = process_batch(store, deployment)
    assert result.events == 5
    assert result.outcomes == {"applied": 5}
    assert not store._trickle  # type: ignore[attr-defined]
    ops = store.query(sa.select(outbox.c.customer_id, outbox.c.op).order_by(outbox.c.id))
    by_customer: dict[str, list[str]] = {}
    for customer, op in ops:
        by_customer.setdefault(customer, []).append(op)
    # every customer of the burst planned as the one of the trickle was
    assert sorted(by_customer) == ["100", "200", "201", "202", "203", "204"]
    assert all(kinds == by_customer["100"] for kinds in by_customer.values())
    assert "upsert" in by_customer["100"]
    with store.snapshot() as conn:  # type: ignore[attr-defined]
        states = store.load_states(conn, "d1", ["100", "204"])  # type: ignore[attr-defined]
    assert set(states) == {"100", "204"}


def test_queued_keys_are_read_per_destination_through_the_unique_index(store: Store) -> None:
    """Whether an operation is queued already is read by (dispensary, destination, key): one
    destination's key does not hide another's operation, and on SQLite the read walks the
    unique index to each key rather than every operation the dispensary ever queued."""
    from dataclasses import replace

    from connector.store.plans import _queued_queries

    first = make_op("c1")
    other = replace(first, destination="other")
    with store.transaction() as conn:
        assert store.enqueue(conn, "x", [first]) == 1
    with store.transaction() as conn:  # same key, another destination: queued too
        assert store.enqueue(conn, "x", [first, other]) == 1
    with store.snapshot() as conn:
        rows = Raw(conn).rows("SELECT destination, idempotency_key FROM outbox ORDER BY id")
    key = first.idempotency_key
    assert [tuple(r) for r in rows] == [(first.destination, key), ("other", key)]
    queries = _queued_queries("x", [first, other, make_op("c2")])
    assert [params[:2] for _, params in queries] == [("x", first.destination), ("x", "other")]
    if store.engine.dialect.name != "sqlite":  # type: ignore[attr-defined]
        return
    with store.snapshot() as conn:
        for sql, params in queries:
            plan = " ".join(str(r[-1]) for r in Raw(conn).rows("EXPLAIN QUERY PLAN " + sql, params))
            assert "dispensary=? AND destination=? AND idempotency_key=?" in plan, plan
