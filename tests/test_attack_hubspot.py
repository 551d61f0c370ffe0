"""Attacks on the ``hubspot`` destination's consent and identity promises.

Each test states one promise and tries to break it through the real store, planner and
worker (tests/vendor_flow.py) with the HubSpot fake, or through the adapter alone where the
promise is the adapter's (batching, answers mapped to operations, setup). A test that fails
without the fix it names is marked in its docstring ("broke: ...").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fakes.hubspot import HubSpotFake
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_hubspot import (
    BASE,
    KEY,
    TOKEN,
    UNSUBSCRIBE_ALL,
    client_for,
    delivery,
    hubspot_config,
    hubspot_flow,
    prepared,
    set_up,
)
from vendor_flow import DISPENSARY, Flow, event_body

from connector.delivery.base import Sent
from connector.destinations.hubspot import HubSpotDestination, HubSpotSink, next_midnight, setup
from connector.errors import FatalDelivery, RetriableDelivery
from connector.mapping import load_mapping

ROOT = Path(__file__).resolve().parent.parent
MAPPING = ROOT / "mappings" / "hubspot.yaml"
MIA = {"email": "mia@example.com"}
NEW = {"email": "mia.new@example.com"}
OTHER_SHOP = "shop2"
# the consent field HubSpot knows (hs_email_optout), which the shipped mapping carries: the
# planner computes it from the connector's consent state (true once opted out, under `never`)
CONSENT_LINE = "hs_email_optout: {from: opt_out, transform: [bool]}\n"


@pytest.fixture
def bare() -> HubSpotFake:
    return HubSpotFake(seed=11, rate_limits=False)


def consent_mapping(work: Path) -> str:
    text = MAPPING.read_text()
    assert CONSENT_LINE.strip() in text  # the shipped mapping carries it
    (work / "hubspot_consent.yaml").write_text(text)
    return "hubspot_consent.yaml"


@asynccontextmanager
async def consent_flow(
    work: Path, fake: HubSpotFake, *, policy: str | None = None
) -> AsyncIterator[Flow]:
    """A flow whose mapping carries hs_email_optout (the planner's consent state)."""
    from test_hubspot import flow_config

    name = consent_mapping(work)
    text = flow_config(policy=policy).replace("mapping: hubspot.yaml", f"mapping: {name}")
    flow = Flow(work, text, app=fake.app, sink_factory=HubSpotSink, base_url=BASE)
    try:
        yield flow
    finally:
        await flow.close()


def contact_of(flow: Flow, customer: str, dispensary: str = DISPENSARY) -> str:
    found = flow.contact_ids()[(dispensary, "hs", customer)]
    assert found is not None
    return found


async def replay_all(flow: Flow) -> None:
    """Every dead letter replayed and delivered, as `connector dlq replay` does, until none
    is left open (a replay may meet a failure still scripted)."""
    for _ in range(5):
        replayed = await asyncio.to_thread(flow.store.replay)
        await flow.drain()
        if replayed.replayed == 0:
            return


# ---- 1. an opted-out customer ends unsubscribed-all ------------------------------------------


def test_opt_out_dead_lettered_then_replayed_ends_unsubscribed(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: a whole-call 400 dead-letters the lone unsubscribe; the replay delivers it."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare, plain=True) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **MIA))
            bare.fail_next(400)
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA))
            assert not bare.opted_out(MIA["email"])
            assert [d["op"] for d in flow.dead_letters()] == ["unsubscribe"]
            await replay_all(flow)
            assert bare.opted_out(MIA["email"])
            assert bare.resubscriptions() == []

    asyncio.run(go())


