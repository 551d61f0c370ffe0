"""End to end: events per second from POST to delivery at a local sink, and the latency of
each event from its POST to the sink's receipt (p50/p99).

`connector serve` runs in its own process on one core; the local sink (tests/fakes/
http_sink.py) runs in another and logs the wall-clock time of every request. Each event is a
new customer (one upsert each), posted by concurrent HTTP clients at a steady offered rate,
so the figure is what the whole pipeline sustains: receive, commit, plan, deliver. Target:
at least 500 events/s with SQLite on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    TOKEN,
    RawPoster,
    event_body,
    process_cpu_seconds,
    server_process,
    sink_process,
    write_config,
)
from tests.fakes.http_sink import Attempt


async def post_all(
    base: str, events: list[tuple[int, bytes]], rate: float, clients: int
) -> dict[int, float]:
    """POST every event over ``clients`` keep-alive connections, paced to ``rate`` per
    second; returns the wall time each was sent."""
    host, port = base.removeprefix("http://").split(":")
    poster = RawPoster(
        host, int(port), "/webhooks/treez/partnersandbox3",
        {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )  # fmt: skip
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=800.0, help="offered events per second")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1, help="the http destination's")
    parser.add_argument(
        "--one-process", action="store_true",
        help="server.pipeline_process: false (receiver, planner and workers in one process)",
    )  # fmt: skip
    args = parser.parse_args()

    events = [(700_000 + i, event_body(700_000 + i, 1)) for i in range(args.events)]
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        with sink_process(work, cpu=None) as (sink_url, attempts_log):
            config = write_config(
                work, sink_url, batch_size=args.batch_size, pipeline_process=not args.one_process
            )
            pids: list[int] = []
            with server_process(config, cpu=None, bench_server=False, pids=pids) as base:
                cpu_before = process_cpu_seconds(pids[0])
                # uvloop: the load generator's CPU is taken from the machine under test
                sent = uvloop.run(post_all(base, events, args.rate, args.clients))
                deadline = time.monotonic() + 120
                received: dict[int, float] = {}
                tail = AttemptsTail(attempts_log)
                while time.monotonic() < deadline and len(received) < len(sent):
                    time.sleep(0.5)  # read only what is new: the reader's CPU is the machine's
                    for attempt in tail.read_new():
                        if 200 <= attempt.status < 300:
                            for op in attempt.ops:
                                cid = int(op["customer_id"])
                                received.setdefault(cid, attempt.wall)
                cpu_used = process_cpu_seconds(pids[0]) - cpu_before
    missing = len(sent) - len(received)
    latencies = sorted(received[c] - sent[c] for c in received if c in sent)
    first, last = min(sent.values()), max(received.values())
    throughput = len(received) / (last - first)
    posting = len(sent) / (max(sent.values()) - first)
    mode = "one process" if args.one_process else "receiver + pipeline process"
    print(f"{len(sent)} events posted at {posting:,.0f}/s offered ({args.clients} clients), "
          f"http destination batch_size {args.batch_size}, {mode}")  # fmt: skip
    print(f"delivered {len(received)} (missing {missing}) in {last - first:.1f} s: "
          f"{throughput:,.0f} events/s end to end")  # fmt: skip
    print(f"connector CPU (receiver and pipeline processes): {cpu_used / len(sent) * 1e3:.2f} ms "
          f"per event, {cpu_used / (last - first):.2f} cores busy")  # fmt: skip
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"POST → sink latency: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    verdict = "meets" if throughput >= 500 and missing == 0 else "MISSES"
    print(f"{verdict} the target of 500 events/s with nothing missing")


if __name__ == "__main__":
    main()
