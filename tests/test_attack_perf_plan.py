"""Attack on issue 17's planning (connector/store/plans.py, _statements.Raw; 9775ee1: at a
trickle, read and planned under the write lock): two planners at once over one store (two
replicas on PostgreSQL, two processes' stores on SQLite) over a customer history permuted and
duplicated, states changed between a batch's snapshot and its write, batches of one or two
events (the trickle path) and larger ones; and a driver error in the middle of a batch's
writes."""

from __future__ import annotations

import itertools
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from test_perf_plan_raw import _deployment

from connector.errors import StoreUnavailable
from connector.pipeline import Deployment, process_batch
from connector.store import Store, open_store
from connector.store._statements import RAW_INSERT_OUTBOX
from connector.store.abc import NewEvent
from connector.store.schema import contacts, customers, inbox, outbox

SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
SECRET = "zz-private-7781@example.com"


def history(seed: int, customers_count: int = 4, versions: int = 4) -> list[NewEvent]:
    """Each customer's versions (a newer last_update each, opt_out flipping), shuffled across
    customers and within one, with some delivered twice."""
    rng = random.Random(seed)
    events = []
    for c in range(customers_count):
        for v in range(versions):
            body = json.loads(json.dumps(SEED))
            data = body["data"]
            data["customer_id"] = f"c{c}"
            data["email"] = f"c{c}.v{v}@example.com"
            data["opt_out"] = rng.choice(["true", "false", None])
            data["last_update"] = f"2026-04-24T11:{10 + v:02d}:21.000-07:00"
            events.append(NewEvent("d1", "webhook", "CUSTOMER", f"c{c}", None, json.dumps(body)))
    events += rng.sample(events, k=len(events) // 3)  # duplicated deliveries
    rng.shuffle(events)
    return events


def deployment_at(work: Path, url: str) -> Deployment:
    work.mkdir(parents=True, exist_ok=True)
    return _deployment(work, url)


def run_planner(store: Store, deployment: Deployment, sizes: list[int]) -> None:
    idle = 0
    n = 0
    while idle < 3:
        result = process_batch(store, deployment, limit=sizes[n % len(sizes)])
        n += 1
        idle = idle + 1 if result.events == 0 else 0


def outcome(store: Any) -> dict[str, Any]:
    """What planning left: each customer's state (without the count of operations planned,
    which depends on how events fell into batches), and per customer and kind of operation the
    payload of its last one, and whether an event is still pending."""
    states = {
        r.customer_id: (r.last_update_us, r.content_hash, r.opt_out, r.opt_out_seen)
        for r in store.query(sa.select(customers))
    }
    held = {
        (r.customer_id, r.destination): (r.delivered_hash, bool(r.unsubscribed))
        for r in store.query(sa.select(contacts))
    }
    last: dict[tuple[str, str], Any] = {}
    for r in store.query(sa.select(outbox).order_by(outbox.c.id)):
        body = json.loads(r.payload)
        last[(r.customer_id, r.op)] = body.get("fields")
    pending = store.query(sa.select(sa.func.count()).where(inbox.c.status == "pending"))[0][0]
    return {"states": states, "contacts": held, "last": last, "pending": pending}


def consent_ops_in_order(store: Any) -> None:
    """Per customer, its operations in queue order: the consent operations alternate (never
    two unsubscribes, or two subscribes, in a row: a duplicate or a reordered consent)."""
    kinds: dict[str, list[str]] = {}
    for r in store.query(sa.select(outbox).order_by(outbox.c.id)):
        if r.op in ("subscribe", "unsubscribe"):
            kinds.setdefault(r.customer_id, []).append(r.op)
    for customer, ops in kinds.items():
        assert all(a != b for a, b in itertools.pairwise(ops)), (customer, ops)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_planners_at_once_plan_as_one(store_url: str, tmp_path: Path, seed: int) -> None:
    events = history(seed)
    # one planner alone, over the same inbox in its own store
    alone_url = f"sqlite:///{tmp_path / 'alone.db'}"
    alone = open_store(alone_url)
    try:
        alone.add_events(events)
        run_planner(alone, deployment_at(tmp_path / "one", alone_url), [1, 3, 2, 8])
        expected = outcome(alone)
        consent_ops_in_order(alone)
    finally:
        alone.close()
    assert expected["pending"] == 0

    url = f"sqlite:///{tmp_path / 'two.db'}"
    first, second = open_store(url), open_store(url)
    try:
        first.add_events(events)
        deployment = deployment_at(tmp_path / "two", url)
        errors: list[BaseException] = []

        def planner(store: Store, sizes: list[int]) -> None:
            try:
                run_planner(store, deployment, sizes)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=planner, args=(first, [1, 2, 5])),
            threading.Thread(target=planner, args=(second, [3, 1, 1, 8])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        got = outcome(first)
        consent_ops_in_order(first)
    finally:
        first.close()
        second.close()
    assert got == expected


@pytest.mark.postgresql_only
@pytest.mark.parametrize("seed", [1, 2])
def test_two_replicas_planning_at_once_on_postgresql(
    store_url: str, tmp_path: Path, seed: int
) -> None:
    events = history(seed)
    alone_url = f"sqlite:///{tmp_path / 'alone.db'}"
    alone = open_store(alone_url)
    try:
        alone.add_events(events)
        run_planner(alone, deployment_at(tmp_path / "one", alone_url), [1, 3, 2, 8])
        expected = outcome(alone)
    finally:
        alone.close()

    first, second = open_store(store_url), open_store(store_url)
    try:
        first.add_events(events)
        deployment = deployment_at(tmp_path / "two", store_url)
        errors: list[BaseException] = []

        def planner(store: Store, sizes: list[int]) -> None:
            try:
                run_planner(store, deployment, sizes)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=planner, args=(first, [1, 2, 5])),
            threading.Thread(target=planner, args=(second, [3, 1, 1, 8])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        got = outcome(first)
        consent_ops_in_order(first)
    finally:
        first.close()
        second.close()
    # the stores differ in how they write booleans: compare them as booleans
    norm = {
        "states": {
            c: (u, h, None if o is None else bool(o), bool(s))
            for c, (u, h, o, s) in got["states"].items()
        },
        "contacts": got["contacts"],
        "last": got["last"],
        "pending": got["pending"],
    }
    want = {
        **expected,
        "states": {
            c: (u, h, None if o is None else bool(o), bool(s))
            for c, (u, h, o, s) in expected["states"].items()
        },
    }
    assert norm == want


@pytest.mark.parametrize("trickle", [True, False])
def test_a_driver_error_mid_batch_writes_nothing_and_names_no_value(
    store: Any, store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trickle: bool
) -> None:
    """The outbox insert (after the states were saved) fails in the driver: the batch leaves
    no state, no operation and its events pending; the error carries no customer value; the
    next batch plans it whole."""
    deployment = _deployment(tmp_path, store_url)
    body = json.loads(json.dumps(SEED))
    body["data"].update(customer_id="c9", email=SECRET, opt_out="false")
    store.add_events([NewEvent("d1", "webhook", "CUSTOMER", "c9", None, json.dumps(body))])
    store._trickle = trickle
    broken = RAW_INSERT_OUTBOX.replace("idempotency_key,", "no_such_column,", 1)
    monkeypatch.setattr("connector.store.plans.RAW_INSERT_OUTBOX", broken)
    with pytest.raises((DBAPIError, StoreUnavailable)) as caught:
        process_batch(store, deployment)
    chain: list[BaseException] = []
    error: BaseException | None = caught.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in chain:
        assert SECRET not in str(error)
        assert SECRET not in repr(error)
        assert SECRET not in str(getattr(error, "params", None))
    assert store.query(sa.select(sa.func.count()).select_from(customers))[0][0] == 0
    assert store.query(sa.select(sa.func.count()).select_from(contacts))[0][0] == 0
    assert store.query(sa.select(sa.func.count()).select_from(outbox))[0][0] == 0
    assert [r.status for r in store.query(sa.select(inbox))] == ["pending"]
    monkeypatch.undo()
    store._trickle = trickle
    assert process_batch(store, deployment).outcomes == {"applied": 1}
    assert store.query(sa.select(sa.func.count()).select_from(customers))[0][0] == 1
    ops = [r.op for r in store.query(sa.select(outbox))]
    assert "upsert" in ops
