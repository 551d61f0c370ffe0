"""Attack on issue 17's continuous delivery pipeline (connector/delivery/worker.py, fd8b544,
00abda5) through the fake of the user's service (tests/fakes/http_sink.py) with scripted
failures: histories of a few customers, their operations interleaved, each customer's calls
answered 500, 429, 400 or 200 as scripted, at several concurrencies. Every operation ends done
or dead as its answers say; a customer never has two calls at the sink at once, and its
operations reach the sink in order (an operation is tried only once the one before it ended
done or dead). Also: a stop with calls in flight and a new worker after it, and a store that
fails while recording results."""

from __future__ import annotations

import asyncio
import collections
import itertools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.http_sink import HttpSink as FakeService
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_delivery import (
    DEST,
    FAST,
    dead_rows,
    enqueue,
    http_config,
    make_op,
    open_ops,
    outbox_rows,
    running_worker,
    wait_until,
)

from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.delivery.worker import DeliveryWorker
from connector.destinations.http import HttpSink
from connector.errors import QuotaPause, StoreUnavailable
from connector.store import AsyncStore, Store, open_store

DISPENSARY = "d"
CUSTOMERS = ("A", "B", "C", "D")
MAPPING = Path(__file__).resolve().parent.parent / "mappings"


@pytest.fixture(scope="module")
def service() -> Iterator[FakeService]:
    with FakeService() as fake:
        yield fake


@pytest.fixture(scope="module")
def mapping_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mappings")
    (folder / "http.yaml").write_text((MAPPING / "http.yaml").read_text())
    return folder


def fresh(service: FakeService, **options: Any) -> None:
    service.configure(
        fail_500=0.0, fail_429=0.0, fail_400=0.0, retry_after=0, delay=0.0, strict=False
    )
    service.reset(seed=0)
    with service.app._lock:  # reset() keeps the per-customer scripts: none left over
        service.app._by_customer.clear()
    if options:
        service.configure(**options)


def new_store(folder: str) -> Store:
    store = open_store(f"sqlite:///{folder}/store.sqlite")
    store.register_process()
    return store


def check_order(service: FakeService, counts: dict[str, int]) -> dict[str, list[int]]:
    """Per customer: never two calls at once, and its operations tried in order (each one
    only after the one before it was answered for the last time). The numbers answered 2xx."""
    accepted: dict[str, list[int]] = collections.defaultdict(list)
    by_customer: dict[str, list[Any]] = collections.defaultdict(list)
    for attempt in service.attempts:
        [op] = attempt.ops
        by_customer[op["customer_id"]].append(attempt)
    for customer, attempts in by_customer.items():
        attempts.sort(key=lambda a: a.received)
        for before, after in itertools.pairwise(attempts):
            assert after.received >= before.answered, customer  # one call at a time
        tried = [a.ops[0]["fields"]["n"] for a in attempts]
        assert tried == sorted(tried), (customer, tried)  # in order, retries in place
        accepted[customer] = [a.ops[0]["fields"]["n"] for a in attempts if a.ok]
        assert set(tried) <= set(range(1, counts[customer] + 1))
    return accepted


ANSWER = st.sampled_from(["500", "429:0", "ok", "ok", "ok", "400"])


@settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    counts=st.fixed_dictionaries({c: st.integers(1, 3) for c in CUSTOMERS}),
    scripts=st.fixed_dictionaries({c: st.lists(ANSWER, max_size=4) for c in CUSTOMERS}),
    order=st.randoms(use_true_random=False),
    concurrency=st.integers(1, 4),
)
def test_scripted_failures_keep_each_customers_order(
    service: FakeService,
    mapping_dir: Path,
    counts: dict[str, int],
    scripts: dict[str, list[str]],
    order: Any,
    concurrency: int,
) -> None:
    fresh(service)
    # the customers' operations interleaved, each customer's in its own order
    queue = [c for c in CUSTOMERS for _ in range(counts[c])]
    order.shuffle(queue)
    seen: collections.Counter[str] = collections.Counter()
    ops = []
    for customer in queue:
        seen[customer] += 1
        ops.append(make_op(customer, seen[customer]))
    for customer, script in scripts.items():
        if script:
            service.script_for(customer, "upsert", script)
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        try:
            enqueue(store, ops)
            sink = HttpSink(http_config(mapping_dir, url=service.url))

            async def go() -> None:
                async with running_worker(store, sink, concurrency=concurrency) as (_, task):
                    await wait_until(lambda: open_ops(store) == 0, task)

            asyncio.run(go())
            rows = outbox_rows(store)
            dead = {r.idempotency_key for r in dead_rows(store)}
        finally:
            store.close()
    accepted = check_order(service, counts)
    for customer in CUSTOMERS:
        assert accepted[customer] == sorted(set(accepted[customer]))  # each once, in order
        for n in range(1, counts[customer] + 1):
            key = f"k-{customer}-{n}"
            expected = "done" if n in accepted[customer] else "dead"
            assert rows[key].status == expected, (key, rows[key].status)
            assert (key in dead) == (expected == "dead")


