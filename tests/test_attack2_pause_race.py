"""Attack on the quota pause with the delivery trip (``record_and_claim``: the results that
ended recorded and the next claim taken in one store call): a call that meets a used-up
quota while a trip is at the store must stop new calls to the destination; the operations
the trip brings back must wait for the pause, not be sent into it."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from typing import Any

from test_attack_perf_worker import new_store
from test_delivery import DEST, DISPENSARY, FAST, enqueue, make_op, open_ops

from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.delivery.worker import DeliveryWorker
from connector.errors import QuotaPause
from connector.store import AsyncStore


class Sink:
    """A's call ends at once; B's meets the used-up quota once the trip recording A's
    result is at the store; C's call is only recorded (when, and whether paused then)."""

    kind = "quota"
    rate_limit = ()

    def __init__(self, trip_started: threading.Event, paused: threading.Event) -> None:
        self.name = DEST
        self.capabilities = Capabilities(batch_size=1)
        self.trip_started, self.paused = trip_started, paused
        self.until = 0.0
        self.calls: list[tuple[str, bool]] = []  # who, whether the pause was known then

    @property
    def batch_size(self) -> int:
        return 1

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        [delivery] = deliveries
        who = delivery.customer_id
        self.calls.append((who, self.paused.is_set() and time.time() < self.until))
        if who == "B" and not self.paused.is_set():
            while not self.trip_started.is_set():
                await asyncio.sleep(0.005)
            self.until = time.time() + 60
            self.paused.set()
            raise QuotaPause("cap", until=self.until, status_code=429)
        return [Sent(contact_id=f"c-{who}")]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def aclose(self) -> None:
        pass


def test_operations_claimed_while_a_call_meets_the_quota_wait_for_the_pause() -> None:
    trip_started, paused = threading.Event(), threading.Event()
    sink = Sink(trip_started, paused)
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        real_trip = store.record_and_claim

        def record_and_claim(*args: Any, **kwargs: Any) -> Any:
            done = args[3] if len(args) > 3 else kwargs.get("done", ())
            if any(row.customer_id == "A" for row, _ in done):
                trip_started.set()
                paused.wait(10)  # B's call meets the quota meanwhile
            return real_trip(*args, **kwargs)

        store.record_and_claim = record_and_claim  # type: ignore[method-assign]
        try:
            enqueue(store, [make_op("A", 1), make_op("B", 1), make_op("C", 1)])

            async def go() -> None:
                astore = AsyncStore(store)
                worker = DeliveryWorker(
                    astore, DISPENSARY, sink, retry=FAST, idle_poll=0.05, concurrency=2
                )
                worker.wake.set()
                stopping = asyncio.Event()
                task = asyncio.create_task(worker.run(stopping))
                deadline = time.monotonic() + 10
                while not paused.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.5)  # what the worker does once paused
                stopping.set()
                await asyncio.wait_for(task, 10)
                astore.close()

            asyncio.run(go())
            assert paused.is_set()
            assert open_ops(store) >= 1
        finally:
            store.close()
    assert [who for who, _ in sink.calls][:2] == ["A", "B"]
    assert [who for who, during in sink.calls if during] == []
