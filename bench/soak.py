"""Soak: a real `connector serve` under a steady load for minutes, sampled every 10 s, to show
that memory, open files and the SQLite write-ahead log stay flat and that nothing is lost.

The run: ``--rate`` webhook events per second (200 by default) for ``--minutes`` (10), each an
update of one of ``--customers`` customers (a customer's versions come round every
customers / rate seconds, so the store holds updates as well as new rows); the local sink
(tests/fakes/http_sink.py) answers 5 % of its calls 500, so retries and back-off happen for
real, and a few dead letters: an operation dies after ``--min-attempts`` (3) failed attempts,
however soon (min_elapsed_seconds 0; the default policy would make one a rarity); the
Treez fake serves ``--treez-customers`` customers and changes ``--churn`` of them a second,
and the service's own scheduler reconciles every 2 minutes (the first run pulls all of them).

Every 10 s: RSS and open files (/proc) of the server and of its pipeline child, the size of the
store file and of its WAL, events posted (answered 202), operations delivered (unique, from
the sink's attempts log), the sink's failed calls, dead letters and queue depth (the service's
/metrics). Printed as a table as it goes and again at the end, and drawn to a PNG (``--plot``).

Targets (each printed meets/MISSES): after a 1-minute warm-up, each process's RSS grows less
than 10 % (last load sample against the first after warm-up); the warm-up lasts until the
first reconciliation has finished if that is later (it pulls every Treez customer and sets up
the Treez client once: a one-time step of about 8 MiB in the pipeline process, which read as
growth whenever the cron's first tick fell after the first minute); the WAL stays below the store's
journal_size_limit (connector/store/_engine.py WAL_SIZE_LIMIT_BYTES); open files do not grow
(the last load sample is no higher than the highest of the first minute after warm-up);
nothing is lost (every webhook customer's latest accepted version, and every Treez change made
before the last reconciliation that finished, reached the sink or the dead letters).

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 200] [--plot soak.png]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (
    ROOT,
    TOKEN,
    event_body,
    fake_process,
    server_process,
    sink_process,
    webhook_poster,
)
from bench._plot import Chart
from bench.pipeline import AttemptsTail
from connector.store._engine import WAL_SIZE_LIMIT_BYTES

DISPENSARY = "partnersandbox3"
FIRST_WEBHOOK_ID = 700_000  # far above the Treez fake's ids (1000, 1001, ...)
SAMPLE_EVERY = 10.0
WARM_UP = 60.0
RSS_GROWTH_LIMIT = 0.10
CHURN_FIRST_VALUE = 1_000_000  # rewards_balance of Treez changes: above any generated one
MIB = 1024 * 1024


def write_config(
    work: Path, sink_url: str, treez_port: int, *, schedule: str, min_attempts: int
) -> Path:
    (work / "http.yaml").write_bytes((ROOT / "mappings" / "http.yaml").read_bytes())
    path = work / "config.yaml"
    path.write_text(
        f"""
store: sqlite:///connector.db
server: {{host: 127.0.0.1, port: 8080, log_level: info, pipeline_process: true}}
dispensaries:
  {DISPENSARY}:
    webhook_token: {TOKEN}
    treez:
      api_url: http://127.0.0.1:{treez_port}/v2.0/dispensary/{DISPENSARY}
      client_id: treez_test_client
      api_key: treez_test_apikey
    reconcile:
      schedule: "{schedule}"
      initial_lookback_hours: 8784
    destinations:
      - name: sink
        type: http
        url: {sink_url}
        mapping: http.yaml
        concurrency: 16
        batch_size: 1
        retry: {{initial_seconds: 0.2, max_seconds: 2, min_attempts: {min_attempts},
                min_elapsed_seconds: 0}}
