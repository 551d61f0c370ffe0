"""Adversarial consent attacks (issue 12 follow-up): each test fails while its defect is
present. Real store, planner and worker into the Alpine IQ fake (vendor mocked only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from fakes.alpineiq import AlpineIQFake
from fakes.klaviyo import KlaviyoFake
from test_alpineiq import RESUBSCRIBE_DISPENSARY, config_text, contact_of, run_flow
from test_klaviyo import klaviyo_flow
from vendor_flow import Flow, event_body


def person(customer: str, n: int) -> dict[str, Any]:
    return {"email": f"c{customer}@example.com", "phone": f"310555{n:04d}"}


OUT = {"email": False, "sms": False}


def merged(customer: str, n: int, version: int, into: str, **changes: Any) -> bytes:
    return event_body(
        customer,
        version,
        status="DEACTIVATED",
        merged_into_customer_id=into,
        **person(customer, n),
        **changes,
    )


# --- 1: a merge cycle swallows the opt-out carried by the second payload ---------------------


def test_cycle_opt_out_in_the_cyclic_merge_payload_is_owed(tmp_path: Any) -> None:
    """A into B, then B's payload says B into A (a cycle: the first merge stands, B is the
    survivor) and carries B's opt-out. B is the record the person lives in: its persona
    must be unsubscribed. The planner's cycle branch (_merge: ``final == cid``) returns
    before the opt-out is owed, and the refresh it triggers re-plans B's older version,
    which is stale and says false: nothing is ever sent."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(
            event_body("A", 60, **person("A", 1)), event_body("B", 60, **person("B", 2))
        )
        await flow.deliver(merged("A", 1, 120, "B"))
        await flow.deliver(merged("B", 2, 180, "A", opt_out="true"))
        assert flow.ops().count("unsubscribe") >= 1, flow.ops()
        assert fake.consent(contact_of(flow, "B")) == OUT

    run_flow(tmp_path, scenario)


# --- 2: under on_source_opt_in, an opt-out only in the absorbed merge payload is dropped -----


def test_resubscribe_policy_opt_out_in_absorbed_merge_payload_is_delivered(
    tmp_path: Any,
) -> None:
    """Policy on_source_opt_in. A was opted in; A's merge payload (its newest version, not a
    stale one: nothing overtakes it) says opt_out true. Alpine IQ has no merge: A's persona
    lives on, and B is the same person. Nothing is unsubscribed: _merge carries the opt-out
    only to destinations under ``never`` (``_carry(..., never, ...)``)."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(
            event_body("A", 60, **person("A", 1)), event_body("B", 60, **person("B", 2))
        )
        await flow.deliver(merged("A", 1, 120, "B", opt_out="true"))
        assert flow.ops().count("unsubscribe") >= 1, flow.ops()
        assert fake.consent(contact_of(flow, "A")) == OUT

    run_flow(tmp_path, scenario, config=config_text(policy=RESUBSCRIBE_DISPENSARY))


# --- 3: a chain A→B→C: whether B's persona is unsubscribed depends on arrival order ---------


def test_chain_order_decides_whether_the_middle_persona_is_unsubscribed(tmp_path: Any) -> None:
    """A (opt-out only in its merge payload) into B, B into C; Alpine IQ keeps every persona.
    A→B first: A, B and C are unsubscribed. B→C first: only A and C: B's persona (same
    person, own phone) stays reachable. _carry owes the opt-out to the absorbed customer's
    own contact and the final survivor's, never to the intermediate links of the chain."""
    consents = []
    for n, later_first in enumerate((False, True)):
        work = tmp_path / str(n)
        work.mkdir()

        async def scenario(flow: Flow, fake: AlpineIQFake, later_first: bool = later_first) -> None:
            await flow.deliver(*(event_body(c, 60, **person(c, i)) for i, c in enumerate("ABC")))
            a_into_b = merged("A", 0, 120, "B", opt_out="true")
            b_into_c = merged("B", 1, 130, "C")
            for body in (b_into_c, a_into_b) if later_first else (a_into_b, b_into_c):
                await flow.deliver(body)
            consents.append({c: fake.consent(contact_of(flow, c)) for c in "ABC"})

        run_flow(work, scenario)
    assert consents[0] == consents[1]
    assert consents[1]["B"] == OUT


