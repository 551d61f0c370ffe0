"""Several replicas on one PostgreSQL database: planning, delivery results, claims and leases
raced from threads, each replica a :class:`PostgresStore` of its own (its own engine and pool).

- Planning is serializable: two or three replicas receive parts of a customer history
  (hypothesis: the histories of ``test_order_independence``, permuted, repeated, split across
  the replicas' inserts) and plan it concurrently with ``process_batch``. Every event is
  planned by exactly one committed batch, none is left pending, and replaying the committed
  batches one at a time in commit order through ONE planner on SQLite gives the same events'
  outcomes, customer state, identity map, operations (by idempotency key, per destination and
  customer, in order), conflicts and dead letters.
- A deadlock aborts the batch, which stays pending and is planned by the next one.
- A delivery result committed while a replica plans the same customer loses neither the
  contact id nor the delivered hash.
- Claims of two stores never hold one operation twice nor two of one customer at once.
- Leases: at most one holder; an expired holder loses it; ``release_claims`` frees it.

PostgreSQL only: on the test server (``CONNECTOR_TEST_PG``, conftest) a fresh database is
created for the module and dropped after. Skipped when the
server is unreachable, unless ``CI`` is set. ``CONCUR_EXAMPLES`` (default 25) sets how many
histories the planning property tries: raise it for a longer hunt.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import fresh_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_alpineiq import API_KEY, UID
from test_klaviyo import FAKE_KEY
from test_order_independence import Event, body, histories
from vendor_flow import DISPENSARY, ROOT, _instant, event_body

from connector.config import load_config
from connector.errors import StoreUnavailable
from connector.pipeline import Deployment, _plan_with, process_batch
from connector.planner import payload_hash
from connector.store import CLAIM_SECONDS, InboxRow, NewEvent, OutboxRow
from connector.store.abc import B, Plan
from connector.store.postgres import PostgresStore, customer_key
from connector.store.schema import (
    conflicts,
    contacts,
    customers,
    dead_letters,
    inbox,
    locks,
    metadata,
    outbox,
)
from connector.store.sqlite import SqliteStore

psycopg = pytest.importorskip("psycopg")

EXAMPLES = int(os.environ.get("CONCUR_EXAMPLES", "25"))
DESTINATIONS = ("aiq", "kl")
SECOND = "zz-second"  # a second dispensary, after the seed's in name order
WAIT = 30.0
# what the planning property met, for a longer hunt's report
REPLANS: Counter[str] = Counter()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh database on the server, dropped after the module."""
    with fresh_database("h_concur") as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """With ``-s``: what the planning property met (batches, re-plans, deadlocks)."""
    yield
    if REPLANS:
        print(f"\nconcurrent planning: {dict(REPLANS)}")


class Replica(PostgresStore):
    """A replica's store that remembers the events of each batch it committed."""

    def __init__(self, url: str) -> None:
        super().__init__(url, listen=False)
        self.committed: list[list[int]] = []
        self.pause = 0.0  # seconds between planning from a snapshot and taking the locks
        self.replans = 0  # batches planned again under the locks

    def plan_batch(self, limit: int, plan: Plan[B]) -> B | None:
        calls = [0]

        def planning(rows: list[InboxRow], reader: Any) -> B:
            result = plan(rows, reader)
            calls[0] += 1
            if calls[0] == 1 and self.pause:
                time.sleep(self.pause)  # another replica commits meanwhile
            return result

        planned = super().plan_batch(limit, planning)
        self.replans += calls[0] > 1
        if planned is not None:
            self.committed.append([row.id for row in planned.rows])
        return planned


@pytest.fixture(scope="module")
def replicas(pg_url: str) -> Iterator[list[Replica]]:
    stores = [Replica(pg_url) for _ in range(3)]
    for store in stores:
        store.register_process()
    yield stores
    for store in stores:
        store.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """The seed's dispensary with an Alpine IQ and a Klaviyo destination (merges planned as
    operations for one, natively for the other); another dispensary, named after it, alike."""
    work = tmp_path_factory.mktemp("concur")
    for mapping in (ROOT / "mappings").glob("*.yaml"):
        shutil.copy(mapping, work / mapping.name)
    block = (
        "    destinations:\n"
        "      - name: aiq\n"
        "        type: alpineiq\n"
        f"        api_key: {API_KEY}\n"
        f'        uid: "{UID}"\n'
        "        mapping: alpineiq.yaml\n"
        "      - name: kl\n"
        "        type: klaviyo\n"
        f"        api_key: {FAKE_KEY}\n"
        "        mapping: klaviyo.yaml\n"
    )
    (work / "config.yaml").write_text(
        "store: sqlite:///connector.db\ndispensaries:\n"
        f"  {DISPENSARY}:\n    webhook_token: tok\n{block}"
        f"  {SECOND}:\n    webhook_token: tok2\n{block}"
    )
    return Deployment.from_config(load_config(work / "config.yaml"))


