"""Webhook latency with hostile clients connected: p50/p99 of a steady stream of normal
webhooks (100/s for 20 s by default), first alone, then while slow and hostile clients hold
connections to the same `connector serve`, and the ratio of the two p99s, in the same run.

The hostile clients (issue 16, item 4; README, "Limits on clients"), each reconnecting as soon
as the server refuses or closes it, so the pressure lasts the whole phase: headers trickled a
byte a second (slowloris), bodies trickled a byte a second, 200 idle connections, 1 MiB bodies
sent over a minute, 3,000 headers, an oversized header, broken chunked framing. The server
runs with its default limits, in its own process beside its pipeline process and a local
sink; the hostile clients in a process of their own, the measured stream in this one (all on
the same machine). A third phase, alone again, shows how much the p99 moves by itself.

Run from the checkout: `PYTHONPATH=. python bench/hostile.py` (`connector serve` is the
virtual environment's script; PYTHONPATH makes it run this checkout's package).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    TOKEN,
    event_body,
    server_process,
    sink_process,
    webhook_poster,
    write_config,
)

PATH = "/webhooks/treez/partnersandbox3"
HEAD = (
    f"POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TOKEN}\r\n"
    "content-type: application/json\r\n"
)


def rss_mib(pid: int) -> float:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match[1]) / 1024 if match else 0.0


async def steady(
    base: str, rate: float, seconds: float, clients: int, first_id: int
) -> list[float]:
    """Normal webhooks at ``rate`` per second over ``clients`` keep-alive connections; the
    latency of each, POST to answer."""
    poster = webhook_poster(base)
    total = int(rate * seconds)
    latencies: list[float] = []
    start = time.monotonic()
    count = 0

    async def client() -> None:
        nonlocal count
        conn = await poster.open()
        try:
            while count < total:
                index = count
                count += 1
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = event_body(first_id + index, 1)
                began = time.perf_counter()
                status = await poster.post(conn, body)
                latencies.append(time.perf_counter() - began)
                if status != 202:
                    raise RuntimeError(f"a normal webhook got HTTP {status}")
        finally:
            conn[1].close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies


@dataclass(frozen=True, slots=True)
class Kind:
    """One hostile client: ``first`` at once, then ``trickle`` ``step`` bytes every ``every``
    seconds; after the server's answer (or close), ``pause`` seconds before it comes again."""

    first: bytes
    trickle: bytes = b""
    step: int = 1
    every: float = 1.0
    pause: float = 0.0


