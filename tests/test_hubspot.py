"""The ``hubspot`` destination (connector/destinations/hubspot.py).

Three groups:

- **The adapter against the fake** (tests/fakes/hubspot.py), one behaviour at a time: the
  batch upsert's request shape, answers mapped back to their operations, a bad input split
  out of its batch, e-mails never twice in one request, 207s, 409s, 429s (ten-second and
  daily), merges, a contact gone on HubSpot's side, consent (e-mail through Communication
  Preferences v4, SMS reported), secrets and customer values kept out of messages.
- **setup** (``connector hubspot setup``): idempotent, in process and once through the CLI
  against the fake served as a process.
- **Whole flows through the fake** with the real store, planner and delivery worker
  (tests/vendor_flow.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
import zoneinfo
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fakes._serve import listening_port
from fakes.hubspot import HubSpotFake
from vendor_flow import DISPENSARY, Flow, event_body

from connector.cli import main
from connector.delivery.base import Delivery, Result, Sent
from connector.delivery.worker import CONTRACT_KEYS
from connector.destinations.hubspot import HubSpotDestination, HubSpotSink, setup
from connector.errors import DeliveryError, FatalDelivery, QuotaPause, RetriableDelivery
from connector.mapping import load_mapping

ROOT = Path(__file__).resolve().parent.parent
MAPPING = ROOT / "mappings" / "hubspot.yaml"
BASE = "https://api.hubapi.com"
TOKEN = "pat-test-fake"  # the fake's default token
SHOP = "shop1"
KEY = "treez_customer_key"
UPSERT = "/crm/v3/objects/contacts/batch/upsert"
MERGE = "/crm/v3/objects/contacts/merge"
UNSUBSCRIBE_ALL = "/communication-preferences/v4/statuses/batch/unsubscribe-all"
WRITE = "/communication-preferences/v4/statuses/batch/write"
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")


# ---- helpers -----------------------------------------------------------------------------------


def hubspot_config(base: Path | None = None, **extra: Any) -> HubSpotDestination:
    base = base or ROOT / "mappings"
    data = {
        "name": "hs",
        "type": "hubspot",
        "token": TOKEN,
        "mapping": "hubspot.yaml",
        "rate_limit": None,
        **extra,
    }
    return HubSpotDestination.model_validate(data, context={"base_dir": base})


def client_for(fake: HubSpotFake) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app))


def prepared(fake: HubSpotFake) -> HubSpotFake:
    """The account after `connector hubspot setup`: the key and the mapping's properties."""
    fake.add_property(KEY, unique=True)
    for name in load_mapping(MAPPING).targets:
        if name not in fake.properties:
            fake.add_property(name)
    return fake


@pytest.fixture
def fake() -> HubSpotFake:
    return prepared(HubSpotFake(seed=5))


def delivery(
    op: str,
    customer: str = "1001",
    *,
    contact_id: str | None = None,
    fields: dict[str, Any] | None = None,
    outbox_id: int = 1,
    **extra: Any,
) -> Delivery:
    key = f"k-{op}-{customer}-{outbox_id}"
    body: dict[str, Any] = dict.fromkeys(CONTRACT_KEYS)
    body.update(
        op=op,
        dispensary=SHOP,
        customer_id=customer,
        contact_id=contact_id,
        fields=fields,
        idempotency_key=key,
    )
    if op in ("unsubscribe", "subscribe"):
        body["channels"] = ["email", "sms"]
    body.update(extra)
    return Delivery(outbox_id, key, body)


def person(customer: str, **fields: Any) -> dict[str, Any]:
    return {KEY: f"treez-{SHOP}-{customer}", "firstname": "Mia", **fields}


def upsert(customer: str, n: int = 1, **fields: Any) -> Delivery:
    return delivery("upsert", customer, fields=person(customer, **fields), outbox_id=n)


def send(
    fake: HubSpotFake, deliveries: list[Delivery], **extra: Any
) -> tuple[list[Result], HubSpotSink]:
    async def go() -> tuple[list[Result], HubSpotSink]:
        sink = HubSpotSink(hubspot_config(**extra), client_for(fake))
        try:
            return await sink.send(deliveries), sink
        finally:
            await sink.aclose()

    return asyncio.run(go())


def contact_of(result: Result) -> str:
    assert isinstance(result, Sent), result
    assert result.contact_id is not None
    return result.contact_id


# ---- configuration -----------------------------------------------------------------------------


def test_config_defaults_and_limits() -> None:
    data = {"name": "hs", "type": "hubspot", "token": TOKEN, "mapping": "hubspot.yaml"}
    config = HubSpotDestination.model_validate(data, context={"base_dir": ROOT / "mappings"})
    assert str(config.base_url) == "https://api.hubapi.com/"
    assert config.id_property == KEY
    assert config.inputs_per_request == 100
    assert [str(r) for r in config.rate_limit] == ["190/10s"]
    assert config.daily_reset_time_zone == "America/New_York"
    for bad in (
        {"token": ""},
        {"inputs_per_request": 101},
        {"inputs_per_request": 0},
        {"id_property": "Treez Key"},
        {"daily_reset_time_zone": "Mars/Base"},
    ):
        with pytest.raises(ValueError, match=r"hubspot|token|inputs_per_request|id_property|zone"):
            HubSpotDestination.model_validate(
                {**data, **bad}, context={"base_dir": ROOT / "mappings"}
            )
    starter = HubSpotDestination.model_validate(
        {**data, "rate_limit": "100/10s"}, context={"base_dir": ROOT / "mappings"}
    )
    assert [str(r) for r in starter.rate_limit] == ["100/10s"]