def reset(store: PostgresStore) -> None:
    """Every table empty, ids from 1 again (the processes of the replicas kept)."""
    names = ", ".join(
        t.name for t in metadata.sorted_tables if t.name not in ("processes", "locks")
    )
    with store.transaction() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))
        conn.execute(sa.delete(locks))


def new_event(raw: bytes) -> NewEvent:
    data = json.loads(raw)
    return NewEvent(
        data["dispensary_short_name"],
        "webhook",
        "CUSTOMER",
        str(data["data"]["customer_id"]),
        _instant(data["data"]["last_update"]),
        raw.decode(),
    )


def pending(store: PostgresStore) -> int:
    found = store.query(sa.select(sa.func.count()).where(inbox.c.status == "pending"))
    return int(found[0][0])


# --- planning: serializable across replicas -----------------------------------------------


def run_replicas(
    stores: list[Replica],
    deployment: Deployment,
    parts: list[list[list[NewEvent]]],
    limit: int,
) -> Counter[str]:
    """Each replica inserts its chunks of events, planning between them, then plans until
    nothing is pending anywhere. Returns the store errors met (a deadlock, a lock timeout),
    which a replica survives as the Processor does: by planning again."""
    start = threading.Barrier(len(stores))
    lock = threading.Lock()
    inserting = [sum(1 for p in parts if p)]
    errors: list[BaseException] = []
    retried: Counter[str] = Counter()

    def work(store: Replica, chunks: list[list[NewEvent]]) -> None:
        try:
            start.wait(timeout=WAIT)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                if chunks:
                    store.add_events(chunks.pop(0))
                    if not chunks:
                        with lock:
                            inserting[0] -= 1
                try:
                    result = process_batch(store, deployment, limit)
                except StoreUnavailable as exc:
                    with lock:
                        retried[str(exc)[:80]] += 1
                    continue
                if not result.events and not chunks:
                    with lock:
                        done = inserting[0] == 0
                    if done and pending(store) == 0:
                        return
                    time.sleep(0.002)
            raise AssertionError("replica still planning after its time")
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(store, list(chunks)))
        for store, chunks in zip(stores, parts, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    if errors:
        raise errors[0]
    return retried


class Scripted(SqliteStore):
    """ONE planner on SQLite, told which pending events its next batch takes."""

    allowed: set[int] | None = None
    committed: list[list[int]]

    def pending_events(self, conn: sa.Connection, limit: int) -> list[InboxRow]:
        rows = super().pending_events(conn, 1_000_000)
        if self.allowed is not None:
            rows = [row for row in rows if row.id in self.allowed]
        return rows[:limit]

    def plan_batch(self, limit: int, plan: Plan[B]) -> B | None:
        planned = super().plan_batch(limit, plan)
        if planned is not None:
            self.committed.append([row.id for row in planned.rows])
        return planned


def commit_order(store: PostgresStore, stores: list[Replica]) -> list[list[int]]:
    """The replicas' committed batches in the order they committed: by the time each marked
    its events, taken after it locked every customer it read (so of two batches that touch a
    customer, the later to commit marks later; batches that share none commute)."""
    marked = {
        r.id: r.processed_at for r in store.query(sa.select(inbox.c.id, inbox.c.processed_at))
    }
    batches = [batch for s in stores for batch in s.committed]
    for batch in batches:
        assert len({marked[i] for i in batch}) == 1, batch
    return sorted(batches, key=lambda batch: (marked[batch[0]], batch[0]))


def replay(
    store: PostgresStore, batches: list[list[int]], deployment: Deployment, path: Path
) -> Scripted:
    """Plan ``batches`` one at a time, in that order, with one planner on a SQLite store that
    holds the same events under the same ids. The events a batch adds (``refresh``) are given
    the ids the replicas' run gave them: the k-th of a customer, the k-th there."""
    ref = Scripted(f"sqlite:///{path}")
    ref.committed = []
    rows = [dict(r._mapping) for r in store.query(sa.select(inbox).order_by(inbox.c.id))]
    refreshes: dict[str, list[int]] = {}
    for row in rows:
        if row["source"] == "refresh":
            refreshes.setdefault(row["customer_id"], []).append(row["id"])
    with ref.transaction() as conn:
        conn.execute(
            sa.insert(inbox),
            [
                {**row, "status": "pending", "processed_at": None, "planned": None}
                for row in rows
                if row["source"] != "refresh"
            ],
        )
    known = {row["id"] for row in rows if row["source"] != "refresh"}
    plan = _plan_with(deployment)
    for batch in batches:
        ref.allowed = set(batch)
        planned = ref.plan_batch(len(batch), plan)
        assert planned is not None, batch
        # the serial planner takes the batch the replicas committed
        assert sorted(ref.committed[-1]) == sorted(batch)
        with ref.transaction() as conn:
            added = conn.execute(
                sa.select(inbox.c.id, inbox.c.customer_id)
                .where(inbox.c.source == "refresh", inbox.c.id.not_in(known))
                .order_by(inbox.c.id)
            ).all()
            for row in added:
                theirs = refreshes.get(row.customer_id, [])
                assert theirs, f"the serial planner refreshed {row.customer_id}, the replicas not"
                target = theirs.pop(0)
                conn.execute(sa.update(inbox).where(inbox.c.id == row.id).values(id=-target))
                known.add(target)
            conn.execute(sa.update(inbox).where(inbox.c.id < 0).values(id=-inbox.c.id))
    assert not any(refreshes.values()), f"refreshed only by the replicas: {refreshes}"
    ref.allowed = None
    return ref


def dump(store: PostgresStore | SqliteStore) -> dict[str, Any]:
    """What planning wrote, comparable across stores (no times, no surrogate ids but the
    inbox's)."""

    def rows(query: Any) -> list[dict[str, Any]]:
        return [dict(r._mapping) for r in store.query(query)]

    events = {r["id"]: (r["status"], r["planned"]) for r in rows(sa.select(inbox))}
    state = sorted(
        tuple(v for k, v in r.items() if k != "updated_at") for r in rows(sa.select(customers))
    )
    contact_rows = sorted(
        tuple(v for k, v in r.items() if k != "updated_at") for r in rows(sa.select(contacts))
    )
    ops: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for r in rows(sa.select(outbox).order_by(outbox.c.id)):
        ops.setdefault((r["destination"], r["customer_id"]), []).append(
            (r["op"], r["order_key"], r["idempotency_key"], json.loads(r["payload"]), r["status"])
        )
    found = Counter(
        (r["customer_id"], r["destination"], r["kind"], r["detail"])
        for r in rows(sa.select(conflicts))
    )
    dead = Counter(
        (r["destination"], r["customer_id"], r["op"], r["reason"])
        for r in rows(sa.select(dead_letters))
    )
    return {
        "events": events,
        "customers": state,
        "contacts": contact_rows,
        "operations": ops,
        "conflicts": found,
        "dead_letters": dead,
    }


def order_free(store: PostgresStore | SqliteStore) -> dict[str, Any]:
    """What does not depend on the order events are planned in (``test_order_independence``'s
    rule): who is merged into whom, and which survivors owe or were told an opt-out."""
    state = {r.customer_id: r for r in store.query(sa.select(customers))}
    owed = {
        (r.destination, r.customer_id)
        for r in store.query(sa.select(contacts))
        if r.customer_id in state
        and state[r.customer_id].merged_into is None
        and (r.unsubscribed or state[r.customer_id].opt_out_seen)
    }
    owed |= {
        (d, c)
        for c, r in state.items()
        if r.merged_into is None and r.opt_out_seen
        for d in DESTINATIONS
    }
    return {"merged": {c: r.merged_into for c, r in state.items()}, "owed": owed}


@st.composite
def concurrent_runs(
    draw: st.DrawFn,
) -> tuple[list[Event], int, list[list[list[Event]]], int, list[float]]:
    """A history, permuted, some events repeated once more, split across 2 or 3 replicas'
    inserts in chunks; the batch limit; and how long each replica pauses between planning
    from its snapshot and locking (widening the window another replica commits in)."""
    events, _ = draw(histories())
    extra = draw(st.lists(st.sampled_from(events), max_size=3))
    order = draw(st.permutations([*events, *extra]))
    replicas = draw(st.sampled_from([2, 3]))
    owner = draw(st.lists(st.integers(0, replicas - 1), min_size=len(order), max_size=len(order)))
    parts: list[list[list[Event]]] = []
    for i in range(replicas):
        mine = [e for e, o in zip(order, owner, strict=True) if o == i]
        size = draw(st.integers(1, 4))
        parts.append([mine[j : j + size] for j in range(0, len(mine), size)])
    pauses = draw(st.lists(st.sampled_from([0.0, 0.001, 0.004]), min_size=3, max_size=3))
    return order, replicas, parts, draw(st.sampled_from([1, 2, 3, 8])), pauses


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=concurrent_runs())
def test_replicas_planning_one_history_equal_one_planner_in_commit_order(
    replicas: list[Replica],
    deployment: Deployment,
    tmp_path_factory: pytest.TempPathFactory,
    case: tuple[list[Event], int, list[list[list[Event]]], int, list[float]],
) -> None:
    _, count, parts, limit, pauses = case
    stores = replicas[:count]
    reset(stores[0])
    for store, pause in zip(stores, pauses, strict=False):
        store.committed, store.pause, store.replans = [], pause, 0
    retried = run_replicas(
        stores, deployment, [[[new_event(body(e)) for e in c] for c in p] for p in parts], limit
    )

    assert pending(stores[0]) == 0
    batches = [batch for s in stores for batch in s.committed]
    planned = Counter(i for batch in batches for i in batch)
    assert [i for i, n in planned.items() if n > 1] == [], "an event planned twice"
    every = {r[0] for r in stores[0].query(sa.select(inbox.c.id))}
    assert set(planned) == every

    work = tmp_path_factory.mktemp("serial")
    ref = replay(stores[0], commit_order(stores[0], stores), deployment, work / "ref.db")
    try:
        theirs, ours = dump(stores[0]), dump(ref)
    finally:
        ref.close()
    for key in theirs:
        assert theirs[key] == ours[key], key
    # and what the order of planning does not change (test_order_independence's rule) is
    # what ONE planner gives planning the events in the order they were received
    single = Scripted(f"sqlite:///{work / 'single.db'}")
    single.committed = []
    try:
        single.add_events([new_event(body(e)) for p in parts for c in p for e in c])
        while process_batch(single, deployment, 256).events:
            pass
        assert order_free(single) == order_free(stores[0])
    finally:
        single.close()
    REPLANS.update(
        batches=len(batches),
        replans=sum(s.replans for s in stores),
        deadlocks=sum(n for reason, n in retried.items() if "deadlock" in reason),
        store_errors=sum(retried.values()),
    )


