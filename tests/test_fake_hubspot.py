"""The fake of HubSpot's contacts, properties and communication preferences APIs
(tests/fakes/hubspot.py) behaves as its docstring says, in process through httpx's ASGI
transport (and once as a process)."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
import zoneinfo
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes._serve import listening_port
from fakes.clock import HandClock
from fakes.hubspot import HubSpotFake

ROOT = Path(__file__).resolve().parent.parent
BASE_URL = "https://api.hubapi.com"
TOKEN = "pat-test-fake"
UPSERT = "/crm/v3/objects/contacts/batch/upsert"
MERGE = "/crm/v3/objects/contacts/merge"
PROPERTIES = "/crm/v3/properties/contacts"
UNSUBSCRIBE_ALL = "/communication-preferences/v4/statuses/batch/unsubscribe-all?channel=EMAIL"
WRITE = "/communication-preferences/v4/statuses/batch/write"
KEY = "treez_customer_key"
_UNSET: Any = object()


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1000.0)


@pytest.fixture
def fake(clock: HandClock) -> HubSpotFake:
    fake = HubSpotFake(clock=clock)
    fake.add_property(KEY, unique=True)
    return fake


def request(
    fake: HubSpotFake,
    method: str,
    path: str,
    body: Any = _UNSET,
    *,
    token: str | None = TOKEN,
    content: bytes | None = None,
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            if content is not None:
                headers["Content-Type"] = "application/json"
                return await client.request(method, path, content=content, headers=headers)
            if body is _UNSET:
                return await client.request(method, path, headers=headers)
            return await client.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


def item(key: str, trace: str | None = None, **properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": key, "idProperty": KEY, "properties": properties}
    if trace is not None:
        out["objectWriteTraceId"] = trace
    return out


def upsert(fake: HubSpotFake, *items: dict[str, Any]) -> httpx.Response:
    return request(fake, "POST", UPSERT, {"inputs": list(items)})


def ids_by_key(response: httpx.Response) -> dict[str, str]:
    assert response.status_code in (200, 207), response.text
    return {r["properties"][KEY]: r["id"] for r in response.json()["results"]}


def error_of(response: httpx.Response, status: int, category: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error"
    assert body["category"] == category
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["correlationId"], str)
    assert len(body["correlationId"]) == 36
    return dict(body)


# ---- auth and routes ---------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "wrong"])
def test_401_without_the_bearer_token(fake: HubSpotFake, token: str | None) -> None:
    error_of(upsert_as(fake, token), 401, "INVALID_AUTHENTICATION")
    assert fake.contacts == {}


def upsert_as(fake: HubSpotFake, token: str | None) -> httpx.Response:
    return request(fake, "POST", UPSERT, {"inputs": [item("k1")]}, token=token)


def test_another_scheme_is_refused(fake: HubSpotFake) -> None:
    async def go() -> int:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            answer = await client.get(f"{PROPERTIES}/email", headers={"Authorization": TOKEN})
            return answer.status_code

    assert asyncio.run(go()) == 401


def test_unknown_routes_methods_and_bodies(fake: HubSpotFake) -> None:
    error_of(request(fake, "GET", "/crm/v3/objects/deals/batch/upsert"), 404, "OBJECT_NOT_FOUND")
    answer = request(fake, "GET", UPSERT)
    error_of(answer, 405, "METHOD_NOT_ALLOWED")
    assert answer.headers["allow"] == "POST"
    error_of(request(fake, "POST", UPSERT, content=b"{nope"), 400, "VALIDATION_ERROR")
    error_of(request(fake, "POST", UPSERT, {"inputs": {}}), 400, "VALIDATION_ERROR")
    assert upsert(fake, item("k1")).status_code == 200
    assert request(fake, "POST", UPSERT + "/", {"inputs": [item("k2")]}).status_code == 200


# ---- batch upsert ------------------------------------------------------------------------------


def test_upsert_creates_then_updates_by_id_property(fake: HubSpotFake) -> None:
    first = upsert(fake, item("k1", "0", email="a@example.com", firstname="Ann"))
    assert first.status_code == 200
    result = first.json()["results"][0]
    assert result["new"] is True
    assert result["objectWriteTraceId"] == "0"
    assert result["properties"]["hs_object_id"] == result["id"]
    assert first.json()["status"] == "COMPLETE"
    contact_id = result["id"]
    again = upsert(fake, item("k1", "0", firstname="Anna", lastname=""))
    assert again.json()["results"][0]["new"] is False
    assert again.json()["results"][0]["id"] == contact_id
    contact = fake.contact(contact_id)
    assert contact is not None
    assert contact.properties == {KEY: "k1", "email": "a@example.com", "firstname": "Anna"}
    upsert(fake, item("k1", firstname=""))
    assert "firstname" not in contact.properties  # an empty string clears a value
    assert fake.contact_by("email", "A@EXAMPLE.com") is contact


def test_results_come_back_out_of_order_but_carry_their_trace_id(fake: HubSpotFake) -> None:
    items = [item(f"k{n}", str(n)) for n in range(20)]
    answer = upsert(fake, *items)
    traces = [r["objectWriteTraceId"] for r in answer.json()["results"]]
    assert sorted(traces, key=int) == [str(n) for n in range(20)]
    assert traces != [str(n) for n in range(20)]
    assert len(set(ids_by_key(answer).values())) == 20


def test_upsert_input_limit(fake: HubSpotFake) -> None:
    assert upsert(fake, *[item(f"k{n}") for n in range(100)]).status_code == 200
    body = error_of(upsert(fake, *[item(f"x{n}") for n in range(101)]), 400, "VALIDATION_ERROR")
    assert body["context"] == {"limit": ["100"]}
    error_of(request(fake, "POST", UPSERT, {"inputs": []}), 400, "VALIDATION_ERROR")
    assert len(fake.contacts) == 100


def test_id_property_must_exist_and_be_unique(fake: HubSpotFake) -> None:
    missing = {"id": "k1", "idProperty": "nope", "properties": {}}
    body = error_of(request(fake, "POST", UPSERT, {"inputs": [missing]}), 400, "VALIDATION_ERROR")
    assert body["subCategory"] == "PROPERTY_DOESNT_EXIST"
    fake.add_property("loyalty_tier")
    plain = {"id": "k1", "idProperty": "loyalty_tier", "properties": {}}
    body = error_of(request(fake, "POST", UPSERT, {"inputs": [plain]}), 400, "VALIDATION_ERROR")
    assert body["subCategory"] == "INVALID_ID_PROPERTY"
    by_email = {"id": "b@example.com", "idProperty": "email", "properties": {"firstname": "B"}}
    assert request(fake, "POST", UPSERT, {"inputs": [by_email]}).status_code == 200
    assert fake.contacts
    assert fake.contact_by("email", "b@example.com") is not None


def test_one_bad_input_fails_the_whole_batch(fake: HubSpotFake) -> None:
    good = item("k1", email="a@example.com")
    body = error_of(upsert(fake, good, item("k2", email="not-an-email")), 400, "VALIDATION_ERROR")
    assert body["subCategory"] == "INVALID_EMAIL"
    body = error_of(upsert(fake, good, item("k2", favourite="x")), 400, "VALIDATION_ERROR")
    assert body["errors"][0]["code"] == "PROPERTY_DOESNT_EXIST"
    error_of(upsert(fake, good, item("k2", hs_object_id="5")), 400, "VALIDATION_ERROR")
    error_of(upsert(fake, good, item("k1")), 400, "VALIDATION_ERROR")  # one id twice
    assert fake.contacts == {}  # nothing of those batches was written


def test_the_same_email_twice_in_one_batch_is_a_409(fake: HubSpotFake) -> None:
    answer = upsert(fake, item("k1", email="a@example.com"), item("k2", email="A@example.com"))
    error_of(answer, 409, "CONFLICT")
    assert fake.contacts == {}


def test_an_email_held_by_another_contact_is_a_409(fake: HubSpotFake) -> None:
    held = ids_by_key(upsert(fake, item("k1", email="a@example.com")))["k1"]
    body = error_of(
        upsert(fake, item("k3", email="c@example.com"), item("k2", email="a@example.com")),
        409,
        "CONFLICT",
    )
    assert body["context"]["id"] == [held]
    assert len(fake.contacts) == 1


def test_207_fails_only_the_inputs_with_a_bad_value(fake: HubSpotFake) -> None:
    fake.add_property("points", kind="number")
    answer = upsert(fake, item("k1", "0", points="12"), item("k2", "1", points="lots"))
    assert answer.status_code == 207
    body = answer.json()
    assert body["numErrors"] == 1
    assert body["errors"][0]["category"] == "VALIDATION_ERROR"
    assert body["errors"][0]["context"] == {"ids": ["k2"], "objectWriteTraceId": ["1"]}
    assert [r["objectWriteTraceId"] for r in body["results"]] == ["0"]
    assert fake.contact_by(KEY, "k2") is None
    assert fake.contact_by(KEY, "k1") is not None


# ---- merge -------------------------------------------------------------------------------------


def test_merge_keeps_the_primary_and_the_absorbed_id_is_gone(fake: HubSpotFake) -> None:
    fake.add_property("city_code")
    ids = ids_by_key(
        upsert(
            fake,
            item("k1", email="a@example.com", firstname="Ann"),
            item("k2", email="b@example.com", lastname="Lee", city_code="9"),
        )
    )
    answer = request(
        fake, "POST", MERGE, {"primaryObjectId": ids["k1"], "objectIdToMerge": ids["k2"]}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["id"] == ids["k1"]
    kept = fake.contact(ids["k1"])
    assert kept is not None
    assert kept.properties["email"] == "a@example.com"
    assert kept.properties["lastname"] == "Lee"
    assert kept.properties["city_code"] == "9"
    assert kept.properties[KEY] == "k1"
    assert fake.contact_by("email", "b@example.com") is kept
    assert fake.contact(ids["k2"]) is None
    assert fake.merged_into(ids["k2"]) == ids["k1"]
    error_of(request(fake, "GET", f"/crm/v3/objects/contacts/{ids['k2']}"), 404, "OBJECT_NOT_FOUND")
    again = {"primaryObjectId": ids["k1"], "objectIdToMerge": ids["k2"]}
    error_of(request(fake, "POST", MERGE, again), 404, "OBJECT_NOT_FOUND")
    # the absorbed contact's unique key is free: upserting by it makes a new contact
    assert ids_by_key(upsert(fake, item("k2")))["k2"] not in ids.values()
    assert [(m.primary, m.absorbed) for m in fake.merges] == [(ids["k1"], ids["k2"])]


def test_lookups_by_email_and_unique_values_stay_right_through_writes_and_merges(
    fake: HubSpotFake,
) -> None:
    """The fake's index (no scan of every contact per lookup) agrees with a scan after
    e-mails changed, cleared and moved by merges, and a unique property added later."""
    import random

    rng = random.Random(5)
    emails = [f"p{n}@example.com" for n in range(6)]
    fake.add_property("code")
    for step in range(120):
        key = f"k{rng.randrange(8)}"
        if rng.random() < 0.15 and len(fake.contacts) > 1:
            primary, absorbed = rng.sample(sorted(fake.contacts), 2)
            merge = {"primaryObjectId": primary, "objectIdToMerge": absorbed}
            assert request(fake, "POST", MERGE, merge).status_code == 200
        else:
            email = rng.choice([*emails, ""])
            upsert(fake, item(key, email=email, code=f"code-{key}"))
        if step == 60:
            fake.add_property("code", unique=True)  # unique from now on: indexed too
        for contact in fake.contacts.values():
            props = contact.properties
            held = [props.get("email", ""), *props.get("hs_additional_emails", "").split(";")]
            for email in filter(None, held):
                assert fake.contact_by("email", email.upper()) is contact
            if KEY in props:
                assert fake.contact_by(KEY, props[KEY]) is contact
            if step > 60 and props.get("code"):
                assert fake.contact_by("code", props["code"]) is contact
        scanned = {c.properties.get(KEY) for c in fake.contacts.values()} - {None}
        for n in range(8):
            found = fake.contact_by(KEY, f"k{n}")
            assert (found is not None) == (f"k{n}" in scanned)
        for email in emails:
            found = fake.contact_by("email", email)
            holders = []
            for c in fake.contacts.values():
                extra = c.properties.get("hs_additional_emails", "").split(";")
                if email in (c.properties.get("email"), *extra):
                    holders.append(c)
            assert holders == ([] if found is None else [found])
    assert fake.merges  # the walk did merge contacts (their e-mails moved)


def test_merge_with_itself_is_a_400(fake: HubSpotFake) -> None:
    contact_id = ids_by_key(upsert(fake, item("k1")))["k1"]
    same = {"primaryObjectId": contact_id, "objectIdToMerge": contact_id}
    error_of(request(fake, "POST", MERGE, same), 400, "VALIDATION_ERROR")
    error_of(request(fake, "POST", MERGE, {"primaryObjectId": contact_id}), 400, "VALIDATION_ERROR")


def test_get_contact_by_id_or_unique_property(fake: HubSpotFake) -> None:
    contact_id = ids_by_key(upsert(fake, item("k1", firstname="Ann")))["k1"]
    answer = request(fake, "GET", f"/crm/v3/objects/contacts/{contact_id}?properties=firstname")
    assert answer.json()["properties"] == {"firstname": "Ann", "hs_object_id": contact_id}
    by_key = request(fake, "GET", f"/crm/v3/objects/contacts/k1?idProperty={KEY}")
    assert by_key.json()["id"] == contact_id


# ---- properties --------------------------------------------------------------------------------


def prop(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "string",
        "fieldType": "text",
        "groupName": "contactinformation",
        **extra,
    }


def test_properties_create_read_and_409_when_present(fake: HubSpotFake) -> None:
    error_of(request(fake, "GET", f"{PROPERTIES}/treez_id"), 404, "OBJECT_NOT_FOUND")
    created = request(fake, "POST", PROPERTIES, prop("treez_id", hasUniqueValue=True))
    assert created.status_code == 201
    assert created.json()["hasUniqueValue"] is True
    assert request(fake, "GET", f"{PROPERTIES}/treez_id").json()["name"] == "treez_id"
    body = error_of(
        request(fake, "POST", PROPERTIES, prop("treez_id")), 409, "OBJECT_ALREADY_EXISTS"
    )
    assert body["context"] == {"name": ["treez_id"]}
    error_of(request(fake, "POST", PROPERTIES, prop("email")), 409, "OBJECT_ALREADY_EXISTS")
    names = {p["name"] for p in request(fake, "GET", PROPERTIES).json()["results"]}
    assert {"email", "firstname", "treez_id", KEY} <= names


def test_property_needs_its_fields_and_an_existing_group(fake: HubSpotFake) -> None:
    error_of(request(fake, "POST", PROPERTIES, {"name": "x"}), 400, "VALIDATION_ERROR")
    error_of(
        request(fake, "POST", PROPERTIES, prop("x", groupName="treez")), 400, "VALIDATION_ERROR"
    )
    error_of(request(fake, "POST", PROPERTIES, prop("Bad Name")), 400, "VALIDATION_ERROR")
    error_of(request(fake, "POST", PROPERTIES, prop("x", type="text")), 400, "VALIDATION_ERROR")
    group = {"name": "treez", "label": "Treez"}
    error_of(request(fake, "GET", f"{PROPERTIES}/groups/treez"), 404, "OBJECT_NOT_FOUND")
    assert request(fake, "POST", f"{PROPERTIES}/groups", group).status_code == 201
    error_of(request(fake, "POST", f"{PROPERTIES}/groups", group), 409, "OBJECT_ALREADY_EXISTS")
    assert request(fake, "GET", f"{PROPERTIES}/groups/treez").json()["label"] == "Treez"
    assert request(fake, "POST", PROPERTIES, prop("x", groupName="treez")).status_code == 201


def test_a_unique_property_created_through_the_api_keys_upserts(clock: HandClock) -> None:
    fake = HubSpotFake(clock=clock)
    error_of(upsert(fake, item("k1")), 400, "VALIDATION_ERROR")
    request(fake, "POST", PROPERTIES, prop(KEY, hasUniqueValue=True))
    assert upsert(fake, item("k1")).status_code == 200


# ---- communication preferences -----------------------------------------------------------------


def test_unsubscribe_all_opts_the_address_out_of_every_type(fake: HubSpotFake) -> None:
    answer = request(fake, "POST", UNSUBSCRIBE_ALL, {"inputs": ["a@example.com"]})
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    assert result["subscriberIdString"] == "a@example.com"
    assert [s["status"] for s in result["statuses"]] == ["UNSUBSCRIBED"]
    assert fake.opted_out("A@example.com")
    assert fake.subscription_status("a@example.com", 1001) == "UNSUBSCRIBED"
    assert fake.resubscriptions() == []


@pytest.mark.parametrize("query", ["", "?channel=SMS", "?channel=email"])
def test_unsubscribe_all_takes_only_the_email_channel(fake: HubSpotFake, query: str) -> None:
    path = UNSUBSCRIBE_ALL.split("?")[0] + query
    error_of(request(fake, "POST", path, {"inputs": ["a@example.com"]}), 400, "VALIDATION_ERROR")
    assert not fake.opted_out("a@example.com")


def test_unsubscribe_all_limits_and_checks_its_inputs(fake: HubSpotFake) -> None:
    many = [f"p{n}@example.com" for n in range(101)]
    error_of(request(fake, "POST", UNSUBSCRIBE_ALL, {"inputs": many}), 400, "VALIDATION_ERROR")
    error_of(request(fake, "POST", UNSUBSCRIBE_ALL, {"inputs": ["nope"]}), 400, "VALIDATION_ERROR")
    assert request(fake, "POST", UNSUBSCRIBE_ALL, {"inputs": many[:100]}).status_code == 200


def status(email: str, state: str, subscription_id: int = 1001) -> dict[str, Any]:
    return {
        "subscriberIdString": email,
        "statusState": state,
        "subscriptionId": subscription_id,
        "channel": "EMAIL",
        "legalBasis": "CONSENT_WITH_NOTICE",
    }


def test_status_write_subscribes_and_records_a_resubscription(fake: HubSpotFake) -> None:
    answer = request(fake, "POST", WRITE, {"inputs": [status("a@example.com", "SUBSCRIBED")]})
    assert answer.json()["results"][0]["setStatusSuccessReason"] == "REQUESTED_CHANGE_OCCURRED"
    assert fake.resubscriptions() == []
    request(fake, "POST", UNSUBSCRIBE_ALL, {"inputs": ["a@example.com"]})
    again = request(fake, "POST", WRITE, {"inputs": [status("a@example.com", "SUBSCRIBED")]})
    assert again.json()["results"][0]["setStatusSuccessReason"] == "RESUBSCRIBE_OCCURRED"
    assert [c.email for c in fake.resubscriptions()] == ["a@example.com"]
    assert not fake.opted_out("a@example.com")
    assert fake.subscription_status("a@example.com", 1001) == "SUBSCRIBED"


def test_status_write_checks_type_and_channel(fake: HubSpotFake) -> None:
    bad_type = status("a@example.com", "SUBSCRIBED", 999)
    error_of(request(fake, "POST", WRITE, {"inputs": [bad_type]}), 400, "VALIDATION_ERROR")
    sms = {**status("a@example.com", "SUBSCRIBED"), "channel": "SMS"}
    error_of(request(fake, "POST", WRITE, {"inputs": [sms]}), 400, "VALIDATION_ERROR")
    assert fake.status_changes == []


# ---- rate limits -------------------------------------------------------------------------------


def test_ten_second_rolling_limit_429_with_hubspot_headers(clock: HandClock) -> None:
    fake = HubSpotFake(clock=clock, ten_second_limit=3)
    fake.add_property(KEY, unique=True)
    answers = [upsert(fake, item(f"k{n}")) for n in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].headers["x-hubspot-ratelimit-max"] == "3"
    assert answers[0].headers["x-hubspot-ratelimit-remaining"] == "2"
    assert answers[2].headers["x-hubspot-ratelimit-interval-milliseconds"] == "10000"
    refused = upsert(fake, item("k9"))
    body = error_of(refused, 429, "RATE_LIMITS")
    assert body["errorType"] == "RATE_LIMIT"
    assert body["policyName"] == "TEN_SECONDLY_ROLLING"
    assert refused.headers["x-hubspot-ratelimit-remaining"] == "0"
    assert "retry-after" not in refused.headers
    clock.advance(9.9)
    assert upsert(fake, item("k9")).status_code == 429
    clock.advance(0.2)  # the first request left the rolling window
    assert upsert(fake, item("k9")).status_code == 200
    assert fake.contact_by(KEY, "k9") is not None


def test_daily_cap_429_until_midnight_in_the_account_zone(clock: HandClock) -> None:
    zone = zoneinfo.ZoneInfo("America/New_York")
    now = [dt.datetime(2026, 5, 1, 23, 0, tzinfo=zone).timestamp()]
    fake = HubSpotFake(clock=clock, daily_limit=2, wall=lambda: now[0])
    fake.add_property(KEY, unique=True)
    first = upsert(fake, item("k1"))
    assert first.headers["x-hubspot-ratelimit-daily"] == "2"
    assert first.headers["x-hubspot-ratelimit-daily-remaining"] == "1"
    assert upsert(fake, item("k2")).status_code == 200
    body = error_of(upsert(fake, item("k3")), 429, "RATE_LIMITS")
    assert body["policyName"] == "DAILY"
    midnight = dt.datetime(2026, 5, 2, tzinfo=zone).timestamp()
    assert fake.daily_reset_at() == midnight
    now[0] = midnight - 1
    assert upsert(fake, item("k3")).status_code == 429
    now[0] = midnight
    assert upsert(fake, item("k3")).status_code == 200


def test_use_up_daily_and_no_rate_limits(clock: HandClock) -> None:
    fake = HubSpotFake(clock=clock)
    fake.add_property(KEY, unique=True)
    fake.use_up_daily()
    assert error_of(upsert(fake, item("k1")), 429, "RATE_LIMITS")["policyName"] == "DAILY"
    free = HubSpotFake(clock=clock, rate_limits=False, ten_second_limit=1)
    free.add_property(KEY, unique=True)
    assert [upsert(free, item(f"k{n}")).status_code for n in range(5)] == [200] * 5


def test_fail_next_and_reset(fake: HubSpotFake) -> None:
    fake.fail_next(503, 2)
    error_of(upsert(fake, item("k1")), 503, "INTERNAL_ERROR")
    error_of(upsert(fake, item("k1")), 503, "INTERNAL_ERROR")
    assert upsert(fake, item("k1")).status_code == 200
    assert fake.statuses() == [503, 503, 200]
    assert fake.calls_to(UPSERT, "POST")[-1].body == {"inputs": [item("k1")]}
    fake.reset()
    assert fake.contacts == {}
    assert fake.calls == []
    assert KEY not in fake.properties


# ---- process mode ------------------------------------------------------------------------------


def test_process_mode_serves_and_exits_cleanly_on_sigterm() -> None:
    command = [sys.executable, "-m", "tests.fakes.hubspot", "--port", "0", "--token", "t9"]
    command += ["--ten-second", "5"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            port = listening_port(process)
            headers = {"Authorization": "Bearer t9"}
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, headers=headers, timeout=5.0) as client:
                statuses = [client.get(f"{PROPERTIES}/email").status_code for _ in range(6)]
                assert statuses == [200] * 5 + [429]
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20.0)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr
