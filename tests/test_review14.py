"""Review of issue #14's change: the problems found, each a test that failed before its fix."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from click.testing import CliRunner
from sqlalchemy import event
from test_braze import write_config
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

from connector.cli import main
from connector.config import load_config
from connector.delivery.base import Capabilities, Delivery, Result, Sent
from connector.delivery.worker import CONTRACT_KEYS, MAX_PAUSE_SECONDS
from connector.destinations import capabilities
from connector.destinations.braze import BrazeDestination, BrazeSink
from connector.errors import QuotaPause
from connector.planner import Operation
from connector.store import Store

ROOT = Path(__file__).resolve().parent.parent

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


BRAZE = "https://rest.iad-01.braze.com"


def braze_sink(tmp_path: Path, wall: Callable[[], float]) -> BrazeSink:
    shutil.copy(ROOT / "mappings" / "braze.yaml", tmp_path / "braze.yaml")
    config = BrazeDestination.model_validate(
        {
            "name": "bz",
            "type": "braze",
            "api_key": "braze-rest-review14-key",
            "rest_endpoint": BRAZE,
            "mapping": "braze.yaml",
            "pace": False,
        },
        context={"base_dir": tmp_path},
    )
    return BrazeSink(config, httpx.AsyncClient(), wall=wall)


@pytest.mark.parametrize("reset", ["1900000003", "1796543880000", "inf", "1e400"])
def test_a_braze_reset_far_ahead_pauses_an_hour_at_most(tmp_path: Path, reset: str) -> None:
    """Braze's windows of the endpoints used are seconds to an hour long: a reset header
    further ahead (a misread unit, a bad value) is not a reason to stop for longer."""
    now = 1_796_543_000.0
    fields = {"external_id": "treez-shop1-1001", "treez_opt_out": False}
    body: dict[str, Any] = dict.fromkeys(CONTRACT_KEYS)
    body.update(op="upsert", dispensary="shop1", customer_id="1001", fields=fields)
    headers = {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}

    async def go() -> QuotaPause:
        sink = braze_sink(tmp_path, lambda: now)
        try:
            with respx.mock(base_url=BRAZE, using="httpx") as router:
                router.post("/users/track").mock(
                    return_value=httpx.Response(429, json={"message": "x"}, headers=headers)
                )
                with pytest.raises(QuotaPause) as info:
                    await sink.send([Delivery(1, "k-1", body)])
            return info.value
        finally:
            await sink.aclose()

    pause = asyncio.run(go())
    assert math.isfinite(pause.until)
    assert now + 1 <= pause.until <= now + 3600


# ---- superseding a waiting upsert, against a claim in another process (PostgreSQL) ---------


def _upsert(customer: str, n: int) -> Operation:
    return replace(make_op(customer, n), replaces_waiting=True)


def _claim_during(store: Store, marker: str) -> tuple[list[list[str]], Callable[[], None]]:
    """Claims made from another connection (another process's worker) right after the
    planner's transaction runs the statement whose SQL or parameters hold ``marker``."""
    claimed: list[list[str]] = []

    def claim() -> None:
        rows = store.claim(DISPENSARY, DEST, 10)
        claimed.append([r.idempotency_key for r in rows])

    def after(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if marker in f"{statement} {parameters}" and not claimed:
            thread = threading.Thread(target=claim)
            thread.start()
            thread.join(10)
            assert not thread.is_alive(), "the claim waited for the planner's transaction"

    event.listen(store.engine, "after_cursor_execute", after)
    return claimed, lambda: event.remove(store.engine, "after_cursor_execute", after)


@pytest.mark.postgresql_only
def test_a_claim_between_the_planners_read_and_its_supersede_keeps_both(store: Store) -> None:
    """READ COMMITTED: the planner read the older upsert as pending, then a worker claimed
    it and committed before the UPDATE: the UPDATE's ``status = 'pending'`` is evaluated
    again on the row as committed (in flight), so the operation being sent is not marked
    superseded, and the newer upsert waits behind it."""
    enqueue(store, [_upsert("c1", 1)])
    claimed, stop = _claim_during(store, "max(outbox.id)")
    try:
        enqueue(store, [_upsert("c1", 2)])
    finally:
        stop()
    assert claimed == [["k-c1-1"]]
    rows = outbox_rows(store)
    assert rows["k-c1-1"].status == "inflight"
    assert rows["k-c1-2"].status == "pending"
    assert store.claim(DISPENSARY, DEST, 10) == []  # behind the one in flight


@pytest.mark.postgresql_only
def test_a_claim_after_the_supersede_skips_the_superseded_upsert(store: Store) -> None:
    """The planner's UPDATE holds the older row until it commits: a claim meanwhile skips
    it (SKIP LOCKED) and never sends an operation the commit marks superseded."""
    enqueue(store, [_upsert("c1", 1)])
    claimed, stop = _claim_during(store, "superseded")
    try:
        enqueue(store, [_upsert("c1", 2)])
    finally:
        stop()
    assert claimed == [[]]
    rows = outbox_rows(store)
    assert rows["k-c1-1"].status == "superseded"
    assert [r.idempotency_key for r in store.claim(DISPENSARY, DEST, 10)] == ["k-c1-2"]


# ---- superseding: only an upsert replaces, only the one planned to ---------------------------


def _unsubscribe(customer: str) -> Operation:
    body = {"op": "unsubscribe", "dispensary": DISPENSARY, "customer_id": customer}
    return Operation(DEST, customer, customer, "unsubscribe", body, f"u-{customer}")


def test_an_operation_after_an_upsert_replaced_in_the_same_call_replaces_nothing(
    store: Store,
) -> None:
    """Two upserts of one customer in one call (a burst planned at once): the first is
    replaced, never written. The operation planned after them, of another customer, must
    not be taken for an upsert that replaces one (the replaced row's identity was a Python
    ``id()``, which the next row made may reuse): c2's waiting upsert stays queued, or c2
    is never created and only its opt-out goes."""
    enqueue(store, [_upsert("c2", 1)])
    enqueue(store, [_upsert("c1", 1), _upsert("c1", 2), _unsubscribe("c2")])
    rows = outbox_rows(store)
    assert rows["k-c2-1"].status == "pending"
    assert rows["u-c2"].status == "pending"
    assert "k-c1-1" not in rows  # replaced in the call, never written
    assert rows["k-c1-2"].status == "pending"


# ---- connector check says the batch Braze sends -----------------------------------------------


def test_check_shows_brazes_batch_as_sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README: ``batch_size`` defaults to ``objects_per_request`` (75). ``connector check``
    read the generic default (1) and said ``batch 1`` for a destination sending 75 a call."""
    path = write_config(tmp_path)
    monkeypatch.setenv("BRAZE_API_KEY", "braze-rest-review14-key")
    checked = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "batch 75," in checked.output
    config = load_config(path)
    [dest] = config.dispensaries["shop1"].destinations
    assert dest.batch_size == capabilities(dest).batch_size == 75


# ---- a Braze SMS opt-out with no SMS subscription group is reported, not dropped ---------------


def test_a_braze_sms_opt_out_with_no_sms_group_is_reported(tmp_path: Path) -> None:
    """SMS has no global state in Braze: only the configured groups carry it. With none set
    (the default), an SMS opt-out reaches nothing; it must say so on the operation (a
    conflict row and the conflicts metric), as HubSpot's does, not count as silently done."""
    now = 1_796_543_000.0
    fields = {"external_id": "treez-shop1-1001", "treez_opt_out": True}

    def unsubscribe(customer: str, channels: list[str]) -> Delivery:
        body: dict[str, Any] = dict.fromkeys(CONTRACT_KEYS)
        body.update(
            op="unsubscribe",
            dispensary="shop1",
            customer_id=customer,
            contact_id=f"treez-shop1-{customer}",
            fields=fields,
            channels=channels,
        )
        return Delivery(int(customer), f"u-{customer}", body)

    async def go() -> list[Result]:
        sink = braze_sink(tmp_path, lambda: now)
        try:
            with respx.mock(base_url=BRAZE, using="httpx") as router:
                router.post("/users/track").mock(
                    return_value=httpx.Response(201, json={"message": "success"})
                )
                return await sink.send(
                    [unsubscribe("1", ["email", "sms"]), unsubscribe("2", ["sms"])]
                )
        finally:
            await sink.aclose()

    both, sms = asyncio.run(go())
    for result in (both, sms):
        assert isinstance(result, Sent)
        assert result.conflict is not None
        kind, _, detail = result.conflict.partition(": ")
        assert kind == "sms_consent_unsupported"
        assert "sms_subscription_groups" in detail
        assert "@" not in detail