def test_a_deadlocked_batch_stays_pending_and_the_next_plans_it(
    replicas: list[Replica], deployment: Deployment
) -> None:
    """A planner that waits for a customer while holding its events, against a session that
    holds that customer and then wants the events: PostgreSQL aborts the planner."""
    store = replicas[0]
    reset(store)
    store.add_events([new_event(body(("200", 1, {"opt_out": "false"})))])
    outcome: list[BaseException | None] = []

    def planner() -> None:
        try:
            process_batch(store, deployment, 8)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    dsn = sa.make_url(store.url).render_as_string(hide_password=False)
    with psycopg.connect(dsn) as other:
        other.execute("SET deadlock_timeout = '20s'")  # the planner's check fires first
        other.execute("SELECT pg_advisory_xact_lock(%s)", [customer_key(DISPENSARY, "200")])
        thread = threading.Thread(target=planner)
        thread.start()
        assert wait_for_lock_wait(other, "advisory"), "the planner never waited"
        other.execute("SELECT id FROM inbox FOR UPDATE")  # the cycle
        other.rollback()
    thread.join(WAIT)
    assert len(outcome) == 1
    assert isinstance(outcome[0], StoreUnavailable), outcome
    assert "deadlock" in str(outcome[0])
    assert pending(store) == 1
    assert process_batch(store, deployment, 8).events == 1
    assert pending(store) == 0
    assert len(store.query(sa.select(outbox))) == 2