"""
    )
    return path


# ---- the Treez fake, changing customers as it serves ------------------------------------------


def treez_fake_main(argv: Sequence[str]) -> int:
    """``python -m bench.soak --treez-fake --port 0 ...``: the Treez fake (its rate limit on)
    with a thread that changes ``--churn`` customers a second (a new rewards_balance each time,
    counting up from CHURN_FIRST_VALUE) and appends ``wall customer_id value`` to ``--log``."""
    from tests.fakes._serve import DEFAULT_LOOP, bind_socket, make_server, serve_until_signalled
    from tests.fakes.treez_api import TreezFake

    parser = argparse.ArgumentParser(prog="bench.soak --treez-fake")
    parser.add_argument("--treez-fake", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--customers", type=int, required=True)
    parser.add_argument("--churn", type=float, required=True, help="changes a second")
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    fake = TreezFake(customers=args.customers, seed=1, dispensary=DISPENSARY)
    statuses = {cid: (fake.customer(cid) or {}).get("status") for cid in fake.customer_ids()}
    active = [cid for cid, status in statuses.items() if status != "DEACTIVATED"]

    def churn() -> None:
        rng = random.Random(1)
        value = CHURN_FIRST_VALUE
        started = time.monotonic()
        with args.log.open("a") as log:
            while True:
                value += 1
                time.sleep(
                    max(0.0, started + (value - CHURN_FIRST_VALUE) / args.churn - time.monotonic())
                )
                cid = rng.choice(active)
                fake.update(cid, rewards_balance=value)
                log.write(f"{time.time():.3f} {cid} {value}\n")
                log.flush()

    if args.churn > 0:
        threading.Thread(target=churn, daemon=True, name="churn").start()
    sock = bind_socket(port=args.port)
    return serve_until_signalled(make_server(fake, DEFAULT_LOOP, quiet=False), sock)


# ---- load -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Load:
    """Webhook events posted by a background thread until ``stop`` is set."""

    base: str
    rate: float
    customers: int
    clients: int = 4
    posted: int = 0
    refused: int = 0
    latest: dict[int, int] = dataclasses.field(default_factory=dict)  # customer -> version
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            uvloop.run(self._post())
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    async def _post(self) -> None:
        poster = webhook_poster(self.base, DISPENSARY)
        start = time.monotonic()
        count = 0

        async def client() -> None:
            nonlocal count
            conn = await poster.open()
            try:
                while not self.stop.is_set():
                    number = count
                    count += 1
                    delay = start + number / self.rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    customer = FIRST_WEBHOOK_ID + number % self.customers
                    version = number // self.customers + 1
                    status = await poster.post(conn, event_body(customer, version))
                    if status == 202:
                        self.posted += 1
                        self.latest[customer] = max(version, self.latest.get(customer, 0))
                    else:
                        self.refused += 1
            finally:
                conn[1].close()

        await asyncio.gather(*(client() for _ in range(self.clients)))


# ---- what reached the sink --------------------------------------------------------------------


def balance(op: dict[str, Any]) -> int | None:
    """The rewards_balance an operation carries (the version of a bench event), if any."""
    fields = op.get("fields")
    value = fields.get("rewards_balance") if isinstance(fields, dict) else None
    return value if isinstance(value, int) else None


@dataclasses.dataclass
class SinkView:
    """The sink's attempts log, read as it grows: unique operations delivered (of webhook
    customers, of the Treez fake's), failed calls, and the highest rewards_balance delivered
    per customer."""

    tail: AttemptsTail
    webhook_keys: set[str] = dataclasses.field(default_factory=set)
    treez_keys: set[str] = dataclasses.field(default_factory=set)
    failed: int = 0
    best: dict[str, int] = dataclasses.field(default_factory=dict)

    def update(self) -> None:
        for attempt in self.tail.read_new():
            if not attempt.ok:
                self.failed += 1
                continue
            for op in attempt.ops:
                cid = str(op.get("customer_id"))
                webhook = cid.isdigit() and int(cid) >= FIRST_WEBHOOK_ID
                keys = self.webhook_keys if webhook else self.treez_keys
                keys.add(str(op.get("idempotency_key")))
                value = balance(op)
                if value is not None and value > self.best.get(cid, -1):
                    self.best[cid] = value


# ---- samples ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float  # seconds since the load started
    phase: str  # load | drain
    rss_server: float  # MiB
    rss_pipeline: float
    fds_server: int
    fds_pipeline: int
    store: float  # MiB
    wal: float
    posted: int
    delivered: int  # unique operations of webhook customers
    treez_ops: int  # unique operations of the Treez fake's customers (reconciliation)
    failed: int  # the sink's non-2xx answers
    dead: int
    queue: int
    runs: int  # reconciliations finished
    pipeline_pid: int


# (heading, Sample attribute, width, format)
COLUMNS = (
    ("t s", "t", 5, "{:.0f}"),
    ("phase", "phase", 5, "{}"),
    ("RSS srv", "rss_server", 7, "{:.1f}"),
    ("RSS pipe", "rss_pipeline", 8, "{:.1f}"),
    ("fds srv", "fds_server", 7, "{}"),
    ("fds pipe", "fds_pipeline", 8, "{}"),
    ("store MiB", "store", 9, "{:.1f}"),
    ("WAL MiB", "wal", 7, "{:.2f}"),
    ("posted", "posted", 8, "{:,}"),
    ("delivered", "delivered", 9, "{:,}"),
    ("Treez ops", "treez_ops", 9, "{:,}"),
    ("sink 5xx", "failed", 8, "{:,}"),
    ("dead", "dead", 4, "{}"),
    ("queue", "queue", 6, "{:,}"),
    ("recon", "runs", 5, "{}"),
)


def table_header() -> str:
    return " ".join(f"{name:>{width}}" for name, _, width, _ in COLUMNS)


def table_row(sample: Sample) -> str:
    return " ".join(
        f"{fmt.format(getattr(sample, attr)):>{width}}" for _, attr, width, fmt in COLUMNS
    )


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def pipeline_child(server_pid: int) -> int:
    """The pid of the server's pipeline process (``connector.pipeline_child``), 0 if none.
    Read from every process's parent pid: /proc/PID/task/TID/children is not reliable while
    the processes run (proc(5))."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if (
                parent == server_pid
                and b"connector.pipeline_child" in Path(f"/proc/{entry}/cmdline").read_bytes()
            ):
                return int(entry)
        except (OSError, IndexError, ValueError):
            continue
    return 0


