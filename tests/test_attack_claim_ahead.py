"""Attack on claiming a backlog rounds ahead of the slots (``AHEAD_ROUNDS``, ae5437f): a quota
pause, a lost lease, failing calls, a failing store trip, a cancelled worker and batches, each
met while calls are claimed ahead (``DeliveryWorker._ready``)."""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import select
from test_attack_perf_worker import new_store
from test_delivery import DEST, DISPENSARY, FAST, enqueue, make_op, open_ops, wait_until

from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.delivery.worker import DeliveryWorker
from connector.errors import FatalDelivery, QuotaPause, RetriableDelivery, StoreUnavailable
from connector.store import AsyncStore
from connector.store.schema import outbox


class Sink:
    """In-process destination: records each call (customer, n, when), calls out at once and
    customers with two calls out; ``hook`` may raise for a call; ``gate`` holds calls."""

    kind = "attack"
    rate_limit = ()

    def __init__(self, batch: int = 1, slow: float = 0.005) -> None:
        self.name = DEST
        self.capabilities = Capabilities(batch_size=batch)
        self.batch, self.slow = batch, slow
        self.calls: list[tuple[str, int, float]] = []
        self.out = self.most_out = 0
        self.customers_out: set[str] = set()
        self.overlap: list[str] = []
        self.hook: Callable[[list[Delivery]], None] | None = None
        self.gate: asyncio.Event | None = None
        self.on_start: Callable[[], None] | None = None

    @property
    def batch_size(self) -> int:
        return self.batch

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        if self.on_start is not None:
            self.on_start()
        who = [d.customer_id for d in deliveries]
        self.overlap += [c for c in who if c in self.customers_out]
        self.customers_out.update(who)
        self.out += 1
        self.most_out = max(self.most_out, self.out)
        try:
            now = time.monotonic()
            self.calls += [(d.customer_id, int(d.body["fields"]["n"]), now) for d in deliveries]
            if self.gate is not None:
                await self.gate.wait()  # and ends as soon as the gate opens
            else:
                await asyncio.sleep(self.slow)
            if self.hook is not None:
                self.hook(deliveries)
            return [Sent(contact_id=f"c-{d.customer_id}") for d in deliveries]
        finally:
            self.out -= 1
            self.customers_out.difference_update(who)

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def aclose(self) -> None:
        pass


def rows(store: Any) -> list[Any]:
    return store.query(select(outbox).order_by(outbox.c.id))


def run(sink: Sink, ops: list[Any], body: Callable[..., Any], patch: Any = None, **kw: Any) -> Any:
    """Enqueue ``ops``, run a worker with ``body(store, worker, task, stopping)``, stop it."""
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        if patch is not None:
            patch(store)
        enqueue(store, ops)

        async def go() -> None:
            astore = AsyncStore(store)
            settings = {"retry": FAST, "idle_poll": 0.05, **kw}
            worker = DeliveryWorker(astore, DISPENSARY, sink, **settings)
            stopping = asyncio.Event()
            task = asyncio.create_task(worker.run(stopping))
            try:
                await body(store, worker, task, stopping)
            finally:
                stopping.set()
                if not task.done():
                    await asyncio.wait_for(task, 15)
                astore.close()

        try:
            asyncio.run(go())
            return rows(store)
        finally:
            store.close()


def backlog(customers: int, per: int = 1) -> list[Any]:
    return [make_op(f"c{i}", n) for n in range(1, per + 1) for i in range(customers)]


def test_1_no_call_starts_once_a_quota_pause_is_known_and_none_counts_an_attempt() -> None:
    sink, paused_at = Sink(slow=0.01), [0.0]

    def hook(deliveries: list[Delivery]) -> None:
        if len(sink.calls) >= 6 and not paused_at[0]:
            paused_at[0] = time.monotonic()
            raise QuotaPause("cap", until=time.time() + 60, status_code=429)

    sink.hook = hook

    async def body(store: Any, worker: DeliveryWorker, task: Any, stopping: Any) -> None:
        await wait_until(lambda: bool(paused_at[0]), task)
        await asyncio.sleep(0.5)

    found = run(sink, backlog(40), body, concurrency=3)
    after = [c for c in sink.calls if c[2] > paused_at[0]]
    assert after == []
    assert all(r.attempts == 0 for r in found if r.status != "done")
    assert sum(r.status == "done" for r in found) == len(sink.calls) - 1


def test_2_no_call_starts_after_the_lease_is_known_lost() -> None:
    sink = Sink(slow=0.03)
    worker_of: list[DeliveryWorker] = []
    late: list[float] = []
    sink.on_start = lambda: late.append(time.monotonic()) if not worker_of[0].leased else None

    async def body(store: Any, worker: DeliveryWorker, task: Any, stopping: Any) -> None:
        worker_of.append(worker)
        await wait_until(lambda: len(worker._ready) >= 2, task)
        store.acquire = lambda *a, **k: False  # another replica took the lease
        worker._lease_checked = -1e9  # the renewal falls due now
        await wait_until(lambda: not worker.leased, task)
        await asyncio.sleep(0.3)

    found = run(sink, backlog(60), body, concurrency=2)
    assert late == []
    # what was claimed ahead went back unsent: pending again, no attempt counted
    assert all(r.attempts == 0 for r in found if r.status == "pending")
    assert any(r.status == "pending" for r in found)