def kinds() -> dict[str, tuple[Kind, int]]:
    """Each kind of hostile client and how many of it are connected at once."""
    body = event_body(1, 1)
    mib = 1024 * 1024
    slow_head = "".join(f"x-slow-{i}: {'a' * 30}\r\n" for i in range(100))
    return {
        "slowloris": (Kind(b"", (HEAD + slow_head).encode()), 50),
        "slow_body": (Kind(f"{HEAD}content-length: {len(body)}\r\n\r\n".encode(), body), 50),
        "idle": (Kind(b""), 200),
        "mib_over_a_minute": (
            Kind(f"{HEAD}content-length: {mib}\r\n\r\n".encode(), b" " * mib, mib // 600, 0.1),
            5,
        ),
        "3000_headers": (
            Kind(
                (HEAD + "".join(f"x-h{i}: v\r\n" for i in range(3000)) + "\r\n").encode(), pause=1.0
            ),
            5,
        ),
        "oversized_header": (Kind(f"{HEAD}x-big: {'b' * 100_000}\r\n\r\n".encode(), pause=1.0), 5),
        "broken_chunked": (
            Kind(
                f"{HEAD}transfer-encoding: chunked\r\n\r\n5\r\n[1,2]\r\nzz\r\n".encode(), pause=1.0
            ),
            5,
        ),
    }


class Hostile:
    """The hostile clients, each reconnecting after its answer until the process is stopped;
    ``answers`` counts what they got (a status, "closed" without one, or "reset"), ``held``
    how many are connected and unanswered."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.answers: Counter[str] = Counter()
        self.held: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, kind: Kind, count: int) -> None:
        self.tasks.extend(asyncio.ensure_future(self._client(name, kind)) for _ in range(count))

    async def _client(self, name: str, kind: Kind) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.held[name] += 1
            answer = asyncio.ensure_future(reader.read(200))
            try:
                writer.write(kind.first)
                for start in range(0, len(kind.trickle), kind.step):
                    await asyncio.wait([answer], timeout=kind.every)
                    if answer.done():
                        break
                    writer.write(kind.trickle[start : start + kind.step])
                head = await answer
                status = head.split(b" ", 2)[1].decode() if head else "closed"
            except ConnectionError:
                status = "reset"
            finally:
                answer.cancel()
                writer.close()
                self.held[name] -= 1
            self.answers[f"{name} {status}"] += 1
            await asyncio.sleep(kind.pause)


async def hostile_process(base: str) -> None:
    """The hostile clients alone (this script with ``--hostile``), in a process of their own
    so that their work does not delay the measured stream's event loop; on SIGTERM, prints
    what they got as one JSON line."""
    host, port = base.removeprefix("http://").split(":")
    hostile = Hostile(host, int(port))
    for name, (kind, count) in kinds().items():
        hostile.start(name, kind, count)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    held = {name: n for name, n in hostile.held.items() if n}
    print(json.dumps({"answers": hostile.answers, "held": held}), flush=True)


def p99_ms(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000


async def run(base: str, pid: int, rate: float, seconds: float, clients: int) -> None:
    await steady(base, rate, 5, clients, 100_000)  # warm-up
    rss_before = rss_mib(pid)
    alone = await steady(base, rate, seconds, clients, 200_000)
    command = [sys.executable, __file__, "--hostile", base]
    hostile = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        await asyncio.sleep(2.0)  # all of them connected and trickling
        rss_connected = rss_mib(pid)
        beside = await steady(base, rate, seconds, clients, 300_000)
        rss_after = rss_mib(pid)
    finally:
        hostile.send_signal(signal.SIGTERM)
        out, _ = hostile.communicate(timeout=30)
    got = json.loads(out.strip().splitlines()[-1])
    again = await steady(base, rate, seconds, clients, 400_000)

    held = sum(count for _, count in kinds().values())
    print(f"steady stream: {rate:.0f} webhooks/s for {seconds:.0f} s over {clients} connections")
    for label, values in (("alone", alone), (f"{held} hostile", beside), ("alone again", again)):
        print(
            f"{label + ':':<14} p50 {statistics.median(values) * 1000:6.2f} ms, "
            f"p99 {p99_ms(values):6.2f} ms ({len(values)} webhooks)"
        )
    print(
        f"p99 ratio (hostile / alone): {p99_ms(beside) / p99_ms(alone):.2f} "
        f"(hostile / alone again: {p99_ms(beside) / p99_ms(again):.2f})"
    )
    print(
        f"server RSS: {rss_before:.0f} MiB alone, {rss_connected:.0f} MiB with the hostile "
        f"clients connected, {rss_after:.0f} MiB at the end of that phase"
    )
    answers = ", ".join(f"{kind} {n}" for kind, n in sorted(got["answers"].items()))
    print(f"what the hostile clients got: {answers}")
    print(f"still connected, unanswered, at the end: {got['held']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="normal webhooks per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="of each phase")
    parser.add_argument("--clients", type=int, default=4, help="connections of the stream")
    parser.add_argument("--hostile", metavar="BASE_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hostile:
        uvloop.run(hostile_process(args.hostile))
        return
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        with sink_process(work, cpu=None) as (sink_url, _):
            config = write_config(work, sink_url)
            pids: list[int] = []
            with server_process(config, cpu=None, bench_server=False, pids=pids) as base:
                uvloop.run(run(base, pids[0], args.rate, args.seconds, args.clients))


if __name__ == "__main__":
    main()