@pytest.mark.parametrize("status", [503, 429])
def test_opt_out_retried_through_5xx_and_ten_second_429(
    tmp_path: Path, bare: HubSpotFake, status: int
) -> None:
    """held: a 5xx or a ten-second 429 on the unsubscribe is an ordinary retry."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **MIA))
            bare.fail_next(status)
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA))
            assert bare.opted_out(MIA["email"])
            assert flow.dead_letters() == []

    asyncio.run(go())


@pytest.mark.parametrize("absorbed_first", [True, False], ids=["absorbed-first", "merge-first"])
def test_merge_of_an_opted_out_customer_unsubscribes_the_survivors_email(
    tmp_path: Path, bare: HubSpotFake, absorbed_first: bool
) -> None:
    """held: the absorbed customer opted out; the survivor's own e-mail ends unsubscribed."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("2001", 1, email="a@example.com"),
                event_body("2002", 1, email="b@example.com"),
            )
            opt_out = event_body("2001", 2, opt_out="true", email="a@example.com")
            merge = (
                event_body("2002", 3, merged_customer_ids=["2001"], email="b@example.com"),
                event_body(
                    "2001",
                    3,
                    status="DEACTIVATED",
                    merged_into_customer_id="2002",
                    email="a@example.com",
                ),
            )
            steps = [(opt_out,), merge] if absorbed_first else [merge, (opt_out,)]
            for step in steps:
                await flow.deliver(*step)
            survivor = bare.contact(contact_of(flow, "2002"))
            assert survivor is not None
            assert bare.opted_out("b@example.com")
            assert bare.resubscriptions() == []
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_merge_chain_with_the_first_absorbed_opted_out(tmp_path: Path, bare: HubSpotFake) -> None:
    """held: A (opted out) into B, then B into C: C's e-mail ends unsubscribed."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                *(event_body(c, 1, email=f"c{c}@example.com") for c in ("2001", "2002", "2003"))
            )
            await flow.deliver(event_body("2001", 2, opt_out="true", email="c2001@example.com"))
            await flow.deliver(
                event_body("2002", 3, merged_customer_ids=["2001"], email="c2002@example.com")
            )
            await flow.deliver(
                event_body("2003", 4, merged_customer_ids=["2002"], email="c2003@example.com")
            )
            assert list(bare.contacts) == [contact_of(flow, "2003")]
            assert bare.opted_out("c2003@example.com")
            assert bare.opted_out("c2002@example.com")
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_email_change_after_opt_out_shipped_mapping(tmp_path: Path, bare: HubSpotFake) -> None:
    """broke, then fixed: the shipped mapping maps hs_email_optout, so a new address after an
    opt-out is unsubscribed too."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **MIA))
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA))
            await flow.deliver(event_body("1001", 3, opt_out="false", **NEW))
            assert bare.opted_out(MIA["email"])
            assert bare.opted_out(NEW["email"])

    asyncio.run(go())


@pytest.mark.parametrize("later", ["false", None], ids=["says-false", "says-nothing"])
def test_email_change_after_opt_out_unsubscribes_the_new_address(
    tmp_path: Path, bare: HubSpotFake, later: str | None
) -> None:
    """broke (fixed): the opt-out is the customer's, not the address's; a mapping that
    carries hs_email_optout makes the upsert of the new address unsubscribe it too."""

    async def go() -> None:
        async with consent_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            assert "hs_email_optout" not in bare.properties  # setup leaves HubSpot's own
            await flow.deliver(event_body("1001", 1, **MIA))
            assert bare.status_changes == []  # no consent sent for a subscribed customer
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA))
            await flow.deliver(event_body("1001", 3, opt_out=later, **NEW))
            contact = bare.contact(contact_of(flow, "1001"))
            assert contact is not None
            assert contact.properties["email"] == NEW["email"]
            assert "hs_email_optout" not in contact.properties  # never written by an upsert
            assert bare.opted_out(MIA["email"])
            assert bare.opted_out(NEW["email"])
            assert bare.resubscriptions() == []
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_email_added_after_an_opt_out_without_one(tmp_path: Path, bare: HubSpotFake) -> None:
    """broke (fixed): opted out with no e-mail (no_identifier), an e-mail added later."""

    async def go() -> None:
        async with consent_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, email=None))
            await flow.deliver(event_body("1001", 2, opt_out="true", email=None))
            await flow.deliver(event_body("1001", 3, **MIA))
            assert bare.opted_out(MIA["email"])
            assert flow.dead_letters() == []

    asyncio.run(go())


# ---- 2. never a subscribe but after a flip; SMS always reported -------------------------------


