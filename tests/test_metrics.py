"""The receiver's /metrics merges the pipeline process's families with its own."""

from __future__ import annotations

import pickle

from prometheus_client.parser import text_string_to_metric_families

from connector.metrics import Metrics


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
    assert found["connector_events_received_total"] == [({"dispensary": "d",
                                                          "outcome": "accepted"}, 3.0)]  # fmt: skip
    assert found["connector_events_planned_total"] == [({"dispensary": "d",
                                                         "outcome": "applied"}, 2.0)]  # fmt: skip
    assert found["connector_operations_total"][0][1] == 2.0
    assert found["connector_delivery_seconds_count"][0][1] == 1.0
    assert found["connector_queue_depth"] == [({"dispensary": "d", "destination": "sink"}, 0.0)]


def test_without_a_pipeline_process_the_registry_renders_as_is() -> None:
    metrics = Metrics()
    metrics.events.labels("d", "ping").inc()
    found = parse(metrics.render([], []))
    assert found["connector_events_received_total"] == [({"dispensary": "d",
                                                          "outcome": "ping"}, 1.0)]  # fmt: skip
