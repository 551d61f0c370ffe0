"""From stored events to queued operations: the deployment's destinations and the planning
loop that feeds every event (webhook or reconciliation) through the planner.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from connector.config import Config, DispensaryConfig, HttpDestination, JsonlDestination
from connector.delivery.base import Destination
from connector.delivery.http import HttpSink
from connector.delivery.jsonl import JsonlSink
from connector.errors import EventValidationError
from connector.logs import get_logger
from connector.mapping import load_mapping
from connector.metrics import Metrics
from connector.planner import DestinationSpec, content_hash, plan
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
    touched: set[tuple[str, str]] = field(default_factory=set)  # (dispensary, destination)


def process_batch(store: Store, deployment: Deployment, limit: int = 64) -> BatchResult:
    """Plan up to ``limit`` pending events, oldest first, in one transaction.

    The new customer state, the operations and the events' outcomes commit together: a crash
    at any point leaves either all of an event's effects or none of them.
    """
    result = BatchResult()
    with store.transaction() as conn:
        rows = store.pending_events(conn, limit)
        outcomes: dict[int, str] = {}
        for row in rows:
            runtime = deployment.dispensaries.get(row.dispensary)
            try:
                event = parse_event_json(row.body)
            except EventValidationError:
                outcomes[row.id] = "failed"
                continue
            if runtime is None or not isinstance(event, CustomerEvent):
                outcomes[row.id] = "ignored"
                continue
            customer = event.customer
            related = [customer.customer_id, *customer.merged_customer_ids]
            if customer.merged_into_customer_id:
                related.append(customer.merged_into_customer_id)
            states = store.load_states(conn, row.dispensary, related)
            planned = plan(
                customer, row.dispensary, states, runtime.specs, digest=content_hash(customer)
            )
            store.save_states(conn, row.dispensary, states, planned.states)
            store.enqueue(conn, row.dispensary, planned.operations)
            store.add_conflicts(
                conn,
                row.dispensary,
                [(c.customer_id, c.destination, c.kind, c.detail) for c in planned.conflicts],
            )
            for failure in planned.failures:
                store.dead_letter_direct(
                    conn, row.dispensary, failure.destination, customer.customer_id, "upsert",
                    f"mapping failed: {failure.message}",
                )  # fmt: skip
            result.touched.update((row.dispensary, op.destination) for op in planned.operations)
            outcomes[row.id] = planned.outcome
        store.mark_events(conn, outcomes)
    result.events = len(rows)
    result.outcomes.update(outcomes.values())
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
    ) -> None:
        self.astore = astore
        self.deployment = deployment
        self.on_enqueued = on_enqueued
        self.metrics = metrics
        self.idle_poll = idle_poll
        self.wake = asyncio.Event()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wake.clear()
            result = await self.astore.call(process_batch, self.astore.store, self.deployment)
            if result.touched:
                self.on_enqueued(result.touched)
            if result.events:
                counts = dict(result.outcomes)
                log.info("planned", events=result.events, counts=counts)
                if self.metrics is not None:
                    for outcome, count in counts.items():
                        self.metrics.planned.labels("all", outcome).inc(count)
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
