"""Consent and identity do not depend on the order of arrival (issue 12's rule).

Histories of up to three customers (A, B, C) are generated: versions with opt-out flips, stale
and tie versions, repeats, the two payloads of a merge of A into B and of a chain B into C, and
delivery failures that dead-letter operations, later replayed. Each history is run in two
orders through the real planner (``process_batch``), the real store (a SQLite file) and the real
worker into the Alpine IQ fake and into the Klaviyo fake, and what each fake ends up holding
about consent is compared:

- the final survivor of each merge group is unsubscribed exactly when some version of some
  customer of the group opted out (``resubscribe: never``), and told so in exactly one
  unsubscribe (one operation, one idempotency key), whatever the order;
- every persona of a customer that opted out at any version is unsubscribed;
- nothing ever opts a contact in, and a merged-away customer's payloads write no field;
- the two orders leave the same consent on every survivor.

Delivery is interleaved with arrival (each batch is delivered before the next arrives), so
these hold in the orders a live system sees, not only when everything is planned first.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_schema
from fakes.alpineiq import AlpineIQFake
from fakes.hubspot import HubSpotFake
from fakes.klaviyo import KlaviyoFake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_alpineiq import API_KEY, BASE_URL, config_text
from test_hubspot import BASE as HUBSPOT_BASE
from test_hubspot import flow_config as hubspot_config
from test_hubspot import prepared as prepared_hubspot
from test_klaviyo import BASE as KLAVIYO_BASE
from test_klaviyo import flow_config as klaviyo_config
from vendor_flow import DISPENSARY, Flow, event_body

from connector.destinations.alpineiq import AlpineIQSink
from connector.destinations.hubspot import HubSpotSink
from connector.destinations.klaviyo import KlaviyoSink
from connector.mapping import compile_mapping_text
from connector.planner import CustomerState, DestinationSpec, Operation, plan
from connector.treez import Customer, parse_customer

A, B, C = "200", "100", "300"
OPT_OUTS = ("true", "false", None)

Event = tuple[str, int, dict[str, Any]]  # customer, version, fields


def person(customer: str) -> dict[str, Any]:
    return {"email": f"c{customer}@example.com", "phone": f"310555{int(customer):04d}"}


@st.composite
def plain_versions(draw: st.DrawFn, customer: str, instants: tuple[int, ...]) -> list[Event]:
    found = []
    for _ in range(draw(st.integers(1, 3))):
        fields = {
            "opt_out": draw(st.sampled_from(OPT_OUTS)),
            "first_name": draw(st.sampled_from(["Jules", "Mia"])),
            **person(customer),
        }
        found.append((customer, draw(st.sampled_from(instants)), fields))
    return found


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Event], set[tuple[str, str]]]:
    """A customer history: the events (each at least once, maybe repeated) and the merges
    (absorbed, survivor) it contains."""
    events: list[Event] = []
    merges: set[tuple[str, str]] = set()
    events += draw(plain_versions(A, (1, 2, 3)))
    events += draw(plain_versions(B, (1, 2, 3)))
    if draw(st.booleans()):  # A merged into B: one payload, the other, or both
        merges.add((A, B))
        which = draw(st.sampled_from(["absorbed", "survivor", "both"]))
        if which in ("absorbed", "both"):
            fields = {"status": "DEACTIVATED", "merged_into_customer_id": B, **person(A)}
            events.append((A, 4, {"opt_out": draw(st.sampled_from(OPT_OUTS)), **fields}))
        if which in ("survivor", "both"):
            fields = {"status": "MERGED", "merged_customer_ids": [A], **person(B)}
            events.append((B, 4, {"opt_out": draw(st.sampled_from(OPT_OUTS)), **fields}))
        if draw(st.booleans()):  # and B into C: a chain
            merges.add((B, C))
            events += draw(plain_versions(C, (1, 5)))
            fields = {"status": "DEACTIVATED", "merged_into_customer_id": C, **person(B)}
            events.append((B, 5, {"opt_out": draw(st.sampled_from(OPT_OUTS)), **fields}))
            fields = {"status": "MERGED", "merged_customer_ids": [B], **person(C)}
            events.append((C, 5, {"opt_out": draw(st.sampled_from(OPT_OUTS)), **fields}))
    if draw(st.booleans()):  # a stray: a payload of A after its merge
        events.append((A, 6, {"opt_out": draw(st.sampled_from(OPT_OUTS)), **person(A)}))
    repeats = draw(st.lists(st.sampled_from(range(len(events))), max_size=3))
    return [*events, *(events[i] for i in repeats)], merges


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[Event], set[tuple[str, str]], list[Any], list[Any]]:
    """A history and two orders of it, each cut into batches, with failures injected."""
    events, merges = draw(histories())
    orders = []
    for _ in range(2):
        order = draw(st.permutations(events))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4)))
        batches = [order[i:j] for i, j in zip([0, *cuts], [*cuts, len(order)], strict=True)]
        failures = draw(
            st.lists(st.tuples(st.sampled_from([400, 500]), st.integers(1, 2)), max_size=2)
        )
        plan = [
            (batch, failures[i] if i < len(failures) else None) for i, batch in enumerate(batches)
        ]
        orders.append(plan)
    return events, merges, orders[0], orders[1]


def survivor_of(customer: str, merges: set[tuple[str, str]]) -> str:
    into = dict(merges)
    while customer in into:
        customer = into[customer]
    return customer


def body(event: Event) -> bytes:
    customer, version, fields = event
    return event_body(customer, version * 60, **fields)


class Failing:
    """An ASGI wrapper that answers the next requests with an error status and a body in
    the vendor's error shape (as ``AlpineIQFake.fail_next`` does for Alpine IQ)."""

    def __init__(self, app: Any, body: Callable[[int], bytes]) -> None:
        self.app = app
        self.body = body
        self.pending: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.pending:
            status = self.pending.pop(0)
            headers = [(b"content-type", b"application/vnd.api+json")]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": self.body(status)})
            return
        await self.app(scope, receive, send)


