"""Attack on planning on PostgreSQL with its statements sent together (pipeline mode, the
notifications sent with the writes and their results never read): another replica is still
woken by what a batch queues, and two replicas planning the same customers at once (small
batches, several versions of each customer) neither deadlock nor queue a customer's
versions out of order."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from test_perf_plan_raw import _deployment

from connector.errors import StoreUnavailable
from connector.pipeline import process_batch
from connector.store import Store, open_store
from connector.store.abc import NewEvent
from connector.store.schema import inbox, outbox

SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())


def _event(customer: str, version: int) -> NewEvent:
    body = json.loads(json.dumps(SEED))
    body["data"]["customer_id"] = customer
    body["data"]["email"] = f"v{version}@example.com"
    body["data"]["last_update"] = f"2026-04-24T11:{version // 60:02d}:{version % 60:02d}.000-07:00"
    return NewEvent("d1", "webhook", "CUSTOMER", customer, None, json.dumps(body))


def _wait(check: Any, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


@pytest.mark.postgresql_only
def test_a_batch_sent_together_still_wakes_another_replica(
    store: Store, store_url: str, tmp_path: Path
) -> None:
    deployment = _deployment(tmp_path, store_url)
    other: Any = open_store(store_url)
    heard: dict[str, list[str]] = {"inbox": [], "outbox": []}
    try:
        other.on_commit("inbox", heard["inbox"].append)
        other.on_commit("outbox", heard["outbox"].append)
        assert _wait(lambda: other.listening)
        assert _wait(lambda: heard["inbox"])  # the wake-up of its (re)connection
        heard["inbox"].clear()
        heard["outbox"].clear()
        store.add_events([_event("77", 1)])
        assert _wait(lambda: heard["inbox"])
        assert process_batch(store, deployment, 16).outcomes == {"applied": 1}
        assert _wait(lambda: "d1/crm" in heard["outbox"]), heard
        # the trickle path (the next batch planned under the lock at once) wakes it too
        heard["outbox"].clear()
        store.add_events([_event("77", 2)])
        assert process_batch(store, deployment, 16).outcomes == {"applied": 1}
        assert _wait(lambda: "d1/crm" in heard["outbox"]), heard
    finally:
        other.close()


@pytest.mark.postgresql_only
@pytest.mark.parametrize("seed", range(3))
def test_two_replicas_planning_the_same_customers_keep_their_versions_in_order(
    store: Store, store_url: str, tmp_path: Path, seed: int
) -> None:
    deployment = _deployment(tmp_path, store_url)
    rng = random.Random(seed)
    customers = [str(900 + n) for n in range(5)]
    versions = 8
    errors: list[BaseException] = []

    def plan(number: int) -> None:
        mine = open_store(store_url)
        local = random.Random(seed * 7 + number)
        try:
            idle = 0
            while idle < 20:
                try:
                    result = process_batch(mine, deployment, local.randint(1, 6))
                except StoreUnavailable:
                    continue  # a deadlock the database broke, or a lock timeout: again
                if result.events:
                    idle = 0
                else:
                    idle += 1
                    time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)
        finally:
            mine.close()

    threads = [threading.Thread(target=plan, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    # the versions arrive a few at a time while both plan, each customer's in order
    for version in range(1, versions + 1):
        batch = [_event(c, version) for c in customers]
        rng.shuffle(batch)
        store.add_events(batch)
        time.sleep(rng.random() * 0.02)
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    pending = store.query(sa.select(inbox.c.id).where(inbox.c.status == "pending"))
    assert pending == []
    queued = store.query(
        sa.select(outbox.c.customer_id, outbox.c.op, outbox.c.payload).order_by(outbox.c.id)
    )
    by_customer: dict[str, list[int]] = {c: [] for c in customers}
    for customer, op, payload in queued:
        if op != "upsert":
            continue
        email = json.loads(payload)["fields"].get("email", "")
        by_customer[customer].append(int(email.split("@")[0][1:]))
    for customer, seen in by_customer.items():
        # queued in the order of their versions, the newest last
        assert seen == sorted(set(seen)), (customer, seen)
        assert seen, customer
        assert seen[-1] == versions, (customer, seen)
