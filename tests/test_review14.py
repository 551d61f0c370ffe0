"""Review of issue #14's change: the problems found, each a test that failed before its fix."""

from __future__ import annotations

import asyncio
import math
import time
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
from connector.delivery.worker import MAX_PAUSE_SECONDS
from connector.errors import QuotaPause
from connector.store import Store

# ---- a quota pause is bounded --------------------------------------------------------------


class FarPauseSink:
    """Answers its first call with a quota pause until ``until`` (a vendor's bad or misread
    reset header: years ahead, a millisecond epoch, infinity), then succeeds."""

    kind = "http"

    def __init__(self, until: float) -> None:
        self.name = DEST
        self.capabilities = Capabilities(batch_size=1)
        self.rate_limit = ()
        self.until = until
        self.calls = 0

    @property
    def batch_size(self) -> int:
        return self.capabilities.batch_size

    async def send(self, deliveries: list[Delivery]) -> list[Result]:
        self.calls += 1
        if self.calls == 1:
            raise QuotaPause("quota used up", until=self.until, status_code=429)
        return [Sent(f"c-{d.customer_id}") for d in deliveries]

    async def backfill(self, deliveries: list[Delivery]) -> list[Result]:
        return await self.send(deliveries)

    async def lookup(self, contact_id: str) -> dict[str, Any] | None:
        return None

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize(
    "ahead", [10 * 365 * 86400.0, 1.8e12, math.inf], ids=["years", "ms-epoch", "inf"]
)
def test_a_pause_far_ahead_is_capped_and_loses_nothing(store: Store, ahead: float) -> None:
    """A pause is at most MAX_PAUSE_SECONDS (a day and then some: HubSpot's daily cap resets
    within 25 hours): a bad reset time must not block a destination for years, in this
    process or, through the store, in every replica after it; nor crash the worker."""
    enqueue(store, [make_op("c1")])
    sink = FarPauseSink(ahead if ahead > 1e12 else time.time() + ahead)
    started = time.time()

    async def go() -> None:
        async with running_worker(store, sink) as (worker, task):
            await wait_until(lambda: store.pause_of(DISPENSARY, DEST) is not None, task)
            assert worker.paused_until <= started + MAX_PAUSE_SECONDS + 5
            await asyncio.sleep(0.2)
            assert not task.done()

    asyncio.run(go())
    pause = store.pause_of(DISPENSARY, DEST)
    assert pause is not None
    assert math.isfinite(pause.until)
    assert started + 60 < pause.until <= time.time() + MAX_PAUSE_SECONDS + 5
    row = outbox_rows(store)["k-c1-1"]
    assert row.status == "pending"
    assert row.attempts == 0
    assert row.next_attempt_at <= time.time() + MAX_PAUSE_SECONDS + 5
    assert open_ops(store) == 1
