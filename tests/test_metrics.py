"""The receiver's /metrics merges the pipeline process's families with its own; the times the
alerts of deploy/prometheus read (last webhook, last reconciliation) come from the receiver
and the store."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from test_receiver import (
    DISPENSARY,
    OTHER,
    OTHER_TOKEN,
    OTHER_URL,
    Running,
    run,
    samples,
    seed_with,
    settled_inbox,
)

from connector.metrics import Metrics

LAST_WEBHOOK = "connector_last_webhook_timestamp_seconds"
LAST_RECONCILE = "connector_last_reconcile_timestamp_seconds"
LAST_SUCCESS = "connector_last_reconcile_success_timestamp_seconds"


def parse(text: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_families_of_the_pipeline_process_join_the_receivers_once_each() -> None:
    receiver, child = Metrics(), Metrics()
    receiver.events.labels("d", "accepted").inc(3)
    child.planned.labels("d", "applied").inc(2)
    child.operations.labels("d", "sink", "upsert", "delivered").inc(2)
    child.delivery_seconds.labels("d", "sink").observe(0.01)
    # what crosses the socket pair: pickled families
    families = pickle.loads(pickle.dumps(list(child.registry.collect())))

    text = receiver.render([], [("d", "sink")], families)
    found = parse(text)

    # one HELP/TYPE per family: a duplicate would make the exposition invalid
    helps = [line for line in text.decode().splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))
    assert found["connector_events_received_total"] == [
        ({"dispensary": "d", "outcome": "accepted"}, 3.0)
    ]
    assert found["connector_events_planned_total"] == [
        ({"dispensary": "d", "outcome": "applied"}, 2.0)
    ]
    assert found["connector_operations_total"][0][1] == 2.0
    assert found["connector_delivery_seconds_count"][0][1] == 1.0
    assert found["connector_queue_depth"] == [({"dispensary": "d", "destination": "sink"}, 0.0)]


def test_without_a_pipeline_process_the_registry_renders_as_is() -> None:
    metrics = Metrics()
    metrics.events.labels("d", "ping").inc()
    found = parse(metrics.render([], []))
    assert found["connector_events_received_total"] == [
        ({"dispensary": "d", "outcome": "ping"}, 1.0)
    ]


# --- the times the alerts need, through the real app and store -------------------------------


def test_last_webhook_time_is_set_by_a_stored_event_not_a_ping_nor_a_refusal(
    tmp_path: Path, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        # the first scrape reads the store's times (none yet): what follows is the receiver's
        assert samples((await rx.client.get("/metrics")).text, LAST_WEBHOOK) == {}
        before = time.time()
        assert (await rx.post()).status_code == 202
        assert (
            await rx.post({"event_type": "TICKET", "data": {}}, path=OTHER_URL, token=OTHER_TOKEN)
        ).status_code == 202
        after = time.time()
        assert (await rx.post({"test": True})).status_code == 200
        assert (await rx.post(b"nope")).status_code == 400

        found = samples((await rx.client.get("/metrics")).text, LAST_WEBHOOK)

        assert set(found) == {(("dispensary", DISPENSARY),), (("dispensary", OTHER),)}
        for at in found.values():
            assert before <= at <= after

    run(tmp_path, scenario, store=store_url)


def test_a_ping_or_a_refused_body_alone_leaves_no_last_webhook_time(
    tmp_path: Path, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        assert (await rx.post({"test": True})).status_code == 200
        assert (await rx.post(token="wrong")).status_code == 403
        assert (await rx.post(seed_with(opt_out="maybe"))).status_code == 422

        assert samples((await rx.client.get("/metrics")).text, LAST_WEBHOOK) == {}

    run(tmp_path, scenario, store=store_url)


def test_last_webhook_time_survives_a_restart(tmp_path: Path, store_url: str) -> None:
    """A new process starts from the store's latest webhook, not from nothing."""
    stored: list[float] = []

    async def first(rx: Running) -> None:
        assert (await rx.post()).status_code == 202
        rows = await settled_inbox(rx, 1)
        stored.append(rows[0].received_at)

    async def second(rx: Running) -> None:
        found = samples((await rx.client.get("/metrics")).text, LAST_WEBHOOK)
        assert found == {(("dispensary", DISPENSARY),): stored[0]}

    run(tmp_path, first, store=store_url)
    run(tmp_path, second, store=store_url)


def test_a_webhook_seen_after_the_start_wins_over_the_stored_time() -> None:
    metrics = Metrics()
    metrics.webhook_seen["d"] = 200.0
    metrics.remember_webhooks({"d": 100.0, "e": 50.0})
    found = parse(metrics.render([], []))
    by_dispensary = {labels["dispensary"]: at for labels, at in found[LAST_WEBHOOK]}
    assert by_dispensary == {"d": 200.0, "e": 50.0}


def _runs(store: Any, runs: list[tuple[str, str]]) -> dict[str, float]:
    """Record reconciliation runs (dispensary, outcome), in order: when each dispensary's
    last one ended ("running": started, not finished; "interrupted": closed as after a
    crash)."""
    ended: dict[str, float] = {}
    for dispensary, outcome in runs:
        run_id = store.start_run(dispensary, "schedule", {}, None)
        if outcome == "interrupted":
            store.close_interrupted(dispensary)
            ended[dispensary] = store.runs(dispensary, 1)[0]["started_at"]
        elif outcome != "running":
            store.finish_run(run_id, outcome, {}, None)
            ended[dispensary] = store.runs(dispensary, 1)[0]["ended_at"]
    return ended


def test_last_reconciliation_times_and_outcome_are_read_from_the_store(
    tmp_path: Path, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        astore = rx.service.astore
        assert samples((await rx.client.get("/metrics")).text, LAST_RECONCILE) == {}

        success = await astore.call(_runs, astore.store, [(DISPENSARY, "succeeded")])
        failure = await astore.call(
            _runs,
            astore.store,
            [(DISPENSARY, "failed"), (DISPENSARY, "running"), (OTHER, "failed")],
        )
        text = (await rx.client.get("/metrics")).text

        # the run still going does not hide the failure before it
        assert samples(text, LAST_RECONCILE) == {
            (("dispensary", DISPENSARY), ("outcome", "failed")): failure[DISPENSARY],
            (("dispensary", OTHER), ("outcome", "failed")): failure[OTHER],
        }
        # OTHER never succeeded: no series, rather than a 1970 that looks overdue
        assert samples(text, LAST_SUCCESS) == {(("dispensary", DISPENSARY),): success[DISPENSARY]}

        again = await astore.call(
            _runs, astore.store, [(DISPENSARY, "succeeded"), (OTHER, "interrupted")]
        )
        text = (await rx.client.get("/metrics")).text

        # one series per dispensary: the failed one is gone once a run succeeds
        assert samples(text, LAST_RECONCILE) == {
            (("dispensary", DISPENSARY), ("outcome", "succeeded")): again[DISPENSARY],
            (("dispensary", OTHER), ("outcome", "interrupted")): again[OTHER],
        }
        assert samples(text, LAST_SUCCESS) == {(("dispensary", DISPENSARY),): again[DISPENSARY]}

    run(tmp_path, scenario, store=store_url)
