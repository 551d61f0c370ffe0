"""An absorbed customer's opt-out reaches every profile its contact info may still live in,
whatever the order of the merge's payloads, and a replayed operation of a merged-away
customer never creates a profile.

- planner (pure): over permutations and repeats of A's versions and of the two payloads of
  A's merge into B, at every step, once some version of A opted out, A's own contact (on
  every destination, native merge or not) is unsubscribed as soon as it exists, and B's
  as soon as the merge is known: one unsubscribe each, one key, never a subscribe;
- Klaviyo (store, worker, fake): the survivor's profile deleted by a marketer (so the merge
  never lands) or not, the payloads in any order, repeated: Vincent's own profile, if it
  still exists, is unsubscribed, and no second profile holds his e-mail;
- Braze (store, worker, fake): the first calls refused, dead letters replayed: no profile of
  the absorbed customer is alive once Braze applied the merges, the survivor is opted out.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from conftest import fresh_schema
from fakes.braze import BrazeFake
from fakes.clock import HandClock
from fakes.klaviyo import KlaviyoFake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attack_braze import OPTED_OUT, out, replay_all
from test_attack_identity import _subscribe, kl
from test_braze import BASE as BRAZE_BASE
from test_braze import SMS, VEGA, VINCENT, flow_config, me
from test_klaviyo import klaviyo_flow
from test_planner import NEVER, apply, delivery, spec, version
from vendor_flow import Flow, event_body

from connector.destinations.braze import BrazeSink
from connector.planner import CustomerState, DestinationSpec, Operation
from connector.treez import Customer

ABSORBED, SURVIVOR = "200", "100"
FLOW_EXAMPLES = int(os.environ.get("CONSENT5_EXAMPLES", "25"))
FLOW = settings(
    max_examples=FLOW_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ---- the planner ---------------------------------------------------------------------------


@st.composite
def absorbed_history(draw: st.DrawFn) -> tuple[list[Customer], list[DestinationSpec]]:
    """A (200) merged into B (100) at instant 3: earlier versions of both, one payload of
    the merge or both, maybe strays of A after it; A opts out at some version (its own, its
    merge payload, a stray), in any order, with repeats."""
    items: list[Customer] = []
    items += draw(st.lists(version(SURVIVOR, instants=(0, 1, 2), statuses=("ACTIVE",)), max_size=2))
    items += draw(st.lists(version(ABSORBED, instants=(0, 1, 2), statuses=("ACTIVE",)), max_size=2))
    which = draw(st.sampled_from(["survivor", "absorbed", "both"]))
    if which in ("survivor", "both"):
        items.append(
            draw(
                version(
                    SURVIVOR, instants=(3,), statuses=("MERGED",), merged_customer_ids=[ABSORBED]
                )
            )
        )
    if which in ("absorbed", "both"):
        items.append(
            draw(
                version(
                    ABSORBED,
                    instants=(3,),
                    statuses=("DEACTIVATED",),
                    merged_into_customer_id=SURVIVOR,
                )
            )
        )
    items += draw(st.lists(version(ABSORBED, instants=(4,), statuses=("ACTIVE",)), max_size=1))
    dests = [spec("klaviyo"), spec("aiq", native_merge=False), spec("braze")]
    return draw(delivery(items)), [
        DestinationSpec(d.name, d.mapping, NEVER, d.native_merge) for d in dests
    ]


def _exists(state: CustomerState | None, destination: str) -> bool:
    if state is None:
        return False
    contact = state.contact(destination)
    return contact.contact_id is not None or contact.delivered_hash is not None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(absorbed_history())
def test_property_an_absorbed_opt_out_reaches_its_own_contact_and_the_survivors_at_once(
    case: tuple[list[Customer], list[DestinationSpec]],
) -> None:
    events, dests = case
    run = apply(events, dests)
    opted = False
    merged = False
    unsubscribes: dict[tuple[str, str], set[str]] = {}
    planned: list[Operation] = []
    states: dict[str, CustomerState] = {}
    for step in run.steps:
        states.update(step.plan.states)
        planned += step.plan.operations
        event = step.event
        opted = opted or (event.customer_id == ABSORBED and event.opt_out is True)
        merged = merged or bool(
            event.merged_into_customer_id == SURVIVOR or ABSORBED in event.merged_customer_ids
        )
        for op in step.plan.operations:
            assert op.op != "subscribe"  # resubscribe: never
            if op.op == "unsubscribe":
                unsubscribes.setdefault((op.customer_id, op.destination), set()).add(
                    op.idempotency_key
                )
        if not opted:
            continue
        for dest in dests:
            absorbed = states.get(ABSORBED)
            if _exists(absorbed, dest.name):
                # A's own contact, wherever the merge stands (planned, landed or never):
                # unsubscribed as soon as it exists and the opt-out is known
                assert absorbed is not None
                assert absorbed.contact(dest.name).unsubscribed, (dest.name, step.event)
                assert (ABSORBED, dest.name) in unsubscribes
            if merged:
                survivor = states.get(SURVIVOR) or CustomerState(SURVIVOR)
                if _exists(survivor, dest.name):
                    assert survivor.contact(dest.name).unsubscribed, (dest.name, step.event)
                else:  # its first upsert will be followed by the unsubscribe
                    assert survivor.opt_out_seen
    # one unsubscribe per customer and destination, under one key, in every order
    for (customer, destination), keys in unsubscribes.items():
        assert len(keys) == 1
        count = [
            op
            for op in planned
            if op.op == "unsubscribe"
            and op.customer_id == customer
            and op.destination == destination
        ]
        assert len(count) == 1, (customer, destination)


# ---- Klaviyo: the survivor's profile deleted, the merge never lands -----------------------------


@st.composite
def klaviyo_case(draw: st.DrawFn) -> tuple[list[bytes], bool]:
    absorbed = event_body(
        "2001",
        2,
        status="DEACTIVATED",
        merged_into_customer_id="2002",
        email="vincent@example.com",
        phone="(213) 555-0101",
        opt_out="true",
    )
    survivor = event_body(
        "2002", 2, merged_customer_ids=["2001"], email="vega@example.com", phone="(213) 555-0102"
    )
    stray = event_body(
        "2001", 3, email="vincent@example.com", phone="(213) 555-0101", opt_out="true"
    )
    items = [absorbed, survivor] + ([stray] if draw(st.booleans()) else [])
    extra = draw(st.lists(st.sampled_from(range(len(items))), max_size=2))
    order = draw(st.permutations([*range(len(items)), *extra]))
    return [items[i] for i in order], draw(st.booleans())


@FLOW
@given(klaviyo_case())
def test_property_klaviyo_an_absorbed_opt_out_leaves_no_profile_of_his_subscribed(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[list[bytes], bool]
) -> None:
    bodies, deleted = case
    fake = KlaviyoFake(seed=9)
    work = tmp_path_factory.mktemp("kl")

    async def go() -> None:
        async with klaviyo_flow(work, fake) as flow:
            await flow.deliver(
                event_body("2001", 1, email="vincent@example.com", phone="(213) 555-0101"),
                event_body("2002", 1, email="vega@example.com", phone="(213) 555-0102"),
            )
            absorbed = kl(flow, "2001")
            assert absorbed is not None
            await _subscribe(fake, "vincent@example.com", "+12135550101")  # a sign-up form
            signed_up = len(fake.subscribes)
            if deleted:
                fake.delete_profile(str(kl(flow, "2002")))
            for body in bodies:  # one at a time: each delivered before the next arrives
                await flow.deliver(body)
            await replay_all(flow)
            his = [
                p
                for p in fake.profiles.values()
                if p.attributes.get("email") == "vincent@example.com"
            ]
            assert len(his) <= 1, "a second profile holds Vincent's e-mail"
            if fake.profile(absorbed) is not None:
                assert fake.consent(absorbed) == {"email": "UNSUBSCRIBED", "sms": "UNSUBSCRIBED"}
            for profile in his:
                consent = fake.consent(profile.id)
                assert "SUBSCRIBED" not in consent.values(), consent
            assert len(fake.subscribes) == signed_up  # the connector subscribed nothing
            if not deleted:  # the merge landed: Vincent's own unsubscribe finds his profile
                # merged away and goes nowhere, never dead-lettered, never making a profile
                assert flow.dead_letters() == [], flow.dead_letters()

    asyncio.run(go())


# ---- Braze: refused creates, dead letters replayed ---------------------------------------------


BrazeCase = tuple[list[list[bytes]], int, bool]  # batches, calls refused, someone opted out


@st.composite
def braze_case(draw: st.DrawFn) -> BrazeCase:
    """A and B opted out (maybe), A merged into B (either payload, or both), any order,
    repeats, cut into batches; Braze refuses the first ``refused`` calls."""
    a, b = "2001", "2002"
    items = [
        event_body(a, 1, opt_out=draw(st.sampled_from(["true", "false"])), **VINCENT),
        event_body(b, 1, opt_out=draw(st.sampled_from(["true", "false"])), **VEGA),
    ]
    opted = any(json.loads(item)["data"]["opt_out"] == "true" for item in items)
    survivor = event_body(b, 2, merged_customer_ids=[a], **VEGA)
    absorbed = event_body(
        a, 2, status="DEACTIVATED", merged_into_customer_id=b, opt_out="true", **VINCENT
    )
    which = draw(st.sampled_from(["absorbed", "survivor", "both"]))
    items += (
        [absorbed]
        if which == "absorbed"
        else [survivor]
        if which == "survivor"
        else [
            absorbed,
            survivor,
        ]
    )
    extra = draw(st.lists(st.sampled_from(range(len(items))), max_size=2))
    order = [items[i] for i in draw(st.permutations([*range(len(items)), *extra]))]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=3)))
    batches = [order[i:j] for i, j in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    opted = opted or which != "survivor"  # the absorbed payload opts out
    return [batch for batch in batches if batch], draw(st.integers(0, 3)), opted


def _braze_run(work: Path, case: BrazeCase, store_url: str | None) -> None:
    batches, refused, opted = case
    fake = BrazeFake(clock=HandClock(1_800_000_000.0), subscription_groups=[SMS], merge_delay=0.0)
    if refused:
        fake.fail_next(400, refused)

    async def go() -> None:
        flow = Flow(
            work,
            flow_config(),
            app=fake.app,
            sink_factory=BrazeSink,
            base_url=BRAZE_BASE,
            store_url=store_url,
        )
        try:
            for batch in batches:
                await flow.deliver(*batch)
            fake.settle()
            await replay_all(flow)
            fake.settle()
            alive = [p["external_id"] for p in fake.profiles]
            assert me("2001") not in alive, alive
            assert len(alive) == len(set(alive))
            if opted and me("2002") in alive:
                assert out(fake, "2002") == OPTED_OUT
            assert fake.subscribes == []
        finally:
            await flow.close()

    asyncio.run(go())


@FLOW
@given(braze_case())
def test_property_braze_a_merged_away_customer_is_never_recreated_by_a_replay(
    tmp_path_factory: pytest.TempPathFactory, case: BrazeCase
) -> None:
    _braze_run(tmp_path_factory.mktemp("bz"), case, None)


@settings(
    max_examples=int(os.environ.get("CONSENT5_EXAMPLES_PG", "8")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(braze_case())
@pytest.mark.parametrize("store", [pytest.param("postgresql", id="postgresql")])
def test_property_braze_a_merged_away_customer_is_never_recreated_by_a_replay_on_postgresql(
    tmp_path_factory: pytest.TempPathFactory,
    pg_database: str,
    store: str,
    case: BrazeCase,
) -> None:
    with fresh_schema(pg_database) as url:
        _braze_run(tmp_path_factory.mktemp("bz"), case, url)
