"""What the ``reconcile``, ``status`` and ``dlq`` commands do, apart from parsing flags.

``reconcile`` runs one reconciliation now and, unless ``--no-wait``, delivers its operations
with this process's own claiming workers (alongside ``serve``'s, if it runs: a claim is
exclusive, so no operation goes out twice, and a customer's operations go in order), their
planner in a child process (:mod:`connector.reconcile_child`) while this one pulls.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from connector.config import Config
from connector.delivery.worker import DeliveryWorker
from connector.metrics import replica_id
from connector.pipeline import Deployment, build_worker, process_batch
from connector.reconcile import Reconciler, RunOptions, RunReport, iso
from connector.reconcile_child import PlanningProcess
from connector.store import COUNT_KEYS, AsyncStore, Store, open_store
from connector.store.abc import Lease, RegisteredProcess, Replayed

Echo = Callable[[str], None]
HEARTBEAT_SECONDS = 5.0
PLAN_LIMIT = 256  # events a planning batch takes at most
PLAN_LINGER_SECONDS = 0.05  # after a wake-up, the planner waits this long for more pages
# the wait for delivery looks at the queue after the first of these, then each 1.5 times
# longer up to the last (each look counts the dispensary's operations)
DELIVERY_POLL_SECONDS = (0.02, 0.1)


PLAIN_EVERY_SECONDS = 5.0  # a line this often when stderr is a log, not a terminal


@dataclass(slots=True)
class _Step:
    what: str
    unit: str
    total: int | None
    started: float
    done: int = 0
    more: dict[str, int] = field(default_factory=dict)
    printed: float = 0.0


class CommandProgress:
    """How far a long command has got, on stderr, in counts only: never a customer's value.

    On a terminal, a rich bar (a spinner while the total is unknown) with the count, the rate
    and the time taken. Elsewhere (a cron job's log) a plain line every ``every`` seconds and
    one when a step ends: a log keeps no carriage return or escape sequence readable.
    A command runs its steps one after the other: :meth:`start` ends the step before.
    """

    def __init__(self, stream: TextIO | None = None, *, every: float = PLAIN_EVERY_SECONDS) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.every = every
        console = Console(file=self.stream)
        # isatty first: FORCE_COLOR or TTY_COMPATIBLE would make rich draw into a pipe
        self._console = console if self.stream.isatty() and console.is_interactive else None
        self._step: _Step | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def start(self, what: str, unit: str, total: int | None = None) -> None:
        """Begin a step counting ``unit`` (``total`` of them, when it is known)."""
        self.done()
        self._step = _Step(what, unit, total, started=time.monotonic())
        if self._console is not None:
            self._bar = Progress(
                _BarOrSpinner(),
                TextColumn("{task.description}"),
                _CountColumn(),
                _RateColumn(),
                TimeElapsedColumn(),
                console=self._console,
            )
            self._task = self._bar.add_task(what, total=total, unit=unit, more={})
            self._bar.start()

    def update(self, done: int, **more: int) -> None:
        """``done`` units so far; ``more``: other counts to show beside it (``pages=12``)."""
        step = self._step
        if step is None:
            return
        step.done, step.more = done, more
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done, more=more)
            return
        now = time.monotonic()
        if now - max(step.printed, step.started) >= self.every:
            step.printed = now
            self._print(step, now)

    def done(self) -> None:
        """End the step: the bar stays drawn with its last counts, or a last plain line."""
        step, self._step = self._step, None
        if step is None:
            return
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None
            return
        self._print(step, time.monotonic())

    def _print(self, step: _Step, now: float) -> None:
        seconds = now - step.started
        rate = step.done / seconds if seconds > 0 else 0.0
        count = _count(step.done, step.total, step.unit, step.more)
        self.stream.write(f"{step.what}: {count} ({rate:,.1f}/s, {seconds:.1f} s)\n")
        self.stream.flush()


def _count(done: int, total: int | None, unit: str, more: dict[str, int]) -> str:
    text = f"{done:,} {unit}" if total is None else f"{done:,}/{total:,} {unit}"
    return ", ".join([text, *(f"{n:,} {name}" for name, n in more.items())])


class _BarOrSpinner(ProgressColumn):
    """A bar once the total is known; until then, a spinner (a bar would only pulse)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=30)
        self._spinner = SpinnerColumn()

    def render(self, task: Task) -> RenderableType:
        return self._spinner.render(task) if task.total is None else self._bar.render(task)


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> RenderableType:
        total = None if task.total is None else int(task.total)
        return Text(_count(int(task.completed), total, task.fields["unit"], task.fields["more"]))