def test_repr_and_messages_never_hold_the_token(fake: HubSpotFake) -> None:
    sink = HubSpotSink(hubspot_config(token="pat-na1-secret-value"), client_for(fake))
    assert "secret" not in repr(sink)
    assert "secret" not in repr(sink.config)
    [result] = asyncio.run(sink.send([upsert("1001")]))
    assert isinstance(result, FatalDelivery)
    assert result.status_code == 401
    assert "secret" not in str(result)
    assert "INVALID_AUTHENTICATION" in str(result)


# ---- upserts -----------------------------------------------------------------------------------


def test_upsert_batch_request_shape_and_results_mapped_by_trace_id(fake: HubSpotFake) -> None:
    deliveries = [upsert(str(1000 + n), n, email=f"p{n}@example.com") for n in range(12)]
    results, _ = send(fake, deliveries)
    [call] = fake.calls
    assert (call.method, call.path, call.status) == ("POST", UPSERT, 200)
    inputs = call.body["inputs"]
    assert inputs[3] == {
        "idProperty": KEY,
        "id": f"treez-{SHOP}-1003",
        "objectWriteTraceId": "3",
        "properties": {"firstname": "Mia", "email": "p3@example.com"},
    }
    # the fake answers out of order: each result still goes to its own operation
    answered = [r["objectWriteTraceId"] for r in call.response["results"]]
    assert answered != sorted(answered, key=int)
    for n, result in enumerate(results):
        contact = fake.contact(contact_of(result))
        assert contact is not None
        assert contact.properties[KEY] == f"treez-{SHOP}-{1000 + n}"


def test_upsert_splits_into_requests_of_inputs_per_request(fake: HubSpotFake) -> None:
    deliveries = [upsert(str(1000 + n), n) for n in range(7)]
    results, _ = send(fake, deliveries, inputs_per_request=3)
    assert [len(c.body["inputs"]) for c in fake.calls] == [3, 3, 1]
    assert all(isinstance(r, Sent) for r in results)
    assert len(fake.contacts) == 7


def test_one_email_is_never_twice_in_one_request(fake: HubSpotFake) -> None:
    deliveries = [
        upsert("1001", 1, email="shared@example.com"),
        upsert("1002", 2, email="Shared@example.com"),
        upsert("1003", 3, email="other@example.com"),
    ]
    results, _ = send(fake, deliveries)
    assert [c.status for c in fake.calls] != [409]
    sent_ids = [[i["id"] for i in c.body["inputs"]] for c in fake.calls]
    assert sent_ids[0] == [f"treez-{SHOP}-1001", f"treez-{SHOP}-1003"]
    assert f"treez-{SHOP}-1002" in sent_ids[1]
    assert isinstance(results[0], Sent)
    assert isinstance(results[2], Sent)
    # the second holder was sent (never dropped): HubSpot's own 409 for it, handled alone
    assert isinstance(results[1], Sent)
    assert results[1].conflict is not None
    assert results[1].conflict.startswith("duplicate_email: ")


def test_a_bad_input_is_split_out_of_its_batch_and_the_rest_delivered(
    fake: HubSpotFake,
) -> None:
    deliveries = [upsert(str(1000 + n), n, email=f"p{n}@example.com") for n in range(8)]
    deliveries[5] = upsert("1005", 5, email="not-an-email")
    results, _ = send(fake, deliveries)
    statuses = [c.status for c in fake.calls]
    assert statuses[0] == 400
    assert statuses.count(200) >= 3
    sizes = [len(c.body["inputs"]) for c in fake.calls]
    assert sizes[:3] == [8, 4, 4]  # halves, recursively, until the bad one stands alone
    assert [len(c.body["inputs"]) for c in fake.calls if c.status == 400][-1] == 1
    bad = results[5]
    assert isinstance(bad, FatalDelivery)
    assert bad.status_code == 400
    assert "VALIDATION_ERROR" in str(bad)
    assert "not-an-email" not in str(bad)  # HubSpot's message quotes it: never repeated
    for n, result in enumerate(results):
        if n != 5:
            assert isinstance(result, Sent), (n, result)
    assert len(fake.contacts) == 7


def test_an_unknown_property_fails_alone_with_the_category(fake: HubSpotFake) -> None:
    deliveries = [upsert("1001", 1), upsert("1002", 2, favourite_strain="x")]
    results, _ = send(fake, deliveries)
    assert isinstance(results[0], Sent)
    assert isinstance(results[1], FatalDelivery)
    assert "HTTP 400" in str(results[1])


