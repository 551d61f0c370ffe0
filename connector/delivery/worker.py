"""One delivery worker per destination: claims ready operations, sends them, records results.

Concurrent across customers, strictly ordered within one (the store's claim gives at most one
operation per customer at a time, and none while an earlier one waits for its retry).

One process of the cluster delivers for a destination at a time: the worker claims only while
it holds the destination's lease in the store (``deliver:DISPENSARY/DESTINATION``), renewed
every :data:`LEASE_RENEW_SECONDS` and taken over by another replica's worker within
:data:`~connector.store.LEASE_SECONDS` of its holder's death. So a destination's
``rate_limit`` holds for the cluster (Klaviyo counts per account), not per replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from connector._pressure import Pressure
from connector.delivery._http import vendor_code
from connector.delivery._secrets import Blanker
from connector.delivery._wait import Signal, first_of
from connector.delivery.base import Delivery, Destination, Sent
from connector.delivery.ratelimit import SlidingWindowLimiter
from connector.delivery.retry import RetryPolicy
from connector.errors import (
    DeliveryError,
    FatalDelivery,
    QuotaPause,
    RetriableDelivery,
    StoreUnavailable,
)
from connector.logs import get_logger
from connector.metrics import Metrics
from connector.store import LEASE_SECONDS, AsyncStore, OutboxRow

log = get_logger("connector.delivery")
LEASE_RENEW_SECONDS = 5.0
# rounds of calls (of ``concurrency``) claimed ahead of the slots while a backlog lasts
AHEAD_ROUNDS = 2
_LEASE_ELSEWHERE = "not sent: another process holds the delivery lease"
# the longest quota pause honoured: a daily cap resets within 25 hours (a day that ends daylight
# saving time); a reset time beyond it (a bad or misread header) pauses this long, not for good
MAX_PAUSE_SECONDS = 26 * 3600.0


@dataclass(slots=True)
class _Outcome:
    done: list[tuple[OutboxRow, str | None]]
    retry: list[tuple[OutboxRow, float, str]]
    dead: list[tuple[OutboxRow, str, int | None, str | None]]
    conflicts: list[tuple[str, str, str]]  # customer, kind, detail
    # outbox id -> the contact id the destination said is gone (its returned id replaces it)
    replaced: dict[int, str] = field(default_factory=dict)
    # operations that met the destination's used-up quota: due again at its reset, no attempt
    paused: list[tuple[OutboxRow, float, str]] = field(default_factory=list)
    pause: tuple[float, str, int | None] | None = None  # the longest pause met this round
    # outbox id -> the failed attempt's answer: status code and the vendor's error code
    answers: dict[int, tuple[int | None, str | None]] = field(default_factory=dict)
    requests: int = 0  # the calls that gave these results


def _size(outcome: _Outcome) -> int:
    return len(outcome.done) + len(outcome.retry) + len(outcome.dead) + len(outcome.paused)


def _merge(into: _Outcome, other: _Outcome) -> _Outcome:
    """``other``'s results added to ``into`` (returned)."""
    into.done += other.done
    into.retry += other.retry
    into.dead += other.dead
    into.conflicts += other.conflicts
    into.replaced.update(other.replaced)
    into.paused += other.paused
    if other.pause is not None and (into.pause is None or other.pause[0] > into.pause[0]):
        into.pause = other.pause
    into.answers.update(other.answers)
    into.requests += other.requests
    return into


@dataclass(slots=True)
class _Trip:
    """One trip to the store's thread (:meth:`DeliveryWorker._trip`): what it took there
    and what it brought back."""

    outcome: _Outcome | None  # results to record first
    recorded: bool = False
    rows: list[OutboxRow] = field(default_factory=list)
    contacts: dict[str, str] = field(default_factory=dict)
    next_due: float | None = None