def file_mib(path: Path) -> float:
    try:
        return path.stat().st_size / MIB
    except OSError:
        return 0.0


@dataclasses.dataclass
class Scraper:
    """The service's /metrics: dead letters, queue depth, reconciliations finished (each new
    end time of the last-run gauge is one more run)."""

    base: str
    run_ends: set[str] = dataclasses.field(default_factory=set)
    dead: int = 0
    queue: int = 0

    def update(self) -> None:
        try:
            text = httpx.get(f"{self.base}/metrics", timeout=5).text
        except httpx.HTTPError:
            return
        dead = queue = 0.0
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("connector_dead_operations{"):
                dead += float(value)
            elif name.startswith("connector_queue_depth{"):
                queue += float(value)
            elif name.startswith("connector_last_reconcile_timestamp_seconds{"):
                self.run_ends.add(value)
        self.dead, self.queue = int(dead), int(queue)


# ---- targets ----------------------------------------------------------------------------------


def warm_up_end(samples: Sequence[Sample]) -> float:
    """When the warm-up ends: :data:`WARM_UP` seconds into the load, or the first sample that
    counts a finished reconciliation if that is later (its one-time costs are not growth)."""
    first_run = next((s.t for s in samples if s.phase == "load" and s.runs > 0), 0.0)
    return max(WARM_UP, first_run)


def rss_growth(samples: Sequence[Sample], attr: str) -> tuple[float, float, float]:
    """(first after warm-up, last, growth) of an RSS series over the load samples."""
    end = warm_up_end(samples)
    steady = [s for s in samples if s.phase == "load" and s.t >= end]
    if not steady:
        raise ValueError("no load sample after the warm-up: run for longer than a minute")
    first, last = getattr(steady[0], attr), getattr(steady[-1], attr)
    return first, last, (last / first - 1) if first else float("inf")


