"""Alpine IQ and Klaviyo: 10,000 customers through each vendor's fake, once as live events
and once as a backfill; API calls made and customers per second.

Each fake (tests/fakes/alpineiq.py, tests/fakes/klaviyo.py) runs in its own process with its
rate limits off, so the figures are the connector's. Live: every customer is a webhook event
committed to a SQLite store, planned, and delivered by the destination's worker; all of them
are queued before the worker starts, a backlog, so for Alpine IQ the worker takes the bulk
path after its first claims; Klaviyo's bulk path is an asynchronous job, kept for backfills,
so its live run goes one profile a call through the real-time endpoint.
Backfill: the same customers, mapped, through the adapter's bulk path (Alpine IQ's
createUpdateMembers, Klaviyo's bulk import jobs, polled until complete). Target: the
backfill makes at most one call per ``bulk_size`` customers, plus job polling. The live
run's customers per second is printed next to the backfill's: their ratio is the figure to
compare across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench._common import ROOT, event_body, fake_process
from connector.config import load_config
from connector.delivery.base import Delivery, Sent
from connector.delivery.retry import RetryPolicy
from connector.delivery.worker import DeliveryWorker
from connector.destinations.alpineiq import AlpineIQDestination, AlpineIQSink
from connector.destinations.klaviyo import MAX_JOB_BYTES, KlaviyoDestination, KlaviyoSink
from connector.pipeline import Deployment, process_batch
from connector.store import AsyncStore, NewEvent, open_store
from connector.treez import CustomerEvent, parse_event_json

DISPENSARY = "partnersandbox3"
KEYS = {"alpineiq": "aiq_bench_key", "klaviyo": "pk_bench_key"}


@contextmanager
def vendor_fake(vendor: str) -> Iterator[str]:
    """The vendor's fake in its own process, rate limits off; yields its base URL."""
    flags = {"alpineiq": ["--no-rate-limit"], "klaviyo": ["--no-rate-limits"]}[vendor]
    with fake_process(f"tests.fakes.{vendor}", "--api-key", KEYS[vendor], *flags) as port:
        yield f"http://127.0.0.1:{port}"


def write_config(work: Path, vendor: str, base_url: str, bulk_size: int) -> Path:
    shutil.copy(ROOT / "mappings" / f"{vendor}.yaml", work / f"{vendor}.yaml")
    extra = {
        "alpineiq": f"uid: '1234'\n        rate_limit: []\n        bulk_size: {bulk_size}",
        "klaviyo": f"pace: false\n        job_poll_seconds: 0.05\n        bulk_size: {bulk_size}",
    }[vendor]
    path = work / "config.yaml"
    path.write_text(
        f"""
store: sqlite:///connector.db
dispensaries:
  {DISPENSARY}:
    webhook_token: bench-token
    destinations:
      - name: {vendor}
        type: {vendor}
        api_key: {KEYS[vendor]}
        base_url: {base_url}
        mapping: {vendor}.yaml
        concurrency: 16
        {extra}
"""
    )
    return path


def bodies(count: int) -> list[bytes]:
    """Distinct customers, each with an e-mail and a valid phone (so vendors can match)."""
    return [
        event_body(
            900_000 + i, 1, email=f"shopper{i}@example.com", phone=f"213{2_000_000 + i}",
            opt_out="false",
        )
        for i in range(count)
    ]  # fmt: skip


def build_sink(config_path: Path, vendor: str) -> AlpineIQSink | KlaviyoSink:
    config = load_config(config_path)
    dest = config.dispensaries[DISPENSARY].destinations[0]
    if isinstance(dest, AlpineIQDestination):
        return AlpineIQSink(dest)
    assert isinstance(dest, KlaviyoDestination)
    return KlaviyoSink(dest)


async def live(config_path: Path, vendor: str, events: list[bytes]) -> tuple[float, int]:
    """Webhook events through store, planner and worker; (seconds, API calls)."""
    config = load_config(config_path)
    store = open_store(config.store)
    store.register_process()
    deployment = Deployment.from_config(config)
    store.add_events(
        [NewEvent(DISPENSARY, "webhook", "CUSTOMER", str(900_000 + i), None, b.decode())
         for i, b in enumerate(events)]
    )  # fmt: skip
    sink = build_sink(config_path, vendor)
    astore = AsyncStore(store)
    worker = DeliveryWorker(astore, DISPENSARY, sink, retry=RetryPolicy(), concurrency=16)
    started = time.perf_counter()
    while (await astore.call(process_batch, store, deployment, 256)).events:
        worker.wake.set()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while True:
        stats = await astore.call(store.queue_stats)
        if all(e["pending"] + e["inflight"] == 0 for e in stats):
            break
        await asyncio.sleep(0.05)
    seconds = time.perf_counter() - started
    stop.set()
    await task
    calls = sum(sink.api.calls.values())
    await sink.aclose()
    astore.close()
    return seconds, calls