def test_sms_opt_out_without_an_email_still_reports_sms(tmp_path: Path, bare: HubSpotFake) -> None:
    """broke (fixed): a customer with a phone and no e-mail opted out; the unsubscribe was
    reported as no_identifier only, and the SMS opt-out left no sms_consent_unsupported row."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, email=None, phone="2135550142"))
            await flow.deliver(
                event_body("1001", 2, opt_out="true", email=None, phone="2135550142")
            )
            kinds = [c["kind"] for c in flow.conflicts()]
            assert "sms_consent_unsupported" in kinds
            # the number, not "555": a conflict row's timestamp may hold those digits
            assert all("2135550142" not in json.dumps(c, default=str) for c in flow.conflicts())

    asyncio.run(go())


def test_sms_reported_when_the_email_unsubscribe_is_retried(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: an unsubscribe that succeeds on its retry still leaves the SMS conflict row."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **MIA))
            bare.fail_next(502)
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA))
            assert [c["kind"] for c in flow.conflicts()] == ["sms_consent_unsupported"]

    asyncio.run(go())


def test_subscribe_and_unsubscribe_of_one_address_in_one_send_keep_their_order(
    bare: HubSpotFake,
) -> None:
    """broke (fixed): the adapter sent every unsubscribe of a send before every subscribe, so
    a subscribe planned before an unsubscribe of the same address (a family's shared e-mail,
    under on_source_opt_in) was written last and the address ended SUBSCRIBED."""
    prepared(bare)
    shared = "family@example.com"
    older = delivery(
        "subscribe",
        "1001",
        fields={KEY: "k1", "email": shared},
        outbox_id=1,
        channels=["email"],
    )
    newer = delivery(
        "unsubscribe",
        "1002",
        fields={KEY: "k2", "email": shared},
        outbox_id=2,
        channels=["email"],
    )

    async def go() -> list[Any]:
        sink = HubSpotSink(hubspot_config(subscription_id=1001), client_for(bare))
        try:
            return await sink.send([older, newer])
        finally:
            await sink.aclose()

    results = asyncio.run(go())
    assert all(isinstance(r, Sent) for r in results)
    assert bare.opted_out(shared)
    assert bare.subscription_status(shared, 1001) == "UNSUBSCRIBED"


class ConsentErrors:
    """HubSpot's documented answer to unsubscribe-all may hold ``errors`` (StandardError)
    next to ``results``: this wrapper drops the named address from the results and names it
    in an error, as HubSpot would for an address it could not opt out."""

    def __init__(self, fake: HubSpotFake, failing: str) -> None:
        self.fake = fake
        self.failing = failing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(UNSUBSCRIBE_ALL):
            await self.fake.app(scope, receive, send)
            return
        start: dict[str, Any] = {}

        async def capture(message: Any) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            data = json.loads(message["body"])
            data["results"] = [
                r for r in data["results"] if r["subscriberIdString"] != self.failing
            ]
            data["numErrors"] = 1
            data["errors"] = [
                {
                    "status": "error",
                    "category": "VALIDATION_ERROR",
                    "message": f"could not opt out {self.failing}",
                    "context": {"subscriberIdString": [self.failing]},
                    "errors": [],
                    "links": {},
                }
            ]
            payload = json.dumps(data).encode()
            headers = [(k, v) for k, v in start["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

        await self.fake.app(scope, receive, capture)


def test_an_unsubscribe_all_error_for_one_address_is_not_reported_done(
    bare: HubSpotFake,
) -> None:
    """broke (fixed): a 200 whose ``errors`` name one address (results without it) counted
    every address as opted out."""
    prepared(bare)
    app = ConsentErrors(bare, "b@example.com")
    deliveries = [
        delivery("unsubscribe", c, fields={KEY: f"k{c}", "email": e}, outbox_id=n)
        for n, (c, e) in enumerate([("1", "a@example.com"), ("2", "b@example.com")])
    ]

    async def go() -> list[Any]:
        import httpx

        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        sink = HubSpotSink(hubspot_config(), client)
        try:
            return await sink.send(deliveries)
        finally:
            await sink.aclose()

    ok, failed = asyncio.run(go())
    assert isinstance(ok, Sent)
    assert isinstance(failed, RetriableDelivery | FatalDelivery)
    assert "b@example.com" not in str(failed)


# ---- 3. identity --------------------------------------------------------------------------------


def test_family_sharing_an_email_never_writes_each_others_contact(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: the second holder's contact is written without the e-mail (duplicate_email);
    the first holder's contact keeps its own values. Reported: the second one's opt-out
    unsubscribes the shared address (HubSpot's consent is per address)."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("1001", 1, first_name="ann", **MIA),
                event_body("1002", 1, first_name="bob", **MIA),
            )
            ann = bare.contact(contact_of(flow, "1001"))
            bob = bare.contact(contact_of(flow, "1002"))
            assert ann is not None
            assert bob is not None
            assert ann.id != bob.id
            assert ann.properties["firstname"] == "Ann"
            assert ann.properties["email"] == MIA["email"]
            assert bob.properties["firstname"] == "Bob"
            assert "email" not in bob.properties
            assert "duplicate_email" in [c["kind"] for c in flow.conflicts()]
            await flow.deliver(event_body("1002", 2, first_name="bobby", **MIA))
            assert ann.properties["firstname"] == "Ann"
            assert len(bare.contacts) == 2
            await flow.deliver(event_body("1002", 3, opt_out="true", first_name="bobby", **MIA))
            assert bare.opted_out(MIA["email"])  # the shared address: see the report
            assert ann.properties["firstname"] == "Ann"

    asyncio.run(go())


def test_two_dispensaries_on_one_account_never_collide(tmp_path: Path, bare: HubSpotFake) -> None:
    """held: the same Treez customer id at two dispensaries is two contacts (the key holds
    the dispensary); the same person's e-mail at the second is reported, not overwritten."""
    lines = [
        "store: sqlite:///connector.db",
        "dispensaries:",
    ]
    for shop in (DISPENSARY, OTHER_SHOP):
        lines += [
            f"  {shop}:",
            f"    webhook_token: token-{shop}",
            "    destinations:",
            "      - name: hs",
            "        type: hubspot",
            f"        token: {TOKEN}",
            "        mapping: hubspot.yaml",
            "        rate_limit: []",
        ]

    async def go() -> None:
        flow = Flow(
            tmp_path,
            "\n".join(lines) + "\n",
            app=bare.app,
            sink_factory=HubSpotSink,
            base_url=BASE,
        )
        try:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("1001", 1, first_name="ann", **MIA),
                event_body("1001", 1, dispensary=OTHER_SHOP, first_name="bob", **MIA),
            )
            one = contact_of(flow, "1001")
            two = contact_of(flow, "1001", OTHER_SHOP)
            assert one != two
            first, second = bare.contact(one), bare.contact(two)
            assert first is not None
            assert second is not None
            assert first.properties[KEY] != second.properties[KEY]
            assert {first.properties["firstname"], second.properties["firstname"]} == {
                "Ann",
                "Bob",
            }
            assert [c.get("email") for c in (first.properties, second.properties)].count(
                MIA["email"]
            ) == 1
        finally:
            await flow.close()

    asyncio.run(go())