class _RateColumn(ProgressColumn):
    """Units a second: rich's estimate over its recent samples, else the mean so far."""

    def render(self, task: Task) -> RenderableType:
        rate = task.finished_speed or task.speed
        if rate is None:
            elapsed = task.elapsed
            rate = task.completed / elapsed if elapsed else 0.0
        return Text(f"{rate:,.1f}/s")


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
    progress: CommandProgress | None = None,
    reconciler_options: dict[str, Any] | None = None,
) -> RunReport:
    workers: dict[tuple[str, str], DeliveryWorker] = {}
    deliver = wait and not options.dry_run
    # with delivery, the planner runs in a process of its own (connector/reconcile_child.py),
    # forked before this one opens its store or starts a thread
    child = None
    if deliver:
        _import_store(config.store)
        child = PlanningProcess(config, _Planner, partial(_wake, workers))
        child.start()
    stopping = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    planner: _Planner | None = None
    reconciler: Reconciler | None = None
    astore: AsyncStore | None = None
    registered = False  # in the store's processes: its claims and leases released at the end
    try:
        store = open_store(config.store, timeout=config.store_timeout_seconds, listen=False)
        astore = AsyncStore(store)
        deployment = Deployment.from_config(config)
        # the workers, the planner and their heartbeat start once the run holds the
        # dispensary's lock (``locked``): a run refused (another holds it) has taken no
        # delivery lease, which would keep the process really delivering from claiming until
        # it looked again, and has planned nothing

        async def locked() -> None:
            nonlocal planner, registered
            assert astore is not None
            if deliver:
                registered = True  # released at the end even if registering fails midway
                await astore.call(store.register_process)
                for dest_config in config.dispensaries[dispensary].destinations:
                    worker = build_worker(astore, dispensary, dest_config, idle_poll=0.2)
                    workers[(dispensary, dest_config.name)] = worker
                    tasks.append(asyncio.create_task(worker.run(stopping)))
                tasks.append(asyncio.create_task(_heartbeat(astore, stopping)))
                assert reconciler is not None  # made before its run calls this
                reconciler.destinations = {key: w.destination for key, w in workers.items()}
            if child is not None:
                await child.connect()
            else:
                planner = _Planner(astore, deployment, partial(_wake, workers))
                tasks.append(asyncio.create_task(planner.run(stopping)))

        async def plan() -> None:
            await (child.plan() if child is not None else _planner(planner).plan())

        async def settle(seconds: float) -> None:
            await (
                child.settle(seconds) if child is not None else _planner(planner).settle(seconds)
            )

        reconciler = Reconciler(
            config,
            astore,
            deployment,
            plan=plan,
            settle=settle,
            **(reconciler_options or {}),
        )
        started = time.monotonic()
        pulled = None
        if progress is not None:
            progress.start("pulling from Treez", "customers")
            pulled = _pull_progress(progress)
        report = await reconciler.run(dispensary, options, pulled, locked=locked)
        if progress is not None:
            progress.done()
        if deliver:
            await _wait_for_delivery(astore, dispensary, report.high_water, timeout, echo, progress)
        _print_report(report, time.monotonic() - started, echo, deliver=deliver, wait=wait)
        return report
    finally:
        if progress is not None:
            progress.done()
        if reconciler is not None:
            await reconciler.aclose()
        if child is not None:
            await child.stop(config.server.shutdown_grace_seconds)
        stopping.set()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if astore is not None and registered:
            with contextlib.suppress(Exception):
                await astore.call(astore.store.release_claims)
        for worker in workers.values():
            await worker.destination.aclose()
        if planner is not None:
            planner.lane.close()
        if astore is not None:
            astore.close()


def _planner(planner: _Planner | None) -> _Planner:
    """The planner of this process, started once the run holds its lock."""
    assert planner is not None, "the run plans only once it holds its lock"
    return planner


def _import_store(url: str) -> None:
    """Import the store's modules (and its migrations') before the fork: once, not in each
    process. Nothing is opened."""
    import connector.store.migrate

    if url.startswith("sqlite"):
        import connector.store.sqlite
    else:
        import connector.store.postgres  # noqa: F401


def _wake(
    workers: dict[tuple[str, str], DeliveryWorker], touched: Iterable[tuple[str, str]]
) -> None:
    """Wake the workers of the destinations a planning batch fed."""
    for key in touched:
        worker = workers.get(key)
        if worker is not None:
            worker.wake.set()