def test_207_fails_only_the_inputs_its_errors_name(fake: HubSpotFake) -> None:
    fake.add_property("points", kind="number")
    deliveries = [
        upsert("1001", 1, points="12"),
        upsert("1002", 2, points="lots"),
        upsert("1003", 3, points="7"),
    ]
    results, _ = send(fake, deliveries)
    assert [c.status for c in fake.calls] == [207]
    assert isinstance(results[0], Sent)
    assert isinstance(results[2], Sent)
    assert isinstance(results[1], FatalDelivery)
    assert "VALIDATION_ERROR" in str(results[1])
    assert "lots" not in str(results[1])


def test_an_email_of_another_contact_writes_ours_without_it(fake: HubSpotFake) -> None:
    [theirs], _ = send(fake, [upsert("9009", 1, email="mia@example.com", firstname="Other")])
    other = contact_of(theirs)
    [ours], _ = send(fake, [upsert("1001", 2, email="mia@example.com", lastname="Wallace")])
    assert isinstance(ours, Sent)
    assert ours.conflict == (
        f"duplicate_email: this customer's e-mail belongs to HubSpot contact {other}; its "
        "contact was written with no e-mail"
    )
    mine = fake.contact(contact_of(ours))
    assert mine is not None
    assert mine.id != other
    assert "email" not in mine.properties
    assert mine.properties["lastname"] == "Wallace"
    untouched = fake.contact(other)
    assert untouched is not None
    assert "lastname" not in untouched.properties
    assert untouched.properties["firstname"] == "Other"


def test_an_upsert_without_the_key_fails_that_operation_only(fake: HubSpotFake) -> None:
    keyless = delivery("upsert", "1002", fields={"firstname": "Ann"}, outbox_id=2)
    results, _ = send(fake, [upsert("1001"), keyless])
    assert isinstance(results[0], Sent)
    assert isinstance(results[1], FatalDelivery)
    assert KEY in str(results[1])


def test_a_5xx_is_retriable_for_the_batch(fake: HubSpotFake) -> None:
    fake.fail_next(503)
    results, _ = send(fake, [upsert("1001"), upsert("1002", 2)])
    assert all(isinstance(r, RetriableDelivery) for r in results)


def test_lists_and_nulls_become_hubspot_text(fake: HubSpotFake) -> None:
    fields = person(
        "1001", treez_groups=["SENIOR", "VETERAN"], lastname=None, treez_rewards_balance=12
    )
    send(fake, [delivery("upsert", "1001", fields=fields)])
    properties = fake.calls[0].body["inputs"][0]["properties"]
    assert properties["treez_groups"] == "SENIOR;VETERAN"
    assert properties["lastname"] == ""
    assert properties["treez_rewards_balance"] == "12"


# ---- a contact gone on HubSpot's side, merges, deactivation ------------------------------------


def test_a_contact_merged_on_hubspots_side_is_replaced(fake: HubSpotFake) -> None:
    [ours], _ = send(fake, [upsert("1001", 1, email="a@example.com")])
    [other], _ = send(fake, [upsert("1002", 2, email="b@example.com")])
    gone = contact_of(ours)
    fake.merge_on_hubspot(contact_of(other), gone)
    [again], _ = send(
        fake, [delivery("upsert", "1001", contact_id=gone, fields=person("1001", firstname="Mimi"))]
    )
    assert isinstance(again, Sent)
    assert again.replaces == gone
    assert again.contact_id not in (gone, None)
    assert fake.contact(contact_of(again)) is not None


def test_merge_sends_the_final_survivor_as_primary(fake: HubSpotFake) -> None:
    results, _ = send(fake, [upsert("1001", 1), upsert("1002", 2)])
    absorbed, survivor = contact_of(results[0]), contact_of(results[1])
    merge = delivery(
        "merge",
        "1001",
        from_contact_id=absorbed,
        into_contact_id=survivor,
        from_customer_id="1001",
        into_customer_id="1002",
    )
    [result], _ = send(fake, [merge])
    assert result == Sent(survivor)
    [call] = fake.calls_to(MERGE)
    assert call.body == {"primaryObjectId": survivor, "objectIdToMerge": absorbed}
    assert fake.contact(absorbed) is None
    # repeated: the absorbed contact is gone, nothing to merge
    [again], _ = send(fake, [merge])
    assert again == Sent(survivor)
    assert len(fake.merges) == 1


def test_merge_waits_for_the_survivor_and_skips_an_absorbed_never_sent(
    fake: HubSpotFake,
) -> None:
    early = delivery("merge", "1001", from_contact_id="101", into_contact_id=None)
    never = delivery("merge", "1001", from_contact_id=None, into_contact_id="555")
    results, _ = send(fake, [early, never])
    assert isinstance(results[0], RetriableDelivery)
    assert results[1] == Sent("555")
    assert fake.calls == []