def test_merge_repeated_and_stray_upsert_of_the_absorbed_never_resurrects(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: a merge delivered twice is one HubSpot merge; the absorbed customer's later
    payload (a new name) writes nothing and makes no new contact with its key."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("2001", 1, email="a@example.com"),
                event_body("2002", 1, first_name="vega", email="b@example.com"),
            )
            survivor = contact_of(flow, "2002")
            pair = (
                event_body(
                    "2002",
                    2,
                    first_name="vega",
                    merged_customer_ids=["2001"],
                    email="b@example.com",
                ),
                event_body(
                    "2001",
                    2,
                    status="DEACTIVATED",
                    merged_into_customer_id="2002",
                    email="a@example.com",
                ),
            )
            await flow.deliver(*pair)
            await flow.deliver(*pair)
            await flow.deliver(event_body("2001", 5, first_name="zed", email="z@example.com"))
            assert list(bare.contacts) == [survivor]
            contact = bare.contact(survivor)
            assert contact is not None
            assert contact.properties["firstname"] == "Vega"
            assert contact.properties["email"] == "b@example.com"
            assert [m.primary for m in bare.merges] == [survivor]
            assert bare.contact_by(KEY, f"treez-{DISPENSARY}-2001") is None
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_absorbed_upsert_dead_lettered_then_merged_then_replayed(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: the absorbed customer's dead upsert is not resent after its merge (replay
    judges it superseded), so its key never makes a second contact."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("2001", 1, email="a@example.com"),
                event_body("2002", 1, email="b@example.com"),
            )
            bare.fail_next(400)
            await flow.deliver(event_body("2001", 2, first_name="zed", email="a@example.com"))
            assert [d["op"] for d in flow.dead_letters()] == ["upsert"]
            await flow.deliver(
                event_body("2002", 3, merged_customer_ids=["2001"], email="b@example.com")
            )
            await replay_all(flow)
            assert list(bare.contacts) == [contact_of(flow, "2002")]
            assert bare.contact_by(KEY, f"treez-{DISPENSARY}-2001") is None

    asyncio.run(go())


# ---- 4. batching ---------------------------------------------------------------------------------