def test_a_stop_mid_flight_and_a_new_worker_keep_the_order(
    service: FakeService, mapping_dir: Path
) -> None:
    """The sink answers slowly; the worker is stopped with calls in flight, then a second
    worker drains: nothing lost, each customer's operations accepted once and in order."""
    fresh(service, delay=0.15)
    counts = dict.fromkeys(CUSTOMERS, 3)
    ops = [make_op(c, n) for n in (1, 2, 3) for c in CUSTOMERS]
    service.script_for("B", "upsert", ["500", "ok"])
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        try:
            enqueue(store, ops)

            async def first() -> None:
                sink = HttpSink(http_config(mapping_dir, url=service.url))
                async with running_worker(store, sink, concurrency=3) as (_, task):
                    await wait_until(lambda: len(service.attempts) >= 3, task)
                    # running_worker stops it here, calls still in flight

            asyncio.run(first())
            assert "inflight" not in {r.status for r in outbox_rows(store).values()}
            fresh(service)
            service.script_for("C", "upsert", ["429:0"])
            sink = HttpSink(http_config(mapping_dir, url=service.url))

            async def second() -> None:
                async with running_worker(store, sink, concurrency=3) as (_, task):
                    await wait_until(lambda: open_ops(store) == 0, task)

            asyncio.run(second())
            rows = outbox_rows(store)
        finally:
            store.close()
    assert {r.status for r in rows.values()} == {"done"}
    check_order(service, counts)


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_store_failing_mid_record_loses_nothing(
    service: FakeService, mapping_dir: Path, failing: int
) -> None:
    """The store refuses the ``failing``-th record of results (an outage, StoreUnavailable)
    while other calls are in flight: the results are recorded later, nothing stays in flight,
    each customer's operations are accepted once each and in order."""
    fresh(service, delay=0.02)
    counts = dict.fromkeys(CUSTOMERS, 3)
    ops = [make_op(c, n) for n in (1, 2, 3) for c in CUSTOMERS]
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        # results are recorded in the trip that also claims (Store.record_and_claim); a
        # trip with results to record is the one refused
        real_trip = store.record_and_claim
        calls = {"n": 0}

        def record_and_claim(*args: Any, **kwargs: Any) -> Any:
            if len(args) > 3 or kwargs.keys() - {"due_if_none"}:
                calls["n"] += 1
                if calls["n"] == failing:
                    raise StoreUnavailable("injected outage", reason="store locked")
            return real_trip(*args, **kwargs)

        store.record_and_claim = record_and_claim  # type: ignore[method-assign]
        try:
            enqueue(store, ops)

            async def go() -> None:
                astore = AsyncStore(store)
                sink = HttpSink(http_config(mapping_dir, url=service.url))
                worker = DeliveryWorker(
                    astore, DISPENSARY, sink, retry=FAST, idle_poll=0.05, concurrency=3
                )
                worker.wake.set()
                stopping = asyncio.Event()
                task = asyncio.create_task(worker.run(stopping))
                try:
                    await wait_until(lambda: open_ops(store) == 0, task, timeout=30)
                finally:
                    stopping.set()
                    await asyncio.wait_for(task, 10)
                    await sink.aclose()
                    astore.close()

            asyncio.run(go())
            rows = outbox_rows(store)
        finally:
            store.close()
    assert calls["n"] > failing
    assert {r.status for r in rows.values()} == {"done"}
    accepted = check_order(service, counts)
    for customer in CUSTOMERS:
        # a result recorded late is never sent again behind a later operation
        assert accepted[customer] == [1, 2, 3], (customer, accepted[customer])


class QuotaSink:
    """In-process destination: every call takes a moment; the first call for ``A`` meets a
    used-up quota (QuotaPause ``pause`` seconds ahead). Records each call's start and end."""

    kind = "quota"
    rate_limit = ()

    def __init__(self, pause: float) -> None:
        self.name = DEST
        self.capabilities = Capabilities(batch_size=1)
        self.pause = pause
        self.paused_at: float | None = None
        self.until = 0.0
        self.calls: list[tuple[float, float, str, int, bool]] = []  # start, end, who, n, ok

    @property
    def batch_size(self) -> int:
        return 1

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        [delivery] = deliveries
        start = time.time()
        await asyncio.sleep(0.02)
        who, n = delivery.customer_id, delivery.body["fields"]["n"]
        if who == "A" and self.paused_at is None:
            self.paused_at = time.time()
            self.until = self.paused_at + self.pause
            self.calls.append((start, time.time(), who, n, False))
            raise QuotaPause("cap", until=self.until, status_code=429)
        self.calls.append((start, time.time(), who, n, True))
        return [Sent(contact_id=f"c-{who}")]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def aclose(self) -> None:
        pass


def test_a_quota_pause_mid_flight_stops_new_calls_and_counts_no_attempt() -> None:
    """A's call meets a used-up quota while B's and C's are in flight: no call starts until
    the quota resets, A's operation counts no attempt, and every customer's operations are
    then sent, in order."""
    ops = [make_op(c, n) for n in (1, 2, 3) for c in ("A", "B", "C")]
    sink = QuotaSink(pause=0.6)
    with tempfile.TemporaryDirectory() as folder:
        store = new_store(folder)
        try:
            enqueue(store, ops)

            async def go() -> None:
                async with running_worker(store, sink, concurrency=3) as (_, task):
                    await wait_until(lambda: open_ops(store) == 0, task)

            asyncio.run(go())
            rows = outbox_rows(store)
        finally:
            store.close()
    assert sink.paused_at is not None
    started_in_pause = [
        (who, n) for start, _, who, n, _ in sink.calls if sink.paused_at < start < sink.until
    ]
    assert started_in_pause == []
    assert {r.status for r in rows.values()} == {"done"}
    assert rows["k-A-1"].attempts == 1  # the paused call is not an attempt
    for customer in ("A", "B", "C"):
        sent = [n for _, _, who, n, ok in sorted(sink.calls) if who == customer and ok]
        assert sent == [1, 2, 3], (customer, sent)
