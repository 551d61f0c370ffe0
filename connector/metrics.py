"""Prometheus metrics of one running connector (its own registry, so tests can run several).

With several replicas on one store, each serves its own ``/metrics``: counters and histograms
are this process's (and its pipeline process's), told apart by ``connector_replica_info``
(the replica id that ``connector status`` shows); the queue gauges are read from the store at
each scrape, so every replica shows the cluster's queues (sum counters across replicas, never
the queue gauges). The last reconciliation's times are read from the store at each scrape too
(the cluster's); the last webhook's time is this process's, seeded from the store once, so an
alert takes its ``max by (dispensary)`` over the replicas."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

REPLICA_ID_CHARS = 8


def replica_id(process_id: str) -> str:
    """The short form of a store process id that ``/metrics`` and ``connector status`` show
    (the first characters of a random hex id: unique enough among a cluster's replicas)."""
    return process_id[:REPLICA_ID_CHARS]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "connector_events_received",
            "Webhook bodies received, by outcome (accepted, ping, ignored, rejected_*...)",
            ["dispensary", "outcome"],
            registry=self.registry,
        )
        self.planned = Counter(
            "connector_events_planned",
            "Events planned, by outcome (applied, tie, stale, duplicate, absorbed, failed)",
            ["dispensary", "outcome"],
            registry=self.registry,
        )
        self.fields_dropped = Counter(
            "connector_fields_dropped",
            "Customer fields left out of applied events because their value was wrong (by "
            "field name; a consent identifier such as email or phone matters most)",
            ["dispensary", "field"],
            registry=self.registry,
        )
        self.operations = Counter(
            "connector_operations",
            "Operations sent to destinations, by result (delivered, retried, dead)",
            ["dispensary", "destination", "op", "result"],
            registry=self.registry,
        )
        self.retries = Counter(
            "connector_delivery_retries",
            "Delivery attempts that will be tried again",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "connector_delivery_seconds",
            "Duration of one request to a destination",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.conflicts = Counter(
            "connector_identity_conflicts",
            "External-id disagreements between Treez and the identity map",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "connector_queue_depth",
            "Operations waiting (pending or in flight)",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "connector_dead_operations",
            "Operations in the dead-letter queue",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.replica = Info(
            "connector_replica",
            "This process: its replica id (the store's process id, short, as connector status "
            "shows it), host, pid and role (all, receiver or pipeline)",
            registry=self.registry,
        )
        self.delivery_lease = Gauge(
            "connector_delivery_lease",
            "1 where this replica delivers for the destination (holds its lease), 0 where "
            "another replica does",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.paused_until = Gauge(
            "connector_destination_paused_until_seconds",
            "Until when (Unix time) the destination is paused for its used-up quota (a daily "
            "cap, a rate window's reset): nothing is sent to it before; 0 when not paused",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.quota_pauses = Counter(
            "connector_quota_pauses_total",
            "Pauses of a destination for its used-up quota, as this process met them",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.oldest_pending = Gauge(
            "connector_oldest_pending_seconds",
            "Age of the oldest operation not yet delivered",
            ["dispensary", "destination"],
            registry=self.registry,
        )
        self.last_reconcile = Gauge(
            "connector_last_reconcile_timestamp_seconds",
            "When (Unix time) the dispensary's last finished reconciliation run ended, labelled "
            "with its outcome (succeeded, failed, interrupted): one series per dispensary, "
            "read from the store (the cluster's)",
            ["dispensary", "outcome"],
            registry=self.registry,
        )
        self.last_reconcile_success = Gauge(
            "connector_last_reconcile_success_timestamp_seconds",
            "When (Unix time) the dispensary's last successful reconciliation run ended, read "
            "from the store (the cluster's)",
            ["dispensary"],
            registry=self.registry,
        )
        self.webhook_seen: dict[str, float] = {}
        """Dispensary -> when (Unix time) this process last stored a webhook of it. The
        receiver writes one float here per stored webhook: a plain dict, no lock, for a
        Gauge's ``set`` takes one on the hot path; it is read at each scrape."""
        self.webhook_times_loaded = False
        self.registry.register(_LastWebhook(self.webhook_seen))

    def remember_webhooks(self, times: Mapping[str, float]) -> None:
        """Seed the last webhook times with the store's (read once, after a start): a restart
        must not make a dispensary look silent. A later time this process saw itself wins."""
        for dispensary, at in times.items():
            if at > self.webhook_seen.get(dispensary, 0.0):
                self.webhook_seen[dispensary] = at
        self.webhook_times_loaded = True

    def render(
        self,
        queue_stats: Iterable[dict[str, Any]],
        configured: Iterable[tuple[str, str]] = (),
        extra: Iterable[Metric] = (),
        paused: Mapping[tuple[str, str], float] | None = None,
        reconciled: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> bytes:
        """The text exposition, with queue gauges read from the store just now; a configured
        destination with nothing queued reads 0 (not its last value). ``extra``: the families
        of the pipeline process, whose samples join this process's families of the same name.
        ``paused``: the destinations paused now (until when), from the store: the cluster's.
        ``reconciled``: per dispensary, its last finished run (``outcome``, ``ended_at``) and
        its last success (``succeeded_at``), from the store; None keeps the values shown."""
        now = time.time()
        entries = {(e["dispensary"], e["destination"]): e for e in queue_stats}
        for key in configured:
            entries.setdefault(
                key,
                {
                    "dispensary": key[0],
                    "destination": key[1],
                    "pending": 0,
                    "inflight": 0,
                    "dead": 0,
                    "oldest_pending_at": None,
                },
            )
        for entry in entries.values():
            labels = (entry["dispensary"], entry["destination"])
            self.queue_depth.labels(*labels).set(entry["pending"] + entry["inflight"])
            self.dead_letters.labels(*labels).set(entry["dead"])
            oldest = entry["oldest_pending_at"]
            self.oldest_pending.labels(*labels).set(0.0 if oldest is None else now - oldest)
        if paused is not None:
            for key in {*entries, *paused}:
                self.paused_until.labels(*key).set(paused.get(key, 0.0))
        if reconciled is not None:
            self._set_reconciled(reconciled)
        extra = list(extra)
        if not extra:
            return generate_latest(self.registry)
        merged: dict[str, Metric] = {}
        for family in [*self.registry.collect(), *extra]:
            known = merged.get(family.name)
            if known is None:
                copy = Metric(family.name, family.documentation, family.type, family.unit)
                copy.samples = list(family.samples)
                merged[family.name] = copy
            else:
                known.samples.extend(family.samples)
        return generate_latest(_Families(list(merged.values())))

    def _set_reconciled(self, reconciled: Mapping[str, Mapping[str, Any]]) -> None:
        # the last run's outcome is a label: a run that ends otherwise replaces the series
        # (cleared first, so a dispensary never shows two outcomes at once)
        self.last_reconcile.clear()
        self.last_reconcile_success.clear()
        for dispensary, times in reconciled.items():
            if times.get("outcome") is not None and times.get("ended_at") is not None:
                self.last_reconcile.labels(dispensary, times["outcome"]).set(times["ended_at"])
            if times.get("succeeded_at") is not None:
                self.last_reconcile_success.labels(dispensary).set(times["succeeded_at"])


class _LastWebhook:
    """``connector_last_webhook_timestamp_seconds`` from the dict the receiver writes."""

    def __init__(self, seen: dict[str, float]) -> None:
        self.seen = seen

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "connector_last_webhook_timestamp_seconds",
            "When (Unix time) the last webhook of the dispensary was stored (an event, not a "
            "refused body nor a ping), as this replica saw it, seeded from the store at its "
            "first scrape: take the max over replicas",
            labels=["dispensary"],
        )
        for dispensary, at in list(self.seen.items()):
            family.add_metric([dispensary], at)
        yield family


class _Families:
    """Enough of a registry for ``generate_latest``: the families to write."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
