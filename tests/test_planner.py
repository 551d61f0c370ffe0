"""The planner (connector/planner.py) against the rules of design.md, "Rules that make it correct".

Explicit scenarios first, then hypothesis properties over whole delivery histories: any order,
with repeats, folded back into the stored state exactly as the production loop does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.config_base import PolicyConfig
from connector.mapping import compile_mapping_text
from connector.planner import (
    ContactState,
    CustomerState,
    DestinationSpec,
    Operation,
    Plan,
    content_hash,
    instant_us,
    merge_key,
    payload_hash,
    plan,
)
from connector.treez import Customer, parse_customer

DISPENSARY = "store1"
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())["data"]
MAPPING = compile_mapping_text(
    "first_name: first_name\nlast_name: last_name\nemail: email\nopted_out: opt_out\n",
    name="test.yaml",
)
NEVER = PolicyConfig()
ON_OPT_IN = PolicyConfig(resubscribe="on_source_opt_in")
HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Factory = Callable[..., Customer]


def spec(name: str = "klaviyo", **options: Any) -> DestinationSpec:
    return DestinationSpec(name=name, mapping=MAPPING, **options)


def customer(**overrides: Any) -> Customer:
    """The seed customer (id 3904, opt_out "true") with some fields replaced."""
    data = copy.deepcopy(SEED)
    data.update(overrides)
    return parse_customer(data)


def micros(moment: datetime) -> int:
    """The instant as microseconds since the epoch, computed here, not by the planner."""
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def at(minute: int) -> str:
    return f"2026-05-01T10:{minute:02d}:00.000-07:00"


@dataclass
class Step:
    event: Customer
    before: CustomerState  # the stored state of the event's customer when it was planned
    plan: Plan


@dataclass
class Run:
    states: dict[str, CustomerState]
    steps: list[Step]

    @property
    def operations(self) -> list[Operation]:
        return [op for step in self.steps for op in step.plan.operations]

    @property
    def outcomes(self) -> list[str]:
        return [step.plan.outcome for step in self.steps]


def apply(
    events: Sequence[Customer],
    destinations: Sequence[DestinationSpec],
    states: dict[str, CustomerState] | None = None,
) -> Run:
    """What the production loop does with the database: plan each event, fold its states back."""
    states = dict(states or {})
    steps = []
    for event in events:
        before = states.get(event.customer_id) or CustomerState(event.customer_id)
        result = plan(event, DISPENSARY, states, destinations)
        states.update(result.states)
        steps.append(Step(event, before, result))
    return Run(states, steps)


def kinds(operations: Sequence[Operation], destination: str | None = None) -> list[str]:
    return [op.op for op in operations if destination in (None, op.destination)]


# --- first sight ---------------------------------------------------------------------------


def test_first_sight_upserts_the_mapped_fields(make_customer: Factory) -> None:
    run = apply([make_customer(opt_out="false", email="jules@example.com")], [spec()])
    assert run.outcomes == ["applied"]
    [op] = run.operations
    assert op.op == "upsert"
    assert (op.destination, op.customer_id, op.order_key) == ("klaviyo", "3904", "3904")
    assert op.body == {
        "op": "upsert",
        "dispensary": DISPENSARY,
        "customer_id": "3904",
        "fields": {
            "first_name": "Jules",
            "last_name": "Winnfield",
            "email": "jules@example.com",
            "opted_out": False,
        },
    }
    state = run.states["3904"]
    assert state.last_update_us == micros(datetime.fromisoformat(SEED["last_update"]))
    assert state.opt_out is False
    assert state.contact("klaviyo").delivered_hash == payload_hash(op.body["fields"])
    assert not state.contact("klaviyo").unsubscribed


@pytest.mark.parametrize("opt_out", ["true", True])
def test_first_sight_opted_out_is_upserted_and_unsubscribed(
    make_customer: Factory, opt_out: object
) -> None:
    run = apply([make_customer(opt_out=opt_out)], [spec("klaviyo"), spec("braze")])
    for name in ("klaviyo", "braze"):
        assert kinds(run.operations, name) == ["upsert", "unsubscribe"]
        [unsubscribe] = [op for op in run.operations if op.destination == name][1:]
        assert unsubscribe.body == {
            "op": "unsubscribe",
            "dispensary": DISPENSARY,
            "customer_id": "3904",
            "channels": ["email", "sms"],
        }
        assert run.states["3904"].contact(name).unsubscribed
    assert run.states["3904"].opt_out is True


@pytest.mark.parametrize("opt_out", ["false", False, None])
def test_first_sight_not_opted_out_is_not_unsubscribed(
    make_customer: Factory, opt_out: object
) -> None:
    run = apply([make_customer(opt_out=opt_out)], [spec()])
    assert kinds(run.operations) == ["upsert"]


# --- order ---------------------------------------------------------------------------------


def test_older_event_after_newer_is_stale(make_customer: Factory) -> None:
    newer = make_customer(last_update=at(20), first_name="Vincent", opt_out="false")
    older = make_customer(last_update=at(10), first_name="Jules", opt_out="true")
    first = apply([newer], [spec()])
    result = plan(older, DISPENSARY, first.states, [spec()])
    assert result.outcome == "stale"
    # nothing of it is applied but its opt-out (see test_defect_3_*)
    assert kinds(result.operations) == ["unsubscribe"]
    assert result.states["3904"].last_update_us == first.states["3904"].last_update_us
    assert result.states["3904"].content_hash == first.states["3904"].content_hash
    quiet = make_customer(last_update=at(10), first_name="Jules", opt_out="false")
    assert plan(quiet, DISPENSARY, first.states, [spec()]) == Plan("stale", {}, [])


@pytest.mark.parametrize("opt_out", ["true", True])
def test_identical_redelivery_is_duplicate(make_customer: Factory, opt_out: object) -> None:
    run = apply([make_customer(opt_out="true"), make_customer(opt_out=opt_out)], [spec()])
    assert run.outcomes == ["applied", "duplicate"]
    assert run.steps[1].plan.operations == []
    assert run.steps[1].plan.states == {}


def test_same_instant_other_content_is_a_tie_and_applied(make_customer: Factory) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="false"),
            make_customer(last_update=at(10), opt_out="false", first_name="Vincent"),
        ],
        [spec()],
    )
    assert run.outcomes == ["applied", "tie"]
    [upsert] = run.steps[1].plan.operations
    assert upsert.op == "upsert"
    assert upsert.body["fields"]["first_name"] == "Vincent"
    assert run.states["3904"].content_hash == content_hash(run.steps[1].event)


def test_instant_us_is_the_instant() -> None:
    for text in ("2026-11-01T01:30:00.000-07:00", "2026-11-01T01:10:00.000-08:00", at(5)):
        moment = datetime.fromisoformat(text)
        assert instant_us(moment) == micros(moment) == int(moment.timestamp()) * 1_000_000


def test_offsets_are_compared_as_instants(make_customer: Factory) -> None:
    # 01:30-07:00 is 08:30Z; 01:10-08:00 (after the DST change) is 09:10Z: later, though
    # its text sorts first.
    earlier = make_customer(last_update="2026-11-01T01:30:00.000-07:00", first_name="A")
    later = make_customer(last_update="2026-11-01T01:10:00.000-08:00", first_name="B")
    assert apply([later, earlier], [spec()]).outcomes == ["applied", "stale"]
    run = apply([earlier, later], [spec()])
    assert run.outcomes == ["applied", "applied"]
    assert run.states["3904"].last_update_us == micros(later.last_update)
    assert run.states["3904"].content_hash == content_hash(later)


# --- change detection ----------------------------------------------------------------------


def test_unchanged_contact_sends_nothing_unless_resend(make_customer: Factory) -> None:
    first = make_customer(last_update=at(10), opt_out="false", notes="first")
    second = make_customer(last_update=at(20), opt_out="false", notes="changed, not mapped")
    run = apply([first, second], [spec()])
    assert run.outcomes == ["applied", "applied"]
    assert run.steps[1].plan.operations == []
    assert run.states["3904"].last_update_us == micros(second.last_update)

    before = apply([first], [spec()]).states
    forced = plan(second, DISPENSARY, before, [spec()], resend=True)
    assert forced.outcome == "applied"
    assert kinds(forced.operations) == ["upsert"]


def test_mapped_change_is_sent(make_customer: Factory) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="false"),
            make_customer(last_update=at(20), opt_out="false", email="new@example.com"),
        ],
        [spec()],
    )
    [upsert] = run.steps[1].plan.operations
    assert upsert.op == "upsert"
    assert upsert.body["fields"]["email"] == "new@example.com"


# --- opt-out is one-way --------------------------------------------------------------------


def test_opt_in_after_opt_out_does_not_resubscribe_by_default(make_customer: Factory) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="true"),
            make_customer(last_update=at(20), opt_out="false"),
            make_customer(last_update=at(30), opt_out=False, first_name="Vincent"),
        ],
        [spec(policy=NEVER)],
    )
    assert "subscribe" not in kinds(run.operations)
    assert kinds(run.operations).count("unsubscribe") == 1
    assert run.states["3904"].contact("klaviyo").unsubscribed


def test_resubscribe_policy_subscribes_once_after_the_flip(make_customer: Factory) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="true"),
            make_customer(last_update=at(20), opt_out="false"),
            make_customer(last_update=at(30), opt_out="false", first_name="Vincent"),
            make_customer(last_update=at(40), opt_out=False, notes="again"),
        ],
        [spec(policy=ON_OPT_IN), spec("other", policy=NEVER)],
    )
    assert kinds(run.steps[1].plan.operations, "klaviyo") == ["upsert", "subscribe"]
    [subscribe] = [op for op in run.steps[1].plan.operations if op.op == "subscribe"]
    assert subscribe.body["channels"] == ["email", "sms"]
    assert kinds(run.operations, "klaviyo").count("subscribe") == 1
    assert "subscribe" not in kinds(run.operations, "other")
    assert not run.states["3904"].contact("klaviyo").unsubscribed
    assert run.states["3904"].contact("other").unsubscribed


def test_resubscribe_policy_never_subscribes_a_customer_never_opted_out(
    make_customer: Factory,
) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="false"),
            make_customer(last_update=at(20), opt_out=None),
            make_customer(last_update=at(30), opt_out=False, first_name="Vincent"),
        ],
        [spec(policy=ON_OPT_IN)],
    )
    # the null in the middle says nothing new: the mapped contact stays as it was
    assert kinds(run.operations) == ["upsert", "upsert"]


def test_resubscribe_needs_a_flip_in_this_event() -> None:
    # the customer opted out, then in again while the policy was "never": still unsubscribed
    # downstream, last known opt_out false. Turning the policy on later resubscribes nobody
    # until the source itself flips from true to false.
    states = {
        "3904": CustomerState(
            "3904",
            last_update_us=micros(datetime.fromisoformat(at(10))),
            opt_out=False,
            contacts={"klaviyo": ContactState(unsubscribed=True)},
        )
    }
    event = customer(last_update=at(20), opt_out="false", first_name="Vincent")
    run = apply([event], [spec(policy=ON_OPT_IN)], states)
    assert kinds(run.operations) == ["upsert"]
    assert run.states["3904"].contact("klaviyo").unsubscribed


def test_null_opt_out_keeps_the_last_known_value(make_customer: Factory) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="true"),
            make_customer(last_update=at(20), opt_out=None, first_name="Vincent"),
        ],
        [spec(policy=ON_OPT_IN)],
    )
    assert run.states["3904"].opt_out is True
    assert kinds(run.steps[1].plan.operations) == ["upsert"]  # neither subscribe nor unsubscribe
    # and a later false is still a flip from true
    later = make_customer(last_update=at(30), opt_out="false")
    assert "subscribe" in kinds(apply([later], [spec(policy=ON_OPT_IN)], run.states).operations)


def test_unsubscribe_happens_once(make_customer: Factory) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="true"),
            make_customer(last_update=at(20), opt_out=True, first_name="Vincent"),
            make_customer(last_update=at(30), opt_out="true", email="v@example.com"),
            make_customer(last_update=at(40), opt_out=None, notes="x"),
        ],
        [spec()],
    )
    assert [kinds(step.plan.operations) for step in run.steps] == [
        ["upsert", "unsubscribe"],
        ["upsert"],
        ["upsert"],
        ["upsert"],  # opted_out is left out of the contact now: a change, but no unsubscribe
    ]


# --- merges --------------------------------------------------------------------------------

SURVIVOR, ABSORBED = "100", "200"


def survivor_payload(minute: int = 30, ids: list[Any] | None = None, **kw: Any) -> Customer:
    return customer(
        customer_id=SURVIVOR,
        last_update=at(minute),
        status="MERGED",
        opt_out="false",
        merged_customer_ids=[ABSORBED] if ids is None else ids,
        **kw,
    )


def absorbed_payload(minute: int = 30, into: Any = SURVIVOR, **kw: Any) -> Customer:
    return customer(
        customer_id=ABSORBED,
        last_update=at(minute),
        status="DEACTIVATED",
        verification_status="NOT_APPLICABLE",
        opt_out="false",
        first_name="Jay",
        merged_into_customer_id=into,
        **kw,
    )


MERGE_DESTINATIONS = [spec("klaviyo"), spec("aiq", native_merge=False), spec("braze")]


def assert_one_merge_each(run: Run) -> None:
    merges = [op for op in run.operations if op.op == "merge"]
    assert sorted(op.destination for op in merges) == ["braze", "klaviyo"]
    for op in merges:
        assert op.customer_id == ABSORBED
        assert op.body["op"] == "merge"
        assert op.body["from_customer_id"] == ABSORBED
        assert op.body["into_customer_id"] == SURVIVOR
        assert op.idempotency_key == merge_key(op.destination, ABSORBED, SURVIVOR)
    assert run.states[ABSORBED].merged_into == SURVIVOR


@pytest.mark.parametrize("survivor_first", [True, False])
def test_merge_in_either_order_yields_one_merge_per_native_destination(
    survivor_first: bool,
) -> None:
    pair = [survivor_payload(), absorbed_payload()]
    run = apply(pair if survivor_first else pair[::-1], MERGE_DESTINATIONS)
    assert_one_merge_each(run)
    assert "merge" not in kinds(run.operations, "aiq")
    # the absorbed payload itself sends nothing else (no deactivate, no upsert of B)
    assert all(op.op == "merge" for op in run.operations if op.customer_id == ABSORBED)


def test_repeated_merge_payloads_still_yield_one_merge() -> None:
    a, b = survivor_payload(), absorbed_payload()
    a_later = survivor_payload(minute=40, first_name="Jules A.")
    run = apply([b, a, b, a, a_later, b, a], MERGE_DESTINATIONS)
    assert_one_merge_each(run)


def test_merge_with_integer_ids() -> None:
    run = apply([survivor_payload(ids=[200]), absorbed_payload(into=100)], MERGE_DESTINATIONS)
    assert_one_merge_each(run)
    run = apply([absorbed_payload(into=100), survivor_payload(ids=[200])], MERGE_DESTINATIONS)
    assert_one_merge_each(run)


@pytest.mark.parametrize("survivor_first", [True, False])
def test_later_payload_of_absorbed_is_recorded_not_applied(survivor_first: bool) -> None:
    pair = [survivor_payload(), absorbed_payload()]
    merged = apply(pair if survivor_first else pair[::-1], MERGE_DESTINATIONS)
    survivor_state = merged.states[SURVIVOR]
    stray = customer(
        customer_id=ABSORBED,
        last_update=at(50),
        status="ACTIVE",
        first_name="Changed",
        email="stray@example.com",
        opt_out="true",
    )
    run = apply([stray], MERGE_DESTINATIONS, merged.states)
    assert run.outcomes == ["absorbed"]
    # nothing of it is applied; its opt-out is owed to the survivor's contacts (and to the
    # absorbed one's own where the destination has no merge, once that contact exists)
    assert {(op.customer_id, op.op) for op in run.operations} <= {
        (SURVIVOR, "unsubscribe"),
        (ABSORBED, "unsubscribe"),
    }
    assert all(op.customer_id == SURVIVOR or op.destination == "aiq" for op in run.operations)
    assert run.states[SURVIVOR].last_update_us == survivor_state.last_update_us
    assert run.states[SURVIVOR].content_hash == survivor_state.content_hash
    assert run.states[SURVIVOR].opt_out_seen
    assert run.states[ABSORBED].merged_into == SURVIVOR
    # and without an opt-out, nothing at all
    quiet = customer(customer_id=ABSORBED, last_update=at(50), status="ACTIVE", opt_out="false")
    again = apply([quiet], MERGE_DESTINATIONS, merged.states)
    assert again.outcomes == ["absorbed"]
    assert again.operations == []
    assert again.states[SURVIVOR] == survivor_state


def test_absorbed_id_seen_only_through_the_survivor_then_stray() -> None:
    # only the survivor's payload arrived; B's old pre-merge payload comes later
    old_b = customer(customer_id=ABSORBED, last_update=at(5), opt_out="false")
    run = apply([survivor_payload(), old_b], MERGE_DESTINATIONS)
    assert run.outcomes[1] == "absorbed"
    assert run.steps[1].plan.operations == []


def test_destination_without_native_merge_gets_no_merge() -> None:
    run = apply([absorbed_payload(), survivor_payload()], [spec("aiq", native_merge=False)])
    assert "merge" not in kinds(run.operations)
    assert all(op.customer_id == SURVIVOR for op in run.operations)


# --- deactivation --------------------------------------------------------------------------


def test_deactivated_without_merge_deactivates_once_then_reactivates(
    make_customer: Factory,
) -> None:
    run = apply(
        [
            make_customer(last_update=at(10), opt_out="false"),
            make_customer(last_update=at(20), opt_out="false", status="DEACTIVATED"),
            make_customer(
                last_update=at(30), opt_out="false", status="DEACTIVATED", first_name="Z"
            ),
            make_customer(last_update=at(40), opt_out="false", status="ACTIVE"),
        ],
        [spec("klaviyo"), spec("aiq", native_merge=False)],
    )
    assert [kinds(step.plan.operations, "klaviyo") for step in run.steps] == [
        ["upsert"],
        ["deactivate"],
        [],
        ["upsert"],  # same mapped contact as before, but the contact was deactivated
    ]
    deactivate = run.steps[1].plan.operations[0]
    assert deactivate.body == {"op": "deactivate", "dispensary": DISPENSARY, "customer_id": "3904"}
    assert kinds(run.operations).count("deactivate") == 2  # one per destination
    assert not run.states["3904"].contact("klaviyo").deactivated


# --- external ids --------------------------------------------------------------------------


def test_external_id_is_adopted_when_the_map_has_none(make_customer: Factory) -> None:
    event = make_customer(external_ids={"aiq_contact_id": 777, "sticky_cards_contact_id": None})
    aiq = spec("aiq", external_id_key="aiq_contact_id")
    result = plan(event, DISPENSARY, {}, [aiq, spec("klaviyo")])
    assert result.conflicts == []
    assert result.states["3904"].contact("aiq").contact_id == "777"
    assert result.states["3904"].contact("klaviyo").contact_id is None


def test_external_id_disagreeing_with_the_map_is_a_conflict(make_customer: Factory) -> None:
    event = make_customer(external_ids={"aiq_contact_id": "aiq-2"})
    aiq = spec("aiq", external_id_key="aiq_contact_id")
    states = {"3904": CustomerState("3904", contacts={"aiq": ContactState(contact_id="aiq-1")})}
    result = plan(event, DISPENSARY, states, [aiq])
    [conflict] = result.conflicts
    assert (conflict.customer_id, conflict.destination, conflict.kind) == (
        "3904",
        "aiq",
        "external_id_mismatch",
    )
    assert "aiq-2" not in conflict.detail  # reported without values
    assert result.states["3904"].contact("aiq").contact_id == "aiq-1"


def test_external_id_agreeing_with_the_map_is_no_conflict(make_customer: Factory) -> None:
    event = make_customer(external_ids={"aiq_contact_id": "aiq-1"})
    states = {"3904": CustomerState("3904", contacts={"aiq": ContactState(contact_id="aiq-1")})}
    result = plan(event, DISPENSARY, states, [spec("aiq", external_id_key="aiq_contact_id")])
    assert result.conflicts == []


# --- mapping failures ----------------------------------------------------------------------


def test_mapping_failure_is_reported_and_other_destinations_are_planned(
    make_customer: Factory,
) -> None:
    broken = DestinationSpec(
        name="broken",
        mapping=compile_mapping_text("first_name: {from: first_name, transform: [int]}\n"),
    )
    result = plan(make_customer(opt_out="true"), DISPENSARY, {}, [broken, spec("klaviyo")])
    [failure] = result.failures
    assert failure.destination == "broken"
    assert "first_name" in failure.message
    assert kinds(result.operations, "klaviyo") == ["upsert", "unsubscribe"]
    # no upsert for the broken one, but consent still goes out
    assert kinds(result.operations, "broken") == ["unsubscribe"]


# --- idempotency keys ----------------------------------------------------------------------


def test_idempotency_keys_are_stable(make_customer: Factory) -> None:
    dests = [spec("klaviyo"), spec("braze")]
    states = apply([make_customer(last_update=at(10), opt_out="false")], dests).states
    event = make_customer(last_update=at(20), opt_out="true", first_name="Vincent")
    once = plan(event, DISPENSARY, states, dests)
    twice = plan(event, DISPENSARY, states, dests)
    assert [op.idempotency_key for op in once.operations] == [
        op.idempotency_key for op in twice.operations
    ]
    assert len({op.idempotency_key for op in once.operations}) == len(once.operations) == 4


def test_idempotency_key_changes_with_last_update(make_customer: Factory) -> None:
    a = plan(make_customer(last_update=at(10)), DISPENSARY, {}, [spec()]).operations
    b = plan(make_customer(last_update=at(20)), DISPENSARY, {}, [spec()]).operations
    assert [op.op for op in a] == [op.op for op in b] == ["upsert", "unsubscribe"]
    assert a[0].idempotency_key != b[0].idempotency_key
    # under `never` a customer's unsubscribe is one operation whatever version owed it
    assert a[1].idempotency_key == b[1].idempotency_key


@pytest.mark.parametrize(
    ("x", "y", "policy"),
    [
        pytest.param({"first_name": "Jules"}, {"first_name": "Vincent"}, NEVER, id="upsert"),
        pytest.param({"opt_out": "true"}, {"opt_out": "false"}, ON_OPT_IN, id="unsubscribe"),
        pytest.param({"status": "DEACTIVATED"}, {"status": "ACTIVE"}, NEVER, id="deactivate"),
    ],
)
def test_reapplied_tie_never_reuses_a_key(
    make_customer: Factory, x: dict[str, Any], y: dict[str, Any], policy: PolicyConfig
) -> None:
    """X, Y, X at one instant: if the planner applies X again (a tie in arrival order), what it
    plans must reach the destination; the outbox skips a key it already holds, so a re-planned
    operation needs a fresh key (or the repeat must be treated as a duplicate and plan nothing).
    With `unsubscribe`, a dropped repeat leaves an opted-out customer subscribed."""
    base = {"last_update": at(10), "opt_out": "false"}
    first = make_customer(**{**base, **x})
    other = make_customer(**{**base, **y})
    run = apply([first, other, first], [spec(policy=policy)])
    keys = [op.idempotency_key for op in run.operations]
    assert len(keys) == len(set(keys)), f"outcomes {run.outcomes}, ops {kinds(run.operations)}"


# --- hypothesis: histories -----------------------------------------------------------------

BASE = datetime(2026, 11, 1, 8, 10, tzinfo=UTC)
OPT_OUTS = ["true", "false", None, True, False]


def stamp(index: int, offset_hours: int) -> str:
    """Instant number ``index`` written with a -07:00 or -08:00 offset (same instant)."""
    moment = (BASE + timedelta(minutes=20 * index)).astimezone(
        timezone(timedelta(hours=offset_hours))
    )
    return moment.isoformat(timespec="milliseconds")


@st.composite
def version(
    draw: st.DrawFn,
    customer_id: str = "3904",
    instants: Sequence[int] = (0, 1, 2, 3),
    statuses: Sequence[str] = ("ACTIVE", "ACTIVE", "DEACTIVATED"),
    **fixed: Any,
) -> Customer:
    fields = {
        "customer_id": customer_id,
        "last_update": stamp(draw(st.sampled_from(instants)), draw(st.sampled_from([-7, -8]))),
        "first_name": draw(st.sampled_from(["Jules", "Vincent"])),
        "email": draw(st.sampled_from([None, "j@example.com"])),
        "notes": draw(st.sampled_from(["N/A", "vip"])),  # not mapped
        "opt_out": draw(st.sampled_from(OPT_OUTS)),
        "status": draw(st.sampled_from(statuses)),
    }
    fields.update(fixed)
    return customer(**fields)


@st.composite
def delivery(draw: st.DrawFn, items: Sequence[Customer]) -> list[Customer]:
    """Every item at least once, some again, in any order."""
    extra = draw(st.lists(st.sampled_from(range(len(items))), max_size=len(items)))
    order = draw(st.permutations([*range(len(items)), *extra]))
    return [items[i] for i in order]


@st.composite
def history(draw: st.DrawFn) -> tuple[list[Customer], list[DestinationSpec]]:
    items = draw(st.lists(version(), min_size=1, max_size=6))
    policy = draw(st.sampled_from([NEVER, ON_OPT_IN]))
    dests = [spec("alpha", policy=policy), spec("beta", policy=policy, native_merge=False)]
    return draw(delivery(items)), dests


PROCESSED = ("applied", "tie")


def assert_keys_identify_operations(operations: Sequence[Operation]) -> None:
    """No two different operations (destination, customer, op, body) share a key."""
    seen: dict[tuple[str, str], tuple[Any, ...]] = {}
    for op in operations:
        identity = (op.customer_id, op.order_key, op.op, json.dumps(op.body, sort_keys=True))
        previous = seen.setdefault((op.destination, op.idempotency_key), identity)
        assert previous == identity, f"key {op.idempotency_key} names two operations"


@HYPOTHESIS
@given(history())
def test_property_final_state_is_that_of_the_newest_version(
    case: tuple[list[Customer], list[DestinationSpec]],
) -> None:
    events, dests = case
    run = apply(events, dests)

    # outcomes follow the order rule (a repeat of a tie that is not the current content may be
    # applied again in arrival order, or taken as a duplicate)
    top: int | None = None
    current: str | None = None
    at_top: list[str] = []
    for step in run.steps:
        moment = micros(step.event.last_update)
        content = step.event.model_dump_json()  # as parsed: "true" and true are alike
        if top is None or moment > top:
            expected = {"applied"}
        elif moment < top:
            expected = {"stale"}
        elif content == current:
            expected = {"duplicate"}
        elif content in at_top:
            expected = {"tie", "duplicate"}
        else:
            expected = {"tie"}
        assert step.plan.outcome in expected
        if step.plan.outcome in PROCESSED:
            if top is None or moment > top:
                at_top = []
            top, current = moment, content
            at_top.append(content)
        else:
            # a stale opt-out under `never` is still owed (an unsubscribe), nothing else
            owed = step.event.opt_out is True and dests[0].policy == NEVER
            assert all(op.op == "unsubscribe" for op in step.plan.operations)
            if not owed or step.plan.outcome == "duplicate":
                assert step.plan.operations == []
                assert step.plan.states == {}

    newest_moment = max(micros(event.last_update) for event in events)
    newest = [event for event in events if micros(event.last_update) == newest_moment]
    final = run.states["3904"]
    assert final.last_update_us == newest_moment
    winners = [event for event in newest if content_hash(event) == final.content_hash]
    assert winners, "the final content is none of the newest versions"
    winner = winners[0]

    alone = apply([winner], dests).states["3904"]
    assert (final.last_update_us, final.content_hash) == (alone.last_update_us, alone.content_hash)
    if winner.opt_out is not None:
        assert final.opt_out is winner.opt_out
    ever = any(event.opt_out is True for event in events)
    view = winner.opt_out
    if dests[0].policy == NEVER and ever:
        view = True  # the planner owns consent: an opt-out at any version stays
    for dest in dests:
        assert final.contact(dest.name).deactivated == alone.contact(dest.name).deactivated
        if winner.status != "DEACTIVATED" and view is not None:
            # an opt-out that arrives stale after the winner was upserted sends the
            # unsubscribe but no new upsert (the winner's body is not at hand): the last
            # upsert then maps the winner as it was planned
            expected = {
                payload_hash(MAPPING.apply(winner.model_copy(update={"opt_out": v}), DISPENSARY))
                for v in (view, winner.opt_out, None, False)  # a null reads as the last known
            }
            assert final.contact(dest.name).delivered_hash in expected
        if final.opt_out is True or (dests[0].policy == NEVER and ever):
            assert final.contact(dest.name).unsubscribed


@HYPOTHESIS
@given(history())
def test_property_no_subscribe_after_opt_out(
    case: tuple[list[Customer], list[DestinationSpec]],
) -> None:
    events, dests = case
    run = apply(events, dests)
    resubscribes = dests[0].policy.resubscribe == "on_source_opt_in"
    known: bool | None = None  # last known opt_out of the processed events
    unsubscribed = {dest.name: False for dest in dests}  # as told to the destination
    for step in run.steps:
        processed = step.plan.outcome in PROCESSED
        opt_out = step.event.opt_out
        # under `never` an opt-out at any version (a stale one too) is owed
        counts = processed or (not resubscribes and step.plan.outcome == "stale")
        for dest in dests:
            ops = kinds(step.plan.operations, dest.name)
            flip = processed and opt_out is False and known is True
            if not resubscribes:
                assert "subscribe" not in ops
            elif flip and unsubscribed[dest.name]:
                assert ops.count("subscribe") == 1, "a true → false flip resubscribes once"
            else:
                assert "subscribe" not in ops, "subscribe only right after a true → false flip"
            if counts and opt_out is True and not unsubscribed[dest.name]:
                assert ops.count("unsubscribe") == 1
            else:
                assert "unsubscribe" not in ops, "unsubscribe once, and only for opt_out true"
            for kind in ops:
                if kind == "unsubscribe":
                    unsubscribed[dest.name] = True
                elif kind == "subscribe":
                    unsubscribed[dest.name] = False
        if processed and opt_out is not None and (resubscribes or known is not True):
            known = opt_out
        if not resubscribes and counts and opt_out is True:
            known = True
        if known is True:
            assert all(unsubscribed.values()), "an opted-out customer is unsubscribed everywhere"
    for dest in dests:
        ops = kinds(run.operations, dest.name)
        if not resubscribes and "unsubscribe" in ops:
            assert "subscribe" not in ops[ops.index("unsubscribe") :]
        assert run.states["3904"].contact(dest.name).unsubscribed == unsubscribed[dest.name]


@st.composite
def merge_history(draw: st.DrawFn) -> tuple[list[Customer], list[DestinationSpec]]:
    """Survivor A (100) absorbs B (200) at instant 3; earlier versions of both, later versions
    of A still listing B, and later strays of B, delivered in any order with repeats."""
    listed = draw(st.sampled_from([[ABSORBED], [200], [ABSORBED, ABSORBED]]))
    into = draw(st.sampled_from([SURVIVOR, 100]))
    items: list[Customer] = []
    items += draw(st.lists(version(SURVIVOR, instants=(0, 1, 2)), max_size=2))
    items.append(
        draw(
            version(
                SURVIVOR,
                instants=(3,),
                statuses=("MERGED", "ACTIVE"),
                merged_customer_ids=listed,
            )
        )
    )
    items += draw(
        st.lists(
            version(SURVIVOR, instants=(3, 4), statuses=("MERGED",), merged_customer_ids=listed),
            max_size=2,
        )
    )
    items += draw(st.lists(version(ABSORBED, instants=(0, 1, 2)), max_size=2))
    items.append(
        draw(
            version(
                ABSORBED, instants=(3,), statuses=("DEACTIVATED",), merged_into_customer_id=into
            )
        )
    )
    items += draw(st.lists(version(ABSORBED, instants=(4,), statuses=("ACTIVE",)), max_size=1))
    policy = draw(st.sampled_from([NEVER, ON_OPT_IN]))
    dests = [
        spec("klaviyo", policy=policy),
        spec("aiq", policy=policy, native_merge=False),
        spec("braze", policy=policy),
    ]
    return draw(delivery(items)), dests


@HYPOTHESIS
@given(merge_history())
def test_property_merge_yields_one_merge_and_nothing_for_the_absorbed_after(
    case: tuple[list[Customer], list[DestinationSpec]],
) -> None:
    events, dests = case
    run = apply(events, dests)
    merges = [op for op in run.operations if op.op == "merge"]
    assert sorted(op.destination for op in merges) == ["braze", "klaviyo"]
    for op in merges:
        assert (op.customer_id, op.body["from_customer_id"], op.body["into_customer_id"]) == (
            ABSORBED,
            ABSORBED,
            SURVIVOR,
        )
        assert op.idempotency_key == merge_key(op.destination, ABSORBED, SURVIVOR)
    assert run.states[ABSORBED].merged_into == SURVIVOR

    def owed_unsubscribe(op: Operation) -> bool:
        # an opt-out of B's is owed to A's contact, and to B's own on every destination
        # (should the merge never land, B's contact lives on; where it did, the adapter
        # finds B's contact merged away and creates nothing)
        return op.op == "unsubscribe" and op.customer_id in (SURVIVOR, ABSORBED)

    [merged_at] = [i for i, step in enumerate(run.steps) if "merge" in kinds(step.plan.operations)]
    # where the merge is planned, an owed opt-out of B's goes to B's own contact on every
    # destination, before the merge (should the merge never land, B is not left subscribed)
    at_merge = [op for op in run.steps[merged_at].plan.operations if op.customer_id == ABSORBED]
    assert all(op.op in ("merge", "unsubscribe") for op in at_merge)
    for dest in ("klaviyo", "braze"):
        mine = [op.op for op in at_merge if op.destination == dest]
        assert mine in (["merge"], ["unsubscribe", "merge"])
    for step in run.steps[merged_at + 1 :]:
        assert all(
            op.customer_id != ABSORBED or owed_unsubscribe(op) for op in step.plan.operations
        )
        if step.event.customer_id == ABSORBED:
            # not applied to B, nor to A; only an opt-out is carried
            assert all(owed_unsubscribe(op) for op in step.plan.operations)
            if step.event.opt_out is not True:
                assert step.plan.operations == []
            assert step.plan.outcome in ("absorbed", "stale", "duplicate")
    for step in run.steps:
        if step.event.customer_id == ABSORBED:  # B's payloads touch A only to opt it out
            assert all(
                op.customer_id == ABSORBED or owed_unsubscribe(op) for op in step.plan.operations
            )


@HYPOTHESIS
@given(st.one_of(history(), merge_history()))
def test_property_idempotency_keys_identify_operations(
    case: tuple[list[Customer], list[DestinationSpec]],
) -> None:
    events, dests = case
    run = apply(events, dests)
    assert_keys_identify_operations(run.operations)
    # and planning is deterministic: the same history gives the same keys
    again = apply(events, dests)
    assert [op.idempotency_key for op in again.operations] == [
        op.idempotency_key for op in run.operations
    ]
