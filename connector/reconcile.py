"""Reconciliation: pull the customers Treez changed since the checkpoint and feed them to the
planner as events from source ``reconcile``, so webhooks and pulls can never disagree.

A run, for one dispensary:

1. takes the store lock ``reconcile:<dispensary>`` (renewed while it runs; a second run of
   the same dispensary, in this process or another, is refused with :class:`ReconcileBusy`
   naming the run holding it). A dry run takes it too: it pulls as a run does, and Treez
   allows 10 requests a second per store while each process paces only its own;
2. pulls pages from the checkpoint minus ``overlap_minutes`` (no checkpoint yet:
   ``initial_lookback_hours`` ago; ``--full``: everything), each page committed to the inbox
   as events of this run and planned (by this process, or by ``serve``'s planner);
3. advances the checkpoint to what is committed: at the end of the run by default, after
   every page with ``paging: anchored`` (see :data:`PAGING_NOTE`);
4. sends dead letters older than ``redrive_after_minutes`` again (at most ``redrive_max``),
   and looks up a sample of contacts where the destination can, to report missing ones;
5. stores the run: start, end, checkpoints, counts, outcome.

Memory stays flat: one page at a time, counts kept in the store (``inbox.run_id``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar, cast

from connector.config import Config, DispensaryConfig
from connector.delivery.base import Destination
from connector.errors import ConnectorError, EventValidationError
from connector.logs import get_logger
from connector.pipeline import Deployment, plan_without_writing
from connector.planner import Operation, instant_us
from connector.store import AsyncStore, InboxRow, NewEvent, Rejected, Replayed
from connector.treez import (
    MAX_DEPTH,
    ReceivedCustomer,
    check_customer,
    check_event_json,
    leave_out_deep,
    readable_name,
)
from connector.treez_api import TreezClient

log = get_logger("connector.reconcile")
T = TypeVar("T")

LOCK_TTL_SECONDS = 60.0
AHEAD_PAGES = 10  # pages fetched ahead of the one stored, paced: a second's worth at most
FIRST_POLL_SECONDS = 0.01  # the first wait for the run's last events to be planned
TREEZ_WINDOW_SECONDS = 1.0  # Treez's limit counts requests in any one second
FULL_SINCE = datetime(2000, 1, 1, tzinfo=UTC)
ONE_MS_US = 1000
FUTURE_SLACK_US = 5 * 60 * 1_000_000  # clocks differ; beyond this a last_update is wrong
CLOCK_SLACK_US = 1_000_000  # between Treez's clock and ours
PAGING_NOTE = (
    "numbered paging is right whatever order Treez lists customers in; anchored paging "
    "(each page asks again from the last customer's last_update) never skips a customer "
    "that moves while the run pages, but only if Treez lists in last_update order"
)

Trigger = Literal["schedule", "command"]
Progress = Callable[[int, int], None]  # pages, customers
Checked = tuple[str, int] | EventValidationError  # (customer id, last_update in us), or why not


class ReconcileBusy(ConnectorError):
    """Another run of the same dispensary holds the lock."""


# what a lock's holder says of its run (see :func:`_holder`), as a refusal names it
_KINDS = {"schedule": "a scheduled run", "command": "a command run", "dry-run": "a dry run"}


def _holder(token: str, kind: str) -> str:
    """The lock holder of a reconciler's runs of one kind: its token first (unique to the
    reconciler, kept whatever the host's name is cut to), then which run it is and where, for
    a refused run to name who holds the lock. At most 64 characters (the column). The same
    for each run of that kind: a lock the reconciler could not release (its store was gone)
    is its own to take again at its next run, as before."""
    host = socket.gethostname().replace(" ", "_")[:32] or "?"
    return f"{token} {kind} {host} {os.getpid()}"[:64]


def _who(holder: str) -> str:
    """A lock's holder as a refusal says it: the run and its process, when the holder is one
    :func:`_holder` made; otherwise (an older version's token, a test's name) as it is."""
    parts = holder.split(" ")
    if len(parts) == 4 and parts[1] in _KINDS:
        _, kind, host, pid = parts
        return f"{_KINDS[kind]} on host {host}, pid {pid}"
    return f"holder {holder!r}"


class ReconcileNotConfigured(ConnectorError):
    """The dispensary has no ``treez`` section, or reconciliation is off."""


@dataclass(frozen=True, slots=True)
class Pulled:
    """A pulled customer, checked once (:func:`_pulled`): its event's ``body`` built from the
    JSON text Treez sent, or its ``record`` (decoded, the careful path) to build it from, or,
    refused, its ``text`` when ``json`` cannot decode it."""

    checked: Checked
    body: str | None = None
    record: dict[str, Any] | None = None
    text: str | None = None

    @property
    def version(self) -> int | None:
        return self.checked[1] if isinstance(self.checked, tuple) else None


@dataclass(frozen=True, slots=True)
class RunOptions:
    since: datetime | None = None  # pull from here, ignoring the checkpoint
    full: bool = False  # everything, ignoring the checkpoint
    resend: bool = False  # ignore change detection too
    dry_run: bool = False  # plan and report, store and send nothing
    trigger: Trigger = "command"


@dataclass(slots=True)
class RunReport:
    dispensary: str
    run_id: int | None
    outcome: str = "running"
    counts: dict[str, int] = field(default_factory=dict)
    pages: int = 0
    checkpoint_before_us: int | None = None
    checkpoint_after_us: int | None = None
    pulled_from: datetime | None = None
    replayed: Replayed | None = None
    missing: int = 0
    looked_up: int = 0
    future: int = 0  # customers whose last_update is in the future (kept out of checkpoints)
    error: str | None = None
    high_water: int = 0  # the outbox id the run's operations are at or below
    planned_ops: Counter[tuple[str, str]] = field(default_factory=Counter)  # dry run
    examples: list[str] = field(default_factory=list)  # dry run: a few operations, no values


def _moment(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)


def iso(us: int | None) -> str | None:
    return None if us is None else _moment(us).isoformat(timespec="milliseconds")


class Reconciler:
    """Runs reconciliations against one store.

    ``plan``: awaited after each committed page and until the run's events are planned; the
    ``reconcile`` command plans them itself, ``serve`` wakes its planner. ``settle``: once
    the pages are all committed, awaited with a number of seconds until the run's events are
    planned: plan what is pending now (no page is coming to batch it with) and wait up to
    that long for it; by default, ``plan`` and a sleep. ``client_for``
    builds the Treez client of a dispensary (tests give one talking to the fake).
    ``destinations``: adapters to look contacts up with (optional).
    """

    def __init__(
        self,
        config: Config,
        astore: AsyncStore,
        deployment: Deployment,
        *,
        plan: Callable[[], Awaitable[None]],
        settle: Callable[[float], Awaitable[None]] | None = None,
        client_for: Callable[[str, DispensaryConfig], TreezClient] | None = None,
        destinations: dict[tuple[str, str], Destination] | None = None,
        poll_seconds: float = 0.05,
    ) -> None:
        self.config = config
        self.astore = astore
        self.runs = astore.store
        self.deployment = deployment
        self._plan = plan
        self._settle = settle or self._plan_and_sleep
        self._client_for = client_for or _default_client
        self.destinations = destinations or {}
        self.poll_seconds = poll_seconds
        self.token = uuid.uuid4().hex[:12]  # this reconciler's, in its lock holders
        # the dispensaries this reconciler runs now: its holder is one for all its runs of a
        # kind (so it takes back a lock it could not release), and the store's acquire
        # renews a lock for its own holder, so a second run here is refused here
        self._running: set[str] = set()
        # one client per dispensary for the life of this reconciler: its token is reused
        # across runs until it nears expiry (Treez checks this), its pace shared by them
        self._clients: dict[str, TreezClient] = {}

    async def _plan_and_sleep(self, seconds: float) -> None:
        await self._plan()
        await asyncio.sleep(seconds)

    def client(self, dispensary: str, disp: DispensaryConfig) -> TreezClient:
        found = self._clients.get(dispensary)
        if found is None:
            found = self._clients[dispensary] = self._client_for(dispensary, disp)
        return found

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def run(
        self,
        dispensary: str,
        options: RunOptions = RunOptions(),
        progress: Progress | None = None,
        *,
        locked: Callable[[], Awaitable[None]] | None = None,
    ) -> RunReport:
        """Run a reconciliation of ``dispensary`` (a dry run too) under its lock.
        ``locked``: awaited once the lock is held, before anything is pulled or stored (the
        command starts its delivery there: a run refused starts nothing, takes no delivery
        lease); a failure of it fails the run, which is then not recorded."""
        disp = self.config.dispensaries.get(dispensary)
        if disp is None:
            raise ReconcileNotConfigured(f"no dispensary {dispensary!r} in the configuration")
        if disp.treez is None:
            raise ReconcileNotConfigured(
                f"dispensaries.{dispensary}.treez is not set (or reconcile.enabled is false): "
                "reconciliation needs the Treez API credentials"
            )
        lock = f"reconcile:{dispensary}"
        holder = _holder(self.token, "dry-run" if options.dry_run else options.trigger)
        if dispensary in self._running:
            raise ReconcileBusy(await self._busy(dispensary, lock))
        self._running.add(dispensary)
        try:
            return await self._run_locked(dispensary, disp, options, progress, locked, holder)
        finally:
            self._running.discard(dispensary)

    async def _run_locked(
        self,
        dispensary: str,
        disp: DispensaryConfig,
        options: RunOptions,
        progress: Progress | None,
        locked: Callable[[], Awaitable[None]] | None,
        holder: str,
    ) -> RunReport:
        """:meth:`run` once no other run of this reconciler holds ``dispensary``: its lock
        taken in the store (or refused), held while it runs, released after."""
        lock = f"reconcile:{dispensary}"
        if not await self.astore.call(self.runs.acquire, lock, holder, LOCK_TTL_SECONDS):
            raise ReconcileBusy(await self._busy(dispensary, lock))
        running = asyncio.current_task()
        assert running is not None
        renewal = asyncio.create_task(self._renew(lock, holder, running))
        try:
            if locked is not None:
                await locked()
            if options.dry_run:
                return await self._dry_run(dispensary, disp, options, progress)
            return await self._run(dispensary, disp, options, progress)
        except asyncio.CancelledError:
            if renewal.done() and not renewal.cancelled() and renewal.result():
                raise ReconcileBusy(
                    f"the reconciliation of {dispensary} lost its lock (paused longer than "
                    f"{LOCK_TTL_SECONDS:.0f} s?): stopped, another run may have taken over"
                ) from None
            raise
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            with contextlib.suppress(Exception):
                await self.astore.call(self.runs.release, lock, holder)

    async def _busy(self, dispensary: str, lock: str) -> str:
        """Why a run is refused: the dispensary, and who holds its lock (when it can be read:
        the refusal is what matters)."""
        why = f"a reconciliation of {dispensary} is already running"
        try:
            leases = await self.astore.call(self.runs.leases)
        except Exception:
            return f"{why}: try again when it has ended"
        found = next((lease for lease in leases if lease.name == lock), None)
        if found is None:  # released since: ended a moment ago
            return f"{why} (it has just ended): try again"
        return f"{why}: {_who(found.holder)} holds its lock {lock}; try again when it has ended"

    async def _renew(self, lock: str, holder: str, running: asyncio.Task[Any]) -> bool:
        """Renew the lock every quarter of its lifetime; if it was lost (taken by another
        holder after it expired), cancel the run and return True."""
        renewed_at = time.monotonic()
        while True:
            await asyncio.sleep(LOCK_TTL_SECONDS / 4)
            try:
                held = await self.astore.call(self.runs.renew, lock, holder, LOCK_TTL_SECONDS)
            except Exception as exc:
                log.warning("reconcile_lock_renewal_failed", error=exc)
                held = time.monotonic() - renewed_at < LOCK_TTL_SECONDS
            else:
                renewed_at = time.monotonic()
            if not held:
                log.warning("reconcile_lock_lost", reason="renewal failed or lock taken")
                running.cancel()
                return True

    async def _after_previous_run(self, dispensary: str) -> None:
        """Start no sooner than a second after the dispensary's previous run ended: Treez
        allows 10 requests in any second per store, and that run may have been another
        process's (another replica's), whose pacing this process cannot see."""
        last = await self.astore.call(self.runs.runs, dispensary, 1)
        ended = last[0]["ended_at"] if last else None
        if ended is not None:
            gap = float(ended) + TREEZ_WINDOW_SECONDS - time.time()
            if gap > 0:
                await asyncio.sleep(min(gap, TREEZ_WINDOW_SECONDS))

    def _start(self, disp: DispensaryConfig, before_us: int | None, options: RunOptions) -> int:
        if options.full:
            return instant_us(FULL_SINCE)
        if options.since is not None:
            return instant_us(options.since)
        if before_us is not None:
            return before_us - int(disp.reconcile.overlap_minutes * 60 * 1_000_000)
        lookback = timedelta(hours=disp.reconcile.initial_lookback_hours)
        return instant_us(datetime.now(UTC) - lookback)

    async def _run(
        self,
        dispensary: str,
        disp: DispensaryConfig,
        options: RunOptions,
        progress: Progress | None,
    ) -> RunReport:
        # the Treez client is built (its TLS context takes tens of milliseconds) in a thread
        # while the run is stored; it sends nothing before the pages
        building = asyncio.ensure_future(asyncio.to_thread(self.client, dispensary, disp))
        try:
            await self.astore.call(self.runs.close_interrupted, dispensary)
            await self._after_previous_run(dispensary)
            before_us = await self.astore.call(self.runs.checkpoint, dispensary)
            start_us = self._start(disp, before_us, options)
            recorded = {
                "full": options.full,
                "resend": options.resend,
                "since": None if options.since is None else options.since.isoformat(),
            }
        except BaseException:
            # no run recorded: the client, once built, is dropped (it has sent nothing)
            building.add_done_callback(_dropped)
            raise
        # the run's row may be committed by the store's thread before a cancel reaches this
        # task: the call is shielded, and a run stopped while it is stored is still recorded
        # (failed, below) rather than left "running" until the next run closes it
        starting = asyncio.ensure_future(
            self.astore.call(self.runs.start_run, dispensary, options.trigger, recorded, before_us)
        )
        stopped: asyncio.CancelledError | None = None
        while True:
            try:
                run_id = await asyncio.shield(starting)
                break
            except asyncio.CancelledError as exc:
                # the store's thread finishes the write in its own time; once it has, the
                # run is recorded failed (below) and the cancel goes on
                stopped = stopped or exc
            except BaseException:
                building.add_done_callback(_dropped)
                if stopped is not None:
                    raise stopped from None
                raise
        report = RunReport(
            dispensary, run_id, checkpoint_before_us=before_us, pulled_from=_moment(start_us)
        )
        log.info(
            "reconcile_started",
            dispensary=dispensary,
            run_id=run_id,
            trigger=options.trigger,
            since=iso(start_us),
        )
        source = "resend" if options.resend else "reconcile"
        started_us = instant_us(datetime.now(UTC))
        # the checkpoint a successful run leaves: the newest change it pulled, else where it
        # started (never earlier than the checkpoint it found)
        newest = max(start_us, before_us or start_us)
        try:
            if stopped is not None:
                raise stopped
            # awaited here, so that a run stopped or failing while it is built is recorded
            client = await building
            pulled = 0
            paging = Paging()
            # the next page is fetched while this one is stored and planned (the client's
            # pace holds whatever the overlap); paced, the next pages: a page late in being
            # stored never idles the window Treez allows, nor does the burst a fresh window
            # allows wait on storing
            ahead = AHEAD_PAGES if getattr(client, "paced", False) else 1
            async with contextlib.aclosing(
                _ahead(self._pages(client, disp, dispensary, start_us, report, paging), ahead)
            ) as pages:
                async for customers, page_checkpoint in pages:
                    events, rejected, versions = self._events(dispensary, customers, source, run_id)
                    paging.note_changes(versions, started_us)
                    # a last_update in the future (a clock gone wrong at the store) must not
                    # carry the checkpoint past changes still to come
                    future = [v for v in versions if v > started_us + FUTURE_SLACK_US]
                    report.future += len(future)
                    if len(future) < len(versions):
                        newest = max(newest, max(v for v in versions if v not in future))
                    # a --since window is someone's choice: it never moves the checkpoint
                    checkpoint = None if options.since else page_checkpoint
                    await self.astore.call(
                        self.runs.add_pulled, dispensary, events, rejected, checkpoint
                    )
                    await self._plan()
                    pulled += len(customers)
                    if progress is not None:
                        progress(report.pages, pulled)
            unresolved = await self._reread(
                client, disp, dispensary, source, run_id, paging, report, started_us
            )
            # the last pages are planned by now or soon: look again at once, then less
            # often (each look counts the run's events), up to poll_seconds apart
            wait = FIRST_POLL_SECONDS
            while await self.astore.call(self.runs.pending_in_run, run_id):
                await self._settle(min(wait, self.poll_seconds))
                wait *= 2
            report.high_water = await self.astore.call(self.runs.outbox_high_water, dispensary)
            if not options.since:
                # a --since run pulled a window of someone's choosing: it moves nothing
                newest = min([newest, *unresolved])
                await self.astore.call(self.runs.set_checkpoint, dispensary, newest)
                report.checkpoint_after_us = max(newest, before_us or newest)
            else:
                report.checkpoint_after_us = before_us
            await self._repair(dispensary, disp, run_id, report)
            report.counts = await self.astore.call(self.runs.run_counts, run_id)
            report.counts["missing_contacts"] = report.missing
            if report.replayed is not None:
                report.counts["redriven"] = report.replayed.replayed
            report.outcome = "succeeded"
        except BaseException as exc:
            report.outcome = "failed"
            # our errors never carry values; another's message might (a class name only)
            report.error = (
                str(exc) if isinstance(exc, ConnectorError) and str(exc) else exc.__class__.__name__
            )
            with contextlib.suppress(Exception):
                report.counts = await self.astore.call(self.runs.run_counts, run_id)
                report.counts["errors"] = report.counts.get("errors", 0) + 1
            after = before_us
            with contextlib.suppress(Exception):
                after = await self.astore.call(self.runs.checkpoint, dispensary)
            report.checkpoint_after_us = after
            with contextlib.suppress(Exception):
                await self.astore.call(
                    self.runs.finish_run, run_id, "failed", report.counts, after, report.error
                )
            log.warning(
                "reconcile_failed",
                dispensary=dispensary,
                run_id=run_id,
                error=report.error,
                counts=report.counts,
            )
            raise
        await self.astore.call(
            self.runs.finish_run, run_id, "succeeded", report.counts, report.checkpoint_after_us
        )
        log.info(
            "reconcile_finished",
            dispensary=dispensary,
            run_id=run_id,
            pages=report.pages,
            counts=report.counts,
        )
        return report

    async def _pages(
        self,
        client: TreezClient,
        disp: DispensaryConfig,
        dispensary: str,
        start_us: int,
        report: RunReport,
        paging: Paging,
    ) -> AsyncGenerator[tuple[list[Pulled], int | None], None]:
        """Yield each page of the window, its customers checked (:func:`_pulled`, for
        :meth:`_events`), with the checkpoint it makes safe, if any.

        Anchored paging (``anchored``; ``auto`` once pages 1 and 2 of the first query came in
        last_update order and continue each other): after each full page, a new query from
        its last customer's last_update (less 1 ms: ties are read again, and dropped, rather
        than skipped), page 1. A customer changing meanwhile moves to the end of the listing
        without shifting anyone past us, so everything up to the anchor is done.

        Numbered paging (``numbered``; ``auto`` until verified or once out of order; and a
        block of ties larger than a page): pages 2, 3... of one query, right in any order but
        shifted by a change during the run. Each such stretch is noted in ``paging``: no
        checkpoint passes its anchor during the run, and the run's final checkpoint stays at
        it if a change was pulled that happened while it paged (:meth:`Paging.safe`).
        """
        mode = disp.reconcile.paging
        size = disp.reconcile.page_size
        after_us, number = start_us, 1
        ordered = mode != "numbered"
        verified = mode == "anchored"
        ties: set[str] = set()  # customers at the anchor's instant, already yielded
        previous_last: int | None = None
        query_answered = _now_us()
        while True:
            if number >= 2:
                paging.numbered(after_us, query_answered, _now_us(), number)
            customers = _pulled(dispensary, await _page(client, after_us, number, size))
            report.pages += 1
            if number == 1:
                query_answered = _now_us()
            full = len(customers) >= size
            if ties:
                tie_us = after_us + ONE_MS_US
                customers = [
                    c
                    for c in customers
                    if not (
                        isinstance(c.checked, tuple)
                        and c.checked[1] == tie_us
                        and c.checked[0] in ties
                    )
                ]
            versions = [c.version for c in customers]
            known = [v for v in versions if v is not None]
            if ordered and known and known != sorted(known):
                ordered = verified = False  # not in last_update order: numbered from here on
                log.info("reconcile_paging_numbered", reason="pages not in last_update order")
            if ordered and not verified and number == 2 and known and previous_last is not None:
                verified = known[0] >= previous_last  # page 2 continues page 1
                ordered = verified
            last = known[-1] if known else None
            checkpoint = None
            if ordered and verified and last is not None:
                # done: everything up to the last customer (less its ties), or the whole
                # window when this is the last page
                checkpoint = paging.bound(last - ONE_MS_US if full else max(known))
            if customers:
                yield customers, checkpoint
            if not full:
                return
            previous_last = last
            if ordered and verified and last is not None and last - ONE_MS_US > after_us:
                ties = {
                    c.checked[0]
                    for c in customers
                    if isinstance(c.checked, tuple) and c.checked[1] == last
                }
                after_us, number = last - ONE_MS_US, 1
            else:
                number += 1

    async def _reread(
        self,
        client: TreezClient,
        disp: DispensaryConfig,
        dispensary: str,
        source: str,
        run_id: int,
        paging: Paging,
        report: RunReport,
        started_us: int,
    ) -> list[int]:
        """Read again, once, each numbered stretch that may have shifted (what a shift made
        us miss is then at a page we read; what we already have is a duplicate, dropped by
        the stored state). Returns the anchors still unsure (a change during the re-read
        too): the run's checkpoint stays there, and the next run reads them again."""
        unresolved = []
        size = disp.reconcile.page_size
        for anchor, pages in paging.risky(CLOCK_SLACK_US):
            again = Paging()
            answered = _now_us()
            for number in range(1, pages + 2):
                if number >= 2:
                    again.numbered(anchor, answered, _now_us(), number)
                customers = _pulled(dispensary, await _page(client, anchor, number, size))
                report.pages += 1
                events, rejected, versions = self._events(dispensary, customers, source, run_id)
                again.note_changes(versions, started_us)
                await self.astore.call(self.runs.add_pulled, dispensary, events, rejected, None)
                await self._plan()
                if len(customers) < size:
                    break
            log.info(
                "reconcile_reread",
                dispensary=dispensary,
                pages=pages + 1,
                reason="a customer changed while pages were read by number",
            )
            if again.risky():
                unresolved.append(anchor)
        return unresolved

    @staticmethod
    def _events(
        dispensary: str,
        customers: Sequence[Pulled | dict[str, Any]],
        source: str,
        run_id: int | None,
    ) -> tuple[list[NewEvent], list[Rejected], list[int]]:
        """The page's events and refusals, and the versions of its events; a record not yet
        checked (a dict) is checked here."""
        events: list[NewEvent] = []
        rejected: list[Rejected] = []
        versions: list[int] = []
        for item in customers:
            customer = item if isinstance(item, Pulled) else Pulled(_check(item), record=item)
            checked, record = customer.checked, customer.record
            if customer.body is not None and isinstance(checked, tuple):
                # the quick path: checked from Treez's text, nothing nested too deep
                versions.append(checked[1])
                events.append(
                    NewEvent(
                        dispensary,
                        source,
                        "CUSTOMER",
                        checked[0],
                        checked[1],
                        customer.body,
                        run_id=run_id,
                    )
                )
                continue
            if isinstance(checked, EventValidationError):
                raw = json.dumps(record) if record is not None else customer.text or ""
                rejected.append(
                    Rejected(dispensary, 422, str(checked)[:2000], "application/json", raw.encode())
                )
                continue
            assert record is not None
            customer_id, us = checked
            versions.append(us)
            if removed := leave_out_deep(record):
                # names only, never a value (customer data)
                log.warning(
                    "fields_dropped",
                    dispensary=dispensary,
                    source=source,
                    customer_id=customer_id,
                    reason=f"nested more than {MAX_DEPTH} levels deep: "
                    + ", ".join(readable_name(n) for n in removed),
                )
            body = {"event_type": "CUSTOMER", "dispensary_short_name": dispensary, "data": record}
            events.append(
                NewEvent(
                    dispensary,
                    source,
                    "CUSTOMER",
                    customer_id,
                    us,
                    json.dumps(body, separators=(",", ":")),
                    run_id=run_id,
                )
            )
        return events, rejected, versions

    async def _repair(
        self, dispensary: str, disp: DispensaryConfig, run_id: int, report: RunReport
    ) -> None:
        settings = disp.reconcile
        if settings.redrive_max:
            report.replayed = await self.astore.call(
                lambda: self.runs.replay(
                    dispensary=dispensary,
                    older_than=time.time() - settings.redrive_after_minutes * 60,
                    limit=settings.redrive_max,
                )
            )
            if report.replayed.replayed:
                await self._plan()  # wakes the workers
        if not settings.lookup_sample:
            return
        for (name, dest_name), destination in self.destinations.items():
            if name != dispensary or not destination.capabilities.can_lookup:
                continue
            known = await self.astore.call(
                self.runs.sample_contacts, dispensary, dest_name, run_id, settings.lookup_sample
            )
            for customer_id, contact_id in known:
                report.looked_up += 1
                try:
                    found = await destination.lookup(contact_id)
                except Exception as exc:
                    log.warning(
                        "lookup_failed", dispensary=dispensary, destination=dest_name, error=exc
                    )
                    break
                if found is None:
                    report.missing += 1
                    await self.astore.call(
                        self.runs.add_conflict,
                        dispensary,
                        customer_id,
                        dest_name,
                        "missing_contact",
                        f"{dest_name} has no contact {contact_id}",
                    )

    async def _dry_run(
        self,
        dispensary: str,
        disp: DispensaryConfig,
        options: RunOptions,
        progress: Progress | None,
    ) -> RunReport:
        # its pulls count in Treez's limit as a run's do: a second after the previous run
        # ended (maybe another process's, whose pace this one cannot see)
        await self._after_previous_run(dispensary)
        before_us = await self.astore.call(self.runs.checkpoint, dispensary)
        start_us = self._start(disp, before_us, options)
        report = RunReport(
            dispensary,
            None,
            outcome="dry run",
            checkpoint_before_us=before_us,
            pulled_from=_moment(start_us),
            checkpoint_after_us=before_us,
        )
        client = self.client(dispensary, disp)
        source = "resend" if options.resend else "reconcile"
        outcomes: Counter[str] = Counter()
        pulled = 0
        try:
            async with contextlib.aclosing(
                _ahead(self._pages(client, disp, dispensary, start_us, report, Paging()))
            ) as pages:
                async for customers, _ in pages:
                    events, rejected, _ = self._events(dispensary, customers, source, None)
                    rows = [
                        InboxRow(
                            i, e.dispensary, e.source, e.customer_id, e.body, None, time.time()
                        )
                        for i, e in enumerate(events)
                    ]
                    found, operations = await self.astore.call(
                        plan_without_writing, self.astore.store, self.deployment, rows
                    )
                    outcomes.update(found.values())
                    outcomes["failed"] += len(rejected)
                    for op in operations.get(dispensary, []):
                        report.planned_ops[(op.destination, op.op)] += 1
                        if len(report.examples) < 20:
                            report.examples.append(_describe(op))
                    pulled += len(customers)
                    if progress is not None:
                        progress(report.pages, pulled)
        except Exception:
            await _treez_window()
            raise
        # a dry run stores no end for the next run to start a second after (a run does,
        # see _after_previous_run): it keeps the lock that second instead
        await _treez_window()
        report.counts = {"pulled": pulled, **dict(outcomes)}
        return report