def wait_for_lock_wait(conn: Any, locktype: str) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        found = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = %s", [locktype]
        ).fetchone()
        if found and found[0]:
            return True
        time.sleep(0.01)
    return False


# --- delivery results racing with planning ------------------------------------------------


class Interleaved(Replica):
    """A replica whose planning runs ``hooks[n]`` after its n-th plan of a batch: the 0th
    plans from a snapshot, with no lock; a later one under its locks (after the state it
    read changed before it locked it)."""

    hooks: dict[int, Callable[[], None]]

    def plan_batch(self, limit: int, plan: Plan[B]) -> B | None:
        calls = [0]

        def planning(rows: list[InboxRow], reader: Any) -> B:
            result = plan(rows, reader)
            hook = self.hooks.get(calls[0])
            calls[0] += 1
            if hook is not None:
                hook()
            return result

        return super().plan_batch(limit, planning)


@pytest.mark.parametrize("locked", [False, True])
@pytest.mark.parametrize("outcome", ["done", "dead"])
def test_a_delivery_result_racing_planning_keeps_contact_and_hash(
    pg_url: str, replicas: list[Replica], deployment: Deployment, locked: bool, outcome: str
) -> None:
    """Replica 0 plans version 2 of a customer while replica 1 records the delivery of
    version 1 (a contact id returned, or a dead letter): the contact id stays, and the hash
    of the last upsert planned is the delivered hash. The results commit between the
    planner's read and its locks; with ``locked``, Klaviyo's while the planner holds them."""
    worker = replicas[1]
    planner = Interleaved(pg_url)
    try:
        reset(worker)
        customer = "200"
        planner.hooks = {}
        planner.add_events([new_event(body((customer, 1, {"first_name": "Jules"})))])
        assert process_batch(planner, deployment, 8).events == 1
        claimed = {d: worker.claim(DISPENSARY, d, 10) for d in DESTINATIONS}
        assert all(len(rows) == 1 for rows in claimed.values()), claimed
        threads: list[threading.Thread] = []

        def deliver(destination: str) -> None:
            rows = claimed[destination]
            if outcome == "done":
                done: list[tuple[OutboxRow, str | None]] = [
                    (row, f"{destination}-contact") for row in rows
                ]
                worker.finish(DISPENSARY, destination, done=done)
            else:
                dead: list[tuple[OutboxRow, str, int | None, str | None]] = [
                    (row, "refused", 400, None) for row in rows
                ]
                worker.finish(DISPENSARY, destination, dead=dead)

        def later() -> None:
            threads.append(threading.Thread(target=deliver, args=("kl",)))
            threads[-1].start()
            time.sleep(0.2)  # it waits for the planner's lock on the customer

        if locked:
            planner.hooks = {0: lambda: deliver("aiq"), 1: later}
        else:
            planner.hooks = {0: lambda: [deliver(d) for d in DESTINATIONS] and None}
        planner.add_events([new_event(body((customer, 2, {"first_name": "Mia"})))])
        planner.replans = 0
        assert process_batch(planner, deployment, 8).events == 1
        assert planner.replans == 1  # the results changed what it read: planned again
        for thread in threads:
            thread.join(WAIT)
        assert len(threads) == locked
        for destination in DESTINATIONS:
            row = planner.query(
                sa.select(contacts).where(
                    contacts.c.customer_id == customer, contacts.c.destination == destination
                )
            )[0]
            upserts = planner.query(
                sa.select(outbox.c.payload)
                .where(
                    outbox.c.customer_id == customer,
                    outbox.c.destination == destination,
                    outbox.c.op == "upsert",
                )
                .order_by(outbox.c.id)
            )
            assert len(upserts) == 2, destination
            last = json.loads(upserts[-1].payload)["fields"]
            if outcome == "done":
                assert row.contact_id == f"{destination}-contact", destination
            assert row.delivered_hash == payload_hash(last), destination
    finally:
        planner.close()


