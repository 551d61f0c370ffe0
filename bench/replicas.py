"""Replicas end to end: events per second from POST to delivery at a local sink, on SQLite
with one process and on PostgreSQL with 1, 2 and 3 ``connector serve`` replicas, in one run
at the same offered load.

Each run gets a fresh store (a temporary SQLite file; a new PostgreSQL database, dropped
after) and a fresh sink (tests/fakes/http_sink.py, its own process, batch_size 1). Customers
get several versions each; one customer's versions are posted in order, each acknowledged
before the next, and spread over the replicas (a client sends its requests to each replica
in turn). Printed per run: events/s end to end, p50/p99 latency from POST to the sink, and
the counts that prove nothing was lost (an operation of the outbox that never reached the
sink, a customer whose latest version did not), duplicated beyond at-least-once (the same
Idempotency-Key accepted twice: counted, allowed) or reordered (a customer's versions
reaching the sink out of order).

Target: PostgreSQL with one replica at least 0.7x the SQLite figure of the same run. The
replicas share this machine's cores with the database, so the 2- and 3-replica figures are
for the record.

    python bench/replicas.py [--events 4800] [--rate 600] [--postgres postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    ROOT,
    TOKEN,
    RawPoster,
    event_body,
    process_cpu_seconds,
    server_process,
    sink_process,
)
from bench.pipeline import AttemptsTail

DISPENSARY = "partnersandbox3"
POSTGRES = os.environ.get("CONNECTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(slots=True)
class Result:
    name: str
    posted: int
    seconds: float
    delivered: int  # events whose operation reached the sink
    p50: float
    p99: float
    outbox: int
    lost_ops: int  # outbox operations whose Idempotency-Key the sink never accepted
    lost_customers: int  # customers whose latest version never reached the sink
    duplicates: int  # accepted attempts beyond the first of a key (at-least-once)
    reordered: int  # customers whose versions reached the sink out of order
    cpu: float  # connector processes, seconds

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds


def write_config(workdir: Path, store: str, sink_url: str, concurrency: int) -> Path:
    (workdir / "http.yaml").write_bytes((ROOT / "mappings" / "http.yaml").read_bytes())
    path = workdir / "config.yaml"
    path.write_text(
        f"""
store: {store}
server: {{host: 127.0.0.1, port: 8080, log_level: info}}
dispensaries:
  {DISPENSARY}:
    webhook_token: {TOKEN}
    destinations:
      - name: sink
        type: http
        url: {sink_url}
        mapping: http.yaml
        concurrency: {concurrency}
        batch_size: 1
        retry: {{initial_seconds: 0.2, max_seconds: 2}}