def test_deactivation_writes_only_the_status_property(fake: HubSpotFake) -> None:
    [made], _ = send(fake, [upsert("1001", 1, email="a@example.com")])
    contact_id = contact_of(made)
    fields = person("1001", email="a@example.com", firstname="Changed")
    [result], _ = send(fake, [delivery("deactivate", "1001", contact_id=contact_id, fields=fields)])
    assert result == Sent(contact_id)
    assert fake.calls[-1].body["inputs"][0]["properties"] == {"treez_status": "DEACTIVATED"}
    contact = fake.contact(contact_id)
    assert contact is not None
    assert contact.properties["firstname"] == "Mia"
    assert contact.properties["treez_status"] == "DEACTIVATED"
    [nothing], _ = send(fake, [delivery("deactivate", "1002", fields=person("1002"))])
    assert nothing == Sent()


# ---- consent -----------------------------------------------------------------------------------


def test_unsubscribe_opts_the_email_out_and_reports_sms(fake: HubSpotFake) -> None:
    op = delivery(
        "unsubscribe", "1001", contact_id="101", fields=person("1001", email="Mia@Example.com")
    )
    [result], _ = send(fake, [op])
    [call] = fake.calls
    assert (call.path, call.query, call.body) == (
        UNSUBSCRIBE_ALL,
        "channel=EMAIL",
        {"inputs": ["mia@example.com"]},
    )
    assert fake.opted_out("mia@example.com")
    assert isinstance(result, Sent)
    assert result.contact_id == "101"
    assert result.conflict is not None
    kind, _, detail = result.conflict.partition(": ")
    assert kind == "sms_consent_unsupported"
    assert "SMS opt-out" in detail
    [email_only], _ = send(
        fake,
        [
            delivery(
                "unsubscribe",
                "1002",
                channels=["email"],
                fields=person("1002", email="b@example.com"),
            )
        ],
    )
    assert email_only == Sent(None)


def test_unsubscribe_without_a_mapped_email_uses_the_contacts_own(fake: HubSpotFake) -> None:
    [made], _ = send(fake, [upsert("1001", 1, email="own@example.com")])
    op = delivery(
        "unsubscribe", "1001", contact_id=contact_of(made), fields=None, channels=["email"]
    )
    [result], _ = send(fake, [op])
    assert result == Sent(contact_of(made))
    assert fake.opted_out("own@example.com")
    # the contact not made yet: retried (never counted as done) until its upsert is delivered
    [waiting], _ = send(fake, [delivery("unsubscribe", "1009", fields={KEY: "x"})])
    assert type(waiting) is RetriableDelivery
    [no_email], _ = send(fake, [upsert("1010", 3)])
    op = delivery("unsubscribe", "1010", contact_id=contact_of(no_email), fields={KEY: "y"})
    [unknown], _ = send(fake, [op])
    assert isinstance(unknown, Sent)
    assert unknown.conflict is not None
    # one conflict a result: the SMS opt-out is the kind, the missing e-mail in its detail
    assert unknown.conflict.startswith("sms_consent_unsupported: ")
    assert "no_identifier" in unknown.conflict
    op.body["channels"] = ["email"]
    [email_only], _ = send(fake, [op])
    assert isinstance(email_only, Sent)
    assert email_only.conflict is not None
    assert email_only.conflict.startswith("no_identifier: ")


def test_unsubscribes_go_in_one_call_per_hundred_addresses(fake: HubSpotFake) -> None:
    ops = [
        delivery(
            "unsubscribe",
            str(n),
            outbox_id=n,
            channels=["email"],
            fields=person(str(n), email=f"p{n}@example.com"),
        )
        for n in range(150)
    ]
    results, _ = send(fake, ops)
    assert [len(c.body["inputs"]) for c in fake.calls_to(UNSUBSCRIBE_ALL)] == [100, 50]
    assert all(isinstance(r, Sent) and r.conflict is None for r in results)


def test_subscribe_needs_a_subscription_type(fake: HubSpotFake) -> None:
    op = delivery("subscribe", "1001", fields=person("1001", email="a@example.com"))
    [result], _ = send(fake, [op])
    assert isinstance(result, Sent)
    assert result.conflict is not None
    assert result.conflict.startswith("sms_consent_unsupported: ")
    assert "no_subscription_type" in result.conflict
    [email_only], _ = send(
        fake, [delivery("subscribe", "1001", channels=["email"], fields=op.fields)]
    )
    assert isinstance(email_only, Sent)
    assert email_only.conflict is not None
    assert email_only.conflict.startswith("no_subscription_type: ")
    assert fake.calls == []
    [result], _ = send(fake, [op], subscription_id=1001, legal_basis="CONSENT_WITH_NOTICE")
    [call] = fake.calls
    assert call.path == WRITE
    assert call.body == {
        "inputs": [
            {
                "subscriberIdString": "a@example.com",
                "subscriptionId": 1001,
                "statusState": "SUBSCRIBED",
                "channel": "EMAIL",
                "legalBasis": "CONSENT_WITH_NOTICE",
            }
        ]
    }
    assert fake.subscription_status("a@example.com", 1001) == "SUBSCRIBED"
    assert isinstance(result, Sent)
    assert result.conflict is not None
    assert result.conflict.startswith("sms_consent_unsupported: ")


# ---- 429s: the ten-second policy and the daily cap ---------------------------------------------


