"""A destination paused for its used-up quota (a vendor's daily cap, a window announced with
its reset time): the adapter raises :class:`~connector.errors.QuotaPause`; the worker sends
nothing to the destination until the reset, counts no attempt for the operations that met
it, and the pause is in the store, so ``connector status``, the metrics and a replica taking
the destination's lease over all see it. On both stores."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_delivery import (
    DEST,
    DISPENSARY,
    enqueue,
    make_op,
    open_ops,
    outbox_rows,
    running_worker,
    wait_until,
)

from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.errors import QuotaPause
from connector.metrics import Metrics
from connector.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent


class QuotaSink:
    """A destination whose quota runs out on its ``fail_at``-th call, until ``pause`` seconds
    later: until then every call answers the same (as a vendor does), after it, success."""

    kind = "http"

    def __init__(self, *, fail_at: int = 1, pause: float = 0.6, batch_size: int = 1) -> None:
        self.name = DEST
        self.capabilities = Capabilities(batch_size=batch_size)
        self.rate_limit = ()
        self.fail_at = fail_at
        self.pause = pause
        self.until: float | None = None
        self.calls: list[tuple[float, list[str]]] = []  # when, customers
        self.refused: list[float] = []

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        now = time.time()
        self.calls.append((now, [d.customer_id for d in deliveries]))
        if self.until is None and len(self.calls) == self.fail_at:
            self.until = now + self.pause
        if self.until is not None and now < self.until:
            self.refused.append(now)
            raise QuotaPause("daily limit reached", until=self.until, status_code=429, body="{}")
        return [Sent(f"c-{d.customer_id}") for d in deliveries]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        return None

    async def aclose(self) -> None:
        return None


def test_the_destination_waits_for_the_reset_and_no_attempt_is_counted(store: Store) -> None:
    enqueue(store, [make_op("c1")])
    sink = QuotaSink(pause=0.6)
    metrics = Metrics()

    async def go() -> None:
        async with running_worker(store, sink, metrics=metrics) as (worker, task):
            await wait_until(lambda: sink.until is not None, task)
            await asyncio.sleep(0.1)
            # met the quota: the operation waits for the reset, the destination is paused
            pause = store.pause_of(DISPENSARY, DEST)
            assert pause is not None
            assert sink.until is not None
            assert abs(pause.until - sink.until) < 0.01
            assert pause.status_code == 429
            assert "daily limit reached" in pause.reason
            row = outbox_rows(store)["k-c1-1"]
            assert row.status == "pending"
            assert row.attempts == 0
            assert row.first_attempt_at is None
            # an operation queued during the pause is not sent before the reset either
            enqueue(store, [make_op("c2")])
            worker.wake.set()
            await wait_until(lambda: open_ops(store) == 0, task)

    asyncio.run(go())
    assert sink.until is not None
    assert len(sink.refused) == 1, "a paused destination is not called again before the reset"
    later = [when for when, _ in sink.calls[1:]]
    assert later
    assert min(later) >= sink.until - 0.05
    rows = outbox_rows(store)
    assert rows["k-c1-1"].status == "done"
    assert rows["k-c1-1"].attempts == 1  # the successful one; the pause counted none
    assert rows["k-c2-1"].status == "done"
    assert store.pause_of(DISPENSARY, DEST) is None  # over
    text = metrics.render([], [(DISPENSARY, DEST)]).decode()
    assert (
        f'connector_quota_pauses_total{{destination="{DEST}",dispensary="{DISPENSARY}"}} 1.0'
        in text
    )


def test_a_pause_per_operation_in_a_batch_pauses_the_destination(store: Store) -> None:
    """An adapter may deliver part of a batch and meet the quota with the rest (a split
    batch): the delivered ones are done, the rest wait for the reset without an attempt."""

    class PartSink(QuotaSink):
        async def send(self, deliveries: list[Delivery]) -> list[Result]:
            now = time.time()
            self.calls.append((now, [d.customer_id for d in deliveries]))
            if self.until is None:
                self.until = now + self.pause
            if now < self.until:
                first, *rest = deliveries
                error = QuotaPause("cap", until=self.until, status_code=429)
                return [Sent(f"c-{first.customer_id}"), *[error for _ in rest]]
            return [Sent(f"c-{d.customer_id}") for d in deliveries]

    enqueue(store, [make_op(f"c{i}") for i in range(3)])
    sink = PartSink(batch_size=3, pause=0.5)

    async def go() -> None:
        async with running_worker(store, sink) as (_, task):
            await wait_until(lambda: open_ops(store) == 0, task)

    asyncio.run(go())
    assert sink.until is not None
    assert len(sink.calls) == 2
    assert sink.calls[1][0] >= sink.until - 0.05
    rows = outbox_rows(store)
    assert all(r.status == "done" for r in rows.values())
    assert sorted(r.attempts for r in rows.values()) == [1, 1, 1]


def test_a_replica_taking_the_lease_over_honours_the_pause(store_url: str) -> None:
    """The pause is the destination's, not the process's: a process that takes the
    delivery lease after the first one stopped reads it and waits for the reset too."""
    first = open_store(store_url)
    first.register_process()
    second = open_store(store_url)
    second.register_process()
    try:
        enqueue(first, [make_op("c1"), make_op("c2", order_key="c2")])
        sink = QuotaSink(pause=1.5)

        async def go() -> None:
            async with running_worker(first, sink) as (_, task):
                await wait_until(lambda: sink.until is not None, task)
                await wait_until(lambda: first.pause_of(DISPENSARY, DEST) is not None, task)
            first.release_claims()
            other = QuotaSink(fail_at=0)  # never refuses: any call before the reset shows
            async with running_worker(second, other) as (worker, task):
                await wait_until(lambda: worker.leased, task)
                assert worker.paused_until == pytest.approx(sink.until, abs=0.01)
                await wait_until(lambda: open_ops(second) == 0, task)
            assert sink.until is not None
            assert min(when for when, _ in other.calls) >= sink.until - 0.05

        asyncio.run(go())
    finally:
        first.close()
        second.close()


def test_status_and_metrics_show_the_pause(store_url: str, tmp_path: Path) -> None:
    from connector.config import load_config
    from connector.runner import status_lines

    (tmp_path / "m.yaml").write_text((ROOT / "mappings" / "http.yaml").read_text())
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        f'store: "{store_url}"\n'
        "dispensaries:\n"
        f"  {DISPENSARY}:\n"
        "    webhook_token: t\n"
        "    destinations:\n"
        f"      - {{name: {DEST}, type: http, url: 'https://example.com/h', mapping: m.yaml}}\n"
    )
    config = load_config(config_file)
    store = open_store(config.store)
    try:
        store.register_process()
        until = time.time() + 3600
        enqueue(store, [make_op("c1")])
        (claimed,) = store.claim(DISPENSARY, DEST, 1)
        store.finish(
            DISPENSARY,
            DEST,
            paused=[(claimed, until, "quota: daily")],
            pause=(until, "quota: daily limit (policy DAILY)", 429),
        )
        (pause,) = store.pauses()
        text = Metrics().render([], [(DISPENSARY, DEST)], paused={(DISPENSARY, DEST): pause.until})
    finally:
        store.close()
    lines = status_lines(config)
    at = lines.index(f"  {DEST}: pending 1, in flight 0, dead letters 0")
    paused = lines[at + 2]
    assert paused.startswith(
        f"    paused until {datetime.fromtimestamp(until, UTC).isoformat(timespec='seconds')}"
    )
    assert "(HTTP 429)" in paused
    assert paused.endswith("quota: daily limit (policy DAILY)")
    labels = f'{{destination="{DEST}",dispensary="{DISPENSARY}"}}'
    sample = f"connector_destination_paused_until_seconds{labels}"
    assert any(
        line.startswith(sample) and abs(float(line.split()[-1]) - until) < 1
        for line in text.decode().splitlines()
    )