# --- 4: a future-dated event redelivered later is applied again (resubscribe, old data) -----


def _future(first_name: str, **changes: Any) -> bytes:
    body = json.loads(event_body("42", 1, first_name=first_name, **person("42", 42), **changes))
    body["data"]["last_update"] = "2099-01-01T00:00:00.000-08:00"
    return json.dumps(body).encode()


def test_future_dated_redelivery_does_not_resubscribe_or_resurrect(tmp_path: Any) -> None:
    """on_source_opt_in. A till dated v1 in 2099 (ordered at receipt + skew). Ten minutes
    later the customer opts out (a newer version). Treez then re-delivers the identical 2099
    event: its ceiling is its new receipt + skew, so the same old version now orders after
    the opt-out: planned as newer, it resubscribes the customer (true → false 'flip') and
    writes the old name back. A re-delivery is a duplicate (design: Order)."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(_future("Vincent"))
        later = json.loads(
            event_body("42", 1, first_name="Mia", opt_out="true", **person("42", 42))
        )
        later["data"]["last_update"] = (datetime.now(UTC) + timedelta(minutes=10)).isoformat(
            timespec="milliseconds"
        )
        await flow.deliver(json.dumps(later).encode())
        await flow.deliver(_future("Vincent"))  # the same body, re-delivered
        assert "subscribe" not in flow.ops("42"), flow.ops("42")
        persona = fake.persona(contact_of(flow, "42"))
        assert persona["firstName"] == "Mia"
        assert persona["emailOptIn"] is False

    run_flow(tmp_path, scenario, config=config_text(policy=RESUBSCRIBE_DISPENSARY))


def test_future_dated_redelivery_under_never_keeps_newer_data(tmp_path: Any) -> None:
    """Same history under ``never``: consent holds, but the re-delivered old version is
    applied over the newer one (the persona's name goes back to the old one)."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(_future("Vincent"))
        later = json.loads(
            event_body("42", 1, first_name="Mia", opt_out="true", **person("42", 42))
        )
        later["data"]["last_update"] = (datetime.now(UTC) + timedelta(minutes=10)).isoformat(
            timespec="milliseconds"
        )
        await flow.deliver(json.dumps(later).encode())
        await flow.deliver(_future("Vincent"))
        persona = fake.persona(contact_of(flow, "42"))
        assert fake.consent(persona["contactID"]) == OUT
        assert persona["firstName"] == "Mia"

    run_flow(tmp_path, scenario)


# --- 5: on_source_opt_in: a dead unsubscribe replayed after the customer opted back in ------


def test_replayed_dead_unsubscribe_after_a_resubscribe_is_superseded(tmp_path: Any) -> None:
    """on_source_opt_in: v1 opts out (the unsubscribe is dead-lettered), v2 opts back in (a
    subscribe, delivered). Replaying the dead unsubscribe sends it after the subscribe: the
    customer ends unsubscribed against the newest Treez state (replay checks only for a
    later *unsubscribe*, not for a later subscribe)."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("7", 60, **person("7", 7)))
        fake.fail_next(400)
        await flow.deliver(event_body("7", 90, opt_out="true", **person("7", 7)))
        assert [d["op"] for d in flow.dead_letters()] == ["unsubscribe"]
        await flow.deliver(event_body("7", 120, opt_out="false", **person("7", 7)))
        assert flow.ops("7")[-1] == "subscribe"
        flow.store.replay()
        await flow.drain()
        assert fake.consent(contact_of(flow, "7"))["email"] is True

    run_flow(tmp_path, scenario, config=config_text(policy=RESUBSCRIBE_DISPENSARY))


# --- the same breaks through Klaviyo (a native merge) ----------------------------------------


def run_klaviyo(
    tmp_path: Any,
    scenario: Callable[[Flow, KlaviyoFake], Awaitable[None]],
    policy: str | None = None,
) -> KlaviyoFake:
    fake = KlaviyoFake(seed=5)

    async def go() -> None:
        async with klaviyo_flow(tmp_path, fake, policy=policy) as flow:
            await scenario(flow, fake)

    asyncio.run(go())
    return fake


def test_klaviyo_cycle_opt_out_in_the_cyclic_merge_payload_is_owed(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: KlaviyoFake) -> None:
        await flow.deliver(
            event_body("A", 60, **person("A", 1)), event_body("B", 60, **person("B", 2))
        )
        await flow.deliver(merged("A", 1, 120, "B"))
        await flow.deliver(merged("B", 2, 180, "A", opt_out="true"))
        assert flow.ops().count("unsubscribe") == 1, flow.ops()
        assert len(fake.unsubscribes) >= 1

    run_klaviyo(tmp_path, scenario)


def test_klaviyo_resubscribe_policy_opt_out_in_absorbed_merge_payload(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: KlaviyoFake) -> None:
        await flow.deliver(
            event_body("A", 60, **person("A", 1)), event_body("B", 60, **person("B", 2))
        )
        await flow.deliver(merged("A", 1, 120, "B", opt_out="true"))
        assert "merge" in flow.ops()
        # one unsubscribe per customer: the absorbed profile's own (before the merge, in
        # case the merge never lands) and the survivor's
        rows = [r for r in flow.outbox() if r["op"] == "unsubscribe"]
        assert sorted(r["customer_id"] for r in rows) == ["A", "B"], flow.ops()
        assert len(fake.unsubscribes) >= 1

    run_klaviyo(tmp_path, scenario, policy="on_source_opt_in")


# --- attacks that HELD (kept as regressions) -------------------------------------------------


def test_held_stale_opt_out_repeated_and_interleaved_one_unsubscribe(tmp_path: Any) -> None:
    """v2 (false) then v1 (true, stale) three times, with delivery in between, plus a tie of
    v2 with other content: exactly one unsubscribe row (one key), no loop of refreshes, the
    persona ends opted out."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("9", 300, **person("9", 9)))
        for _ in range(3):
            await flow.deliver(event_body("9", 60, opt_out="true", **person("9", 9)))
        await flow.deliver(event_body("9", 300, first_name="Tie", **person("9", 9)))
        await flow.deliver(event_body("9", 60, opt_out="true", **person("9", 9)))
        rows = [r for r in flow.outbox() if r["op"] == "unsubscribe"]
        assert len(rows) == 1
        assert len({r["idempotency_key"] for r in rows}) == 1
        assert "subscribe" not in flow.ops()
        assert fake.consent(contact_of(flow, "9")) == OUT
        assert flow.store.pending_work() == 0

    run_flow(tmp_path, scenario)


def test_held_stray_absorbed_opt_out_after_merge_reaches_both(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(
            event_body("A", 60, **person("A", 1)), event_body("B", 60, **person("B", 2))
        )
        await flow.deliver(merged("A", 1, 120, "B"))
        await flow.deliver(event_body("A", 200, opt_out="true", **person("A", 1)))
        for c in "AB":
            assert fake.consent(contact_of(flow, c)) == OUT, c
        assert flow.ops("A").count("unsubscribe") == 1
        assert flow.ops("B").count("unsubscribe") == 1
        assert flow.ops("A").count("upsert") == 1  # the stray is not applied

    run_flow(tmp_path, scenario)


def test_held_survivor_payload_late_is_upserted_then_unsubscribed(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("A", 60, **person("A", 1)))
        await flow.deliver(merged("A", 1, 120, "B", opt_out="true"))
        assert flow.ops("B") == []
        await flow.deliver(
            event_body("B", 130, status="MERGED", merged_customer_ids=["A"], **person("B", 2))
        )
        assert flow.ops("B") == ["upsert", "unsubscribe"]
        assert fake.consent(contact_of(flow, "B")) == OUT

    run_flow(tmp_path, scenario)


def test_held_stale_opt_out_for_a_deactivated_customer_never_reactivates(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("D", 60, **person("D", 4)))
        await flow.deliver(event_body("D", 300, status="DEACTIVATED", **person("D", 4)))
        await flow.deliver(event_body("D", 120, opt_out="true", **person("D", 4)))
        assert flow.ops("D") == ["upsert", "deactivate", "unsubscribe"]

    run_flow(tmp_path, scenario)


def test_held_merge_chain_queued_together_opt_out_in_a(tmp_path: Any) -> None:
    """Both merges in one batch, either order, and the cycle-free chain: C unsubscribed."""

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(*(event_body(c, 60, **person(c, i)) for i, c in enumerate("ABC")))
        await flow.deliver(merged("B", 1, 130, "C"), merged("A", 0, 120, "B", opt_out="true"))
        assert fake.consent(contact_of(flow, "C")) == OUT
        assert fake.consent(contact_of(flow, "A")) == OUT
        unsubscribed = [r["customer_id"] for r in flow.outbox() if r["op"] == "unsubscribe"]
        assert sorted(set(unsubscribed)) == sorted(unsubscribed)  # one per customer at most

    run_flow(tmp_path, scenario)


def test_held_mixed_policies_per_destination(tmp_path: Any) -> None:
    """Two Alpine IQ destinations, one ``never`` and one ``on_source_opt_in``: v1 true,
    v2 false. Only the second resubscribes; the first stays out."""
    extra = (
        "      - name: aiq2\n        type: alpineiq\n        api_key: aiq-SECRET-key-0042\n"
        '        uid: "1234"\n        mapping: alpineiq.yaml\n        rate_limit: "500/s"\n'
        "        policy:\n          resubscribe: on_source_opt_in\n"
    )

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("M", 60, opt_out="true", **person("M", 5)))
        await flow.deliver(event_body("M", 120, opt_out="false", **person("M", 5)))
        by_dest: dict[str, list[str]] = {}
        for r in flow.outbox():
            by_dest.setdefault(r["destination"], []).append(r["op"])
        assert by_dest["aiq"] == ["upsert", "unsubscribe"]
        assert by_dest["aiq2"] == ["upsert", "unsubscribe", "subscribe"]

    run_flow(tmp_path, scenario, config=config_text() + extra)


def test_held_null_opt_out_pull_never_resubscribes(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("N", 60, opt_out="true", **person("N", 6)))
        await flow.deliver(
            event_body("N", 120, opt_out=None, first_name="Pulled", **person("N", 6))
        )
        await flow.deliver(event_body("N", 30, opt_out=None, **person("N", 6)))  # stale null
        assert "subscribe" not in flow.ops("N")
        assert fake.consent(contact_of(flow, "N")) == OUT

    run_flow(tmp_path, scenario, config=config_text(policy=RESUBSCRIBE_DISPENSARY))


def test_held_dead_unsubscribe_replayed_once(tmp_path: Any) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("R", 60, **person("R", 8)))
        fake.fail_next(400)
        await flow.deliver(event_body("R", 90, opt_out="true", **person("R", 8)))
        await flow.deliver(event_body("R", 30, opt_out="true", **person("R", 8)))  # stale, again
        await flow.deliver(event_body("R", 120, first_name="Later", **person("R", 8)))
        for _ in range(2):
            flow.store.replay()
            await flow.drain()
        assert [r["op"] for r in flow.outbox()].count("unsubscribe") == 1
        assert fake.consent(contact_of(flow, "R")) == OUT

    run_flow(tmp_path, scenario)
