"""End to end: events per second from POST to delivery at a local sink, the latency of each
event from its POST to the sink's receipt (p50/p99), and the connector's CPU per event at a
trickle and at saturation.

`connector serve` runs in its own process (with its pipeline process); the local sink (tests/
fakes/http_sink.py) runs in another and logs the wall-clock time of every request. Each event
is a new customer (one upsert each), posted by concurrent HTTP clients at a steady offered
rate. One server goes through the phases in turn: idle (no events), then each trickle rate of
``--rates`` (1, 10 and 100 events/s by default), then saturation (``--events`` offered at
``--rate``). Each phase ends when the sink has every event of it; its CPU is that of both
connector processes from the phase's first POST to its last delivery (the idle phase: over
``--idle-seconds``); ``recv ms/ev`` is the receiver's process alone (the rest of the CPU is its
pipeline process's). ``--history N`` gives the store a past first: N customers, each with a
processed event and a delivered operation, as weeks of retention leave them (a fresh store
hides every cost that grows with the tables).

Targets (issue 17): at saturation at least 3,000 events/s delivered with nothing missing
(about 0.3 ms of connector CPU per event, printed beside it, with the load generator and the
sink on the same two cores); at every trickle rate, CPU per event within 2x of the saturated
figure of the same run; at 100 events/s, p99 POST-to-sink under 100 ms (and no worse than the
29 ms measured before the issue); idle under 1% of a core.

The floor (``--floor``, on by default): at each trickle rate, what the same stack spends on an
event's two HTTP legs alone, with no store and no planning: the connector's own server
answering a no-op route (bench/_server.py, the receiver's process only) and the http
destination's client (connector/delivery/_h1.py) posting one operation to the sink (this
process). A trickle's
CPU per event cannot fall below the floor, so the floor's ratio to the saturated figure says
how much of the 2x a rate leaves for everything durable.

    python bench/pipeline.py [--rate 5000 --events 15000] [--rates 1,10,100] [--one-process]
                             [--history 200000] [--no-floor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    RawPoster,
    event_body,
    process_cpu_seconds,
    server_process,
    sink_process,
    webhook_poster,
    write_config,
)
from connector.delivery._h1 import H1Pool
from tests.fakes.http_sink import Attempt


def add_history(database: Path, customers: int, dispensary: str = "partnersandbox3") -> None:
    """``customers`` past customers in the store: each with a processed event (its body
    purged, as past retention), its state, its contact at the sink and a delivered upsert;
    ids below the bench's own, so none is met again."""
    now = time.time() - 86_400
    conn = sqlite3.connect(database, timeout=30)
    with conn:
        for start in range(0, customers, 10_000):
            ids = [str(100_000 + i) for i in range(start, min(customers, start + 10_000))]
            conn.executemany(
                "INSERT INTO inbox (dispensary, source, event_type, customer_id, last_update_us,"
                " received_at, body, status, processed_at) VALUES (?, 'webhook', 'CUSTOMER', ?,"
                " 1, ?, NULL, 'applied', ?)",
                [(dispensary, cid, now, now) for cid in ids],
            )
            conn.executemany(
                "INSERT INTO customers (dispensary, customer_id, last_update_us, content_hash,"
                " opt_out, merges, updated_at, opt_out_seen) VALUES (?, ?, 1, ?, 0, '[]', ?, 0)",
                [(dispensary, cid, f"{int(cid):064x}", now) for cid in ids],
            )
            conn.executemany(
                "INSERT INTO contacts (dispensary, customer_id, destination, contact_id,"
                " delivered_hash, unsubscribed, deactivated, ops_planned, updated_at)"
                " VALUES (?, ?, 'sink', ?, ?, 0, 0, 1, ?)",
                [(dispensary, cid, f"c-{cid}", f"{int(cid):064x}", now) for cid in ids],
            )
            conn.executemany(
                "INSERT INTO outbox (dispensary, destination, order_key, customer_id, op, payload,"
                " idempotency_key, status, attempts, created_at, next_attempt_at, done_at)"
                " VALUES (?, 'sink', ?, ?, 'upsert', '{}', ?, 'done', 1, ?, ?, ?)",
                [(dispensary, cid, cid, f"{int(cid):040x}", now, now, now) for cid in ids],
            )
    # the phases start from a settled store, not from a checkpoint of all of this
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def post_all(
    base: str, events: list[tuple[int, bytes]], rate: float, clients: int
) -> dict[int, float]:
    """POST every event over ``clients`` keep-alive connections, paced to ``rate`` per
    second; returns the wall time each was sent."""
    poster = webhook_poster(base)
    sent: dict[int, float] = {}
    pending = list(reversed(events))
    start = time.monotonic()
    count = 0

    async def client() -> None:
        nonlocal count
        conn = await poster.open()
        try:
            while pending:
                customer_id, body = pending.pop()
                due = start + count / rate
                count += 1
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent[customer_id] = time.time()
                status = await poster.post(conn, body)
                if status != 202:
                    raise RuntimeError(f"event {customer_id}: HTTP {status}")
        finally:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return sent