@dataclass(slots=True)
class Paging:
    """What a run's numbered paging risks: for each query paged by number, its anchor, when
    it paged and how many pages; and the changes pulled that happened during the run."""

    stretches: list[list[int]] = field(default_factory=list)  # [anchor, from, to, pages] (us)
    changes: list[int] = field(default_factory=list)  # last_update of recent changes (us)
    changes_overflow: bool = False

    def numbered(self, anchor_us: int, since_us: int, now_us: int, page: int) -> None:
        if self.stretches and self.stretches[-1][0] == anchor_us:
            self.stretches[-1][2:] = [now_us, page]
        else:
            self.stretches.append([anchor_us, since_us, now_us, page])

    def note_changes(self, versions: list[int], run_started_us: int) -> None:
        recent = [v for v in versions if v >= run_started_us - CLOCK_SLACK_US]
        if len(self.changes) + len(recent) > 100_000:
            self.changes_overflow = True
        else:
            self.changes.extend(recent)

    def bound(self, checkpoint: int) -> int:
        """A checkpoint held at the anchor of any numbered stretch (whether that stretch
        shifted is known only at the end of the run)."""
        return min([checkpoint, *(s[0] for s in self.stretches)])

    def risky(self, slack_us: int = 0) -> list[tuple[int, int]]:
        """(anchor, pages) of each numbered stretch during which a pulled customer changed
        after its first page was answered (less ``slack_us`` for the clocks' difference):
        it may have shifted another past a page."""
        return [
            (anchor, pages)
            for anchor, since, until, pages in self.stretches
            if self.changes_overflow
            or any(since - slack_us <= v <= until + CLOCK_SLACK_US for v in self.changes)
        ]


