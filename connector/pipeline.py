"""From stored events to queued operations: the deployment's destinations and the planning
loop that feeds every event (webhook or reconciliation) through the planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from connector._pressure import Pressure
from connector.config import Config, DispensaryConfig, HttpDestination, JsonlDestination
from connector.delivery.base import Destination
from connector.delivery.http import HttpSink
from connector.delivery.jsonl import JsonlSink
from connector.errors import EventValidationError
from connector.logs import get_logger
from connector.mapping import load_mapping
from connector.metrics import Metrics
from connector.planner import DestinationSpec, Operation, content_hash, plan
from connector.store import AsyncStore, Store
from connector.treez import CustomerEvent, parse_event_json

log = get_logger("connector.pipeline")


def build_destination(config: HttpDestination | JsonlDestination) -> Destination:
    if isinstance(config, HttpDestination):
        return HttpSink(config)
    return JsonlSink(config)


@dataclass(slots=True)
class DispensaryRuntime:
    name: str
    config: DispensaryConfig
    specs: list[DestinationSpec]


@dataclass(slots=True)
class Deployment:
    """Everything the planner needs, compiled once from the configuration."""

    dispensaries: dict[str, DispensaryRuntime] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> Deployment:
        out = cls()
        for name, disp in config.dispensaries.items():
            specs = [
                DestinationSpec(
                    name=dest.name,
                    mapping=load_mapping(dest.mapping),
                    policy=disp.policy_for(dest.name),
                    native_merge=True,  # http and jsonl both carry a merge operation
                )
                for dest in disp.destinations
            ]
            out.dispensaries[name] = DispensaryRuntime(name, disp, specs)
        return out


@dataclass(slots=True)
class BatchResult:
    events: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    by_dispensary: Counter[tuple[str, str]] = field(default_factory=Counter)
    touched: set[tuple[str, str]] = field(default_factory=set)  # (dispensary, destination)


def process_batch(store: Store, deployment: Deployment, limit: int = 256) -> BatchResult:
    """Plan up to ``limit`` pending events, oldest first, in one transaction.

    Events are planned one after the other against state held in memory (each sees the
    effects of the ones before it, as if applied one at a time); the new state, the
    operations and the events' outcomes then commit together, a few set-wise statements per
    dispensary. A crash at any point leaves all of a batch's effects or none.
    """
    result = BatchResult()
    with store.transaction(durable=False) as conn:  # redone from the durable inbox if lost
        rows = store.pending_events(conn, limit)
        outcomes: dict[int, str] = {}
        work: list[tuple[int, str, CustomerEvent]] = []
        related: dict[str, set[str]] = {}
        for row in rows:
            try:
                event = parse_event_json(row.body)
            except EventValidationError:
                outcomes[row.id] = "failed"
                continue
            if row.dispensary not in deployment.dispensaries or not isinstance(
                event, CustomerEvent
            ):
                outcomes[row.id] = "ignored"
                continue
            customer = event.customer
            ids = related.setdefault(row.dispensary, set())
            ids.add(customer.customer_id)
            ids.update(customer.merged_customer_ids)
            if customer.merged_into_customer_id:
                ids.add(customer.merged_into_customer_id)
            work.append((row.id, row.dispensary, event))

        loaded = {d: store.load_states(conn, d, ids) for d, ids in related.items()}
        current = {d: dict(states) for d, states in loaded.items()}
        operations: dict[str, list[Operation]] = {d: [] for d in related}
        conflicts: dict[str, list[tuple[str, str, str, str]]] = {d: [] for d in related}
        for event_id, dispensary, event in work:
            customer = event.customer
            states = current[dispensary]
            planned = plan(
                customer,
                dispensary,
                states,
                deployment.dispensaries[dispensary].specs,
                digest=content_hash(customer),
            )
            states.update(planned.states)
            operations[dispensary].extend(planned.operations)
            conflicts[dispensary].extend(
                (c.customer_id, c.destination, c.kind, c.detail) for c in planned.conflicts
            )
            for failure in planned.failures:
                store.dead_letter_direct(
                    conn, dispensary, failure.destination, customer.customer_id, "upsert",
                    f"mapping failed: {failure.message}",
                )  # fmt: skip
            result.touched.update((dispensary, op.destination) for op in planned.operations)
            outcomes[event_id] = planned.outcome
        for dispensary, states in current.items():
            store.save_states(conn, dispensary, loaded[dispensary], states)
            store.enqueue(conn, dispensary, operations[dispensary])
            store.add_conflicts(conn, dispensary, conflicts[dispensary])
        store.mark_events(conn, outcomes)
    result.events = len(rows)
    result.outcomes.update(outcomes.values())
    dispensary_of = {row.id: row.dispensary for row in rows}
    result.by_dispensary.update((dispensary_of[i], o) for i, o in outcomes.items())
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
        self.idle_poll = idle_poll
        self.wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        failures = 0
        while not stopping.is_set():
            self.wake.clear()
            started = time.monotonic()
            # small batches while webhooks arrive: a batch holds the interpreter lock
            limit = 16 if self.pressure.busy else 256
            try:
                result = await self.astore.call(
                    process_batch, self.astore.store, self.deployment, limit
                )
            except Exception as exc:  # a locked store, a bug: the events stay pending
                failures += 1
                log.warning("planning_failed", error=exc, attempt=failures)
                await _rest(stopping, min(30.0, self.idle_poll * 2**failures))
                continue
            failures = 0
            if result.touched:
                self.on_enqueued(result.touched)
            if result.events:
                counts = dict(result.outcomes)
                log.info("planned", events=result.events, counts=counts)
                if self.metrics is not None:
                    for (dispensary, outcome), count in result.by_dispensary.items():
                        self.metrics.planned.labels(dispensary, outcome).inc(count)
                await self.pressure.yield_after(time.monotonic() - started)
                if result.events < limit // 4:
                    # a trickle: wait a moment so the next batch carries more events (each
                    # batch costs a dozen statements whatever its size)
                    await _rest(stopping, self.linger)
                continue
            waits = [
                asyncio.ensure_future(self.wake.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            _, pending = await asyncio.wait(
                waits, timeout=self.idle_poll, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()


async def _rest(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if the service stops meanwhile."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
