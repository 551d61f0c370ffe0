"""What the ``reconcile``, ``status`` and ``dlq`` commands do, apart from parsing flags.

``reconcile`` runs one reconciliation now and, unless ``--no-wait``, delivers its operations
with this process's own claiming workers (alongside ``serve``'s, if it runs: a claim is
exclusive, so no operation goes out twice, and a customer's operations go in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from connector.config import Config
from connector.delivery.worker import DeliveryWorker
from connector.metrics import replica_id
from connector.pipeline import Deployment, build_worker, process_batch
from connector.reconcile import Reconciler, RunOptions, RunReport, iso
from connector.store import COUNT_KEYS, AsyncStore, Store, open_store
from connector.store.abc import Lease, RegisteredProcess

Echo = Callable[[str], None]
HEARTBEAT_SECONDS = 5.0


class ProgressLine:
    """``pages 12  customers 600`` rewritten in place on a terminal; silent elsewhere."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0

    def __call__(self, pages: int, customers: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self.stream.write(f"\rpages {pages:,}  customers {customers:,}")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\n")
            self.stream.flush()


def _counts_line(counts: dict[str, Any]) -> str:
    keys = [k for k in COUNT_KEYS if k != "pulled"]
    parts = [f"{k.replace('_', ' ')} {counts.get(k, 0):,}" for k in keys]
    return f"pulled {counts.get('pulled', 0):,}: " + ", ".join(parts)


async def reconcile_now(
    config: Config,
    dispensary: str,
    options: RunOptions,
    *,
    wait: bool,
    timeout: float,
    echo: Echo,
    progress: ProgressLine | None = None,
    reconciler_options: dict[str, Any] | None = None,
) -> RunReport:
    store = open_store(config.store, timeout=config.store_timeout_seconds, listen=False)
    astore = AsyncStore(store)
    deployment = Deployment.from_config(config)
    workers: dict[tuple[str, str], DeliveryWorker] = {}
    stopping = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    deliver = wait and not options.dry_run
    if deliver:
        await astore.call(store.register_process)
        for dest_config in config.dispensaries[dispensary].destinations:
            workers[(dispensary, dest_config.name)] = build_worker(
                astore, dispensary, dest_config, idle_poll=0.2
            )
        tasks = [asyncio.create_task(w.run(stopping)) for w in workers.values()]

    async def plan() -> None:
        """Plan what is pending (this run's events, and any webhook's) and wake the workers."""
        while True:
            result = await astore.call(process_batch, store, deployment, 256)
            for key in result.touched:
                if key in workers:
                    workers[key].wake.set()
            if not result.events:
                return

    reconciler = Reconciler(
        config, astore, deployment, plan=plan,
        destinations={key: w.destination for key, w in workers.items()},
        **(reconciler_options or {}),
    )  # fmt: skip
    started = time.monotonic()
    if deliver:
        tasks.append(asyncio.create_task(_heartbeat(astore, stopping)))
    try:
        report = await reconciler.run(dispensary, options, progress)
        if progress is not None:
            progress.done()
        if deliver:
            runs = store
            deadline = time.monotonic() + timeout
            while await astore.call(runs.open_operations, dispensary, report.high_water):
                if time.monotonic() > deadline:
                    echo(f"delivery still going after {timeout:.0f} s: serve will finish it")
                    break
                await asyncio.sleep(0.1)
        _print_report(report, time.monotonic() - started, echo, deliver=deliver, wait=wait)
        return report
    finally:
        await reconciler.aclose()
        stopping.set()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await astore.call(store.release_claims)
        for worker in workers.values():
            await worker.destination.aclose()
        astore.close()


async def _heartbeat(astore: AsyncStore, stopping: asyncio.Event) -> None:
    """Keep this process's claims alive while its workers deliver (as serve does), so no
    other process takes them back and delivers an operation twice."""
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), HEARTBEAT_SECONDS)
        if not stopping.is_set():
            with contextlib.suppress(Exception):
                await astore.call(astore.store.heartbeat)


def _print_report(
    report: RunReport, seconds: float, echo: Echo, *, deliver: bool, wait: bool
) -> None:
    name = report.dispensary
    if report.run_id is None:  # a dry run
        echo(f"reconcile {name}: dry run in {seconds:.1f} s, nothing stored or sent")
        echo(f"  pulled from {report.pulled_from:%Y-%m-%dT%H:%M:%S%z}, {report.pages} pages")
        echo("  " + ", ".join(f"{k} {v:,}" for k, v in sorted(report.counts.items())))
        if not report.planned_ops:
            echo("  no operations would be sent")
        for (destination, op), count in sorted(report.planned_ops.items()):
            echo(f"  would send {destination}: {count:,} {op}")
        for line in report.examples:
            echo(f"    e.g. {line}")
        return
    echo(f"reconcile {name}: {report.outcome} in {seconds:.1f} s (run {report.run_id})")
    echo(
        f"  pulled from {report.pulled_from:%Y-%m-%dT%H:%M:%S%z}, {report.pages} pages; "
        f"checkpoint {iso(report.checkpoint_before_us) or 'none'} -> "
        f"{iso(report.checkpoint_after_us) or 'none'}"
    )
    echo("  " + _counts_line(report.counts))
    replayed = report.replayed
    if replayed is not None:
        echo(
            f"  dead letters sent again {replayed.replayed:,} "
            f"(superseded {replayed.superseded:,}, not replayable {replayed.unreplayable:,}); "
            f"contacts looked up {report.looked_up:,}, missing {report.missing:,}"
        )
    if not wait:
        echo("  delivery left to serve (--no-wait)")


