"""The delivery worker's continuous pipeline (issue 17): a slow call holds up only its own
slot, not the calls claimed with it; a customer still gets one operation at a time, in order;
a stop lets the calls in flight end and records their results."""

from __future__ import annotations

import asyncio
from typing import Any

from test_delivery import (
    DEST,
    FAST,
    enqueue,
    make_op,
    open_ops,
    outbox_rows,
    running_worker,
    wait_until,
)

from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.delivery.worker import DeliveryWorker
from connector.store import AsyncStore, Store


class HeldSink:
    """A destination whose calls for ``held`` customers wait until ``release`` is set; it
    keeps the order of the operations it was given, and counts the calls in flight per
    customer."""

    kind = "held"
    rate_limit = ()

    def __init__(self, held: set[str], *, batch_size: int = 1) -> None:
        self.name = DEST
        self.capabilities = Capabilities(batch_size=batch_size)
        self.held = held
        self.release = asyncio.Event()
        self.sent: list[str] = []  # idempotency keys, in the order the calls began
        self.flying: dict[str, int] = {}
        self.overlaps: list[str] = []

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        customers = [d.customer_id for d in deliveries]
        for customer in customers:
            if self.flying.get(customer):
                self.overlaps.append(customer)
            self.flying[customer] = self.flying.get(customer, 0) + 1
        self.sent += [d.idempotency_key for d in deliveries]
        try:
            if self.held & set(customers):
                await self.release.wait()
            else:
                await asyncio.sleep(0)
        finally:
            for customer in customers:
                self.flying[customer] -= 1
        return [Sent(contact_id=f"c-{d.customer_id}") for d in deliveries]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def aclose(self) -> None:
        pass


def status_of(store: Store, key: str) -> Any:
    return outbox_rows(store)[key].status


def test_a_slow_call_holds_up_only_its_slot(store: Store) -> None:
    """Concurrency 2: the call for A hangs; B..F are each sent and recorded meanwhile (a
    round would have waited for A before recording B and claiming C)."""
    others = ["B", "C", "D", "E", "F"]
    enqueue(store, [make_op("A"), *(make_op(c) for c in others)])
    sink = HeldSink({"A"})

    async def go() -> None:
        async with running_worker(store, sink, concurrency=2) as (_, task):
            done = [f"k-{c}-1" for c in others]
            await wait_until(lambda: all(status_of(store, k) == "done" for k in done), task)
            assert status_of(store, "k-A-1") == "inflight"
            sink.release.set()
            await wait_until(lambda: open_ops(store) == 0, task)

    asyncio.run(go())
    assert sink.sent[0] == "k-A-1"
    assert sorted(sink.sent) == sorted(["k-A-1", *(f"k-{c}-1" for c in others)])
    assert sink.overlaps == []


def test_one_operation_per_customer_in_flight_and_in_order(store: Store) -> None:
    """A customer's next operation waits for the last one's result to be recorded, while
    other customers' calls come and go around it."""
    ops = [make_op(c, n) for n in (1, 2, 3) for c in ("A", "B", "C", "D")]
    enqueue(store, ops)
    sink = HeldSink({"A"})

    async def go() -> None:
        async with running_worker(store, sink, concurrency=3) as (_, task):
            rest = [f"k-{c}-{n}" for n in (1, 2, 3) for c in ("B", "C", "D")]
            await wait_until(lambda: all(status_of(store, k) == "done" for k in rest), task)
            # A's first call still hangs: its later operations were never claimed
            assert [status_of(store, f"k-A-{n}") for n in (1, 2, 3)] == [
                "inflight",
                "pending",
                "pending",
            ]
            sink.release.set()
            await wait_until(lambda: open_ops(store) == 0, task)

    asyncio.run(go())
    assert sink.overlaps == []
    for customer in ("A", "B", "C", "D"):
        keys = [k for k in sink.sent if k.startswith(f"k-{customer}-")]
        assert keys == [f"k-{customer}-{n}" for n in (1, 2, 3)]


def test_a_stop_waits_for_the_calls_in_flight_and_records_them(store: Store) -> None:
    enqueue(store, [make_op("A"), make_op("B")])
    sink = HeldSink({"A"})

    async def go() -> None:
        astore = AsyncStore(store)
        worker = DeliveryWorker(astore, "d", sink, retry=FAST, idle_poll=0.05, concurrency=4)
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        try:
            await wait_until(lambda: status_of(store, "k-B-1") == "done", task)
            stopping.set()
            await asyncio.sleep(0.05)
            assert not task.done()  # A's call is still in flight: the worker waits for it
            sink.release.set()
            await asyncio.wait_for(task, 10)
        finally:
            astore.close()

    asyncio.run(go())
    assert status_of(store, "k-A-1") == "done"
    assert store.contact_ids("d", DEST, ["A", "B"]) == {"A": "c-A", "B": "c-B"}