EMAILS = ["a@example.com", "A@example.com", "b@example.com", "c@example.com", "bad@@x", None]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(EMAILS), st.sampled_from(["1", "x", None]), st.booleans()),
        min_size=1,
        max_size=25,
    ),
    st.integers(1, 8),
    st.lists(st.sampled_from(EMAILS[:4]), max_size=2),
)
def test_batching_isolates_exactly_the_bad_inputs(
    rows: list[tuple[str | None, str | None, bool]], per_request: int, held: list[str]
) -> None:
    """held: every input but the bad ones (an invalid e-mail: 400; a number property with
    text: 207) is delivered to its own contact; no request exceeds inputs_per_request or
    holds one e-mail twice; an e-mail held by another contact is written without it."""
    fake = prepared(HubSpotFake(seed=3, rate_limits=False))
    fake.add_property("points", kind="number")
    for n, email in enumerate(dict.fromkeys(e.lower() for e in held)):
        asyncio.run(_seed(fake, f"other{n}", email))
    mark = len(fake.calls)
    deliveries = []
    for n, (email, points, deactivate) in enumerate(rows):
        fields: dict[str, Any] = {KEY: f"k{n}", "firstname": f"N{n}"}
        if email is not None:
            fields["email"] = email
        if points is not None:
            fields["points"] = points
        op = "deactivate" if deactivate else "upsert"
        contact = "1" if deactivate else None
        deliveries.append(delivery(op, str(n), fields=fields, outbox_id=n, contact_id=contact))

    async def go() -> list[Any]:
        sink = HubSpotSink(hubspot_config(inputs_per_request=per_request), client_for(fake))
        try:
            return await sink.send(deliveries)
        finally:
            await sink.aclose()

    results = asyncio.run(go())
    for call in fake.calls[mark:]:
        if call.path != "/crm/v3/objects/contacts/batch/upsert":
            continue
        inputs = call.body["inputs"]
        assert len(inputs) <= per_request
        emails = [i["properties"]["email"].lower() for i in inputs if "email" in i["properties"]]
        assert len(emails) == len(set(emails))
    for n, ((email, points, deactivate), result) in enumerate(zip(rows, results, strict=True)):
        bad = not deactivate and (email == "bad@@x" or points == "x")
        if bad:
            assert isinstance(result, FatalDelivery), (n, result)
            assert "bad@@x" not in str(result)
            continue
        assert isinstance(result, Sent), (n, result)
        contact = fake.contact(str(result.contact_id))
        assert contact is not None
        assert contact.properties[KEY] == f"k{n}"
        if deactivate:
            assert contact.properties["treez_status"] == "DEACTIVATED"
            continue
        assert contact.properties["firstname"] == f"N{n}"
        if email is not None and (contact.properties.get("email") or "").lower() != email.lower():
            assert result.conflict is not None
            assert result.conflict.startswith("duplicate_email")
    keys = [c.properties.get(KEY) for c in fake.contacts.values()]
    assert len(keys) == len(set(keys))  # one contact per key


async def _seed(fake: HubSpotFake, key: str, email: str) -> None:
    async with client_for(fake) as client:
        sink = HubSpotSink(hubspot_config(), client)
        [result] = await sink.send([delivery("upsert", key, fields={KEY: key, "email": email})])
        assert isinstance(result, Sent)


# ---- 6. setup -----------------------------------------------------------------------------------


def test_setup_never_changes_an_existing_property() -> None:
    """held: a property the account has (another type, another group) is left as it is, and
    a second run writes nothing."""
    fake = HubSpotFake(rate_limits=False)
    fake.add_property("treez_store", kind="number")
    before = fake.properties["treez_store"]

    async def run() -> list[str]:
        async with client_for(fake) as client:
            return await setup(hubspot_config(), load_mapping(MAPPING), client)

    asyncio.run(run())
    writes = [c for c in fake.calls if c.method != "GET"]
    assert all(c.body.get("name") != "treez_store" for c in writes)
    asyncio.run(run())
    assert [c for c in fake.calls if c.method != "GET"] == writes
    assert fake.properties["treez_store"] == before


def test_setup_leaves_hubspots_consent_property_to_hubspot(tmp_path: Path) -> None:
    """broke (fixed): a mapping that carries hs_email_optout made setup create a custom
    property by that name (HubSpot's own consent property; the upsert never writes it)."""
    fake = HubSpotFake(rate_limits=False)
    name = consent_mapping(tmp_path)
    for mapping in (ROOT / "mappings").glob("*.yaml"):
        (tmp_path / mapping.name).write_text(mapping.read_text())
    config = HubSpotDestination.model_validate(
        {"name": "hs", "type": "hubspot", "token": TOKEN, "mapping": name, "rate_limit": None},
        context={"base_dir": tmp_path},
    )

    async def run() -> list[str]:
        async with client_for(fake) as client:
            return await setup(config, load_mapping(config.mapping), client)

    lines = asyncio.run(run())
    assert "hs_email_optout" not in fake.properties
    assert not any("hs_email_optout" in line and "created" in line for line in lines)


# ---- 5. the daily cap ------------------------------------------------------------------------


