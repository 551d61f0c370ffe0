"""Attack on each customer's order when several workers (replicas: stores of their own on
the same database, as several processes have) take trips at once (``record_and_claim``:
the results of their ended calls recorded, then the next claim, in one transaction), with
retries and calls left in flight across trips: a customer is never held by two workers at
once, and the operation claimed for a customer is always its earliest one not yet done."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from test_delivery import DEST, DISPENSARY, enqueue, make_op, open_ops

from connector.errors import StoreUnavailable
from connector.store import OutboxRow, Store, open_store

CUSTOMERS = [f"c{n}" for n in range(8)]
OPS = 6


class Book:
    """What the test knows, under one lock: who holds each customer, and each customer's
    operations not yet done (by outbox id)."""

    def __init__(self, ids: dict[str, list[int]]) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, tuple[int, int]] = {}  # customer -> (worker, outbox id)
        self.remaining = {c: sorted(v) for c, v in ids.items()}
        self.problems: list[str] = []
        self.workers: set[int] = set()
        self.start = threading.Barrier(3)
        self.unavailable = 0
        self.trips = 0

    def claimed(self, worker: int, rows: list[OutboxRow]) -> None:
        with self.lock:
            seen: set[str] = set()
            for row in rows:
                c = row.customer_id
                if c in seen:
                    self.problems.append(f"two operations of {c} in one claim")
                seen.add(c)
                if c in self.held:
                    self.problems.append(f"{c} claimed by {worker} while {self.held[c]} holds it")
                if not self.remaining[c] or row.id != self.remaining[c][0]:
                    self.problems.append(f"{c}: {row.id} claimed before {self.remaining[c][:1]}")
                self.held[c] = (worker, row.id)
                self.workers.add(worker)


def _worker(
    number: int, url: str, book: Book, seed: int, stop: threading.Event, errors: list[Any]
) -> None:
    rng = random.Random(seed)
    store = open_store(url)
    store.register_process()
    book.start.wait(30)
    mine: list[OutboxRow] = []
    try:
        while not stop.is_set():
            time.sleep(rng.random() * 0.004)  # the calls take a moment
            # some calls end (done or retried), others stay in flight across the trip
            ended = [row for row in mine if rng.random() < 0.7]
            done = [(row, f"k-{row.customer_id}") for row in ended if rng.random() < 0.7]
            retry = [(row, 0.0, "HTTP 500") for row in ended if all(row is not d for d, _ in done)]
            with book.lock:
                for row in ended:
                    del book.held[row.customer_id]
                for row, _ in done:
                    book.remaining[row.customer_id].remove(row.id)
            try:
                claimed = store.record_and_claim(
                    DISPENSARY, DEST, rng.randint(1, 4), done=done, retry=retry
                )
            except StoreUnavailable:
                book.unavailable += 1
                with book.lock:  # nothing of the trip committed: the calls still hold theirs
                    for row in ended:
                        book.held[row.customer_id] = (number, row.id)
                    for row, _ in done:
                        book.remaining[row.customer_id].insert(0, row.id)
                continue
            book.trips += 1
            mine = [row for row in mine if all(row is not e for e in ended)]
            book.claimed(number, claimed.rows)
            mine += claimed.rows
            with book.lock:
                if not any(book.remaining.values()) and not mine:
                    stop.set()
    except BaseException as exc:  # the test fails with it
        errors.append(exc)
        stop.set()
    finally:
        store.close()


@pytest.mark.parametrize("seed", range(4))
def test_replicas_taking_trips_at_once_keep_each_customers_order(
    store: Store, store_url: str, seed: int
) -> None:
    ops = [make_op(c, n) for n in range(1, OPS + 1) for c in CUSTOMERS]
    random.Random(seed).shuffle(ops)
    # a customer's operations in the order of their n (what the planner enqueues in order)
    ops.sort(key=lambda op: op.body["fields"]["n"])
    enqueue(store, ops)
    rows = store.claim(DISPENSARY, DEST, 0)
    assert rows == []
    ids: dict[str, list[int]] = {c: [] for c in CUSTOMERS}
    real: Any = store
    with real.engine.connect() as conn:
        from sqlalchemy import select

        from connector.store.schema import outbox

        for id_, customer in conn.execute(select(outbox.c.id, outbox.c.customer_id)):
            ids[customer].append(id_)
    book = Book(ids)
    stop = threading.Event()
    errors: list[Any] = []
    threads = [
        threading.Thread(target=_worker, args=(n, store_url, book, seed * 10 + n, stop, errors))
        for n in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert book.problems == []
    assert not any(book.remaining.values())
    assert open_ops(store) == 0
    # every worker claimed some (the trips did run at once)
    assert len(book.workers) >= 2, (book.workers, book.trips, book.unavailable)