"""
    )
    return path


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    name = f"h_bench_replicas_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield urlsplit(POSTGRES)._replace(path=f"/{name}").geturl()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def outbox_keys(store: str, workdir: Path) -> list[str]:
    sql = "SELECT idempotency_key FROM outbox"
    if store.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(workdir / "connector.db")) as conn:
            return [row[0] for row in conn.execute(sql)]
    import psycopg

    with psycopg.connect(store) as conn:
        return [row[0] for row in conn.execute(sql)]


async def post_all(
    bases: list[str], plan: list[list[tuple[int, int]]], rate: float
) -> dict[tuple[int, int], float]:
    """Each client posts its list of (customer, version) in order, to each replica in turn,
    paced together to ``rate`` per second; the wall time each event was sent."""
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    posters = []
    for base in bases:
        host, port = base.removeprefix("http://").split(":")
        posters.append(RawPoster(host, int(port), f"/webhooks/treez/{DISPENSARY}", headers))
    sent: dict[tuple[int, int], float] = {}
    start = time.monotonic()
    count = 0

    async def client(index: int, share: list[tuple[int, int]]) -> None:
        nonlocal count
        conns = [await poster.open() for poster in posters]
        try:
            for turn, (customer_id, version) in enumerate(share):
                due = start + count / rate
                count += 1
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                which = (index + turn) % len(posters)
                sent[(customer_id, version)] = time.time()
                status = await posters[which].post(conns[which], event_body(customer_id, version))
                if status != 202:
                    raise RuntimeError(f"event {customer_id}/{version}: HTTP {status}")
        finally:
            for conn in conns:
                conn[1].close()

    await asyncio.gather(*(client(i, share) for i, share in enumerate(plan)))
    return sent


def run(
    name: str,
    store: str,
    replicas: int,
    workdir: Path,
    plan: list[list[tuple[int, int]]],
    rate: float,
    concurrency: int,
) -> Result:
    events = sum(len(share) for share in plan)
    with sink_process(workdir, cpu=None) as (sink_url, attempts_log):
        config = write_config(workdir, store, sink_url, concurrency)
        pids: list[int] = []
        with contextlib.ExitStack() as stack:
            bases = [
                stack.enter_context(server_process(config, cpu=None, bench_server=False, pids=pids))
                for _ in range(replicas)
            ]
            cpu_before = sum(process_cpu_seconds(pid) for pid in pids)
            sent = uvloop.run(post_all(bases, plan, rate))
            first: dict[str, float] = {}  # Idempotency-Key -> first accepted arrival (wall)
            arrival: dict[tuple[int, int], float] = {}
            order: dict[int, list[int]] = defaultdict(list)
            duplicates = 0
            tail = AttemptsTail(attempts_log)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and len(arrival) < events:
                time.sleep(0.5)
                for attempt in tail.read_new():
                    if not (200 <= attempt.status < 300) or not attempt.ops:
                        continue
                    key = attempt.idempotency_key or ""
                    if key in first:
                        duplicates += 1
                        continue
                    first[key] = attempt.wall
                    for op in attempt.ops:
                        if op["op"] != "upsert":
                            continue
                        cid, version = int(op["customer_id"]), int(op["fields"]["rewards_balance"])
                        arrival.setdefault((cid, version), attempt.wall)
                        order[cid].append(version)
            cpu = sum(process_cpu_seconds(pid) for pid in pids) - cpu_before
            keys = outbox_keys(store, workdir)
    latest: dict[int, int] = {}
    for cid, version in sent:
        latest[cid] = max(latest.get(cid, 0), version)
    latencies = sorted(arrival[k] - sent[k] for k in arrival if k in sent)
    begin = min(sent.values())
    end = max(arrival.values()) if arrival else time.time()
    return Result(
        name=name,
        posted=len(sent),
        seconds=end - begin,
        delivered=len(arrival),
        p50=statistics.median(latencies) if latencies else float("nan"),
        p99=latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("nan"),
        outbox=len(keys),
        lost_ops=sum(1 for key in keys if key not in first),
        lost_customers=sum(1 for cid, v in latest.items() if (cid, v) not in arrival),
        duplicates=duplicates,
        reordered=sum(1 for versions in order.values() if versions != sorted(set(versions))),
        cpu=cpu,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=4800)
    parser.add_argument("--versions", type=int, default=4, help="per customer")
    parser.add_argument("--rate", type=float, default=600.0, help="offered events per second")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16, help="the http destination's")
    parser.add_argument("--replicas", default="1,2,3", help="PostgreSQL replica counts")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()

    customers = max(1, args.events // args.versions)
    plan: list[list[tuple[int, int]]] = [[] for _ in range(args.clients)]
    for version in range(1, args.versions + 1):  # one client per customer: versions in order
        for index in range(customers):
            plan[index % args.clients].append((800_000 + index, version))
    runs: list[tuple[str, str | None, int]] = []
    if not args.skip_sqlite:
        runs.append(("SQLite, 1 process", None, 1))
    runs += [
        (f"PostgreSQL, {n} replica{'s' * (n > 1)}", "pg", n)
        for n in map(int, args.replicas.split(","))
    ]
    results: list[Result] = []
    for name, kind, count in runs:
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
            work = Path(tmp)
            if kind is None:
                results.append(
                    run(name, "sqlite:///connector.db", 1, work, plan, args.rate, args.concurrency)
                )
            else:
                with postgres_database() as url:
                    results.append(run(name, url, count, work, plan, args.rate, args.concurrency))
        print(_line(results[-1]), flush=True)
    offered = customers * args.versions
    print(
        f"\n{offered} events ({customers} customers x {args.versions} versions) offered at "
        f"{args.rate:,.0f}/s by {args.clients} clients; http sink, batch_size 1, "
        f"concurrency {args.concurrency}"
    )
    print(
        f"{'run':<24}{'events/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'CPU ms/ev':>10}  "
        f"lost ops/customers  duplicated  reordered"
    )
    for r in results:
        print(_line(r))
    sqlite_rate = next((r.rate for r in results if r.name.startswith("SQLite")), None)
    pg_one = next((r.rate for r in results if r.name == "PostgreSQL, 1 replica"), None)
    if sqlite_rate and pg_one:
        ratio = pg_one / sqlite_rate
        verdict = "meets" if ratio >= 0.7 else "MISSES"
        print(f"PostgreSQL 1 replica / SQLite: {ratio:.2f} ({verdict} the 0.7 target)")
    clean = all(r.lost_ops == r.lost_customers == r.reordered == 0 for r in results)
    print("nothing lost or reordered" if clean else "LOST OR REORDERED EVENTS: see the table")


def _line(r: Result) -> str:
    return (
        f"{r.name:<24}{r.rate:>9,.0f}{r.p50 * 1000:>8.0f}{r.p99 * 1000:>8.0f}"
        f"{r.cpu / max(1, r.posted) * 1000:>10.2f}  {r.lost_ops:>8}/{r.lost_customers:<9}"
        f"{r.duplicates:>11}{r.reordered:>11}   ({r.delivered}/{r.posted} delivered, "
        f"{r.outbox} ops)"
    )


if __name__ == "__main__":
    main()