def test_daily_429_pauses_without_counting_attempts_and_resumes_after_the_reset(
    tmp_path: Path,
) -> None:
    """held: the account's day ends 1.5 s after the first request (a wall clock behind the
    real one, so the store's pause is over at once and the worker keeps meeting the cap):
    every try before the reset is a pause, never an attempt (three would dead-letter it),
    and the upsert and the opt-out are delivered once the day has turned."""
    real = time.time()
    midnight = next_midnight(real - 86_400, "America/New_York")
    offset = midnight - 1.5 - real
    fake = HubSpotFake(seed=4, rate_limits=True, wall=lambda: time.time() + offset)

    async def go() -> None:
        from test_hubspot import flow_config, plain_mapping

        flow = Flow(
            tmp_path,
            flow_config().replace("hubspot.yaml", plain_mapping(tmp_path)),
            app=fake.app,
            sink_factory=HubSpotSink,
            base_url=BASE,
            sink_options={"wall": lambda: time.time() + offset},
        )
        try:
            await set_up(flow, fake)
            fake.use_up_daily()
            await flow.deliver(event_body("1001", 1, **MIA), timeout=30.0)
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA), timeout=30.0)
            assert 429 in fake.statuses()
            assert flow.dead_letters() == []
            assert [r["status"] for r in flow.outbox()] == ["done", "done"]
            assert [r["attempts"] for r in flow.outbox()] == [1, 1]
            assert len(fake.contacts) == 1
            assert fake.opted_out(MIA["email"])
        finally:
            await flow.close()

    asyncio.run(go())


# ---- more identity and consent attacks -------------------------------------------------------


def test_stray_opt_out_of_the_absorbed_after_its_merge_unsubscribes_the_survivor(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: A merged into B, then a payload of A says opt_out: B's e-mail is unsubscribed."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("2001", 1, email="a@example.com"),
                event_body("2002", 1, email="b@example.com"),
            )
            await flow.deliver(
                event_body("2002", 2, merged_customer_ids=["2001"], email="b@example.com")
            )
            await flow.deliver(event_body("2001", 3, opt_out="true", email="a@example.com"))
            assert bare.opted_out("b@example.com")
            assert list(bare.contacts) == [contact_of(flow, "2002")]
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_two_customers_swapping_emails_never_keep_each_others(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """broke (fixed): X and Y swap addresses (one batch). Each one's new address is held by
    the other's contact (409), so each was written *without* the e-mail and kept its old
    one, which is now the other customer's: X's contact went on carrying Y's address. The
    409 resend now clears the contact's e-mail (the customer's old address is not theirs
    any more); the second one then writes its new address."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("1001", 1, email="a@example.com"),
                event_body("1002", 1, email="b@example.com"),
            )
            await flow.deliver(
                event_body("1001", 2, email="b@example.com"),
                event_body("1002", 2, email="a@example.com"),
            )
            x = bare.contact(contact_of(flow, "1001"))
            y = bare.contact(contact_of(flow, "1002"))
            assert x is not None
            assert y is not None
            assert x.properties.get("email") != "a@example.com"
            assert y.properties.get("email") != "b@example.com"
            assert len(bare.contacts) == 2
            assert flow.dead_letters() == []

    asyncio.run(go())


@pytest.mark.xfail(
    strict=True,
    reason="the survivor's contact was merged away in HubSpot; the adapter cannot find "
    "where it went (the fake answers 404 for a merged id and drops its unique key, as "
    "assumed; real HubSpot may resolve it, not settled by the spec collection), so the "
    "merge waits for B's next update and is dead-lettered if none comes",
)
def test_merge_into_a_survivor_merged_away_on_hubspots_side(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """A marketer merged the survivor's contact into another in HubSpot; then Treez merges A
    into B. The merge can only wait for B's next update (the fake drops the absorbed
    contact's unique values, so B's key finds nothing): reported as what happens."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body("2001", 1, email="a@example.com"),
                event_body("2002", 1, email="b@example.com"),
                event_body("2003", 1, email="z@example.com"),
            )
            ids = flow.contact_ids()
            bare.merge_on_hubspot(ids[(DISPENSARY, "hs", "2003")], ids[(DISPENSARY, "hs", "2002")])
            await flow.deliver(
                event_body("2002", 2, merged_customer_ids=["2001"], email="b@example.com"),
                timeout=30.0,
            )
            survivors = {flow.contact_ids()[(DISPENSARY, "hs", c)] for c in ("2001", "2002")}
            # A's contact must end merged into the contact that now holds B
            assert ids[(DISPENSARY, "hs", "2001")] not in bare.contacts, (
                survivors,
                [d["op"] for d in flow.dead_letters()],
            )

    asyncio.run(go())