def klaviyo_error(status: int) -> bytes:
    code = "invalid" if status == 400 else "error"
    error = {
        "id": "e1",
        "status": status,
        "code": code,
        "title": "Injected",
        "detail": "injected",
        "source": {"pointer": "/data/"},
    }
    return json.dumps({"errors": [error]}).encode()


@dataclass
class Vendor:
    """What the property needs of one destination and its fake."""

    name: str
    destination: str
    fake: Any
    app: Any
    config: str
    sink: Any
    base_url: str
    fail: Callable[[int, int], None]
    consent: Callable[[str], str | None]  # "out", "in", or None (never told), by contact
    opted_in: Callable[[], list[Any]]  # every call or change that opted a contact in


def alpineiq() -> Vendor:
    fake = AlpineIQFake(api_key=API_KEY, rate_limit_per_second=None, uid="1234")

    def consent(contact: str) -> str | None:
        if fake.persona(contact) is None:
            return None
        values = set(fake.consent(contact).values())
        return "out" if values == {False} else "in" if True in values else None

    def opted_in() -> list[Any]:
        return [
            c
            for c in fake.calls
            if isinstance(c.body, dict)
            and True in (c.body.get("emailOptIn"), c.body.get("smsOptIn"))
        ]

    return Vendor(
        "alpineiq",
        "aiq",
        fake,
        fake.app,
        config_text(),
        AlpineIQSink,
        BASE_URL,
        lambda status, count: fake.fail_next(status, count),
        consent,
        opted_in,
    )


def klaviyo() -> Vendor:
    fake = KlaviyoFake(seed=3)
    failing = Failing(fake.app, klaviyo_error)

    def consent(contact: str) -> str | None:
        if fake.profile(contact) is None:
            return None
        values = set(fake.consent(contact).values()) - {"NEVER_SUBSCRIBED"}
        return "out" if values == {"UNSUBSCRIBED"} else "in" if "SUBSCRIBED" in values else None

    return Vendor(
        "klaviyo",
        "kl",
        fake,
        failing,
        klaviyo_config(DISPENSARY),
        KlaviyoSink,
        KLAVIYO_BASE,
        lambda status, count: failing.pending.extend([status] * count),
        consent,
        lambda: list(fake.subscribes),
    )


def braze() -> Vendor:
    from fakes.braze import BrazeFake
    from test_braze import BASE as BRAZE_BASE
    from test_braze import SMS
    from test_braze import flow_config as braze_config

    from connector.destinations.braze import BrazeSink

    # merges land at the next request or read (Braze applies them a little later)
    fake = BrazeFake(subscription_groups=[SMS], merge_delay=0.0, rate_limits=False)
    failing = Failing(fake.app, lambda status: json.dumps({"message": "injected"}).encode())

    def consent(contact: str) -> str | None:
        if fake.profile(contact) is None:
            return None
        states = fake.consent(contact)
        if states["email"] == "unsubscribed" and states.get(SMS) == "unsubscribed":
            return "out"
        if states["email"] == "opted_in" or "subscribed" in (states.get(SMS),):
            return "in"
        return None  # Braze's default (subscribed): never told

    return Vendor(
        "braze",
        "bz",
        fake,
        failing,
        braze_config(DISPENSARY),
        BrazeSink,
        BRAZE_BASE,
        lambda status, count: failing.pending.extend([status] * count),
        consent,
        lambda: fake.subscribes,
    )


