"""A harness for flow tests through a vendor fake: the real store (a SQLite file), the real
planner (``process_batch``) and the real delivery worker, with the destination's adapter
talking HTTP to the fake in-process through ``httpx.ASGITransport``.

    flow = Flow(tmp_path, vendor_block, app=fake.app, sink_factory=AlpineIQSink)
    await flow.deliver(event_body("1001", 1, email="a@example.com"))
    flow.outbox_summary()      # {(customer, op): status, ...}
    await flow.close()

``event_body`` builds a webhook body from the seed delivery (another customer, a version
that orders it: a higher version is newer). Nothing here sleeps on a timer beyond the
worker's own polling: :meth:`Flow.drain` returns as soon as no operation is pending or in
flight (or raises after ``timeout`` seconds).
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from connector.config import load_config
from connector.delivery.base import Destination
from connector.delivery.retry import RetryPolicy
from connector.delivery.worker import DeliveryWorker
from connector.pipeline import Deployment, process_batch
from connector.planner import instant_us
from connector.store import AsyncStore, NewEvent, open_store
from connector.store.schema import conflicts, contacts, dead_letters, outbox

ROOT = Path(__file__).resolve().parent.parent
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
DISPENSARY = SEED["dispensary_short_name"]

# Fast retries for tests: a retriable answer is tried again within ~20 ms, twice at most; a
# Retry-After is honoured up to max_seconds (the fakes' 1 s is).
FAST_RETRY = RetryPolicy(
    initial_seconds=0.01,
    max_seconds=2.0,
    jitter_seconds=0.0,
    min_attempts=3,
    min_elapsed_seconds=0.0,
)


def event_body(
    customer_id: str, version: int, *, dispensary: str = DISPENSARY, **changes: Any
) -> bytes:
    """The seed delivery as customer ``customer_id`` at ``version`` (higher is newer), with
    the customer's fields in ``changes`` replaced (``opt_out="true"``, ``email=...``)."""
    body = copy.deepcopy(SEED)
    body["dispensary_short_name"] = dispensary
    data = body["data"]
    data["customer_id"] = customer_id
    data["last_update"] = (
        f"2026-05-{1 + version // 86400:02d}T{version // 3600 % 24:02d}:"
        f"{version // 60 % 60:02d}:{version % 60:02d}.000-07:00"
    )
    data["opt_out"] = "false"
    data.update(changes)
    return json.dumps(body).encode()


def _instant(text: Any) -> int | None:
    """``last_update`` as the receiver stores it in the inbox (microseconds, an instant)."""
    try:
        return instant_us(datetime.fromisoformat(str(text)))
    except ValueError:
        return None


class Flow:
    """One dispensary (or several) with one vendor destination each, over a fresh store."""

    def __init__(
        self,
        work: Path,
        config_text: str,
        *,
        app: Any,
        sink_factory: Callable[..., Destination],
        base_url: str,
        retry: RetryPolicy = FAST_RETRY,
        concurrency: int = 8,
        sink_options: dict[str, Any] | None = None,
        store_url: str | None = None,
    ) -> None:
        """``config_text``: a whole config.yaml whose ``store`` is ``sqlite:///connector.db``
        and whose mappings are file names under ``mappings/`` (copied into ``work``)."""
        for mapping in (ROOT / "mappings").glob("*.yaml"):
            shutil.copy(mapping, work / mapping.name)
        path = work / "config.yaml"
        store = store_url or f"sqlite:///{work}/c.db"  # store_url: an empty store elsewhere
        path.write_text(config_text.replace("sqlite:///connector.db", store))
        self.config = load_config(path)
        self.deployment = Deployment.from_config(self.config)
        self.store = open_store(self.config.store)
        self.store.register_process()
        self.astore = AsyncStore(self.store)
        self.base_url = base_url
        self.sinks: dict[tuple[str, str], Destination] = {}
        self.workers: list[DeliveryWorker] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        for dispensary, config in self.config.dispensaries.items():
            for dest in config.destinations:
                client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
                sink = sink_factory(dest, client, **(sink_options or {}))
                self.sinks[(dispensary, dest.name)] = sink
                self.workers.append(
                    DeliveryWorker(
                        self.astore,
                        dispensary,
                        sink,
                        retry=retry,
                        concurrency=concurrency,
                        idle_poll=0.02,
                    )
                )
        self._seq = 0

    def sink(self, dispensary: str = DISPENSARY, name: str | None = None) -> Destination:
        for (d, n), sink in self.sinks.items():
            if d == dispensary and (name is None or n == name):
                return sink
        raise KeyError((dispensary, name))

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(w.run(self._stop)) for w in self.workers]

    async def post(self, *bodies: bytes) -> None:
        """Commit webhook events as the receiver would, then plan them."""
        events = []
        for body in bodies:
            data = json.loads(body)
            self._seq += 1
            events.append(
                NewEvent(
                    data["dispensary_short_name"],
                    "webhook",
                    "CUSTOMER",
                    str(data["data"].get("customer_id")),
                    _instant(data["data"].get("last_update")),
                    body.decode(),
                )
            )
        self.store.add_events(events)
        while (await self.astore.call(process_batch, self.store, self.deployment, 256)).events:
            pass
        for worker in self.workers:
            worker.wake.set()

    async def drain(self, timeout: float = 20.0) -> None:
        """Wait until no operation is pending or in flight (retries included)."""
        self.start()
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.astore.call(self.store.queue_stats)
            if all(e["pending"] + e["inflight"] == 0 for e in stats):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"operations still open after {timeout} s: {stats}")
            await asyncio.sleep(0.01)

    async def deliver(self, *bodies: bytes, timeout: float = 20.0) -> None:
        """Post the events in one batch and wait until their operations are settled."""
        await self.post(*bodies)
        await self.drain(timeout)

    # --- what the store says ------------------------------------------------------------------

    def _rows(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        with self.store.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def outbox(self) -> list[dict[str, Any]]:
        """Every operation, oldest first, as stored (``op``, ``customer_id``, ``status`` ...)."""
        return self._rows(sa.select(outbox).order_by(outbox.c.id))

    def ops(self, customer_id: str | None = None) -> list[str]:
        """The operations planned, oldest first (of one customer, or all)."""
        return [
            row["op"]
            for row in self.outbox()
            if customer_id is None or row["customer_id"] == customer_id
        ]

    def dead_letters(self) -> list[dict[str, Any]]:
        return self._rows(sa.select(dead_letters))

    def conflicts(self) -> list[dict[str, Any]]:
        return self._rows(sa.select(conflicts))

    def contact_ids(self) -> dict[tuple[str, str, str], str | None]:
        """(dispensary, destination, customer) -> the vendor's contact id recorded."""
        rows = self._rows(sa.select(contacts))
        return {
            (r["dispensary"], r["destination"], r["customer_id"]): r["contact_id"] for r in rows
        }

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            await task
        for sink in self.sinks.values():
            await sink.aclose()
        self.store.release_claims()  # as serve does when it stops: claims and leases
        self.astore.close()
