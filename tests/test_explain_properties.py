"""The operator's view holds for every order of arrival (hypothesis, over permutations and
duplications of a customer's history: versions with opt-out flips, stale and tie versions,
repeats, merges and a chain of merges, refused deliveries that dead-letter, replays).

For each history, run through the real planner, store, worker and the Alpine IQ fake:

- ``explain`` tells every event of a customer once, in the order received, each planned one
  with its decisions; every operation in the outbox is named by exactly the decisions of the
  events that planned it, and every operation a decision names is in the outbox: nothing is
  done that the story does not tell, and the story tells nothing that was not done;
- a customer that opted out at any version (or the survivor it was merged into) is told
  unsubscribed in its story wherever it has a contact, and that unsubscribe stands delivered,
  or dead with its answer, never lost;
- no customer value appears in a story unless values are asked for;
- some of the history first refused by an older rule (kept in quarantine), then moved into
  the inbox by ``quarantine replay`` at any point, once or several times: the consent every
  survivor ends with is the one the same history gives without the detour.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_order_independence import (
    A,
    B,
    C,
    Vendor,
    alpineiq,
    body,
    check,
    histories,
    person,
    run_order,
    runs,
    same_consent_in_both,
    survivor_of,
)
from vendor_flow import DISPENSARY, Flow

from connector.explain import build_story, story_json, story_lines
from connector.quarantine import judge
from connector.store.abc import Rejected

EXAMPLES = int(os.environ.get("EXPLAIN_EXAMPLES", "60"))


def told(flow: Flow, customer: str, show_values: bool = False) -> dict[str, Any]:
    names = [d.name for d in flow.config.dispensaries[DISPENSARY].destinations]
    record = flow.store.customer_record(DISPENSARY, customer, names)
    return story_json(build_story(record, names), show_values)


def check_story(events: list[Any], merges: set[tuple[str, str]], flow: Flow) -> None:
    outbox = flow.outbox()
    keys_told: list[str] = []
    kinds_told: dict[str, str] = {}
    last_upsert: dict[str, str] = {}
    for customer in (A, B, C):
        story = told(flow, customer)
        inbox = story["events"]
        ids = [e["id"] for e in inbox]
        assert ids == sorted(ids)
        assert len(ids) == len(set(ids))
        for event in inbox:
            assert event["outcome"] != "pending"
            assert event["decisions_kept"]
        record = flow.store.customer_record(DISPENSARY, customer, ["aiq"])
        for event in record.events:
            for _, kind, key in event.decisions or ():
                if kind not in ("failed", "conflict"):
                    keys_told.append(key)
                    kinds_told[key] = kind
                if kind == "upsert":
                    last_upsert[customer] = key
        named = [i for e in story["events"] for d in e["decisions"] for i in d["operations"]]
        assert len(named) == len(set(named)), named  # each operation told once
        mine = [r for r in outbox if r["customer_id"] == customer]
        story_ops = {o["id"] for o in story["operations"]}
        assert {r["id"] for r in mine} <= story_ops
        for op in story["operations"]:
            if op["status"] == "dead":
                assert op["dead_letter"] is not None or op["answers"], op
                assert op["answers"][-1]["result"] == "dead"
        # consent told: an opt-out anywhere in the group is an unsubscribe in the story
        opted = any(
            survivor_of(e[0], merges) == survivor_of(customer, merges)
            and e[2].get("opt_out") == "true"
            for e in events
        )
        has_contact = any(c["contact_id"] for c in story["contacts"])
        if opted and customer == survivor_of(customer, merges) and has_contact:
            unsubscribes = [o for o in story["operations"] if o["op"] == "unsubscribe"]
            assert unsubscribes, customer
            assert all(o["status"] in ("done", "dead") for o in unsubscribes)
        text = "\n".join(story_lines(build_story(record, ["aiq"])))
        for value in (*person(customer).values(), "Jules", "Mia"):
            assert value not in text, (customer, value)
    # every operation is told by the decision that planned it, and nothing else is told but
    # an upsert replaced before it was queued by a newer one planned in the same batch
    queued = {r["idempotency_key"] for r in outbox}
    assert queued <= set(keys_told)
    for key in set(keys_told) - queued:
        assert kinds_told[key] == "upsert", key
    for customer, key in last_upsert.items():
        assert key in queued, customer


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(runs())
def test_the_story_tells_every_operation_in_any_order(
    tmp_path_factory: pytest.TempPathFactory, case: Any
) -> None:
    events, merges, first, _ = case
    vendor = alpineiq()

    async def go() -> None:
        flow = await run_order(tmp_path_factory.mktemp("story"), vendor, first)
        try:
            check(events, merges, vendor, flow)
            check_story(events, merges, flow)
        finally:
            await flow.close()

    asyncio.run(go())


async def run_with_quarantine(
    work: Path, vendor: Vendor, order: list[Any], refused: set[int], replay_at: list[int]
) -> Flow:
    """``order`` in batches, except the events at positions ``refused``, which are kept in
    quarantine (as an older rule refused them) and replayed before the batches in
    ``replay_at`` (and at the end)."""
    flow = Flow(
        work, vendor.config, app=vendor.app, sink_factory=vendor.sink, base_url=vendor.base_url
    )
    verdict = judge(flow.config)
    position = 0
    for index, (batch, failure) in enumerate(order):
        if index in replay_at:
            await asyncio.to_thread(flow.store.replay_quarantined, verdict)
        kept, held = [], []
        for event in batch:
            (held if position in refused else kept).append(event)
            position += 1
        if held:
            flow.store.add_events(
                [],
                [
                    Rejected(DISPENSARY, 422, "an older rule", "application/json", body(e))
                    for e in held
                ],
            )
        if failure is not None:
            vendor.fail(*failure)
        await flow.deliver(*(body(e) for e in kept))
    for _ in range(2):  # twice: the second moves nothing
        await asyncio.to_thread(flow.store.replay_quarantined, verdict)
        await flow.deliver()
    for _ in range(5):
        replayed = await asyncio.to_thread(flow.store.replay)
        await flow.drain()
        if replayed.replayed == 0:
            break
    assert flow.store.quarantined() == []
    return flow


@st.composite
def detours(draw: st.DrawFn) -> tuple[Any, ...]:
    events, merges = draw(histories())
    order = draw(st.permutations(events))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4)))
    batches = [(order[i:j], None) for i, j in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    refused = draw(st.sets(st.integers(0, len(order) - 1), min_size=1, max_size=3))
    replay_at = draw(st.lists(st.integers(0, len(batches)), max_size=2))
    plain = draw(st.permutations(events))
    return events, merges, batches, refused, replay_at, [(plain, None)]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(detours())
def test_a_quarantine_detour_changes_no_consent(
    tmp_path_factory: pytest.TempPathFactory, case: Any
) -> None:
    events, merges, batches, refused, replay_at, plain = case
    finals = []

    async def go() -> None:
        vendor = alpineiq()
        flow = await run_with_quarantine(
            tmp_path_factory.mktemp("detour"), vendor, batches, refused, replay_at
        )
        try:
            finals.append(check(events, merges, vendor, flow))
            check_story(events, merges, flow)
            moved = flow.store.quarantined(include_replayed=True, limit=100)
            assert len(moved) == len(refused)
            assert all(q.replayed_event_id is not None for q in moved)
        finally:
            await flow.close()
        vendor = alpineiq()
        flow = await run_order(tmp_path_factory.mktemp("plain"), vendor, plain)
        try:
            finals.append(check(events, merges, vendor, flow))
        finally:
            await flow.close()

    asyncio.run(go())
    same_consent_in_both(events, merges, finals)
