"""From stored events to queued operations: the deployment's destinations and the planning
loop that feeds every event (webhook or reconciliation) through the planner.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from connector._pressure import Pressure
from connector.config import AnyDestination, Config, DispensaryConfig
from connector.delivery._wait import Signal, first_of
from connector.delivery.retry import RetryPolicy
from connector.delivery.worker import DeliveryWorker
from connector.destinations import build_destination, capabilities, mapping_problems
from connector.errors import EventValidationError, MappingError, Problem
from connector.logs import get_logger
from connector.mapping import load_mapping
from connector.metrics import Metrics
from connector.planner import (
    CustomerState,
    DestinationSpec,
    Operation,
    Plan,
    content_hash,
    instant_us,
    plan,
)
from connector.store import AsyncStore, InboxRow, PlannedBatch, Rejected, StateReader
from connector.store.abc import PlanCommit
from connector.treez import CustomerEvent, parse_stored_event

log = get_logger("connector.pipeline")
PROCESSED = ("applied", "tie")  # outcomes that make an event the customer's current version


def build_worker(
    astore: AsyncStore,
    dispensary: str,
    config: AnyDestination,
    *,
    metrics: Metrics | None = None,
    idle_poll: float = 1.0,
    pressure: Pressure | None = None,
) -> DeliveryWorker:
    """A delivery worker for a configured destination, with its adapter and retry policy."""
    retry = RetryPolicy(
        initial_seconds=config.retry.initial_seconds,
        max_seconds=config.retry.max_seconds,
        min_attempts=config.retry.min_attempts,
        min_elapsed_seconds=config.retry.min_elapsed_seconds,
    )
    return DeliveryWorker(
        astore,
        dispensary,
        build_destination(config),
        retry=retry,
        concurrency=config.concurrency,
        metrics=metrics,
        idle_poll=idle_poll,
        pressure=pressure,
    )


@dataclass(slots=True)
class DispensaryRuntime:
    name: str
    config: DispensaryConfig
    specs: list[DestinationSpec]


@dataclass(slots=True)
class Deployment:
    """Everything the planner needs, compiled once from the configuration."""

    dispensaries: dict[str, DispensaryRuntime] = field(default_factory=dict)
    future_skew_us: int = 300_000_000  # server.max_future_skew_seconds

    @classmethod
    def from_config(cls, config: Config) -> Deployment:
        out = cls(future_skew_us=int(config.server.max_future_skew_seconds * 1_000_000))
        for name, disp in config.dispensaries.items():
            specs = []
            for dest in disp.destinations:
                can = capabilities(dest)
                mapping = load_mapping(dest.mapping)
                problems = mapping_problems(dest, mapping)
                if problems:
                    where = f"dispensaries.{name}.destinations ({dest.name}, type {dest.type})"
                    raise MappingError(str(dest.mapping), [Problem(where, p) for p in problems])
                specs.append(
                    DestinationSpec(
                        name=dest.name,
                        mapping=mapping,
                        policy=disp.policy_for(dest.name),
                        native_merge=can.native_merge,
                        channels=can.channels,
                        external_id_key=can.external_id_key,
                        consent_fields=can.consent_needs_fields,
                        coalesce_upserts=can.coalesce_upserts,
                    )
                )
            out.dispensaries[name] = DispensaryRuntime(name, disp, specs)
        return out


@dataclass(slots=True)
class BatchResult:
    events: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_dispensary: Counter[tuple[str, str]] = field(default_factory=Counter)
    touched: set[tuple[str, str]] = field(default_factory=set)  # (dispensary, destination)
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)  # (dispensary, field)
    # customers whose current version the batch queued again (``refresh``): more is pending
    requeued: int = 0


@dataclass
class _Plans(PlannedBatch):
    """A batch planned in memory, ready for the store to write (:class:`PlannedBatch`), and
    what the loop reports about it."""

    touched: set[tuple[str, str]] = field(default_factory=set)
    # events refused when planned (parse_stored_event): (row, the problems), kept in
    # quarantine with their reason when the batch is written (``rejected``)
    invalid: list[tuple[InboxRow, str]] = field(default_factory=list)
    # applied events whose wrong fields outside the rules were left out: (row, the problems)
    dropped: list[tuple[InboxRow, list[Problem]]] = field(default_factory=list)


def _related(
    rows: list[InboxRow], deployment: Deployment
) -> tuple[
    dict[int, str],
    list[tuple[InboxRow, CustomerEvent]],
    dict[str, set[str]],
    list[tuple[InboxRow, str]],
    list[tuple[InboxRow, list[Problem]]],
]:
    """Parse the events; which customers' state each dispensary's batch needs; the events
    refused, with their problems; the fields left out of the others, with theirs."""
    outcomes: dict[int, str] = {}
    work: list[tuple[InboxRow, CustomerEvent]] = []
    related: dict[str, set[str]] = {}
    invalid: list[tuple[InboxRow, str]] = []
    left_out: list[tuple[InboxRow, list[Problem]]] = []
    for row in rows:
        try:
            event, dropped = parse_stored_event(row.body)
        except EventValidationError as exc:
            outcomes[row.id] = "failed"
            invalid.append((row, "; ".join(str(p) for p in exc.problems)))
            continue
        if dropped:
            left_out.append((row, dropped))
        if row.dispensary not in deployment.dispensaries or not isinstance(event, CustomerEvent):
            outcomes[row.id] = "ignored"
            continue
        customer = event.customer
        ids = related.setdefault(row.dispensary, set())
        ids.add(customer.customer_id)
        ids.update(customer.merged_customer_ids)
        if customer.merged_into_customer_id:
            ids.add(customer.merged_into_customer_id)
        work.append((row, event))
    return outcomes, work, related, invalid, left_out


def summary(planned: Plan, *, known: bool) -> str:
    """What planning one event gave, in words a run's counts are made from: ``new`` when the
    customer was unknown, then the operation kinds, ``conflict`` and ``merged`` (a merged-away
    customer recorded as such)."""
    words = [] if known else ["new"]
    words += sorted({op.op for op in planned.operations})
    if planned.conflicts:
        words.append("conflict")
    if planned.outcome == "applied" and any(
        s.merged_into is not None for s in planned.states.values()
    ):
        words.append("merged")
    return " ".join(words)[:96]


def decisions(planned: Plan) -> str:
    """What planning one event decided per destination, as ``inbox.decisions`` keeps it:
    ``[[destination, kind, detail], ...]``, kind an operation (detail: its idempotency key,
    which finds it in the outbox), ``failed`` (the mapping refused the customer) or
    ``conflict`` (detail: the conflict's kind). No customer value is written."""
    found: list[list[str]] = [
        [op.destination, op.op, op.idempotency_key] for op in planned.operations
    ]
    found += [[f.destination, "failed", "mapping"] for f in planned.failures]
    found += [[c.destination, "conflict", c.kind] for c in planned.conflicts]
    return json.dumps(found, separators=(",", ":"))


def _plan_rows(
    rows: list[InboxRow],
    deployment: Deployment,
    load: Callable[[str, set[str]], dict[str, CustomerState]],
    first_received: Callable[[str, str, int], float | None] | None = None,
) -> _Plans:
    """Plan ``rows`` one after the other against state held in memory (each event sees the
    effects of the ones before it, as if applied one at a time). No writes."""
    outcomes, work, related, invalid, left_out = _related(rows, deployment)
    loaded = {d: _with_survivors(load, d, ids) for d, ids in related.items()}
    current = {d: dict(states) for d, states in loaded.items()}
    plans = _Plans(
        rows=rows,
        outcomes=outcomes,
        related=related,
        loaded=loaded,
        current=current,
        operations={d: [] for d in related},
        conflicts={d: [] for d in related},
        failures=[],
        invalid=invalid,
        dropped=left_out,
    )
    for row, event in work:
        event_id, dispensary = row.id, row.dispensary
        customer = event.customer
        states = current[dispensary]
        before = states.get(customer.customer_id)
        known = before is not None and before.last_update_us is not None
        ceiling = None
        if row.received_at is not None:
            ceiling = int(row.received_at * 1_000_000) + deployment.future_skew_us
            raw = instant_us(customer.last_update)
            if raw > ceiling and first_received is not None:
                # dated past the skew: it orders at its first receipt, so a re-delivery of
                # it later is not taken for a newer version
                first = first_received(dispensary, customer.customer_id, raw)
                if first is not None:
                    ceiling = min(ceiling, int(first * 1_000_000) + deployment.future_skew_us)
        try:
            planned = plan(
                customer,
                dispensary,
                states,
                deployment.dispensaries[dispensary].specs,
                resend=row.source == "resend",
                digest=content_hash(customer),
                not_after_us=ceiling,
                refresh=row.source == "refresh",
            )
        except Exception as exc:  # one poisoned event must not hold up every other one
            outcomes[event_id] = "failed"
            plans.invalid.append((row, f"could not be planned ({exc.__class__.__name__})"))
            continue
        if row.run_id is not None:
            plans.planned[event_id] = summary(planned, known=known)
        plans.decisions[event_id] = decisions(planned)
        for changed_id, after in planned.states.items():
            earlier = states.get(changed_id)
            is_current = changed_id == customer.customer_id and planned.outcome in PROCESSED
            if (
                after.opt_out_seen
                and not (earlier is not None and earlier.opt_out_seen)
                and after.merged_into is None
                and after.last_update_us is not None
                and not is_current
            ):
                plans.refresh.setdefault(dispensary, set()).add(changed_id)
        states.update(planned.states)
        plans.operations[dispensary].extend(planned.operations)
        plans.conflicts[dispensary].extend(
            (c.customer_id, c.destination, c.kind, c.detail) for c in planned.conflicts
        )
        plans.failures.extend(
            (dispensary, f.destination, customer.customer_id, f.message) for f in planned.failures
        )
        plans.touched.update((dispensary, op.destination) for op in planned.operations)
        outcomes[event_id] = planned.outcome
    plans.rejected = [
        Rejected(
            row.dispensary,
            422,
            f"{REFUSED_WHEN_PLANNED} ({row.source}): {problems}",
            "application/json",
            row.body.encode(),
        )
        for row, problems in plans.invalid
    ]
    return plans


def _plan_with(deployment: Deployment) -> Callable[[list[InboxRow], StateReader], _Plans]:
    """:func:`_plan_rows` as the store's plan-commit port calls it: against the state it
    reads through a :class:`StateReader` (one of its snapshots or transactions)."""

    def plan_rows(rows: list[InboxRow], reader: StateReader) -> _Plans:
        return _plan_rows(rows, deployment, reader.load_states, reader.first_received)

    return plan_rows


def _with_survivors(
    load: Callable[[str, set[str]], dict[str, CustomerState]], dispensary: str, ids: set[str]
) -> dict[str, CustomerState]:
    """The states of ``ids`` and of every customer they were merged into, down each chain
    (a merge goes into the final survivor). ``ids`` gains the survivors, so the batch's
    optimistic re-check covers them too. One more read per link, only where merges are."""
    states = load(dispensary, ids)
    wanted = {s.merged_into for s in states.values() if s.merged_into} - ids
    while wanted:
        ids.update(wanted)
        found = load(dispensary, wanted)
        states.update(found)
        wanted = {s.merged_into for s in found.values() if s.merged_into} - ids
    return states


def _field_of(problem: Problem) -> str:
    """``data.addresses[0].city`` → ``addresses``: the customer field a problem is about."""
    return problem.where.removeprefix("data.").split(".", 1)[0].split("[", 1)[0]


# the start of the quarantine reason of a stored event refused when it is planned: the
# receiver and the reconciliation check what they store, so this is an event stored by an
# older version, or written to the inbox by hand
REFUSED_WHEN_PLANNED = "refused when planned"


def process_batch(store: PlanCommit, deployment: Deployment, limit: int = 256) -> BatchResult:
    """Plan up to ``limit`` pending events, oldest first, and commit the result at once.

    Planning is CPU work, and the write lock is shared with the receiver (in another process
    by default): so the events and their customers' state are read first, planned with no
    lock held, and only the writes take the lock. Under the lock the batch checks that its
    events are still pending and that the state it planned from is still what is stored; if
    another process changed either meanwhile, it plans again under the lock. The new state,
    the operations and the events' outcomes commit together, a few set-wise statements per
    dispensary: a crash at any point leaves all of a batch's effects or none.
    """
    plans = store.plan_batch(limit, _plan_with(deployment))
    if plans is None:
        return BatchResult()
    result = BatchResult(
        events=len(plans.rows),
        touched=plans.touched,
        requeued=sum(len(ids) for ids in plans.refresh.values()),
    )
    for row, dropped in plans.dropped:
        # field paths and what is wrong with them: never a value (customer data)
        log.warning(
            "fields_dropped",
            dispensary=row.dispensary,
            source=row.source,
            customer_id=row.customer_id,
            reason="; ".join(str(p) for p in dropped),
        )
        result.dropped.update((row.dispensary, _field_of(p)) for p in dropped)
    for row, problems in plans.invalid:
        # field paths and what is wrong with them: never a value (they are customer data)
        log.warning(
            "event_refused",
            dispensary=row.dispensary,
            source=row.source,
            customer_id=row.customer_id,
            reason=problems,
        )
    result.outcomes.update(plans.outcomes.values())
    dispensary_of = {row.id: row.dispensary for row in plans.rows}
    result.by_dispensary.update((dispensary_of[i], o) for i, o in plans.outcomes.items())
    return result


class Processor:
    """Runs :func:`process_batch` whenever events arrive, and wakes the workers it fed."""

    def __init__(
        self,
        astore: AsyncStore,
        deployment: Deployment,
        *,
        on_enqueued: Callable[[Iterable[tuple[str, str]]], None],
        metrics: Metrics | None = None,
        idle_poll: float = 1.0,
        pressure: Pressure | None = None,
        linger: float = 0.02,
    ) -> None:
        self.astore = astore
        self.deployment = deployment
        self.linger = linger
        self.pressure = pressure or Pressure()
        self.on_enqueued = on_enqueued
        self.metrics = metrics
        self.idle_poll = idle_poll  # the service may lengthen it while wake-ups are heard
        self.backoff = idle_poll  # the first wait after a failure
        self.wake = Signal()
        self._planned: dict[tuple[str, str], Any] = {}  # planned events' series, by labels

    async def run(self, stopping: asyncio.Event) -> None:
        failures = 0
        # after a small batch, the next one waits until this (monotonic) time: events that
        # arrive meanwhile are planned together (each batch has a fixed cost, a few
        # statements whatever its size)
        hold_until = 0.0
        while not stopping.is_set():
            held = hold_until - time.monotonic()
            if held > 0:
                # no timer runs after a batch: at a trickle an event is planned at once, and
                # only one that follows a batch within the linger waits for the rest of it
                await _rest(stopping, held)
                continue
            self.wake.clear()
            started = time.monotonic()
            # small batches while webhooks arrive: a batch holds the interpreter lock
            limit = 16 if self.pressure.busy else 64
            try:
                result = await self.astore.call(
                    process_batch, self.astore.store, self.deployment, limit
                )
            except Exception as exc:  # a locked store, a bug: the events stay pending
                failures += 1
                log.warning("planning_failed", error=exc, attempt=failures)
                # a wake-up (a commit, the store's listener reconnecting) ends the back-off
                self.wake.clear()
                await _rest(stopping, min(30.0, self.backoff * 2**failures), self.wake)
                continue
            failures = 0
            if result.touched:
                self.on_enqueued(result.touched)
            if result.events:
                counts = dict(result.outcomes)
                log.info("planned", events=result.events, counts=counts)
                if self.metrics is not None:
                    for key, count in result.by_dispensary.items():
                        series = self._planned.get(key)
                        if series is None:  # each looked up once (see DeliveryWorker)
                            series = self._planned[key] = self.metrics.planned.labels(*key)
                        series.inc(count)
                    for (dispensary, name), count in result.dropped.items():
                        self.metrics.fields_dropped.labels(dispensary, name).inc(count)
                await self.pressure.yield_after(time.monotonic() - started)
                if result.events >= limit // 4 or result.requeued:
                    continue
                # a trickle: the next batch waits for the linger to pass since this one
                # (see ``hold_until``), so that it carries more events
                hold_until = time.monotonic() + self.linger
                if self.wake.is_set():
                    continue
                # nothing was committed since this batch read the inbox (a commit sets
                # ``wake``): no event is pending, and polling for none has its cost too
            await first_of([self.wake, stopping], self.idle_poll)


async def _rest(stopping: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep ``seconds``, or less if the service stops (or ``wake`` is set) meanwhile."""
    await first_of([stopping] if wake is None else [wake, stopping], seconds)


def plan_without_writing(
    store: PlanCommit, deployment: Deployment, rows: list[InboxRow]
) -> tuple[dict[int, str], dict[str, list[Operation]]]:
    """Plan ``rows`` against the stored state and return (outcome per row id, operations per
    dispensary) without writing anything: what a dry run shows."""
    plans = store.plan_readonly(rows, _plan_with(deployment))
    return plans.outcomes, plans.operations