# ---- 1 again, as a property: e-mail changes around an opt-out, in any order ----------------

ADDRESSES = ("one@example.com", "two@example.com", None)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 4), st.sampled_from(ADDRESSES), st.sampled_from(["true", "false", None])
        ),
        min_size=1,
        max_size=5,
    ).filter(lambda vs: any(v[2] == "true" for v in vs)),
    st.lists(st.sampled_from([None, 503, 429, 400]), min_size=5, max_size=5),
)
# found by a random run: a version without an e-mail leaves the address before it in
# HubSpot, and the stale opt-out that follows maps the address of its own time
@example(
    versions=[(1, "two@example.com", "false"), (2, None, None), (1, "one@example.com", "true")],
    failures=[None] * 5,
)
def test_an_opted_out_customer_ends_with_every_current_address_unsubscribed(
    tmp_path_factory: pytest.TempPathFactory,
    versions: list[tuple[int, str | None, str | None]],
    failures: list[int | None],
) -> None:
    """held (after the fix, with a mapping carrying hs_email_optout; fails with the shipped
    mapping): whatever the order of versions that change the e-mail around an opt-out,
    failures, dead letters and replays, the address the customer's contact ends with is
    unsubscribed and nothing subscribes."""
    work = tmp_path_factory.mktemp("emails")
    fake = HubSpotFake(seed=2, rate_limits=False)

    async def go() -> None:
        async with consent_flow(work, fake) as flow:
            await set_up(flow, fake)
            for (version, email, opt_out), failure in zip(versions, failures, strict=False):
                if failure is not None:
                    fake.fail_next(failure)
                await flow.deliver(event_body("1001", version, email=email, opt_out=opt_out))
            await replay_all(flow)
            contact_id = flow.contact_ids().get((DISPENSARY, "hs", "1001"))
            contact = fake.contact(contact_id) if contact_id else None
            assert [c for c in fake.status_changes if c.status == "SUBSCRIBED"] == []
            if contact is not None and contact.properties.get("email"):
                assert fake.opted_out(contact.properties["email"]), [
                    (r["op"], r["status"]) for r in flow.outbox()
                ]

    asyncio.run(go())


def _edit_in_hubspot(fake: HubSpotFake, contact_id: str, **properties: str) -> None:
    """A HubSpot user edits a contact (through the API, by its id)."""

    async def go() -> None:
        async with client_for(fake) as client:
            body = {
                "inputs": [
                    {"id": contact_id, "idProperty": "hs_object_id", "properties": properties}
                ]
            }
            answer = await client.post(
                f"{BASE}/crm/v3/objects/contacts/batch/upsert",
                json=body,
                headers={"authorization": f"Bearer {TOKEN}"},
            )
            assert answer.status_code == 200, answer.text

    asyncio.run(go())