def hubspot() -> Vendor:
    fake = prepared_hubspot(HubSpotFake(rate_limits=False, seed=3))

    def consent(contact: str) -> str | None:
        found = fake.contact(contact)
        email = found.properties.get("email") if found is not None else None
        if email is None:
            return None
        if fake.opted_out(email):
            return "out"
        subscribed = fake.subscription_status(email, 1001) == "SUBSCRIBED"
        return "in" if subscribed else None

    return Vendor(
        "hubspot",
        "hs",
        fake,
        fake.app,
        hubspot_config(),
        HubSpotSink,
        HUBSPOT_BASE,
        lambda status, count: fake.fail_next(status, count),
        consent,
        lambda: [c for c in fake.status_changes if c.status == "SUBSCRIBED"],
    )


VENDORS = {"alpineiq": alpineiq, "klaviyo": klaviyo, "braze": braze, "hubspot": hubspot}


async def run_order(
    work: Path, vendor: Vendor, plan: list[Any], store_url: str | None = None
) -> Flow:
    flow = Flow(
        work,
        vendor.config,
        app=vendor.app,
        sink_factory=vendor.sink,
        base_url=vendor.base_url,
        store_url=store_url,
    )
    for batch, failure in plan:
        if failure is not None:
            vendor.fail(*failure)
        await flow.deliver(*(body(e) for e in batch))
    # every dead letter replayed (as `connector dlq replay` does) until none is left open
    for _ in range(5):
        replayed = await asyncio.to_thread(flow.store.replay)
        await flow.drain()
        if replayed.replayed == 0:
            break
    return flow


def consent_by_customer(vendor: Vendor, flow: Flow) -> dict[str, str | None]:
    """Consent of each customer's contact, as the identity map names it (live ones only)."""
    found = {}
    for (_, _, customer), contact in flow.contact_ids().items():
        if (
            contact is not None
            and (
                vendor.fake.persona(contact)
                if vendor.name == "alpineiq"
                else vendor.fake.profile(contact)
            )
            is not None
        ):
            found[customer] = vendor.consent(contact)
    return found


def check(
    events: list[Event], merges: set[tuple[str, str]], vendor: Vendor, flow: Flow
) -> dict[str, Any]:
    opted = {e[0] for e in events if e[2].get("opt_out") == "true"}
    group_opted = {survivor_of(c, merges) for c in opted}
    consent = consent_by_customer(vendor, flow)
    # nothing ever opts a contact in (resubscribe: never)
    assert vendor.opted_in() == []
    # every contact of a customer that opted out, and the survivor of its group, is opted out
    for customer in opted | group_opted:
        if customer in consent:
            assert consent[customer] == "out", customer
    # one unsubscribe per customer and destination: one operation, one key
    unsubscribes: dict[str, set[str]] = {}
    for row in flow.outbox():
        if row["op"] == "unsubscribe":
            unsubscribes.setdefault(row["customer_id"], set()).add(row["idempotency_key"])
    assert all(len(keys) == 1 for keys in unsubscribes.values()), unsubscribes
    rows = [r for r in flow.outbox() if r["op"] == "unsubscribe"]
    assert len(rows) == len(unsubscribes)
    for survivor in group_opted:
        if survivor in consent:
            assert survivor in unsubscribes
    for customer in unsubscribes:  # only to the person who opted out, in one of their records
        assert survivor_of(customer, merges) in group_opted, customer
    # every operation settled: delivered, or dead only while the destination refused it
    open_rows = [r for r in flow.outbox() if r["status"] not in ("done", "dead")]
    assert open_rows == []
    survivors = {survivor_of(c, merges) for c in (A, B, C)}
    return {s: consent.get(s) for s in survivors if s in consent}


