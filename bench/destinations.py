"""Every vendor destination: N customers (10,000 by default) through the vendor's fake, once
as live events and once as a backfill; API calls made and customers per second.

Each fake (tests/fakes/<vendor>.py) runs in its own process with its rate limits off, so the
figures are the connector's. Live: every customer is a webhook event committed to a SQLite
store, planned, and delivered by the destination's worker; all of them are queued before the
worker starts, a backlog, so a destination whose bulk path answers at once (Alpine IQ, Braze)
takes it after its first claims; Klaviyo's bulk path is an asynchronous job, kept for
backfills, so its live run goes one profile a call through the real-time endpoint; HubSpot's
live path is its batch upsert (100 inputs a call). Backfill: the same customers, mapped,
through the adapter's bulk path (Alpine IQ's createUpdateMembers, Klaviyo's bulk import jobs
polled until complete, Braze's /users/track, HubSpot's batch upsert).

Targets: the backfill runs at 25,000 customers/s or more through Alpine IQ's fake, 15,000/s
through Klaviyo's (issue 17), and makes at most one upsert call per bulk size (Alpine IQ's
bulk_size, Klaviyo's 10,000-profile or 5 MB job, Braze's 75 objects, HubSpot's 100 inputs), plus
job polling (Klaviyo); the live runs of Braze and HubSpot stay within the same bound. HubSpot's
properties are created first with the destination's setup hook (`connector hubspot setup`),
not counted. The live run's customers per second is printed next to the backfill's: their
ratio is the figure to compare across machines.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench._common import ROOT, event_body, fake_process, process_cpu_seconds
from connector.config import load_config
from connector.delivery.base import Delivery, Sent
from connector.delivery.retry import RetryPolicy
from connector.delivery.worker import DeliveryWorker
from connector.destinations import DESTINATION_TYPES, build_destination
from connector.destinations.klaviyo import MAX_JOB_BYTES, KlaviyoSink
from connector.mapping import load_mapping
from connector.pipeline import Deployment, process_batch
from connector.store import AsyncStore, NewEvent, open_store
from connector.treez import CustomerEvent, parse_event_json

DISPENSARY = "partnersandbox3"
# backfill customers per second through the fake (issue 17, target 4)
BACKFILL_TARGETS = {"alpineiq": 25_000, "klaviyo": 15_000}


@dataclass(frozen=True)
class Vendor:
    key_flag: str  # how the fake is told the key it accepts
    key: str
    fake_flags: tuple[str, ...]  # rate limits off
    block: str  # the destination's own settings ({base}: the fake's URL, {bulk}: bulk size)
    bulk: int  # customers per bulk call (the target's unit)
    upsert_path: str | None  # the path whose calls the target counts (None: every call)


VENDORS = {
    "alpineiq": Vendor(
        "--api-key",
        "aiq_bench_key",
        ("--no-rate-limit",),
        "api_key: {key}\n        uid: '1234'\n        base_url: {base}\n        rate_limit: []\n"
        "        bulk_size: {bulk}",
        500,
        None,
    ),
    "klaviyo": Vendor(
        "--api-key",
        "pk_bench_key",
        ("--no-rate-limits",),
        "api_key: {key}\n        base_url: {base}\n        pace: false\n"
        "        job_poll_seconds: 0.05\n        bulk_size: {bulk}",
        10_000,
        None,
    ),
    "braze": Vendor(
        "--api-key",
        "braze-bench-key",
        ("--no-rate-limits",),
        "api_key: {key}\n        rest_endpoint: {base}\n        pace: false",
        75,
        "/users/track",
    ),
    "hubspot": Vendor(
        "--token",
        "pat-bench-token",
        ("--no-rate-limits",),
        "token: {key}\n        base_url: {base}\n        rate_limit: []",
        100,
        "/crm/v3/objects/contacts/batch/upsert",
    ),
}


@contextmanager
def vendor_fake(vendor: str) -> Iterator[str]:
    """The vendor's fake in its own process, rate limits off; yields its base URL."""
    spec = VENDORS[vendor]
    with fake_process(f"tests.fakes.{vendor}", spec.key_flag, spec.key, *spec.fake_flags) as port:
        yield f"http://127.0.0.1:{port}"