async def backfill(
    config_path: Path, vendor: str, events: list[bytes]
) -> tuple[float, int, dict[str, int], int, int]:
    """The same customers through the bulk path; (seconds, calls, calls by kind, failed)."""
    config = load_config(config_path)
    deployment = Deployment.from_config(config)
    mapping = deployment.dispensaries[DISPENSARY].specs[0].mapping
    deliveries = []
    for i, body in enumerate(events):
        event = parse_event_json(body)
        assert isinstance(event, CustomerEvent)
        fields = mapping.apply(event.customer, DISPENSARY)
        deliveries.append(
            Delivery(i, f"k{i}", {"op": "upsert", "dispensary": DISPENSARY,
                                  "customer_id": event.customer.customer_id,
                                  "contact_id": None, "fields": fields})
        )  # fmt: skip
    sink = build_sink(config_path, vendor)
    if isinstance(sink, KlaviyoSink):  # jobs are capped at 5 MB as well as at bulk_size
        profiles = [sink.bulk_profile(d) for d in deliveries]
        job_bytes = len(json.dumps(profiles, separators=(",", ":")))
    else:
        job_bytes = 0
    started = time.perf_counter()
    results = await sink.backfill(deliveries)
    seconds = time.perf_counter() - started
    calls = dict(sink.api.calls)
    await sink.aclose()
    failed = sum(1 for r in results if not isinstance(r, Sent))
    return seconds, sum(calls.values()), calls, failed, job_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--vendor", choices=["alpineiq", "klaviyo"], action="append")
    parser.add_argument("--aiq-bulk-size", type=int, default=500)
    args = parser.parse_args()
    events = bodies(args.customers)
    print(f"{args.customers:,} customers per run; fakes in their own processes, limits off")
    print(f"{'vendor':9} {'run':9} {'API calls':>10} {'customers/s':>12}  notes")
    verdicts = []
    for vendor in args.vendor or ["alpineiq", "klaviyo"]:
        bulk_size = args.aiq_bulk_size if vendor == "alpineiq" else 10_000
        for run in ("live", "backfill"):
            with (
                tempfile.TemporaryDirectory(prefix=f"bench-{vendor}-") as tmp,
                vendor_fake(vendor) as base,
            ):
                work = Path(tmp)
                config = write_config(work, vendor, base, bulk_size)
                cwd = os.getcwd()
                os.chdir(work)
                try:
                    if run == "live":
                        seconds, calls = uvloop.run(live(config, vendor, events))
                        per = calls / args.customers
                        path = "bulk path" if vendor == "alpineiq" else "real-time path"
                        note = f"{per:.4f} calls per customer (a backlog: {path})"
                    else:
                        seconds, calls, kinds, failed, job_bytes = uvloop.run(
                            backfill(config, vendor, events)
                        )
                        # one call per bulk_size customers, or per 5 MB of profiles if more
                        allowed = max(
                            math.ceil(args.customers / bulk_size),
                            math.ceil(job_bytes / (MAX_JOB_BYTES - 4096)),
                        )
                        polls = kinds.get("jobs", 0)
                        posts = calls - polls
                        ok = posts <= allowed and failed == 0
                        verdicts.append(ok)
                        note = (
                            f"{posts} bulk posts for {allowed} allowed (bulk_size {bulk_size}"
                            + (f", {job_bytes / 2**20:.1f} MiB of profiles" if job_bytes else "")
                            + ")"
                            + (f" + {polls} job polls" if vendor == "klaviyo" else "")
                            + (f", {failed} failed" if failed else "")
                            + (" — meets" if ok else " — MISSES")
                        )
                finally:
                    os.chdir(cwd)
            rate = args.customers / seconds
            print(f"{vendor:9} {run:9} {calls:>10,} {rate:>12,.0f}  {note}")
    print(
        "backfill target (at most one call per bulk_size customers, or per 5 MB "
        "job for Klaviyo, plus polling): " + ("met" if all(verdicts) else "MISSED")
    )


if __name__ == "__main__":
    main()