def test_ten_second_429_is_an_ordinary_retry_after_the_interval() -> None:
    fake = prepared(HubSpotFake(ten_second_limit=1))
    results, _ = send(fake, [upsert("1001"), upsert("1002", 2)], inputs_per_request=1)
    assert isinstance(results[0], Sent)
    refused = results[1]
    assert type(refused) is RetriableDelivery
    assert refused.status_code == 429
    assert refused.retry_after == 10.0
    assert "TEN_SECONDLY_ROLLING" in str(refused)


def wall_at(hour: int) -> Callable[[], float]:
    return lambda: dt.datetime(2026, 5, 1, hour, 30, tzinfo=NEW_YORK).timestamp()


def send_at(
    fake: HubSpotFake, deliveries: list[Delivery], wall: Callable[[], float], **extra: Any
) -> list[Result]:
    async def go() -> list[Result]:
        sink = HubSpotSink(hubspot_config(**extra), client_for(fake), wall=wall)
        try:
            return await sink.send(deliveries)
        finally:
            await sink.aclose()

    return asyncio.run(go())


@pytest.mark.parametrize("zone", ["America/New_York", "America/Los_Angeles"])
def test_daily_429_raises_quota_pause_until_midnight_in_the_account_zone(zone: str) -> None:
    fake = prepared(HubSpotFake())
    fake.use_up_daily()
    with pytest.raises(QuotaPause) as caught:
        send_at(fake, [upsert("1001")], wall_at(22), daily_reset_time_zone=zone)
    midnight = dt.datetime(2026, 5, 2, tzinfo=zoneinfo.ZoneInfo(zone)).timestamp()
    if zone == "America/Los_Angeles":  # 22:30 in New York is 19:30 there
        midnight = dt.datetime(2026, 5, 1, tzinfo=zoneinfo.ZoneInfo(zone)).timestamp() + 86400
    assert caught.value.until == midnight
    assert caught.value.status_code == 429


def test_a_daily_quota_pause_stops_the_whole_send(fake: HubSpotFake) -> None:
    merge = delivery("merge", "1003", from_contact_id="1", into_contact_id="2", outbox_id=3)
    fake.use_up_daily()
    with pytest.raises(QuotaPause):
        send_at(fake, [upsert("1001"), merge], wall_at(9))
    assert [c.status for c in fake.calls] == [429]


def test_the_last_request_of_the_day_pauses_before_the_next(fake: HubSpotFake) -> None:
    fake.daily_limit = 1

    async def go() -> None:
        sink = HubSpotSink(hubspot_config(), client_for(fake), wall=wall_at(9))
        try:
            [first] = await sink.send([upsert("1001")])
            assert isinstance(first, Sent)
            with pytest.raises(QuotaPause):
                await sink.send([upsert("1002", 2)])
        finally:
            await sink.aclose()

    asyncio.run(go())
    assert len(fake.calls) == 1  # the remaining count said 0: no request wasted on a 429


def test_daily_limit_setting_pauses_without_asking(fake: HubSpotFake) -> None:
    now = [dt.datetime(2026, 5, 1, 23, 59, tzinfo=NEW_YORK).timestamp()]

    async def go() -> None:
        sink = HubSpotSink(hubspot_config(daily_limit=2), client_for(fake), wall=lambda: now[0])
        try:
            await sink.send([upsert("1001")])
            await sink.send([upsert("1002", 2)])
            with pytest.raises(QuotaPause) as caught:
                await sink.send([upsert("1003", 3)])
            assert caught.value.until == dt.datetime(2026, 5, 2, tzinfo=NEW_YORK).timestamp()
            now[0] = caught.value.until
            [after] = await sink.send([upsert("1003", 3)])
            assert isinstance(after, Sent)
        finally:
            await sink.aclose()

    asyncio.run(go())
    assert len(fake.calls) == 3


# ---- setup -------------------------------------------------------------------------------------


def test_setup_creates_the_key_and_the_properties_once() -> None:
    fake = HubSpotFake()
    config = hubspot_config()
    mapping = load_mapping(MAPPING)

    async def run() -> list[str]:
        async with client_for(fake) as client:
            return await setup(config, mapping, client)

    first = asyncio.run(run())
    assert "property group treez: created" in first
    assert f"property {KEY}: created (unique)" in first
    assert "property treez_rewards_balance: created" in first
    assert not any(line.startswith(("property email", "property firstname")) for line in first)
    props = fake.properties
    assert props[KEY]["hasUniqueValue"] is True
    assert props["treez_store"]["groupName"] == "treez"
    assert props["treez_store"]["hasUniqueValue"] is False
    writes = len(fake.calls_to("/crm/v3/properties", "POST"))
    second = asyncio.run(run())
    assert second[-1] == "nothing to change: everything is already present"
    assert all(line.endswith("already present") for line in second[:-1]), second
    assert len(second) == len(first)
    assert len(fake.calls_to("/crm/v3/properties", "POST")) == writes
    # and an upsert through the mapping now goes through
    fields = load_mapping(MAPPING).apply(
        __import__("connector.treez", fromlist=["parse_customer"]).parse_customer(
            json.loads((ROOT / "tests" / "data" / "seed_body.json").read_text())["data"]
        ),
        SHOP,
    )
    [result], _ = send(fake, [delivery("upsert", "3904", fields=fields)])
    assert isinstance(result, Sent), result