# --- claims ---------------------------------------------------------------------------------


def fill_outbox(store: PostgresStore, customers_: int, per_customer: int) -> None:
    now = time.time()
    with store.transaction() as conn:
        conn.execute(
            sa.insert(outbox),
            [
                {
                    "dispensary": DISPENSARY,
                    "destination": "aiq",
                    "order_key": f"c{c}",
                    "customer_id": f"c{c}",
                    "op": "upsert",
                    "payload": "{}",
                    "idempotency_key": f"k{c}-{n}",
                    "status": "pending",
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                }
                for n in range(per_customer)
                for c in range(customers_)
            ],
        )


@pytest.mark.parametrize("workers", [2, 4])
def test_claims_of_two_stores_never_overlap(replicas: list[Replica], workers: int) -> None:
    """Workers of two stores claim one destination directly (no lease) and finish what they
    claimed. Each window [claim returned, finish called] lies inside the store's holding of
    the operation: no two windows of one operation, nor of one customer, overlap; every
    operation is delivered once, a customer's in order."""
    store = replicas[0]
    reset(store)
    fill_outbox(store, customers_=12, per_customer=6)
    total = 12 * 6
    windows: list[tuple[float, float, OutboxRow]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(workers)

    def work(i: int) -> None:
        mine = replicas[i % 2]
        try:
            start.wait(WAIT)
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                rows = mine.claim(DISPENSARY, "aiq", 1 + i % 3)
                got = time.monotonic()
                if not rows:
                    if mine.pending_count(DISPENSARY, "aiq") == 0:
                        return
                    time.sleep(0.001)
                    continue
                time.sleep(0.0005 * (i + 1))
                done = time.monotonic()
                mine.finish(DISPENSARY, "aiq", done=[(row, None) for row in rows])
                windows.extend((got, done, row) for row in rows)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert errors == []
    assert sorted(w[2].id for w in windows) == sorted({w[2].id for w in windows})
    assert len(windows) == total
    by_customer: dict[str, list[tuple[float, float, OutboxRow]]] = {}
    for window in windows:
        by_customer.setdefault(window[2].customer_id, []).append(window)
    for customer, held in by_customer.items():
        held.sort(key=lambda w: w[0])
        for before, after in itertools.pairwise(held):
            assert before[1] <= after[0], f"two operations of {customer} held at once"
        assert [w[2].id for w in held] == sorted(w[2].id for w in held), customer


# --- leases ---------------------------------------------------------------------------------


def test_a_lease_has_one_holder_among_racing_stores(replicas: list[Replica]) -> None:
    store = replicas[0]
    reset(store)
    name = f"deliver:{DISPENSARY}/aiq"
    windows: list[tuple[float, float, str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def work(mine: Replica) -> None:
        try:
            start.wait(WAIT)
            for _ in range(60):
                if mine.acquire(name, mine.process_id, 5.0):
                    got = time.monotonic()
                    assert mine.renew(name, mine.process_id, 5.0)
                    time.sleep(0.001)
                    windows.append((got, time.monotonic(), mine.process_id))
                    mine.release(name, mine.process_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT * 2)
    assert errors == []
    assert len({w[2] for w in windows}) > 1  # the race was run, not won by one thread alone
    windows.sort()
    for before, after in itertools.pairwise(windows):
        assert before[1] <= after[0], "two holders at once"


def test_an_expired_lease_is_lost_and_release_claims_frees_it(replicas: list[Replica]) -> None:
    one, two = replicas[0], replicas[1]
    reset(one)
    name = f"deliver:{DISPENSARY}/kl"
    assert one.acquire(name, one.process_id, 0.2)
    assert not two.acquire(name, two.process_id, 5.0)
    time.sleep(0.3)
    assert two.acquire(name, two.process_id, 0.5)  # expired: taken over
    assert not one.renew(name, one.process_id, 5.0)  # the expired holder lost it
    one.heartbeat()  # renews only its own leases
    assert not one.acquire(name, one.process_id, 5.0)
    two.heartbeat()  # renews for LEASE_SECONDS: still held after the 0.5 s asked for
    time.sleep(0.6)
    assert not one.acquire(name, one.process_id, 5.0)
    two.release_claims()
    assert one.acquire(name, one.process_id, 5.0)
    two.register_process()
    one.release_claims()
    one.register_process()


def winners(stores: list[Replica], name: str) -> list[str]:
    """The stores that took ``name`` when all asked at once."""
    start = threading.Barrier(len(stores))
    won: list[str] = []

    def take(mine: Replica) -> None:
        start.wait(WAIT)
        if mine.acquire(name, mine.process_id, 5.0):
            won.append(mine.process_id)

    threads = [threading.Thread(target=take, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    return won


def test_racing_takeovers_of_an_expired_lease_have_one_winner(replicas: list[Replica]) -> None:
    reset(replicas[0])
    for round_ in range(20):
        name = f"lease-{round_}"
        assert replicas[0].acquire(name, "gone", -1.0)  # expired at once
        assert len(winners(replicas, name)) == 1, round_


def test_a_fresh_lease_raced_has_one_winner(replicas: list[Replica]) -> None:
    reset(replicas[0])
    for round_ in range(20):
        assert len(winners(replicas, f"fresh-{round_}")) == 1, round_


def test_a_replayed_operation_waits_for_its_customers_operation_in_flight(
    replicas: list[Replica],
) -> None:
    """A dead letter replayed puts its operation back under its old id, before a later
    operation of the customer that another replica holds meanwhile: it must wait for that
    one, not be claimed beside it (and delivered after the newer one)."""
    one, two = replicas[0], replicas[1]
    reset(one)
    fill_outbox(one, customers_=1, per_customer=2)
    with one.transaction() as conn:  # an opt-out, then an upsert
        conn.execute(sa.update(outbox).where(outbox.c.id == 1).values(op="unsubscribe"))
    first = one.claim(DISPENSARY, "aiq", 10)
    assert [row.idempotency_key for row in first] == ["k0-0"]
    one.finish(DISPENSARY, "aiq", dead=[(first[0], "refused", 400, None)])
    second = two.claim(DISPENSARY, "aiq", 10)
    assert [row.idempotency_key for row in second] == ["k0-1"]
    assert one.replay().replayed == 1
    assert one.claim(DISPENSARY, "aiq", 10) == []  # k0-1 is still in flight
    assert one.next_due(DISPENSARY, "aiq") is None
    # an expired claim does not hold the customer up: the replayed operation goes first
    assert one.claim(DISPENSARY, "aiq", 10, now=time.time() + 3600)[0].idempotency_key == "k0-0"


def test_a_late_result_of_an_expired_claim_leaves_the_new_holder_alone(
    replicas: list[Replica],
) -> None:
    """Replica 0 claims, stalls past its claim (no heartbeat: a pause, a cut network);
    replica 1 takes the operation over; replica 0's late retry must not put it back pending
    for replica 2 to claim while replica 1 still holds it."""
    one, two, three = replicas
    reset(one)
    fill_outbox(one, customers_=1, per_customer=1)
    held = one.claim(DISPENSARY, "aiq", 10)
    later = time.time() + CLAIM_SECONDS + 1
    assert [row.id for row in two.claim(DISPENSARY, "aiq", 10, now=later)] == [held[0].id]
    one.finish(DISPENSARY, "aiq", retry=[(held[0], time.time(), "timed out")])
    assert three.claim(DISPENSARY, "aiq", 10, now=later) == []  # still replica 1's
    one.finish(DISPENSARY, "aiq", dead=[(held[0], "refused", 400, None)])
    assert one.dead_letters() == []
    [taken] = two.claim(DISPENSARY, "aiq", 10, now=later + CLAIM_SECONDS + 1)
    two.finish(DISPENSARY, "aiq", done=[(taken, None)])
    assert one.pending_count(DISPENSARY, "aiq") == 0


def test_batches_over_two_dispensaries_lock_customers_in_one_order(
    replicas: list[Replica], deployment: Deployment
) -> None:
    """A batch whose first event is of the second dispensary (by name) against a replica
    holding the first one's customer and then wanting the second's (the order every batch
    must lock in): the batch waits, it does not deadlock."""
    store = replicas[0]
    reset(store)
    store.add_events(
        [
            new_event(event_body("200", 60, dispensary=SECOND)),
            new_event(event_body("200", 60)),
        ]
    )
    outcome: list[BaseException | None] = []

    def planner() -> None:
        try:
            assert process_batch(store, deployment, 8).events == 2
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    dsn = sa.make_url(store.url).render_as_string(hide_password=False)
    with psycopg.connect(dsn) as other:
        other.execute("SET deadlock_timeout = '20s'")
        other.execute("SELECT pg_advisory_xact_lock(%s)", [customer_key(DISPENSARY, "200")])
        thread = threading.Thread(target=planner)
        thread.start()
        assert wait_for_lock_wait(other, "advisory"), "the planner never waited"
        other.execute("SELECT pg_advisory_xact_lock(%s)", [customer_key(SECOND, "200")])
        other.rollback()
    thread.join(WAIT)
    assert outcome == [None]
    assert pending(store) == 0