def fds_flat(samples: Sequence[Sample], attr: str) -> tuple[int, int, bool]:
    """(plateau, last, flat): the plateau is the highest count of the first half of the load
    after warm-up (at least its first minute: a connection a pool opens at the first
    reconciliation is a step, not a leak); flat when the last load sample is no higher."""
    end = warm_up_end(samples)
    steady = [s for s in samples if s.phase == "load" and s.t >= end]
    if not steady:
        raise ValueError("no load sample after the warm-up: run for longer than a minute")
    half = max(60.0, (steady[-1].t - steady[0].t) / 2)
    plateau = max(getattr(s, attr) for s in steady if s.t < steady[0].t + half)
    last = getattr(steady[-1], attr)
    return plateau, last, last <= plateau


def lost(expected: dict[str, int], *reached: dict[str, int]) -> list[str]:
    """Customers whose expected value reached none of ``reached`` (at that value or above)."""
    return [
        cid
        for cid, value in expected.items()
        if max((r.get(cid, -1) for r in reached), default=-1) < value
    ]


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


# ---- the store, once the server stopped --------------------------------------------------------


@contextmanager
def read_store(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def dead_balances(conn: sqlite3.Connection) -> dict[str, int]:
    best: dict[str, int] = {}
    for cid, payload in conn.execute("SELECT customer_id, payload FROM dead_letters"):
        op = json.loads(payload)
        value = balance(op) if isinstance(op, dict) else None
        if value is not None and value > best.get(cid, -1):
            best[cid] = value
    return best


def churn_expected(log: Path, before_wall: float) -> dict[str, int]:
    """The last value each Treez customer was given before ``before_wall``."""
    expected: dict[str, int] = {}
    if not log.exists():
        return expected
    for line in log.read_text().splitlines():
        wall, cid, value = line.split()
        if float(wall) < before_wall:
            expected[cid] = int(value)
    return expected


# ---- the run ----------------------------------------------------------------------------------


def plot(path: Path, samples: Sequence[Sample], run_starts: Sequence[float]) -> None:
    xs = [s.t for s in samples]

    def series(name: str, attr: str) -> tuple[str, list[float], list[float]]:
        return name, xs, [float(getattr(s, attr)) for s in samples]

    chart = Chart(2, 4)
    panels = [
        ("RSS (MIB)", [series("SERVER", "rss_server"), series("PIPELINE", "rss_pipeline")]),
        ("OPEN FILES", [series("SERVER", "fds_server"), series("PIPELINE", "fds_pipeline")]),
        ("STORE FILE (MIB)", [series("CONNECTOR.DB", "store")]),
        ("WAL (MIB)", [series("CONNECTOR.DB-WAL", "wal")]),
        ("EVENTS", [series("POSTED", "posted"), series("DELIVERED", "delivered")]),
        ("SINK FAILED CALLS", [series("5XX", "failed")]),
        ("QUEUE DEPTH", [series("PENDING+INFLIGHT", "queue")]),
        ("DEAD LETTERS", [series("DEAD", "dead")]),
    ]
    for index, (title, lines) in enumerate(panels):
        chart.panel(
            index, title, lines, x_label="SECONDS (DOTS: RECONCILIATIONS)", marks=run_starts
        )
    chart.save(path)


def main() -> None:
    if "--treez-fake" in sys.argv[1:]:
        sys.exit(treez_fake_main(sys.argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="of load")
    parser.add_argument("--rate", type=float, default=200.0, help="offered events per second")
    parser.add_argument("--customers", type=int, default=20_000, help="webhook customers")
    parser.add_argument("--fail", type=float, default=0.05, help="share of sink calls failed")
    parser.add_argument("--min-attempts", type=int, default=3, help="before a dead letter")
    parser.add_argument("--treez-customers", type=int, default=2000)
    parser.add_argument("--churn", type=float, default=2.0, help="Treez changes a second")
    parser.add_argument("--schedule", default="*/2 * * * *", help="reconciliation (cron)")
    parser.add_argument("--drain", type=float, default=180.0, help="seconds, at most")
    parser.add_argument("--plot", type=Path, default=Path("soak.png"))
    args = parser.parse_args()
    if args.minutes * 60 < 2 * WARM_UP:
        parser.error(f"--minutes: at least {2 * WARM_UP / 60:g} (a warm-up, then a minute)")
    import connector

    print(f"connector from {Path(connector.__file__).parent}")
    plot_path = args.plot.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        churn_log = work / "treez-changes.log"
        treez = fake_process(
            "bench.soak",
            "--treez-fake",
            "--customers",
            str(args.treez_customers),
            "--churn",
            str(args.churn),
            "--log",
            str(churn_log),
        )
        sink = sink_process(work, "--fail-500", str(args.fail), "--seed", "7", cpu=None)
        with treez as treez_port, sink as (sink_url, attempts_log):
            config = write_config(
                work, sink_url, treez_port, schedule=args.schedule, min_attempts=args.min_attempts
            )
            pids: list[int] = []
            with server_process(config, cpu=None, bench_server=False, pids=pids) as base:
                samples, load, view, started_wall, drained_at = soak(
                    args, base, pids[0], work, attempts_log
                )
        with read_store(work / "connector.db") as conn:
            dead = dead_balances(conn)
            runs = conn.execute(
                "SELECT trigger, started_at, ended_at, outcome, counts FROM reconcile_runs "
                "ORDER BY id"
            ).fetchall()
            outbox = conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall()
        finished = [
            r for r in runs if r[3] == "succeeded" and r[2] is not None and r[2] <= drained_at
        ]
        churn = churn_expected(churn_log, finished[-1][1] - 1.0) if finished else {}
    report(args, samples, load, view, dead, runs, outbox, churn, started_wall, plot_path)


def soak(
    args: argparse.Namespace, base: str, server_pid: int, work: Path, attempts_log: Path
) -> tuple[list[Sample], Load, SinkView, float, float]:
    """Post for ``args.minutes``, then wait for the queue to empty; sample every 10 s. Returns
    the samples, the load, the sink's view and the wall times the load started and the drain
    ended."""
    load = Load(base, args.rate, args.customers)
    view = SinkView(AttemptsTail(attempts_log))
    scraper = Scraper(base)
    store = work / "connector.db"
    samples: list[Sample] = []
    pipeline_pids: set[int] = set()
    print(
        f"{args.rate:.0f} events/s offered for {args.minutes:g} min to {args.customers:,} "
        f"customers; sink fails {args.fail:.0%} of calls; Treez fake: "
        f"{args.treez_customers:,} customers, {args.churn:g} changes/s, reconcile "
        f"{args.schedule!r}"
    )
    print(table_header(), flush=True)
    thread = threading.Thread(target=load.run, daemon=True, name="load")
    started, started_wall = time.monotonic(), time.time()

    def take(phase: str) -> None:
        view.update()
        scraper.update()
        pipeline = pipeline_child(server_pid)
        pipeline_pids.add(pipeline)
        sample = Sample(
            t=time.monotonic() - started,
            phase=phase,
            rss_server=rss_mib(server_pid),
            rss_pipeline=rss_mib(pipeline),
            fds_server=open_files(server_pid),
            fds_pipeline=open_files(pipeline),
            store=file_mib(store),
            wal=file_mib(store.with_name(store.name + "-wal")),
            posted=load.posted,
            delivered=len(view.webhook_keys),
            treez_ops=len(view.treez_keys),
            failed=view.failed,
            dead=scraper.dead,
            queue=scraper.queue,
            runs=len(scraper.run_ends),
            pipeline_pid=pipeline,
        )
        samples.append(sample)
        print(table_row(sample), flush=True)

    take("start")
    thread.start()
    load_end = started + args.minutes * 60
    drain_end = load_end + args.drain
    next_sample = started + SAMPLE_EVERY
    phase = "load"
    while True:
        now = time.monotonic()
        if phase == "load" and now >= load_end:
            load.stop.set()
            thread.join(timeout=30)
            phase = "drain"
        if load.error is not None:
            raise RuntimeError("the load generator failed") from load.error
        if now >= next_sample:
            take(phase)
            next_sample += SAMPLE_EVERY
        if phase == "drain":
            view.update()
            scraper.update()
            # done when the queue is empty and every customer not yet seen at the sink may be
            # one of the dead letters (which ones is read from the store once it is stopped)
            missing = lost({str(c): v for c, v in load.latest.items()}, view.best)
            if (scraper.queue == 0 and len(missing) <= scraper.dead) or now >= drain_end:
                take("end")
                break
        time.sleep(1.0 if phase == "drain" else min(1.0, max(0.0, next_sample - now)))
    if len(pipeline_pids) > 1:
        print(f"note: the pipeline process changed during the run ({len(pipeline_pids)} pids)")
    return samples, load, view, started_wall, time.time()


def report(
    args: argparse.Namespace,
    samples: list[Sample],
    load: Load,
    view: SinkView,
    dead: dict[str, int],
    runs: list[tuple[Any, ...]],
    outbox: list[tuple[Any, ...]],
    churn: dict[str, int],
    started_wall: float,
    plot_path: Path,
) -> None:
    print()
    print("all samples:")
    print(table_header())
    for sample in samples:
        print(table_row(sample))
    print()
    print("reconciliation runs (start s, seconds, outcome, counts):")
    for trigger, start, end, outcome, counts in runs:
        took = f"{end - start:.1f}" if end is not None else "-"
        print(f"  {trigger:<8} {start - started_wall:>7.0f} {took:>6} {outcome:<10} {counts}")
    print("outbox at the end: " + ", ".join(f"{status} {n:,}" for status, n in outbox))
    print(
        f"posted {load.posted:,} events (refused {load.refused:,}) to {len(load.latest):,} "
        f"customers; the sink took {len(view.webhook_keys):,} unique operations of them and "
        f"{len(view.treez_keys):,} of the Treez fake's customers, and failed {view.failed:,} "
        f"calls; the dead letters hold operations of {len(dead):,} customers"
    )
    plot(plot_path, samples, [r[1] - started_wall for r in runs])
    print()
    checks = []
    for name, attr in (("server", "rss_server"), ("pipeline", "rss_pipeline")):
        first, last, growth = rss_growth(samples, attr)
        ok = growth < RSS_GROWTH_LIMIT
        checks.append(ok)
        print(
            f"{verdict(ok)}: {name} RSS after the {warm_up_end(samples):.0f} s warm-up "
            f"{first:.1f} -> "
            f"{last:.1f} MiB ({growth:+.1%}; target < +{RSS_GROWTH_LIMIT:.0%})"
        )
    wal_max = max(s.wal for s in samples)
    ok = wal_max * MIB < WAL_SIZE_LIMIT_BYTES
    checks.append(ok)
    print(
        f"{verdict(ok)}: WAL at most {wal_max:.2f} MiB (bound: the store's journal_size_limit, "
        f"{WAL_SIZE_LIMIT_BYTES / MIB:.0f} MiB)"
    )
    for name, attr in (("server", "fds_server"), ("pipeline", "fds_pipeline")):
        plateau, last, ok = fds_flat(samples, attr)
        checks.append(ok)
        print(
            f"{verdict(ok)}: {name} open files {last} at the end of the load, highest of the "
            f"first half after warm-up {plateau} (target: no growth)"
        )
    webhook_lost = lost({str(c): v for c, v in load.latest.items()}, view.best, dead)
    churn_lost = lost(churn, view.best, dead)
    ok = not webhook_lost and not churn_lost and bool(churn or args.churn == 0)
    checks.append(ok)
    if not churn and args.churn:
        print("no reconciliation finished during the run: the Treez changes were not checked")
    print(
        f"{verdict(ok)}: nothing lost: {len(load.latest) - len(webhook_lost):,} of "
        f"{len(load.latest):,} webhook customers' latest version and "
        f"{len(churn) - len(churn_lost):,} of {len(churn):,} Treez changes made before the "
        f"last finished reconciliation reached the sink or the dead letters"
    )
    print(f"plot: {plot_path}")
    print(f"{verdict(all(checks))} the soak targets")


if __name__ == "__main__":
    main()