def test_setup_refuses_a_key_property_without_unique_values() -> None:
    fake = HubSpotFake()
    fake.add_property(KEY, unique=False)

    async def run() -> list[str]:
        async with client_for(fake) as client:
            return await setup(hubspot_config(), load_mapping(MAPPING), client)

    with pytest.raises(DeliveryError, match="hasUniqueValue"):
        asyncio.run(run())


def test_setup_through_the_cli_against_the_fake_as_a_process(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tests.fakes.hubspot", "--port", "0", "--token", "t9"]
    shutil.copy(MAPPING, tmp_path / "hubspot.yaml")
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            port = listening_port(process)
            config = tmp_path / "config.yaml"
            config.write_text(
                f"store: sqlite:///{tmp_path}/c.db\ndispensaries:\n  shop1:\n"
                "    webhook_token: tok\n    destinations:\n      - name: hs\n"
                "        type: hubspot\n        token: ${HUBSPOT_TOKEN}\n"
                "        mapping: hubspot.yaml\n"
                f"        base_url: http://127.0.0.1:{port}\n"
            )
            runner = CliRunner()
            args = [
                "hubspot",
                "setup",
                "--config",
                str(config),
                "-d",
                "shop1",
                "--destination",
                "hs",
            ]
            env = {"HUBSPOT_TOKEN": "t9"}
            first = runner.invoke(main, args, env=env)
            assert first.exit_code == 0, first.output
            assert f"property {KEY}: created (unique)" in first.output
            assert first.output.rstrip().endswith(" created")
            assert first.output.splitlines()[-1].startswith("done: ")
            second = runner.invoke(main, args, env=env)
            assert second.exit_code == 0, second.output
            assert "created" not in second.output
            assert second.output.rstrip().endswith(
                "nothing to change: everything is already present"
            )
            wrong = runner.invoke(main, args, env={"HUBSPOT_TOKEN": "nope"})
            assert wrong.exit_code == 1
            assert "HTTP 401" in wrong.output
            assert "nope" not in wrong.output
        finally:
            process.terminate()
            process.communicate(timeout=20.0)


# ---- whole flows through the fake --------------------------------------------------------------


def plain_mapping(work: Path) -> str:
    """The shipped mapping without ``hs_email_optout``: upserts then carry no consent view,
    so a test sees the unsubscribe operation's own path (the shipped mapping also
    unsubscribes an opted-out customer's address through its upserts)."""
    lines = (ROOT / "mappings" / "hubspot.yaml").read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("hs_email_optout:")]
    assert len(kept) == len(lines) - 1
    (work / "hubspot_plain.yaml").write_text("".join(kept))
    return "hubspot_plain.yaml"


def flow_config(*, policy: str | None = None, **extra: Any) -> str:
    lines = [
        "store: sqlite:///connector.db",
        "dispensaries:",
        f"  {DISPENSARY}:",
        f"    webhook_token: token-{DISPENSARY}",
    ]
    if policy is not None:
        lines += ["    policy:", f"      resubscribe: {policy}"]
    lines += [
        "    destinations:",
        "      - name: hs",
        "        type: hubspot",
        f"        token: {TOKEN}",
        "        mapping: hubspot.yaml",
        "        rate_limit: []",
    ]
    lines += [f"        {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def hubspot_flow(
    work: Path,
    fake: HubSpotFake,
    *,
    policy: str | None = None,
    plain: bool = False,
    **extra: Any,
) -> AsyncIterator[Flow]:
    """A flow through the fake with the shipped mapping (``plain``: without its consent
    field, see :func:`plain_mapping`)."""
    text = flow_config(policy=policy, **extra)
    if plain:
        text = text.replace("mapping: hubspot.yaml", f"mapping: {plain_mapping(work)}")
    flow = Flow(
        work,
        text,
        app=fake.app,
        sink_factory=HubSpotSink,
        base_url=BASE,
    )
    try:
        yield flow
    finally:
        await flow.close()


@pytest.fixture
def bare() -> HubSpotFake:
    """A new account: `connector hubspot setup` is run by the flow helper."""
    return HubSpotFake(seed=9)


async def set_up(flow: Flow, fake: HubSpotFake) -> None:
    dest = flow.config.dispensaries[DISPENSARY].destinations[0]
    assert isinstance(dest, HubSpotDestination)
    async with client_for(fake) as client:
        await setup(dest, load_mapping(dest.mapping), client)


PERSON = {"email": "mia@example.com", "phone": "(213) 555-0142"}


def upserts(fake: HubSpotFake) -> list[Any]:
    return fake.calls_to(UPSERT)