def status_lines(config: Config, *, now: float | None = None) -> list[str]:
    """What ``connector status`` prints: per dispensary its last run; per destination its
    queues (the cluster's, from the store) and which process delivers for it (holds its
    lease); then the processes registered in the cluster."""
    store = open_store(config.store, timeout=config.store_timeout_seconds, listen=False)
    try:
        runs = store
        last = runs.last_runs()
        queues = {(q["dispensary"], q["destination"]): q for q in store.queue_stats()}
        dead = runs.dead_counts()
        conflicts = runs.conflict_counts()
        leases = {lease.name: lease for lease in store.leases()}
        paused = {(p.dispensary, p.destination): p for p in store.pauses()}
        registered = store.registered_processes()
    finally:
        store.close()
    now = time.time() if now is None else now
    known = {p.id: p for p in registered}
    lines = []
    for name, disp in config.dispensaries.items():
        lines.append(f"{name}")
        run = last.get(name)
        if run is None:
            state = "never reconciled" if disp.reconciles else "reconciliation off"
            lines.append(f"  last run: {state}")
        else:
            ended = run["ended_at"] or run["started_at"]
            when = datetime.fromtimestamp(ended, UTC).isoformat(timespec="seconds")
            lines.append(f"  last run {run['id']}: {run['outcome']} at {when} ({run['trigger']})")
            lines.append("    " + _counts_line(run["counts"]))
            if run["error"]:
                lines.append(f"    error: {run['error']}")
        for dest in disp.destinations:
            q = queues.get((name, dest.name), {})
            lines.append(
                f"  {dest.name}: pending {q.get('pending', 0):,}, in flight "
                f"{q.get('inflight', 0):,}, dead letters {dead.get((name, dest.name), 0):,}"
            )
            lease = leases.get(f"deliver:{name}/{dest.name}")
            lines.append("    " + _lease_line(lease, known, now))
            pause = paused.get((name, dest.name))
            if pause is not None:
                status = "" if pause.status_code is None else f" (HTTP {pause.status_code})"
                lines.append(
                    f"    paused until {_when(pause.until)} for its quota{status}, since "
                    f"{_when(pause.since)}: {pause.reason}"
                )
        found = {k: v for (d, k), v in conflicts.items() if d == name}
        if found:
            lines.append(
                "  conflicts: " + ", ".join(f"{k} {v:,}" for k, v in sorted(found.items()))
            )
    lines.append(f"processes: {len(registered)}")
    for process in registered:
        beat = max(0.0, now - process.heartbeat_at)
        lines.append(
            f"  {replica_id(process.id)}  {process.host} pid {process.pid}  started "
            f"{_when(process.started_at)}  heartbeat {beat:.0f} s ago"
        )
    return lines


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def _lease_line(lease: Lease | None, known: dict[str, RegisteredProcess], now: float) -> str:
    """Who delivers for a destination: the live holder of its ``deliver:`` lease."""
    if lease is None:
        return "delivered by: nobody now (no running process holds its lease)"
    holder = replica_id(lease.holder)
    process = known.get(lease.holder)
    where = f" ({process.host} pid {process.pid})" if process is not None else ""
    if lease.expires_at < now:
        lapsed = _when(lease.expires_at)
        return f"delivered by: nobody (the lease of {holder}{where} lapsed at {lapsed})"
    return f"delivered by: {holder}{where}, lease until {_when(lease.expires_at)}"


def dlq_lines(store: Store, **filters: Any) -> list[str]:
    letters = store.dead_letters(**filters)
    if not letters:
        return ["no dead letters"]
    lines = []
    for d in letters:
        when = datetime.fromtimestamp(d.created_at, UTC).isoformat(timespec="seconds")
        status = "-" if d.status_code is None else str(d.status_code)
        replayed = " (replayed)" if d.replayed_at else ""
        lines.append(
            f"{d.id:>6}  {when}  {d.dispensary}/{d.destination}  customer {d.customer_id}  "
            f"{d.op}  attempts {d.attempts}  status {status}{replayed}\n        {d.reason[:300]}"
        )
    return lines