class DeliveryWorker:
    def __init__(
        self,
        astore: AsyncStore,
        dispensary: str,
        destination: Destination,
        *,
        retry: RetryPolicy,
        concurrency: int = 8,
        metrics: Metrics | None = None,
        idle_poll: float = 1.0,
        pressure: Pressure | None = None,
        linger: float = 0.01,
    ) -> None:
        self.pressure = pressure or Pressure()
        self.linger = linger
        self.astore = astore
        self.dispensary = dispensary
        self.destination = destination
        bind = getattr(destination, "bind_identity_map", None)
        if bind is not None:  # an adapter that asks who owns a contact before writing to it
            bind(
                lambda contact_id, kind=None: astore.call(
                    astore.store.contact_claims, dispensary, destination.name, contact_id, kind
                )
            )
        # an adapter's blanker of the secrets it sends (connector/delivery/_secrets.py): applied
        # to every error and conflict kept, whatever built its text (a vendor echoing its key
        # in a per-object error or an id field)
        self._blank: Blanker | None = getattr(destination, "blank", None)
        merges = getattr(destination, "bind_merges", None)
        if merges is not None:  # an adapter that must never make a merged-away customer's contact
            merges(
                lambda customer_id: astore.call(astore.store.merged_away, dispensary, customer_id)
            )
        self.retry = retry
        self.concurrency = max(1, concurrency)
        self.metrics = metrics
        # this destination's series, each looked up once: ``labels`` takes a lock and makes
        # a key at every call (a few tens of microseconds an operation on a cold cache)
        self._operations: dict[tuple[str, str], Any] = {}
        self._seconds = (
            None
            if metrics is None
            else metrics.delivery_seconds.labels(dispensary, destination.name)
        )
        self.idle_poll = idle_poll
        self.limiter = SlidingWindowLimiter(destination.rate_limit)
        self.wake = Signal()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._backlog = False  # deep enough for the destination's bulk path
        self.lease = f"deliver:{dispensary}/{destination.name}"
        self.leased = False  # whether this process delivers for the destination now
        self._lease_checked = -LEASE_RENEW_SECONDS  # monotonic time of the last take/renew
        # the destination's quota is used up until then (epoch seconds): nothing is claimed
        self.paused_until = 0.0
        self._pause_reason = ""  # why the destination is paused until paused_until
        # a round the store could not record (it went away meanwhile): recorded before
        # anything else once it answers, or its claims, which the heartbeat renews, would
        # stay in flight as long as this process lives
        self._unrecorded: _Outcome | None = None
        # the continuous pipeline (destinations without a bulk path for a backlog): batches
        # in flight, each a task; their results wait in ``_finished`` for the next record
        self._inflight: set[asyncio.Task[None]] = set()
        # claimed and not yet sent, while every slot is busy: a backlog's next calls, sent as
        # slots come free, so the calls go on while a trip records and claims (see _step)
        self._ready: collections.deque[tuple[list[OutboxRow], dict[str, str]]] = collections.deque()
        self._ahead = False  # the last claim was full: claim rounds ahead of the slots
        self._cancelled = False  # run() ended: nothing more is started
        self._finished = _Outcome([], [], [], [])
        self._progress = Signal()  # enough slots came free to claim again
        self._all_free = Signal()  # no call in flight
        self._more = True  # a claim may find something: woken, a result recorded, a full claim

    async def _hold_lease(self) -> bool:
        """Take or renew the destination's lease when due; whether this process holds it."""
        now = time.monotonic()
        if now - self._lease_checked < LEASE_RENEW_SECONDS:
            return self.leased
        store = self.astore.store
        held = await self.astore.call(store.acquire, self.lease, store.process_id, LEASE_SECONDS)
        if held and not self.leased:
            # taken (at start, or from a replica that stopped): its pause holds here too
            pause = await self.astore.call(store.pause_of, self.dispensary, self.destination.name)
            if pause is not None:
                self._pause_until(_bounded(pause.until), pause.reason)
        if held != self.leased:
            log.info(
                "delivery_lease",
                dispensary=self.dispensary,
                destination=self.destination.name,
                outcome="taken" if held else "held elsewhere",
            )
        self.leased, self._lease_checked = held, now
        return held

    async def run(self, stopping: asyncio.Event) -> None:
        """Deliver until ``stopping`` is set; the calls in flight are finished and their
        results recorded first."""
        failures = 0
        try:
            while not stopping.is_set():
                try:
                    await self._step(stopping)
                    failures = 0
                except Exception as exc:  # a locked store, a bug: claims expire, nothing lost
                    failures += 1
                    log.warning(
                        "delivery_loop_failed",
                        destination=self.destination.name,
                        error=exc,
                        attempt=failures,
                    )
                    await self._back_off(stopping, min(30.0, self.idle_poll * 2**failures))
            await self._drain()
        finally:
            self._cancelled = True  # a call ending from here on starts none claimed ahead
            for task in self._inflight:  # cancelled (not stopped): their claims expire
                task.cancel()

    async def _drain(self) -> None:
        """Let the calls in flight end (and those claimed ahead, started as they end) and
        record their results (and any left unrecorded)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight), return_exceptions=True)
        outcome = self._take_finished()
        if self._unrecorded is not None:
            if outcome is not None:
                _merge(self._unrecorded, outcome)
            outcome = self._unrecorded
        if outcome is None:
            return
        try:
            await self._record(outcome)
        except Exception as exc:  # the claims expire and another worker redoes them
            log.warning(
                "delivery_unrecorded_at_stop",
                destination=self.destination.name,
                error=exc,
                count=_size(outcome),
            )
        self._unrecorded = None

    async def _back_off(self, stopping: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds`` after a failure, or until woken: a wake-up during the wait (the
        store's listener reconnected, the planner enqueued) says the store is back, and a
        long outage must not leave delivery waiting out its last, longest back-off."""
        self.wake.clear()
        await first_of([self.wake, stopping], seconds)

    async def _step(self, stopping: asyncio.Event) -> None:
        """Keep up to ``concurrency`` calls in flight: claim as slots come free (at least
        half of them, or all of them when nothing is in flight), and record the results of
        the calls that ended in the same trip to the store, before the claim (a customer's
        next operation is claimable once its last one is recorded). A slow call holds up
        only its own slot, and a trickle costs one trip when it arrives and one when its
        call ends, with no wait for more to gather."""
        capabilities = self.destination.capabilities
        if capabilities.bulk_for_backlog and capabilities.bulk_size:
            await self._step_rounds(stopping)
            return
        if self.wake.is_set():
            self._more = True
        self.wake.clear()  # before looking: a wake-up from here on is not lost
        if self._unrecorded is not None:
            await self._record_unrecorded()
        if not await self._hold_lease():
            # another process delivers for this destination: what is in flight here ends
            # and is recorded, what was claimed ahead goes back unsent; look again when the
            # other's lease could have lapsed
            while self._ready:
                self._unsent(self._ready.popleft()[0])
            await self._settle_only()
            await self._wait(stopping, LEASE_RENEW_SECONDS, wake=False)
            return
        wait = self.paused_until - time.time()
        if wait > 0:
            # the quota is used up: claim nothing until it resets (renewing the lease)
            await self._settle_only()
            await self._wait(stopping, min(wait, LEASE_RENEW_SECONDS), wake=False)
            return
        # a backlog (the last claim was full) is claimed rounds ahead of the slots: the calls
        # claimed ahead start as slots come free, while the next trip is at the store (with
        # the slots only, every call waited for the trip: bench/pipeline.py, issue 17's note)
        capacity = self._capacity()
        held = len(self._inflight) + len(self._ready)
        free = capacity - held
        if held and 2 * free < capacity:
            # most slots busy: wait for more to come free (recorded and refilled together)
            self._progress.clear()
            await self._wait(stopping, self.idle_poll, wake=False)
            return
        if self._inflight and _size(self._finished) and not self._ready:
            # some calls ended, others are still out: give those a moment (the linger) to
            # end too, so that one trip records and refills them all; a slow one is then
            # left alone in its slot
            await self._wait_all_free(stopping)
            free = capacity - len(self._inflight) - len(self._ready)
        outcome = self._take_finished()
        if outcome is None and not self._more:
            # nothing ended, nothing new: wait for either (or look again, for a retry due)
            await self._wait(stopping, self.idle_poll, wake=True)
            self._more = self._more or not self._progress.is_set()
            return
        started = time.monotonic()
        trip = _Trip(outcome)
        # nothing in flight and no sign of new work: what was recorded is all there was,
        # unless a customer of it has a next operation (due now: the next due time says so)
        busy = bool(self._inflight or self._ready)
        claim = self._more or busy
        self._more = False
        limit = free * self.destination.batch_size
        try:
            await self.astore.call(self._trip, trip, limit if claim else 0, not busy)
        except Exception as exc:
            left = trip.outcome if trip.outcome is not None and not trip.recorded else None
            if trip.rows:  # claimed, never sent, and the store failed: back, due now
                now = time.time()
                error = f"not sent: the store failed ({exc.__class__.__name__})"
                back = _Outcome([], [(row, now, error) for row in trip.rows], [], [])
                left = back if left is None else _merge(left, back)
            if left is not None:
                self._unrecorded = left
            self._more = True
            raise
        if trip.outcome is not None:
            self._log_recorded(trip.outcome)
        rows = trip.rows
        if claim and len(rows) >= limit:
            self._more = True  # a full claim: more may be waiting
        if claim:
            self._ahead = bool(rows) and len(rows) >= limit
        if rows:
            size = self.destination.batch_size
            for i in range(0, len(rows), size):
                self._ready.append((rows[i : i + size], trip.contacts))
            self._start_ready()
        await self.pressure.yield_after(time.monotonic() - started)
        if self._inflight or self._ready or self._more:
            return  # the next step waits for calls to end, or claims again
        due = trip.next_due
        timeout = self.idle_poll if due is None else min(self.idle_poll, due - time.time())
        if timeout > 0:
            await self._wait(stopping, timeout, wake=True)
        self._more = True  # the wait is over: due, woken, or time to look again

    def _trip(self, trip: _Trip, limit: int, idle: bool) -> None:
        """In the store's thread: record what ended, claim up to ``limit`` (none when 0),
        and read what the claim needs (the contact ids), or when it finds nothing and
        nothing is in flight (``idle``), when the next operation falls due: one hand-over
        to the thread and one write transaction."""
        outcome = trip.outcome
        if outcome is None:
            claimed = self.astore.store.record_and_claim(
                self.dispensary, self.destination.name, limit, due_if_none=idle
            )
        else:
            claimed = self.astore.store.record_and_claim(
                self.dispensary,
                self.destination.name,
                limit,
                outcome.done,
                outcome.retry,
                outcome.dead,
                outcome.conflicts,
                outcome.replaced,
                outcome.paused,
                outcome.pause,
                outcome.answers,
                due_if_none=idle,
            )
            trip.recorded = True
        trip.rows = claimed.rows
        if claimed.rows:
            trip.contacts = claimed.contacts
            trip.contacts.update(
                {f"into:{cid}": contact for cid, contact in claimed.survivors.items()}
            )
        trip.next_due = claimed.next_due

    def _capacity(self) -> int:
        """The calls this worker holds claimed: its slots, and while a backlog lasts (the last
        claim was full) :data:`AHEAD_ROUNDS` rounds of them more, claimed ahead."""
        return self.concurrency * (1 + AHEAD_ROUNDS if self._ahead else 1)

    def _unsent(self, batch: list[OutboxRow]) -> None:
        """``batch``, claimed ahead and not sent, goes back with the next record once the
        destination's lease is held elsewhere: due now, counting no attempt (as a call that
        met a used-up quota)."""
        now = time.time()
        self._finished.paused.extend((row, now, _LEASE_ELSEWHERE) for row in batch)

    def _start_ready(self) -> None:
        """Send what was claimed, as far as there are free slots (none once the worker is
        cancelled: what is left stays claimed until the process gives its claims back or
        they expire)."""
        if self._cancelled:
            return
        while self._ready and len(self._inflight) < self.concurrency:
            batch, contacts = self._ready.popleft()
            task = asyncio.create_task(self._send(batch, contacts, None))
            self._all_free.clear()
            self._inflight.add(task)
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:  # _send catches all
            log.error(
                "delivery_task_failed", destination=self.destination.name, error=task.exception()
            )
        self._start_ready()  # a call claimed ahead takes the slot at once
        capacity = self._capacity()
        if 2 * (capacity - len(self._inflight) - len(self._ready)) >= capacity:
            self._progress.set()
        if not self._inflight:
            self._all_free.set()

    def _take_finished(self) -> _Outcome | None:
        """The results of the calls that ended since the last record, if any."""
        self._progress.clear()
        outcome = self._finished
        if not _size(outcome) and not outcome.conflicts and outcome.pause is None:
            return None
        self._finished = _Outcome([], [], [], [])
        return outcome

    async def _settle_only(self) -> None:
        """Record what ended, claiming nothing (the lease is elsewhere, or a pause)."""
        outcome = self._take_finished()
        if outcome is None:
            return
        try:
            await self._record(outcome)
        except Exception:
            self._unrecorded = outcome
            raise
        self._log_recorded(outcome)

    async def _wait_all_free(self, stopping: asyncio.Event) -> None:
        """Until no call is in flight, ``stopping``, or :attr:`linger` has passed."""
        await first_of([self._all_free, stopping], self.linger)

    async def _wait(self, stopping: asyncio.Event, timeout: float, *, wake: bool) -> None:
        """Until enough calls end (:meth:`_ended`), ``stopping``, ``timeout``, or when
        ``wake``, a wake-up."""
        events = [stopping, self._progress, self.wake] if wake else [stopping, self._progress]
        await first_of(events, timeout)

    async def _step_rounds(self, stopping: asyncio.Event) -> None:
        """A round at a time, for a destination with a bulk path for a backlog: claim, send
        every batch (or all through the bulk path), record, claim again."""
        store = self.astore.store
        limit = self.concurrency * self.destination.batch_size
        capabilities = self.destination.capabilities
        bulk = capabilities.bulk_size if capabilities.bulk_for_backlog else None
        if bulk and self._backlog:
            limit = max(limit, bulk)
        self.wake.clear()  # before looking: a wake-up from here on is not lost
        if self._unrecorded is not None:
            await self._record_unrecorded()
        if not await self._hold_lease():
            # another process delivers for this destination: look again when its lease
            # could have lapsed (it renews it every few seconds while it lives)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), LEASE_RENEW_SECONDS)
            return
        wait = self.paused_until - time.time()
        if wait > 0:
            # the quota is used up: claim nothing until it resets (renewing the lease)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), min(wait, LEASE_RENEW_SECONDS))
            return
        rows = await self.astore.call(store.claim, self.dispensary, self.destination.name, limit)
        if bulk and len(rows) >= self.concurrency * self.destination.batch_size:
            # a backlog (a reconciliation, a burst): worth the bulk path once it is this deep
            try:
                waiting = await self.astore.call(
                    store.pending_count, self.dispensary, self.destination.name
                )
            except Exception as exc:
                self._give_back(rows, exc)
                raise
            self._backlog = waiting + len(rows) >= max(2, bulk // 2)
        elif len(rows) < self.concurrency * self.destination.batch_size:
            self._backlog = False
        if rows:
            started = time.monotonic()
            if bulk and self._backlog and len(rows) > self.concurrency:
                await self._round(rows, bulk=True)
            else:
                await self._round(rows)
            await self.pressure.yield_after(time.monotonic() - started)
            if len(rows) < limit // 2:
                # a trickle: let a few more operations gather (a round costs three
                # transactions whatever its size)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.linger)
            return
        due = await self.astore.call(store.next_due, self.dispensary, self.destination.name)
        timeout = self.idle_poll if due is None else min(self.idle_poll, due - time.time())
        if timeout > 0:
            waits = [
                asyncio.ensure_future(self.wake.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            _, pending = await asyncio.wait(
                waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()

    async def _round(self, rows: list[OutboxRow], *, bulk: bool = False) -> None:
        """Deliver claimed operations (at most one per customer): in batches of the
        destination's ``batch_size``, or all at once through its bulk path (``bulk``)."""
        try:
            contacts = await self.astore.call(self._contacts_sync, rows)
        except Exception as exc:
            self._give_back(rows, exc)
            raise
        size = len(rows) if bulk else self.destination.batch_size
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        outcome = _Outcome([], [], [], [])
        started = time.monotonic()
        await asyncio.gather(
            *(self._send(batch, contacts, outcome, bulk=bulk) for batch in batches)
        )
        if outcome.done:
            ops = collections.Counter(row.op for row, _ in outcome.done)
            log.info(
                "delivered",
                dispensary=self.dispensary,
                destination=self.destination.name,
                count=len(outcome.done),
                counts=dict(ops),
                requests=len(batches),
                duration_ms=round((time.monotonic() - started) * 1000, 2),
            )
        try:
            await self._record(outcome)
        except Exception:
            self._unrecorded = outcome
            raise

    def _contacts_sync(self, rows: list[OutboxRow]) -> dict[str, str]:
        """In the store's thread: the contact ids claimed operations are sent with."""
        store, name = self.astore.store, self.destination.name
        contacts = store.contact_ids(self.dispensary, name, {r.customer_id for r in rows})
        survivors = {str(r.body["into_customer_id"]) for r in rows if r.op == "merge"}
        if survivors:
            # a merge goes into the final survivor: if the survivor was itself merged
            # away since this merge was planned (B into C after A into B), into C's
            resolved = store.resolve_contact_ids(self.dispensary, name, survivors)
            contacts.update({f"into:{cid}": contact for cid, contact in resolved.items()})
        return contacts

    def _log_recorded(self, outcome: _Outcome) -> None:
        if outcome.done:
            ops = collections.Counter(row.op for row, _ in outcome.done)
            log.info(
                "delivered",
                dispensary=self.dispensary,
                destination=self.destination.name,
                count=len(outcome.done),
                counts=dict(ops),
                requests=outcome.requests,
            )

    def _give_back(self, rows: list[OutboxRow], exc: Exception) -> None:
        """Claimed, nothing sent, and the store failed: the claims go back, due now."""
        now = time.time()
        error = f"not sent: the store failed ({exc.__class__.__name__})"
        self._unrecorded = _Outcome([], [(row, now, error) for row in rows], [], [])

    async def _record_unrecorded(self) -> None:
        outcome, store = self._unrecorded, self.astore.store
        assert outcome is not None
        try:
            await self._record(outcome)
        except StoreUnavailable:
            raise  # an outage (locked, full, read-only, gone): the round is kept for later
        except Exception:
            with contextlib.suppress(Exception):
                # the store takes writes and still refuses the round: not an outage but a
                # bug, which must not hold up the destination for good. The round is
                # dropped, its claims left in flight until this process ends (as before it
                # was kept). A read (ping) would not do: a locked, full or read-only SQLite
                # store still answers reads.
                await self.astore.call(store.probe_write)
                self._unrecorded = None
                log.error(
                    "delivery_unrecorded",
                    dispensary=self.dispensary,
                    destination=self.destination.name,
                    count=len(outcome.done) + len(outcome.retry) + len(outcome.dead),
                )
            raise
        self._unrecorded = None

    async def _record(self, outcome: _Outcome) -> None:
        await self.astore.call(self._record_sync, outcome)

    def _record_sync(self, outcome: _Outcome) -> None:
        self.astore.store.finish(
            self.dispensary,
            self.destination.name,
            outcome.done,
            outcome.retry,
            outcome.dead,
            outcome.conflicts,
            replaced=outcome.replaced,
            paused=outcome.paused,
            pause=outcome.pause,
            answers=outcome.answers,
        )

    async def _send(
        self,
        batch: list[OutboxRow],
        contacts: dict[str, str],
        into: _Outcome | None,
        *,
        bulk: bool = False,
    ) -> None:
        """Send one batch; its results go to ``into``, or when None, to the results
        waiting for the next record (:attr:`_finished`, as it is when the call ends)."""
        deliveries = [_delivery(row, contacts) for row in batch]
        async with self._slots, self.limiter.slot():
            if self.paused_until > time.time():
                # the quota was met since this batch was claimed (by a call ending while the
                # trip that claimed it was at the store, or while it waited for a slot): it
                # waits for the pause with no attempt counted, as the call that met it does
                outcome = self._finished if into is None else into
                until, reason = self.paused_until, self._pause_reason
                outcome.paused.extend((row, until, reason) for row in batch)
                return
            if not self.leased and into is None:
                # another process took the destination's lease since this call was claimed
                # ahead (it took a slot while the renewal was at the store): it goes back
                # unsent, as those still waiting do
                self._unsent(batch)
                return
            started = time.monotonic()
            try:
                if bulk:
                    results = await self.destination.backfill(deliveries)
                else:
                    results = await self.destination.send(deliveries)
            except QuotaPause as exc:
                self._paused(batch, exc, self._results_of(into))
                return
            except DeliveryError as exc:
                self._failed(batch, exc, time.monotonic() - started, self._results_of(into))
                return
            except Exception as exc:  # a bug in an adapter must not lose the operations
                log.exception("delivery_crashed", destination=self.destination.name)
                error = RetriableDelivery(f"unexpected {exc.__class__.__name__}")
                self._failed(batch, error, time.monotonic() - started, self._results_of(into))
                return
        outcome = self._results_of(into)
        duration = time.monotonic() - started
        if len(results) < len(batch):  # an adapter that says less: the rest was accepted
            results = [*results, *[Sent() for _ in range(len(batch) - len(results))]]
        debug = log.isEnabledFor(logging.DEBUG)
        for row, result in zip(batch, results[: len(batch)], strict=True):
            if isinstance(result, QuotaPause):
                self._paused([row], result, outcome)
                continue
            if isinstance(result, DeliveryError):
                self._failed([row], result, duration, outcome)
                continue
            contact_id = result.contact_id
            if row.op == "merge" and contact_id == contacts.get(
                f"into:{row.body.get('into_customer_id')}"
            ):
                contact_id = None  # the survivor's contact, known already (maybe resolved)
            outcome.done.append((row, contact_id))
            if result.replaces is not None and contact_id:
                # the store moves the map and reports it (contact_replaced)
                outcome.replaced[row.id] = result.replaces
                if self.metrics is not None:
                    self.metrics.conflicts.labels(self.dispensary, self.destination.name).inc()
            if result.conflict is not None:
                conflict = result.conflict if self._blank is None else self._blank(result.conflict)
                kind, _, detail = conflict.partition(": ")
                outcome.conflicts.append((row.customer_id, kind, detail or kind))
                if self.metrics is not None:
                    self.metrics.conflicts.labels(self.dispensary, self.destination.name).inc()
            self._count(row, "delivered")
            if debug:  # the store keeps every delivery (outbox); info has one line a round
                log.debug(
                    "delivered",
                    dispensary=self.dispensary,
                    destination=self.destination.name,
                    customer_id=row.customer_id,
                    op=row.op,
                    operation_id=row.id,
                    attempt=row.attempts + 1,
                    duration_ms=round(duration * 1000, 2),
                    status="ok",
                )
        if self._seconds is not None:
            self._seconds.observe(duration)

    def _results_of(self, into: _Outcome | None) -> _Outcome:
        if into is not None:
            return into
        self._finished.requests += 1
        return self._finished

    def _paused(self, batch: list[OutboxRow], exc: QuotaPause, outcome: _Outcome) -> None:
        """The destination's quota is used up until ``exc.until``: these operations wait for
        it with no attempt counted, and the destination claims nothing meanwhile."""
        if self._blank is not None:
            exc = self._blank.error(exc)
        reason = f"quota: {exc}"
        until = _bounded(exc.until)
        outcome.paused.extend((row, until, reason) for row in batch)
        answer = (exc.status_code, vendor_code(exc.body, [row.body for row in batch]))
        outcome.answers.update((row.id, answer) for row in batch)
        if outcome.pause is None or until > outcome.pause[0]:
            outcome.pause = (until, reason, exc.status_code)
        self._pause_until(until, reason)

    def _pause_until(self, until: float, reason: str) -> None:
        if until <= self.paused_until:
            return
        self.paused_until, self._pause_reason = until, reason
        log.warning(
            "destination_paused",
            dispensary=self.dispensary,
            destination=self.destination.name,
            until=datetime.fromtimestamp(until, UTC).isoformat(timespec="seconds"),
            seconds=round(max(0.0, until - time.time()), 1),
            reason=reason,
        )
        if self.metrics is not None:  # the pause itself is read from the store at a scrape
            self.metrics.quota_pauses.labels(self.dispensary, self.destination.name).inc()

    def _failed(
        self, batch: list[OutboxRow], exc: DeliveryError, duration: float, outcome: _Outcome
    ) -> None:
        if self._blank is not None:
            exc = self._blank.error(exc)
        now = time.time()
        answer = (exc.status_code, vendor_code(exc.body, [row.body for row in batch]))
        for row in batch:
            outcome.answers[row.id] = answer
            attempts = row.attempts + 1
            first = row.first_attempt_at if row.first_attempt_at is not None else now
            delay = None
            if isinstance(exc, RetriableDelivery):
                delay = self.retry.next_delay(attempts, now - first, exc.retry_after)
            if delay is None:
                reason = str(exc) if isinstance(exc, FatalDelivery) else f"gave up: {exc}"
                outcome.dead.append((row, reason, exc.status_code, exc.body))
                self._count(row, "dead")
                result = "dead"
            else:
                outcome.retry.append((row, now + delay, str(exc)))
                self._count(row, "retried")
                if self.metrics is not None:
                    self.metrics.retries.labels(self.dispensary, self.destination.name).inc()
                result = "retry"
            log.warning(
                "delivery_failed",
                dispensary=self.dispensary,
                destination=self.destination.name,
                customer_id=row.customer_id,
                op=row.op,
                operation_id=row.id,
                attempt=attempts,
                status_code=exc.status_code,
                error=str(exc),
                outcome=result,
                duration_ms=round(duration * 1000, 2),
                retry_in_s=None if delay is None else round(delay, 3),
            )

    def _count(self, row: OutboxRow, result: str) -> None:
        if self.metrics is not None:
            series = self._operations.get((row.op, result))
            if series is None:
                series = self._operations[(row.op, result)] = self.metrics.operations.labels(
                    self.dispensary, self.destination.name, row.op, result
                )
            series.inc()


def _bounded(until: float) -> float:
    """A pause's end, at most :data:`MAX_PAUSE_SECONDS` ahead (never infinite)."""
    latest = time.time() + MAX_PAUSE_SECONDS
    return until if math.isfinite(until) and until < latest else latest


CONTRACT_KEYS = (
    "op",
    "dispensary",
    "customer_id",
    "contact_id",
    "fields",
    "channels",
    "from_contact_id",
    "into_contact_id",
    "from_customer_id",
    "into_customer_id",
    "idempotency_key",
)


def _delivery(row: OutboxRow, contacts: dict[str, str]) -> Delivery:
    """The operation as contract 4 states it: every key present, null where it does not
    apply, so a receiving workflow (n8n, Zapier, Make) sees one fixed shape."""
    body: dict[str, object] = dict.fromkeys(CONTRACT_KEYS)
    body.update(row.body)
    body["contact_id"] = contacts.get(row.customer_id)
    if row.op == "merge":
        body["from_contact_id"] = contacts.get(str(body.get("from_customer_id")))
        body["into_contact_id"] = contacts.get(f"into:{body.get('into_customer_id')}")
    body["idempotency_key"] = row.idempotency_key
    return Delivery(row.id, row.idempotency_key, body)