def test_flow_create_update_and_no_op(tmp_path: Path, bare: HubSpotFake) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            mark = len(bare.calls)
            await flow.deliver(event_body("1001", 1, first_name="mia", **PERSON))
            [contact] = bare.contacts.values()
            assert contact.properties[KEY] == f"treez-{DISPENSARY}-1001"
            assert contact.properties["email"] == "mia@example.com"
            assert contact.properties["phone"] == "+12135550142"
            assert contact.properties["firstname"] == "Mia"
            assert flow.contact_ids() == {(DISPENSARY, "hs", "1001"): contact.id}
            await flow.deliver(event_body("1001", 2, last_name="wallace", **PERSON))
            assert contact.properties["lastname"] == "Wallace"
            assert list(bare.contacts) == [contact.id]
            calls = len(bare.calls)
            await flow.deliver(
                event_body("1001", 3, notes="prefers sativa", last_name="wallace", **PERSON)
            )
            assert len(bare.calls) == calls  # nothing the mapping carries changed
            assert len(bare.calls) - mark == 2
            assert flow.ops() == ["upsert", "upsert"]
            assert bare.status_changes == []

    asyncio.run(go())


def test_flow_opt_out_email_and_sms_reports_sms_and_never_resubscribes(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare, subscription_id=1001) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **PERSON))
            await flow.deliver(event_body("1001", 2, opt_out="true", **PERSON))
            assert bare.opted_out("mia@example.com")
            [conflict] = flow.conflicts()
            assert conflict["customer_id"] == "1001"
            assert conflict["kind"] == "sms_consent_unsupported"
            assert "mia" not in json.dumps(conflict, default=str)
            await flow.deliver(event_body("1001", 3, opt_out="false", first_name="Mimi", **PERSON))
            assert bare.calls_to(WRITE) == []
            assert bare.resubscriptions() == []
            assert bare.opted_out("mia@example.com")
            # the opt-out's upsert carries the consent view (hs_email_optout, never sent)
            assert flow.ops() == ["upsert", "upsert", "unsubscribe", "upsert"]
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_flow_opt_in_resubscribes_only_under_the_policy(tmp_path: Path, bare: HubSpotFake) -> None:
    async def go() -> None:
        async with hubspot_flow(
            tmp_path, bare, policy="on_source_opt_in", subscription_id=1001
        ) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, opt_out="true", **PERSON))
            await flow.deliver(event_body("1001", 2, opt_out="false", **PERSON))
            assert flow.ops() == ["upsert", "unsubscribe", "upsert", "subscribe"]
            [write] = bare.calls_to(WRITE)
            assert write.body["inputs"][0]["statusState"] == "SUBSCRIBED"
            assert [c.email for c in bare.resubscriptions()] == ["mia@example.com"]
            assert bare.subscription_status("mia@example.com", 1001) == "SUBSCRIBED"
            kinds = [c["kind"] for c in flow.conflicts()]
            assert kinds == ["sms_consent_unsupported", "sms_consent_unsupported"]

    asyncio.run(go())


ABSORBED, SURVIVOR, FINAL = "2001", "2002", "2003"
VINCENT = {"email": "vincent@example.com"}
VEGA = {"email": "vega@example.com"}


def merge_pair(absorbed: str, survivor: str, version: int, **fields: Any) -> tuple[bytes, bytes]:
    into = event_body(survivor, version, merged_customer_ids=[absorbed], **fields)
    out = event_body(absorbed, version, status="DEACTIVATED", merged_into_customer_id=survivor)
    return into, out


@pytest.mark.parametrize("survivor_first", [True, False], ids=["survivor-first", "absorbed-first"])
def test_flow_merge_in_either_order_and_repeated(
    tmp_path: Path, bare: HubSpotFake, survivor_first: bool
) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body(ABSORBED, 1, **VINCENT), event_body(SURVIVOR, 1, **VEGA))
            ids = flow.contact_ids()
            absorbed_id = ids[(DISPENSARY, "hs", ABSORBED)]
            survivor_id = ids[(DISPENSARY, "hs", SURVIVOR)]
            into, out = merge_pair(ABSORBED, SURVIVOR, 2, **VEGA)
            pair = [into, out] if survivor_first else [out, into]
            for _ in range(2):
                for body in pair:
                    await flow.deliver(body)
            merges = [c for c in bare.calls_to(MERGE) if c.status == 200]
            assert [c.body for c in merges] == [
                {"primaryObjectId": survivor_id, "objectIdToMerge": absorbed_id}
            ]
            assert list(bare.contacts) == [survivor_id]
            assert flow.ops(ABSORBED).count("merge") == 1
            assert flow.dead_letters() == []
            survivor = bare.contact(survivor_id)
            assert survivor is not None
            assert survivor.properties["email"] == "vega@example.com"

    asyncio.run(go())