def test_3_failures_retries_and_dead_letters_end_each_operation_once_in_order() -> None:
    sink, tries = Sink(slow=0.002), collections.Counter[tuple[str, int]]()

    def hook(deliveries: list[Delivery]) -> None:
        [d] = deliveries
        key = (d.customer_id, int(d.body["fields"]["n"]))
        tries[key] += 1
        index = int(d.customer_id[1:])
        if index % 7 == 0 and key[1] == 2:
            raise FatalDelivery("refused", status_code=400)
        if index % 3 == 0 and tries[key] <= 2:
            raise RetriableDelivery("busy", status_code=503, retry_after=0.05)
        if index % 5 == 0 and tries[key] == 1:
            raise RuntimeError("adapter bug")

    sink.hook = hook

    async def body(store: Any, worker: DeliveryWorker, task: Any, stopping: Any) -> None:
        await wait_until(lambda: open_ops(store) == 0, task, timeout=60)

    found = run(sink, backlog(30, per=3), body, concurrency=4)
    assert sink.overlap == []
    assert sink.most_out <= 4
    assert sorted(r.status for r in found) == sorted(
        "dead" if int(r.customer_id[1:]) % 7 == 0 and r.idempotency_key.endswith("-2") else "done"
        for r in found
    )
    per: dict[str, list[int]] = collections.defaultdict(list)
    for who, n, _ in sink.calls:
        per[who].append(n)
    assert all(ns == sorted(ns) for ns in per.values())
    assert all(set(ns) == {1, 2, 3} for ns in per.values())


def test_4_a_store_failure_on_a_trip_with_calls_claimed_ahead_loses_nothing() -> None:
    sink, failed = Sink(slow=0.01), [0]

    def patch(store: Any) -> None:
        real = store.record_and_claim

        def record_and_claim(*args: Any, **kwargs: Any) -> Any:
            if failed[0] < 2 and len(sink.calls) >= 5:
                failed[0] += 1
                raise StoreUnavailable("gone", reason="store locked")
            return real(*args, **kwargs)

        store.record_and_claim = record_and_claim

    async def body(store: Any, worker: DeliveryWorker, task: Any, stopping: Any) -> None:
        await wait_until(lambda: open_ops(store) == 0, task, timeout=60)

    found = run(sink, backlog(40, per=2), body, patch, concurrency=3)
    assert failed[0] == 2
    assert all(r.status == "done" for r in found)
    sent = collections.Counter((who, n) for who, n, _ in sink.calls)
    assert set(sent.values()) == {1}
    assert len(sent) == 80
    assert sink.overlap == []


def test_5_no_call_starts_after_the_worker_task_is_cancelled() -> None:
    sink = Sink(slow=0.002)
    cancelled_at = [0.0]

    async def body(store: Any, worker: DeliveryWorker, task: Any, stopping: Any) -> None:
        await wait_until(lambda: len(sink.calls) >= 3 and len(worker._ready) >= 2, task)
        sink.gate = asyncio.Event()  # the next call waits for the gate
        await wait_until(lambda: sink.out == 1 and len(worker._ready) >= 1, task)
        await asyncio.sleep(0.1)  # the worker waits for its slot to free
        cancelled_at[0] = time.monotonic()
        sink.gate.set()  # the call ends ...
        task.cancel()  # ... and the worker is cancelled in the same moment
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)

    found = run(sink, backlog(40), body, concurrency=1)
    late = [c for c in sink.calls if c[2] >= cancelled_at[0]]
    # sent after the cancellation and left claimed (not recorded): sent again after a restart
    assert {r.status for r in found if (r.customer_id, 1) in {c[:2] for c in late}} <= {"done"}
    assert late == []


@pytest.mark.parametrize(("concurrency", "batch"), [(1, 3), (2, 4)])
def test_6_batches_at_low_concurrency_deliver_everything_once_in_order(
    concurrency: int, batch: int
) -> None:
    sink = Sink(batch=batch, slow=0.003)

    async def body(store: Any, worker: DeliveryWorker, task: Any, stopping: Any) -> None:
        await wait_until(lambda: open_ops(store) == 0, task, timeout=60)

    found = run(sink, backlog(25, per=3), body, concurrency=concurrency)
    assert all(r.status == "done" for r in found)
    assert sink.most_out <= concurrency
    assert sink.overlap == []
    per: dict[str, list[int]] = collections.defaultdict(list)
    for who, n, _ in sink.calls:
        per[who].append(n)
    assert all(ns == [1, 2, 3] for ns in per.values())