@settings(
    max_examples=int(os.environ.get("ORDER_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(runs())
@pytest.mark.parametrize("vendor_name", sorted(VENDORS))
def test_consent_of_survivors_is_the_same_in_any_order(
    tmp_path_factory: pytest.TempPathFactory, vendor_name: str, case: Any
) -> None:
    events, merges, first, second = case
    finals = []
    for order in (first, second):
        work = tmp_path_factory.mktemp("order")
        vendor = VENDORS[vendor_name]()

        async def go(vendor: Vendor = vendor, order: list[Any] = order, work: Path = work) -> Any:
            flow = await run_order(work, vendor, order)
            try:
                return check(events, merges, vendor, flow)
            finally:
                await flow.close()

        finals.append(asyncio.run(go()))
    same_consent_in_both(events, merges, finals)


def same_consent_in_both(events: Any, merges: Any, finals: list[Any]) -> None:
    opted = {survivor_of(e[0], merges) for e in events if e[2].get("opt_out") == "true"}
    for survivor in opted:
        for final in finals:
            if survivor in final:
                assert final[survivor] == "out"
    assert json.dumps(finals[0], sort_keys=True) == json.dumps(finals[1], sort_keys=True)


@settings(
    max_examples=int(os.environ.get("ORDER_EXAMPLES_PG", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(runs())
@pytest.mark.parametrize(
    "vendor_name", [pytest.param(v, id=f"postgresql-{v}") for v in sorted(VENDORS)]
)
def test_consent_of_survivors_is_the_same_in_any_order_on_postgresql(
    tmp_path_factory: pytest.TempPathFactory, pg_database: str, vendor_name: str, case: Any
) -> None:
    """The same property through the PostgreSQL store (fewer examples: a schema each)."""
    events, merges, first, second = case
    finals = []
    for order in (first, second):
        work = tmp_path_factory.mktemp("order")
        vendor = VENDORS[vendor_name]()
        with fresh_schema(pg_database) as url:

            async def go(
                vendor: Vendor = vendor, order: list[Any] = order, work: Path = work, url: str = url
            ) -> Any:
                flow = await run_order(work, vendor, order, store_url=url)
                try:
                    return check(events, merges, vendor, flow)
                finally:
                    await flow.close()

            finals.append(asyncio.run(go()))
    same_consent_in_both(events, merges, finals)


# --- the same rule on the planner alone: fast, many more histories ------------------------------

PLANNER_MAPPING = compile_mapping_text(
    "first_name: first_name\nemail: email\nopted_out: {from: opt_out, transform: [bool]}\n",
    name="consent.yaml",
)
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())["data"]


def as_customer(event: Event) -> Customer:
    customer, version, fields = event
    data = {**copy.deepcopy(SEED), "customer_id": customer, "opt_out": None}
    data["last_update"] = f"2026-05-01T10:{version:02d}:00.000-07:00"
    data.update(fields)
    return parse_customer(data)


def planned(events: list[Event], specs: list[DestinationSpec]) -> tuple[Any, list[Operation]]:
    states: dict[str, CustomerState] = {}
    operations: list[Operation] = []
    for event in events:
        result = plan(as_customer(event), DISPENSARY, states, specs)
        states.update(result.states)
        operations += result.operations
    return states, operations


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data())
def test_the_planner_owes_the_same_opt_outs_in_any_order(
    history: tuple[list[Event], set[tuple[str, str]]], data: st.DataObject
) -> None:
    events, merges = history
    specs = [
        DestinationSpec("native", PLANNER_MAPPING, native_merge=True),
        DestinationSpec("plain", PLANNER_MAPPING, native_merge=False),
    ]
    opted = {e[0] for e in events if e[2].get("opt_out") == "true"}
    group_opted = {survivor_of(c, merges) for c in opted}
    outcomes = []
    for _ in range(2):
        order = data.draw(st.permutations(events))
        states, operations = planned(order, specs)
        seen_out: set[tuple[str, str]] = set()
        keys: dict[tuple[str, str], set[str]] = {}
        for op in operations:
            where = (op.destination, op.customer_id)
            assert op.op != "subscribe"
            if op.op == "unsubscribe":
                keys.setdefault(where, set()).add(op.idempotency_key)
                seen_out.add(where)
            elif op.op == "upsert" and where in seen_out:
                # no upsert planned after the opt-out says the customer is opted in
                assert op.body["fields"].get("opted_out") is True
        assert all(len(k) == 1 for k in keys.values())  # one unsubscribe: one key
        owed = set()
        for spec in specs:
            for customer, state in states.items():
                if state.merged_into is not None:
                    continue
                contact = state.contact(spec.name)
                if contact.unsubscribed or state.opt_out_seen:
                    owed.add((spec.name, customer))
        # every final survivor of an opted-out group owes (or was told) the opt-out, and only
        # those: the same set in every order
        assert owed == {(s.name, c) for s in specs for c in group_opted if c in states}
        merged = sorted((op.destination, op.customer_id) for op in operations if op.op == "merge")
        assert len(merged) == len(set(merged))  # one merge per absorbed customer
        outcomes.append((owed, set(merged)))
    assert outcomes[0] == outcomes[1]