async def _ahead(items: AsyncGenerator[T, None], most: int = 1) -> AsyncGenerator[T, None]:
    """``items``, the next ones already being fetched while the caller handles the one just
    yielded: at most ``most`` ahead, never more (memory stays that many pages). An error of
    ``items`` is raised where its item would have been yielded; leaving early cancels the
    fetch under way."""
    arrived: asyncio.Queue[tuple[Literal["item", "end", "error"], Any]] = asyncio.Queue()
    room = asyncio.Semaphore(most)  # a fetch starts when the caller has taken an earlier item

    async def fetch() -> None:
        while True:
            await room.acquire()
            try:
                item = await anext(items)
            except StopAsyncIteration:
                arrived.put_nowait(("end", None))
                return
            except Exception as exc:
                arrived.put_nowait(("error", exc))
                return
            except BaseException as exc:  # cancelled: never leave the caller waiting
                arrived.put_nowait(("error", exc))
                raise
            arrived.put_nowait(("item", item))

    fetching = asyncio.create_task(fetch())
    try:
        while True:
            kind, item = await arrived.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            room.release()
            yield cast(T, item)
    finally:
        fetching.cancel()
        try:
            await asyncio.wait([fetching])
        finally:
            await items.aclose()


async def _page(
    client: TreezClient, after_us: int, number: int, size: int
) -> list[str] | list[dict[str, Any]]:
    """A page of customers as :meth:`TreezClient.page_texts` gives it; from a client without
    it (a test's stand-in), as its ``page`` gives it."""
    texts = getattr(client, "page_texts", None)
    if texts is None:
        return await client.page(_moment(after_us), number, size)
    return cast(list[str] | list[dict[str, Any]], await texts(_moment(after_us), number, size))