def test_flow_merge_chain_goes_into_the_final_survivor(tmp_path: Path, bare: HubSpotFake) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(
                event_body(ABSORBED, 1, **VINCENT),
                event_body(SURVIVOR, 1, **VEGA),
                event_body(FINAL, 1, email="final@example.com"),
            )
            ids = flow.contact_ids()
            final_id = ids[(DISPENSARY, "hs", FINAL)]
            # B into C first, then A into B: A's contact goes into C's
            await flow.deliver(*merge_pair(SURVIVOR, FINAL, 2, email="final@example.com"))
            await flow.deliver(*merge_pair(ABSORBED, SURVIVOR, 3, **VEGA))
            assert list(bare.contacts) == [final_id]
            primaries = {m.primary for m in bare.merges}
            assert primaries == {final_id}
            assert flow.dead_letters() == []
            resolved = flow.store.resolve_contact_ids(DISPENSARY, "hs", [ABSORBED, SURVIVOR])
            assert resolved == {ABSORBED: final_id, SURVIVOR: final_id}

    asyncio.run(go())


def test_flow_deactivation_and_reactivation(tmp_path: Path, bare: HubSpotFake) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **PERSON))
            [contact] = bare.contacts.values()
            await flow.deliver(event_body("1001", 2, status="DEACTIVATED", **PERSON))
            assert upserts(bare)[-1].body["inputs"][0]["properties"] == {
                "treez_status": "DEACTIVATED"
            }
            assert contact.properties["treez_status"] == "DEACTIVATED"
            assert contact.properties["email"] == "mia@example.com"
            await flow.deliver(event_body("1001", 3, status="ACTIVE", **PERSON))
            assert contact.properties["treez_status"] == "ACTIVE"
            assert flow.ops() == ["upsert", "deactivate", "upsert"]
            assert list(bare.contacts) == [contact.id]

    asyncio.run(go())


def test_flow_a_bad_input_is_dead_lettered_alone(tmp_path: Path, bare: HubSpotFake) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            bodies = [event_body(str(3000 + n), 1, email=f"p{n}@example.com") for n in range(6)]
            bodies[2] = event_body("3002", 1, email="broken@@example")
            await flow.deliver(*bodies)
            [dead] = flow.dead_letters()
            assert "VALIDATION_ERROR" in dead["reason"] or "HTTP 400" in json.dumps(
                dead, default=str
            )
            assert "broken" not in str(dead.get("reason"))
            assert len(bare.contacts) == 5
            statuses = [c.status for c in upserts(bare)]
            assert statuses[0] == 400
            assert 200 in statuses

    asyncio.run(go())


def test_flow_a_contact_gone_on_hubspots_side_is_replaced(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            await flow.deliver(event_body("1001", 1, **PERSON), event_body("1002", 1, **VEGA))
            ids = flow.contact_ids()
            gone, other = ids[(DISPENSARY, "hs", "1001")], ids[(DISPENSARY, "hs", "1002")]
            bare.merge_on_hubspot(other, gone)  # a marketer merged them in HubSpot
            await flow.deliver(event_body("1001", 2, first_name="Mimi", **PERSON))
            now = flow.contact_ids()[(DISPENSARY, "hs", "1001")]
            assert now not in (gone, None)
            contact = bare.contact(now)
            assert contact is not None
            assert contact.properties["firstname"] == "Mimi"
            assert "contact_replaced" in [c["kind"] for c in flow.conflicts()]
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_flow_daily_cap_pauses_the_destination_until_midnight(
    tmp_path: Path, bare: HubSpotFake
) -> None:
    async def go() -> None:
        async with hubspot_flow(tmp_path, bare) as flow:
            await set_up(flow, bare)
            bare.use_up_daily()
            mark = len(bare.calls)
            await flow.post(event_body("1001", 1, **PERSON))
            flow.start()
            for _ in range(100):
                if len(bare.calls) > mark:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert bare.contacts == {}
            # then nothing: paused, not retried
            assert [c.status for c in bare.calls[mark:]] == [429]
            assert flow.dead_letters() == []
            assert [r["status"] for r in flow.outbox()] == ["pending"]
            pause = flow.store.pause_of(DISPENSARY, "hs")
            assert pause is not None
            assert pause.until == bare.daily_reset_at()

    asyncio.run(go())


# ---- check and map -----------------------------------------------------------------------------


def test_check_passes_offline_and_map_works_on_the_seed_event(tmp_path: Path) -> None:
    shutil.copy(MAPPING, tmp_path / "hubspot.yaml")
    config = tmp_path / "config.yaml"
    # an unreachable base_url: check must not contact HubSpot
    config.write_text(
        flow_config(base_url="http://127.0.0.1:9").replace(
            "sqlite:///connector.db", f"sqlite:///{tmp_path}/c.db"
        )
    )
    runner = CliRunner()
    checked = runner.invoke(main, ["check", "--config", str(config)])
    assert checked.exit_code == 0, checked.output
    assert "hubspot → http://127.0.0.1:9, idProperty treez_customer_key" in checked.output
    assert TOKEN not in checked.output
    seed = ROOT / "tests" / "data" / "seed_body.json"
    mapped = runner.invoke(main, ["map", "--show-values", "--config", str(config), str(seed)])
    assert mapped.exit_code == 0, mapped.output
    fields = json.loads(mapped.output)
    assert fields[KEY] == f"treez-{DISPENSARY}-3904"
    assert fields["firstname"] == "Jules"
    assert fields["treez_groups"] == "SENIOR"