class _Planner:
    """Plans the pending events (this run's, and any webhook's) in a store lane of its own,
    woken after each committed page, and says which destinations it fed (``touched``: their
    workers are woken): the run stores the next page meanwhile, and a batch carries whatever
    came in since the last (up to :data:`PLAN_LIMIT` events, gathered for
    :data:`PLAN_LINGER_SECONDS` until the run's pages are all in, see :meth:`settle`). It
    calls ``planned`` each time all that was pending is planned. A planning failure fails
    the run at its next page. With delivery, it runs in a process of its own
    (:mod:`connector.reconcile_child`)."""

    def __init__(
        self,
        astore: AsyncStore,
        deployment: Deployment,
        touched: Callable[[Iterable[tuple[str, str]]], None],
        planned: Callable[[], None] = lambda: None,
    ) -> None:
        self.lane = astore.lane("planner")
        self.deployment = deployment
        self.touched = touched
        self.on_planned = planned
        self.wake = asyncio.Event()
        self.planned = asyncio.Event()
        self.hurry = False  # no page is coming to batch with: plan at once
        self.error: Exception | None = None

    async def plan(self) -> None:
        """What the reconciler awaits after each page: a wake-up, or the planner's failure."""
        if self.error is not None:
            raise self.error
        self.wake.set()

    async def settle(self, seconds: float) -> None:
        """The reconciler's ``settle``: plan what is pending at once, from now on without
        lingering for pages, and wait up to ``seconds`` for it."""
        self.hurry_up()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.planned.wait(), seconds)
        if self.error is not None:
            raise self.error

    def hurry_up(self) -> None:
        self.hurry = True
        self.planned.clear()
        self.wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while True:
            waits = [
                asyncio.ensure_future(self.wake.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if stopping.is_set():
                return
            if not self.hurry:
                # a moment for more pages to come in: a batch costs a dozen statements
                # whatever its size
                await asyncio.sleep(PLAN_LINGER_SECONDS)
            self.wake.clear()
            try:
                while True:
                    result = await self.lane.call(
                        process_batch, self.lane.store, self.deployment, PLAN_LIMIT
                    )
                    if result.touched:
                        self.touched(result.touched)
                    # fewer than asked: all that was pending is planned (a page committed
                    # since has woken this loop again); stopping: what is left waits
                    if result.events < PLAN_LIMIT or stopping.is_set():
                        break
            except Exception as exc:
                self.error = exc
                self.planned.set()
                return
            self.planned.set()
            self.on_planned()


def _pull_progress(progress: CommandProgress) -> Callable[[int, int], None]:
    def pulled(pages: int, customers: int) -> None:
        progress.update(customers, pages=pages)

    return pulled


async def _wait_for_delivery(
    astore: AsyncStore,
    dispensary: str,
    high_water: int,
    timeout: float,
    echo: Echo,
    progress: CommandProgress | None,
) -> None:
    """Wait until the operations up to the run's ``high_water`` are delivered or dead.

    The bar's total is what is still open when the pull ends: the workers deliver while the
    run pulls, and the store counts only open operations, not a run's delivered ones.
    """
    store = astore.store
    deadline = time.monotonic() + timeout
    total = await astore.call(store.open_operations, dispensary, high_water)
    if progress is not None and total:
        progress.start("delivering", "operations", total)
    still_open = total
    wait = DELIVERY_POLL_SECONDS[0]
    while still_open:
        if time.monotonic() > deadline:
            if progress is not None:
                progress.done()
            echo(f"delivery still going after {timeout:.0f} s: serve will finish it")
            break
        await asyncio.sleep(wait)
        wait = min(wait * 1.5, DELIVERY_POLL_SECONDS[1])
        still_open = await astore.call(store.open_operations, dispensary, high_water)
        if progress is not None:
            progress.update(max(0, total - still_open))
    if progress is not None:
        progress.done()


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


def replay_dead_letters(
    store: Store,
    *,
    dispensary: str | None = None,
    destination: str | None = None,
    customer: str | None = None,
    progress: CommandProgress | None = None,
) -> Replayed:
    """What ``connector dlq replay`` does: the matching dead letters back in the queue,
    counted first so the bar has a total."""
    total = _dead_letter_total(store, dispensary, destination, customer)
    if progress is None or not total:
        return store.replay(dispensary=dispensary, destination=destination, customer=customer)
    progress.start("replaying", "dead letters", total)
    try:
        return store.replay(
            dispensary=dispensary,
            destination=destination,
            customer=customer,
            progress=progress.update,
        )
    finally:
        progress.done()


def _dead_letter_total(
    store: Store, dispensary: str | None, destination: str | None, customer: str | None
) -> int:
    """How many dead letters ``replay`` will go through with these filters (as it does: not
    replayed yet, any age). The store counts per destination; one customer's are few."""
    if customer is None:
        return sum(
            n
            for (d, t), n in store.dead_counts().items()
            if dispensary in (None, d) and destination in (None, t)
        )
    found = store.dead_letters(
        dispensary=dispensary, destination=destination, customer=customer, limit=2**31 - 1
    )
    return len(found)