def write_config(work: Path, vendor: str, base_url: str, bulk_size: int) -> Path:
    shutil.copy(ROOT / "mappings" / f"{vendor}.yaml", work / f"{vendor}.yaml")
    spec = VENDORS[vendor]
    block = spec.block.format(key=spec.key, base=base_url, bulk=bulk_size)
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
        mapping: {vendor}.yaml
        concurrency: 16
        {block}
"""
    )
    return path


def bodies(count: int) -> list[bytes]:
    """Distinct customers, each with an e-mail and a valid phone (so vendors can match)."""
    return [
        event_body(
            900_000 + i,
            1,
            email=f"shopper{i}@example.com",
            phone=f"213{2_000_000 + i}",
            opt_out="false",
        )
        for i in range(count)
    ]


def destination(config_path: Path) -> Any:
    return load_config(config_path).dispensaries[DISPENSARY].destinations[0]


async def prepare(config_path: Path) -> None:
    """What the vendor needs before the first sync (HubSpot's properties), not counted."""
    dest = destination(config_path)
    setup = DESTINATION_TYPES[dest.type].setup
    if setup is not None:
        await setup(dest, load_mapping(dest.mapping))


def calls_of(sink: Any, vendor: str) -> tuple[int, int, dict[str, int]]:
    """(every call, the calls the target counts, calls by family)."""
    every = sum(sink.api.calls.values())
    path = VENDORS[vendor].upsert_path
    counted = every if path is None else sink.api.paths.get(path, 0)
    return every, counted, dict(sink.api.calls)


async def live(config_path: Path, vendor: str, events: list[bytes]) -> tuple[float, int, int]:
    """Webhook events through store, planner and worker; (seconds, API calls, counted)."""
    await prepare(config_path)
    config = load_config(config_path)
    store = open_store(config.store)
    store.register_process()
    deployment = Deployment.from_config(config)
    store.add_events(
        [
            NewEvent(DISPENSARY, "webhook", "CUSTOMER", str(900_000 + i), None, b.decode())
            for i, b in enumerate(events)
        ]
    )
    sink = build_destination(destination(config_path))
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
    every, counted, _ = calls_of(sink, vendor)
    dead = sum(e["dead"] for e in await astore.call(store.queue_stats))
    await sink.aclose()
    astore.close()
    if dead:
        raise SystemExit(f"{vendor} live: {dead} operations dead-lettered")
    return seconds, every, counted


async def backfill(
    config_path: Path, vendor: str, events: list[bytes]
) -> tuple[float, int, int, dict[str, int], int, int, tuple[float, float]]:
    """The same customers through the bulk path; (seconds, calls, counted calls, calls by
    kind, failed, Klaviyo's job bytes, CPU seconds of the connector and of the fake)."""
    await prepare(config_path)
    config = load_config(config_path)
    deployment = Deployment.from_config(config)
    mapping = deployment.dispensaries[DISPENSARY].specs[0].mapping
    deliveries = []
    for i, body in enumerate(events):
        event = parse_event_json(body)
        assert isinstance(event, CustomerEvent)
        fields = mapping.apply(event.customer, DISPENSARY)
        deliveries.append(
            Delivery(
                i,
                f"k{i}",
                {
                    "op": "upsert",
                    "dispensary": DISPENSARY,
                    "customer_id": event.customer.customer_id,
                    "contact_id": None,
                    "fields": fields,
                },
            )
        )
    sink = build_destination(destination(config_path))
    if isinstance(sink, KlaviyoSink):  # jobs are capped at 5 MB as well as at bulk_size
        profiles = [sink.bulk_profile(d) for d in deliveries]
        job_bytes = len(json.dumps(profiles, separators=(",", ":")))
    else:
        job_bytes = 0
    started = time.perf_counter()
    own, every_cpu = time.process_time(), process_cpu_seconds(os.getpid())
    results = await sink.backfill(deliveries)
    seconds = time.perf_counter() - started
    own = time.process_time() - own
    fake = process_cpu_seconds(os.getpid()) - every_cpu - own  # the fake is our child
    every, counted, kinds = calls_of(sink, vendor)
    await sink.aclose()
    failed = sum(1 for r in results if not isinstance(r, Sent))
    return seconds, every, counted, kinds, failed, job_bytes, (own, fake)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--vendor", choices=sorted(VENDORS), action="append")
    parser.add_argument("--aiq-bulk-size", type=int, default=500)
    parser.add_argument(
        "--run", choices=("live", "backfill"), action="append", help="only these (default both)"
    )
    args = parser.parse_args()
    events = bodies(args.customers)
    n = args.customers
    print(f"{n:,} customers per run; fakes in their own processes, limits off")
    print(f"{'vendor':9} {'run':9} {'API calls':>10} {'customers/s':>12}  notes")
    verdicts = []
    rate_verdicts: list[str] = []
    for vendor in args.vendor or list(VENDORS):
        bulk_size = args.aiq_bulk_size if vendor == "alpineiq" else VENDORS[vendor].bulk
        for run in args.run or ("live", "backfill"):
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
                        seconds, calls, counted = uvloop.run(live(config, vendor, events))
                        note = f"{calls / n:.4f} calls per customer"
                        if VENDORS[vendor].upsert_path is not None:
                            allowed = math.ceil(n / bulk_size)
                            ok = counted <= allowed
                            verdicts.append(ok)
                            note += f"; {counted} upsert calls for {allowed} allowed" + (
                                " — meets" if ok else " — MISSES"
                            )
                        elif vendor == "alpineiq":
                            note += " (a backlog: bulk path)"
                        else:
                            note += " (real-time path)"
                    else:
                        seconds, calls, counted, kinds, failed, job_bytes, cpu = uvloop.run(
                            backfill(config, vendor, events)
                        )
                        # one call per bulk_size customers, or per 5 MB of profiles if more
                        allowed = max(
                            math.ceil(n / bulk_size),
                            math.ceil(job_bytes / (MAX_JOB_BYTES - 4096)),
                        )
                        polls = kinds.get("jobs", 0)
                        posts = counted - polls
                        ok = posts <= allowed and failed == 0
                        verdicts.append(ok)
                        note = (
                            f"{posts} bulk posts for {allowed} allowed (bulk size {bulk_size}"
                            + (f", {job_bytes / 2**20:.1f} MiB of profiles" if job_bytes else "")
                            + ")"
                            + (f" + {polls} job polls" if vendor == "klaviyo" else "")
                            + (f" + {calls - counted} other calls" if calls > counted else "")
                            + (f", {failed} failed" if failed else "")
                            + (" — meets" if ok else " — MISSES")
                            + f"; CPU per customer: connector {cpu[0] / n * 1e6:.0f} µs, "
                            f"fake {cpu[1] / n * 1e6:.0f} µs"
                        )
                        if vendor in BACKFILL_TARGETS:
                            fast = n / seconds >= BACKFILL_TARGETS[vendor]
                            rate_verdicts.append(
                                f"{vendor} backfill {n / seconds:,.0f}/s: "
                                + ("meets" if fast else "MISSES")
                                + f" the {BACKFILL_TARGETS[vendor]:,}/s target"
                            )
                finally:
                    os.chdir(cwd)
            rate = n / seconds
            print(f"{vendor:9} {run:9} {calls:>10,} {rate:>12,.0f}  {note}")
    print(
        "call target (at most one upsert call per bulk size, or per 5 MB job for Klaviyo, "
        "plus polling): " + ("met" if all(verdicts) else "MISSED")
    )
    for line in rate_verdicts:
        print(line)


if __name__ == "__main__":
    main()