class AttemptsTail:
    """The sink's attempts log, read from where the last read stopped (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read_new(self) -> list[Attempt]:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [Attempt(**json.loads(line)) for line in data[:end].splitlines() if line.strip()]

    def read_all(self) -> list[Attempt]:
        """Every whole line of the log, from its start (the offset is left as it is)."""
        data = self.path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]
        return [Attempt(**json.loads(line)) for line in data.splitlines() if line.strip()]


@dataclass
class Phase:
    name: str
    events: int
    delivered: int
    seconds: float
    cpu: float
    latencies: list[float]
    receiver_cpu: float = 0.0  # of the cpu: the receiver's process alone (the rest: its child)
    machine_cpu: float = 0.0  # all cores' busy time meanwhile: connector, sink, load, kernel

    @property
    def cpu_per_event(self) -> float:
        return self.cpu / max(1, self.events)

    def percentile(self, share: float) -> float:
        if not self.latencies:
            return float("nan")
        return self.latencies[max(0, int(len(self.latencies) * share) - 1)]


def run_phase(
    name: str,
    base: str,
    tail: AttemptsTail,
    pids: list[int],
    events: list[tuple[int, bytes]],
    rate: float,
    clients: int,
) -> Phase:
    """Post ``events`` at ``rate`` and wait for the sink to have all of them."""
    cpu_before, receiver_before = connector_cpu(pids), receiver_cpu(pids)
    machine_before = machine_busy()
    # uvloop: the load generator's CPU is taken from the machine under test
    sent = uvloop.run(post_all(base, events, rate, min(clients, len(events))))
    deadline = time.monotonic() + 120
    received: dict[int, float] = {}
    while time.monotonic() < deadline and len(received) < len(sent):
        time.sleep(
            0.05 if rate < 50 else 0.5
        )  # only what is new: the reader's CPU is the machine's
        for attempt in tail.read_new():
            if 200 <= attempt.status < 300:
                for op in attempt.ops:
                    received.setdefault(int(op["customer_id"]), attempt.wall)
    cpu = connector_cpu(pids) - cpu_before
    receiver = receiver_cpu(pids) - receiver_before
    machine = machine_busy() - machine_before
    first = min(sent.values())
    last = max(received.values(), default=first)
    latencies = sorted(received[c] - sent[c] for c in received if c in sent)
    return Phase(name, len(sent), len(received), last - first, cpu, latencies, receiver, machine)


def machine_busy() -> float:
    """Seconds of CPU all cores spent busy so far (Linux /proc/stat: all but idle and
    iowait; 0 elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / tick


def connector_cpu(pids: list[int]) -> float:
    return process_cpu_seconds(pids[0])


def receiver_cpu(pids: list[int]) -> float:
    """The CPU of ``connector serve``'s own process, without its pipeline process."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        fields = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / tick


@dataclass
class Floor:
    rate: float
    receive: float  # CPU seconds per request of the receiver's process, no-op route
    send: float  # CPU seconds per request of the http destination's client posting one operation


def receive_floor(work: Path, sink_url: str, rates: list[float], seconds: float) -> list[float]:
    """Per rate: the receiver's CPU per request to the bench server's no-op route, posted
    alone at that rate (the same server stack and fast path as the webhook route)."""
    floor_dir = work / "floor"
    floor_dir.mkdir()
    config = write_config(floor_dir, sink_url)
    pids: list[int] = []
    out = []
    with server_process(config, cpu=None, bench_server=True, pids=pids) as base:
        host, port = base.removeprefix("http://").split(":")
        poster = RawPoster(
            host, int(port), "/noop/partnersandbox3", {"content-type": "application/json"}
        )
        body = event_body(1, 1)

        async def post(count: int, rate: float) -> None:
            conn = await poster.open()
            try:
                start = time.monotonic()
                for i in range(count):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if await poster.post(conn, body) != 202:
                        raise RuntimeError("the no-op route did not answer 202")
            finally:
                conn[1].close()

        uvloop.run(post(20, 20))  # warm-up
        time.sleep(1)
        for rate in rates:
            count = max(5, round(rate * seconds))
            before = receiver_cpu(pids)
            uvloop.run(post(count, rate))
            out.append((receiver_cpu(pids) - before) / count)
    return out


def send_floor(sink_url: str, op: dict[str, object], rate: float, seconds: float) -> float:
    """This process's CPU per request posting ``op`` alone at ``rate`` to the sink through
    the http destination's client (its ``HttpSink``'s :class:`H1Pool`)."""
    count = max(5, round(rate * seconds))

    async def post() -> float:
        pool = H1Pool(sink_url, limit=16, timeout=30)

        async def one(i: int) -> None:
            key = f"floor-{rate:g}-{i}"
            content = json.dumps({**op, "idempotency_key": key}).encode()
            headers = {"content-type": "application/json", "idempotency-key": key}
            response = await pool.post(content, headers)
            if not 200 <= response.status < 300:
                raise RuntimeError(f"the sink answered {response.status}")

        try:
            for i in range(5):  # warm-up: the connection and the first requests
                await one(-1 - i)
            cpu = time.process_time()
            start = time.monotonic()
            for i in range(count):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await one(i)
            return (time.process_time() - cpu) / count
        finally:
            await pool.aclose()

    return uvloop.run(post())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=15000, help="of the saturated phase")
    parser.add_argument("--rate", type=float, default=5000.0, help="offered at saturation, /s")
    parser.add_argument("--rates", default="1,10,100", help="trickle rates, events/s ('' none)")
    parser.add_argument("--trickle-seconds", type=float, default=20.0, help="of each trickle")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="0: no idle phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--history", type=int, default=0, help="past customers in the store before the phases"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="the http destination's")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="server.pipeline_process: false (receiver, planner and workers in one process)",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each trickle rate's floor: the HTTP legs alone, no store",
    )
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    next_id = 700_000

    def new_events(count: int) -> list[tuple[int, bytes]]:
        nonlocal next_id
        made = [(next_id + i, event_body(next_id + i, 1)) for i in range(count)]
        next_id += count
        return made

    phases: list[Phase] = []
    floors: list[Floor] = []
    idle_share = idle_receiver = None
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        with sink_process(work, cpu=None) as (sink_url, attempts_log):
            config = write_config(
                work, sink_url, batch_size=args.batch_size, pipeline_process=not args.one_process
            )
            pids: list[int] = []
            with server_process(config, cpu=None, bench_server=False, pids=pids) as base:
                tail = AttemptsTail(attempts_log)
                if args.history:
                    add_history(work / "connector.db", args.history)
                # a first event, not measured: connections, caches and the first batch warm up
                run_phase("warm-up", base, tail, pids, new_events(20), 20, 4)
                if args.idle_seconds > 0:
                    time.sleep(2)  # the warm-up's lingering ends
                    before, receiver_before = connector_cpu(pids), receiver_cpu(pids)
                    time.sleep(args.idle_seconds)
                    idle_share = (connector_cpu(pids) - before) / args.idle_seconds
                    idle_receiver = (receiver_cpu(pids) - receiver_before) / args.idle_seconds
                for rate in rates:
                    count = max(5, round(rate * args.trickle_seconds))
                    clients = 1 if rate <= 10 else 4
                    phases.append(
                        run_phase(f"{rate:g}/s", base, tail, pids, new_events(count), rate, clients)
                    )
                saturated = run_phase(
                    "saturated", base, tail, pids, new_events(args.events), args.rate, args.clients
                )
            if args.floor and rates:
                # after the connector has stopped: the floor's server and client run alone
                op = next(a.ops[0] for a in reversed(tail.read_all()) if a.ok and a.ops)
                receives = receive_floor(work, sink_url, rates, args.trickle_seconds)
                floors = [
                    Floor(rate, receive, send_floor(sink_url, op, rate, args.trickle_seconds))
                    for rate, receive in zip(rates, receives, strict=True)
                ]
    mode = "one process" if args.one_process else "receiver + pipeline process"
    print(
        f"http destination batch_size {args.batch_size}, {mode}, "
        f"{args.history:,} past customers in the store; "
        f"connector CPU counts both of its processes"
    )
    print(
        f"{'phase':<10} {'events':>7} {'delivered':>9} {'events/s':>9} {'CPU ms/ev':>9} "
        f"{'vs sat.':>7} {'p50 ms':>7} {'p99 ms':>7} {'recv ms/ev':>10}"
    )
    for phase in [*phases, saturated]:
        ratio = phase.cpu_per_event / saturated.cpu_per_event
        print(
            f"{phase.name:<10} {phase.events:>7} {phase.delivered:>9} "
            f"{phase.delivered / max(phase.seconds, 1e-9):>9,.0f} "
            f"{phase.cpu_per_event * 1e3:>9.3f} {ratio:>6.2f}x "
            f"{phase.percentile(0.5) * 1e3:>7.1f} {phase.percentile(0.99) * 1e3:>7.1f} "
            f"{phase.receiver_cpu / max(1, phase.events) * 1e3:>10.3f}"
        )
    throughput = saturated.delivered / max(saturated.seconds, 1e-9)
    missing = sum(p.events - p.delivered for p in [*phases, saturated])
    print(
        f"saturated: {throughput:,.0f} events/s end to end, "
        f"{saturated.cpu / saturated.seconds:.2f} cores of connector CPU busy"
    )
    rest = (saturated.machine_cpu - saturated.cpu) / max(1, saturated.delivered)
    if saturated.machine_cpu > 0:
        # what the two cores allow: the sink, the load generator and the kernel's share of an
        # event are the machine's too; were the connector's own 0.3 ms, the most would be...
        cores = os.cpu_count() or 1
        print(
            f"the rest of the machine (sink, load generator, kernel): {rest * 1e3:.3f} ms of "
            f"CPU per event; {cores} cores allow at most "
            f"{cores / (saturated.cpu_per_event + rest):,.0f} events/s at this split, "
            f"{cores / (0.0003 + rest):,.0f}/s were the connector's 0.3 ms"
        )
    for floor in floors:
        total = floor.receive + floor.send
        print(
            f"floor at {floor.rate:g}/s, the HTTP legs alone: receive {floor.receive * 1e3:.3f} + "
            f"send {floor.send * 1e3:.3f} = {total * 1e3:.3f} ms/ev, "
            f"{total / saturated.cpu_per_event:.2f}x saturated"
        )
    if idle_share is not None:
        print(
            f"idle: {idle_share * 100:.2f}% of a core over {args.idle_seconds:g} s "
            f"(the receiver's process {(idle_receiver or 0.0) * 100:.2f}%, the rest its "
            f"pipeline process)"
        )
    verdicts = [
        (
            throughput >= 3000 and missing == 0,
            f"at least 3,000 events/s end to end with nothing missing ({throughput:,.0f}/s, "
            f"{missing} missing)",
        ),
    ]
    for phase in phases:
        ratio = phase.cpu_per_event / saturated.cpu_per_event
        verdicts.append(
            (ratio <= 2.0, f"{phase.name}: CPU per event within 2x of saturated ({ratio:.2f}x)")
        )
        if phase.name == "100/s":
            p99 = phase.percentile(0.99) * 1e3
            verdicts.append(
                (p99 < 29.0, f"100/s: p99 under 29 ms, the figure before ({p99:.1f} ms)")
            )
    if idle_share is not None:
        verdicts.append((idle_share < 0.01, f"idle under 1% of a core ({idle_share * 100:.2f}%)"))
    for ok, what in verdicts:
        print(f"{'meets' if ok else 'MISSES'}: {what}")


if __name__ == "__main__":
    main()