async def _treez_window() -> None:
    """Wait out Treez's window after the last request sent (the lock held meanwhile): the
    next run, maybe another process's, pacing afresh, must not add its burst to it."""
    await asyncio.sleep(TREEZ_WINDOW_SECONDS)


def _now_us() -> int:
    return instant_us(datetime.now(UTC))


def _describe(op: Operation) -> str:
    """An operation without customer values: kind, destination, customer id, field names."""
    fields = op.body.get("fields")
    names = f" fields: {', '.join(sorted(fields))}" if isinstance(fields, dict) else ""
    return f"{op.destination}: {op.op} customer {op.customer_id}{names}"


# the most "{" and "[" a customer's text may hold for its quick path: then no field can nest
# deeper than leave_out_deep allows (the event wraps the customer in two levels)
_QUICK_OPENERS = MAX_DEPTH - 2


def _pulled(dispensary: str, page: list[str] | list[dict[str, Any]]) -> list[Pulled]:
    """A page's customers, each checked once. A customer's JSON text (see
    :meth:`TreezClient.page_texts`) becomes its event's body as it is, wrapped in the
    envelope, when the receiver's check of that body (:func:`check_event_json`) accepts it
    and nothing in it can nest too deep; anything else (a refusal included) is decoded and
    checked as a record (:func:`_check`), as it always was."""
    prefix = (
        '{"event_type":"CUSTOMER","dispensary_short_name":' + json.dumps(dispensary) + ',"data":'
    )
    pulled = []
    for item in page:
        if isinstance(item, str):
            body = f"{prefix}{item}}}"
            refusal = None
            try:
                received = check_event_json(body, source="pulled customer")
            except EventValidationError as exc:
                received, refusal = None, exc
            if (
                isinstance(received, ReceivedCustomer)
                and item.count("{") + item.count("[") <= _QUICK_OPENERS
            ):
                checked = (received.customer_id, instant_us(received.last_update))
                pulled.append(Pulled(checked, body=body))
                continue
            try:
                record = json.loads(item)
            except (ValueError, RecursionError):
                # what json cannot read (a number of more than 4,300 digits, nesting past
                # its depth), which failed the whole page when json read it: refused, as
                # the receiver refuses such a body
                if refusal is None:
                    raise
                pulled.append(Pulled(refusal, text=item))
                continue
        else:
            record = item
        pulled.append(Pulled(_check(record), record=record))
    return pulled


def _check(record: dict[str, Any]) -> Checked:
    """A pulled customer checked once: the rules' fields, as for a webhook (a wrong field
    outside them is dropped when planned rather than refusing the customer, and a missed
    opt-out)."""
    try:
        customer_id, last_update = check_customer(record, source="pulled customer")
    except EventValidationError as exc:
        return exc
    return customer_id, instant_us(last_update)


def _default_client(dispensary: str, disp: DispensaryConfig) -> TreezClient:
    assert disp.treez is not None
    return TreezClient(disp.treez)


def _dropped(future: asyncio.Future[Any]) -> None:
    """Take what a future left behind (its result, or its failure) without a warning."""
    if not future.cancelled():
        future.exception()