def test_a_held_contact_that_still_exists_is_never_replaced(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """broke (fixed): a HubSpot user cleared the key on the customer's contact; the next
    upsert made a second contact and the adapter said the held one was gone (``replaces``)
    without asking, so the map moved off the contact that still holds the customer's
    e-mail. The design: a different id while the held one lives is ``contact_id_changed``
    and the map is kept."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **MIA))
            held = contact_of(flow, "1001")
            await asyncio.to_thread(_edit_in_hubspot, bare, held, **{KEY: ""})
            await flow.deliver(event_body("1001", 2, first_name="mimi", **MIA))
            kinds = [c["kind"] for c in flow.conflicts()]
            assert contact_of(flow, "1001") == held
            assert "contact_replaced" not in kinds
            assert "contact_id_changed" in kinds
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_opt_out_with_an_invalid_new_email_unsubscribes_the_contacts_own(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """broke (fixed): the opt-out version carries an e-mail HubSpot refuses (its upsert is
    dead-lettered, the contact keeps the valid one). The unsubscribe sent the invalid one:
    a 400, dead-lettered, and every replay the same; the contact's real address stayed
    subscribed. An address that is not one is now replaced by the contact's own."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **MIA))
            await flow.deliver(event_body("1001", 2, opt_out="true", email="mia@@example"))
            assert bare.opted_out(MIA["email"])
            assert [d["op"] for d in flow.dead_letters()] == ["upsert"]
            assert "sms_consent_unsupported" in [c["kind"] for c in flow.conflicts()]

    asyncio.run(go())


def test_a_409_naming_no_holder_never_clears_the_contacts_email(bare: HubSpotFake) -> None:
    """held (guards the swap fix): a lone 409 that names no other contact is resent with
    the e-mail left out, so the contact keeps the address it has."""
    prepared(bare)
    first = delivery("upsert", "1001", fields={KEY: "k1", "firstname": "Mia", **MIA})
    second = delivery("upsert", "1001", fields={KEY: "k1", "firstname": "Mimi", **MIA})

    async def go() -> None:
        async with client_for(bare) as client:
            sink = HubSpotSink(hubspot_config(), client)
            [made] = await sink.send([first])
            assert isinstance(made, Sent)
            bare.fail_next(409)
            [again] = await sink.send([second])
            assert isinstance(again, Sent)
            contact = bare.contact(str(made.contact_id))
            assert contact is not None
            assert contact.properties["firstname"] == "Mimi"
            assert contact.properties["email"] == MIA["email"]

    asyncio.run(go())


def test_daily_limit_counts_every_sink_of_one_token(bare: HubSpotFake) -> None:
    """broke (fixed): HubSpot's daily cap is the app's (one token), but each sink (one per
    dispensary) counted its own requests against ``daily_limit``: two dispensaries made
    twice the configured cap. The day's count is now shared by the sinks of one token."""
    from connector.errors import QuotaPause

    prepared(bare)

    def op(customer: str) -> Any:
        return delivery("upsert", customer, fields={KEY: f"k{customer}"})

    async def go() -> None:
        async with client_for(bare) as one_client, client_for(bare) as two_client:
            one = HubSpotSink(hubspot_config(daily_limit=3), one_client)
            two = HubSpotSink(hubspot_config(name="hs2", daily_limit=3), two_client)
            await one.send([op("1")])
            await one.send([op("2")])
            await two.send([op("3")])
            with pytest.raises(QuotaPause):
                await two.send([op("4")])
            with pytest.raises(QuotaPause):
                await one.send([op("5")])

    asyncio.run(go())
    assert len(bare.calls) == 3


async def _resend(flow: Flow, body: bytes) -> None:
    """A reconciliation's resend of one pulled record (change detection ignored)."""
    from vendor_flow import _instant

    from connector.pipeline import process_batch
    from connector.store import NewEvent

    data = json.loads(body)["data"]
    event = NewEvent(
        DISPENSARY,
        "resend",
        "CUSTOMER",
        str(data["customer_id"]),
        _instant(data["last_update"]),
        body.decode(),
    )
    flow.store.add_events([event])
    while (await flow.astore.call(process_batch, flow.store, flow.deployment, 256)).events:
        pass
    await flow.drain()


def test_reconciliation_resend_after_an_opt_out_reasserts_it(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: a pulled record saying nothing of consent (opt_out null), with a new address,
    resent after the opt-out: the upsert says opted out, the new address is unsubscribed
    and nothing subscribes."""

    async def go() -> None:
        async with consent_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            flow.start()
            await flow.deliver(event_body("1001", 1, **MIA))
            await flow.deliver(event_body("1001", 2, opt_out="true", **MIA))
            await _resend(flow, event_body("1001", 3, opt_out=None, **NEW))
            await _resend(flow, event_body("1001", 3, opt_out=None, **NEW))
            assert bare.opted_out(NEW["email"])
            assert [c for c in bare.status_changes if c.status == "SUBSCRIBED"] == []
            ups = [c for c in bare.calls if c.path.endswith("/batch/upsert")]
            assert ups[-1].body["inputs"][0]["properties"]["email"] == NEW["email"]

    asyncio.run(go())


def test_dead_opt_out_of_the_first_absorbed_replayed_after_a_merge_chain(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    """held: A's unsubscribe dead-lettered, then A into B and B into C, then the replay:
    A's and C's addresses end unsubscribed, nothing subscribes, one contact is left."""

    async def go() -> None:
        async with hubspot_flow(tmp_path, bare, plain=True) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                *(event_body(c, 1, email=f"c{c}@example.com") for c in ("2001", "2002", "2003"))
            )
            bare.fail_next(400)
            await flow.deliver(event_body("2001", 2, opt_out="true", email="c2001@example.com"))
            assert [d["op"] for d in flow.dead_letters()] == ["unsubscribe"]
            await flow.deliver(
                event_body("2002", 3, merged_customer_ids=["2001"], email="c2002@example.com")
            )
            await flow.deliver(
                event_body("2003", 4, merged_customer_ids=["2002"], email="c2003@example.com")
            )
            await replay_all(flow)
            assert list(bare.contacts) == [contact_of(flow, "2003")]
            assert bare.opted_out("c2001@example.com")
            assert bare.opted_out("c2003@example.com")
            assert bare.resubscriptions() == []

    asyncio.run(go())
