"""The ``alpineiq`` destination (connector/destinations/alpineiq.py): each operation and each
documented error against respx, then whole flows (real store, planner and worker) against the
fake of Alpine IQ (tests/fakes/alpineiq.py) through tests/vendor_flow.py.

Every test also checks that ``/loyaltyContact`` was never called: in real life that endpoint
texts the customer a double opt-in at once (shared/docs/destinations.md)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from fakes.alpineiq import AlpineIQFake, is_contact_id
from pydantic import ValidationError
from vendor_flow import DISPENSARY, FAST_RETRY, Flow, event_body

from connector.config_base import Rate
from connector.delivery.base import Delivery, Sent
from connector.delivery.retry import RetryPolicy
from connector.destinations.alpineiq import AlpineIQDestination, AlpineIQSink
from connector.errors import DeliveryError, FatalDelivery, RetriableDelivery

ROOT = Path(__file__).resolve().parent.parent
MAPPING = ROOT / "mappings" / "alpineiq.yaml"
BASE_URL = "https://lab.alpineiq.com"
UID = "1234"
API_KEY = "aiq-SECRET-key-0042"
LOYALTY = "/api/v2/loyalty"
BULK = f"/api/v1.1/createUpdateMembers/{UID}"
CONSENT_KEYS = {"emailOptIn", "smsOptIn"}

EMAIL = "jules@example.com"
PHONE = "+13105551234"
FIELDS: dict[str, Any] = {
    "firstName": "Jules",
    "lastName": "Winnfield",
    "email": EMAIL,
    "mobilePhone": PHONE,
    "tags": ["SENIOR"],
    "customAttributes": {"treezStatus": "ACTIVE"},
}


# ---- respx: the sink alone -------------------------------------------------------------------


def aiq_config(**extra: Any) -> AlpineIQDestination:
    data = {
        "name": "aiq",
        "type": "alpineiq",
        "api_key": API_KEY,
        "uid": UID,
        "mapping": str(MAPPING),
        **extra,
    }
    return AlpineIQDestination.model_validate(data)


def delivery(
    op: str,
    customer: str = "1001",
    *,
    contact_id: str | None = None,
    fields: dict[str, Any] | None = None,
    channels: list[str] | None = None,
    outbox_id: int = 1,
    **extra: Any,
) -> Delivery:
    """An operation as the worker hands it over (contract 4: every key present)."""
    key = f"k-{op}-{customer}-{outbox_id}"
    body = {
        "op": op,
        "dispensary": DISPENSARY,
        "customer_id": customer,
        "contact_id": contact_id,
        "fields": fields,
        "channels": channels,
        "from_contact_id": None,
        "into_contact_id": None,
        "from_customer_id": None,
        "into_customer_id": None,
        "idempotency_key": key,
        **extra,
    }
    return Delivery(outbox_id, key, body)


def ok(contact_id: str = "c0ffee", **data: Any) -> httpx.Response:
    return httpx.Response(200, json={"success": True, "data": {"contactID": contact_id, **data}})


def refusal(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    body = {"success": False, "error": {"code": code, "message": message}}
    return httpx.Response(status, json=body, headers=headers)


def run_sink(scenario: Callable[[AlpineIQSink], Awaitable[Any]], **config: Any) -> Any:
    """Run ``scenario`` with a sink built from the configuration (its own httpx client,
    which respx intercepts), closed afterwards."""

    async def go() -> Any:
        sink = AlpineIQSink(aiq_config(**config))
        try:
            return await scenario(sink)
        finally:
            await sink.aclose()

    return asyncio.run(go())


def send_one(d: Delivery, **config: Any) -> Any:
    async def scenario(sink: AlpineIQSink) -> Any:
        results = await sink.send([d])
        assert len(results) == 1
        return results[0]

    return run_sink(scenario, **config)


def sent_json(route: respx.Route, index: int = -1) -> Any:
    return json.loads(route.calls[index].request.content)


@pytest.fixture
def api() -> Iterator[respx.MockRouter]:
    """Alpine IQ mocked by respx; anything unmocked fails the test. A route catches any
    ``loyaltyContact`` path so that a call to it is seen and fails the test at teardown."""
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as router:
        guard = router.route(path__regex=r"(?i).*loyaltycontact.*", name="loyaltyContact")
        guard.respond(200, json={"success": True, "data": {}})
        yield router
        assert not guard.called, "the sink called /loyaltyContact (texts a double opt-in)"
        paths = [call.request.url.path.lower() for call in router.calls]
        assert not [p for p in paths if "loyaltycontact" in p]


def test_upsert_posts_the_member_with_uid_and_srcid_and_records_the_persona(
    api: respx.MockRouter,
) -> None:
    route = api.post(LOYALTY).mock(return_value=ok("65a1b2c3d4e5f60718293a4b", created=True))
    fields = {**FIELDS, "emailOptIn": True, "smsOptIn": True}  # even if a mapping had them
    result = send_one(delivery("upsert", "3904", fields=fields))
    assert result == Sent("65a1b2c3d4e5f60718293a4b")
    assert route.call_count == 1
    request = route.calls.last.request
    assert request.method == "POST"
    assert request.headers["x-apikey"] == API_KEY
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body["uid"] == UID
    assert body["srcID"] == "3904"
    assert "contactID" not in body  # unknown yet: Alpine IQ matches by phone, then e-mail
    assert not CONSENT_KEYS & body.keys(), "a plain upsert never carries consent"
    assert {k: v for k, v in body.items() if k not in ("uid", "srcID")} == FIELDS


def test_upsert_names_the_known_persona_and_keeps_it_when_the_answer_has_none(
    api: respx.MockRouter,
) -> None:
    route = api.post(LOYALTY).mock(
        side_effect=[
            httpx.Response(200, json={"success": True, "data": {}}),
            httpx.Response(200, content=b"not json"),
            httpx.Response(200, json={"success": True, "data": {"id": 77}}),
        ]
    )

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        known = delivery("upsert", fields=FIELDS, contact_id="known-persona")
        return [(await sink.send([known]))[0] for _ in range(3)]

    results = run_sink(scenario)
    assert results == [Sent("known-persona"), Sent("known-persona"), Sent("77")]
    for index in range(3):
        body = sent_json(route, index)
        assert body["contactID"] == "known-persona"
        assert body["srcID"] == "1001"


@pytest.mark.parametrize(
    ("channels", "expected"),
    [
        (None, {"emailOptIn": False, "smsOptIn": False}),
        (["email", "sms"], {"emailOptIn": False, "smsOptIn": False}),
        (["email"], {"emailOptIn": False}),
        (["sms"], {"smsOptIn": False}),
    ],
)
def test_unsubscribe_sets_opt_ins_false_with_the_mapped_member(
    api: respx.MockRouter, channels: list[str] | None, expected: dict[str, bool]
) -> None:
    route = api.post(LOYALTY).mock(return_value=ok("p1"))
    fields = {**FIELDS, "emailOptIn": True, "smsOptIn": True}  # never trusted from fields
    result = send_one(delivery("unsubscribe", fields=fields, channels=channels, contact_id="p1"))
    assert result == Sent("p1")
    body = sent_json(route)
    assert {k: body[k] for k in CONSENT_KEYS if k in body} == expected
    assert body["email"] == EMAIL  # Alpine IQ finds the member by phone or e-mail
    assert body["mobilePhone"] == PHONE
    assert (body["uid"], body["srcID"], body["contactID"]) == (UID, "1001", "p1")


def test_unsubscribe_without_mapped_fields_still_names_the_customer(
    api: respx.MockRouter,
) -> None:
    route = api.post(LOYALTY).mock(return_value=ok("p9"))
    assert send_one(delivery("unsubscribe", fields=None, channels=["email", "sms"])) == Sent("p9")
    assert sent_json(route) == {
        "uid": UID,
        "srcID": "1001",
        "emailOptIn": False,
        "smsOptIn": False,
    }


def test_subscribe_sets_opt_ins_true(api: respx.MockRouter) -> None:
    route = api.post(LOYALTY).mock(return_value=ok("p1"))
    result = send_one(
        delivery("subscribe", fields=FIELDS, channels=["email", "sms"], contact_id="p1")
    )
    assert result == Sent("p1")
    body = sent_json(route)
    assert (body["emailOptIn"], body["smsOptIn"]) == (True, True)
    assert body["contactID"] == "p1"


def test_deactivate_marks_the_known_persona_and_sends_nothing_else(api: respx.MockRouter) -> None:
    route = api.post(LOYALTY).mock(return_value=ok("p1"))
    result = send_one(delivery("deactivate", contact_id="p1", fields=FIELDS))
    assert result == Sent("p1")
    assert sent_json(route) == {
        "uid": UID,
        "contactID": "p1",
        "srcID": "1001",
        "customAttributes": {"treezStatus": "DEACTIVATED"},
    }


def test_deactivate_of_a_customer_alpine_iq_never_saw_makes_no_call(
    api: respx.MockRouter,
) -> None:
    assert send_one(delivery("deactivate", contact_id=None)) == Sent()
    assert api.calls.call_count == 0


GONE = refusal(404, "not_found", "contactID: no persona gone-p")


def test_a_subscribe_is_never_sent_by_phone_or_email(api: respx.MockRouter) -> None:
    """Alpine IQ matches by phone, then e-mail: a family sharing a phone shares a persona. A
    subscribe for a persona that is gone (or never known) is not sent again without its id:
    it could opt in another person (the customer stays unsubscribed; reported)."""
    route = api.post(LOYALTY).mock(side_effect=[GONE])
    result = send_one(delivery("subscribe", fields=FIELDS, contact_id="gone-p"))
    assert isinstance(result, Sent)
    assert result.contact_id is None
    assert result.conflict is not None
    assert result.conflict.startswith("unknown_contact: ")
    assert route.call_count == 1
    assert send_one(delivery("subscribe", fields=FIELDS, contact_id=None)).contact_id is None
    assert route.call_count == 1


@pytest.mark.parametrize(("op", "channels"), [("upsert", None), ("unsubscribe", ["email", "sms"])])
def test_defect_8_an_operation_on_a_gone_persona_matches_again_and_names_what_it_replaces(
    api: respx.MockRouter, op: str, channels: list[str] | None
) -> None:
    """A 404 for the persona held: sent again without contactID (Alpine IQ matches by phone,
    e-mail and srcID), and the persona that answers replaces the gone one: one report, made
    by the store when it moves the map, none from the adapter."""
    route = api.post(LOYALTY).mock(side_effect=[GONE, ok("survivor-p")])
    result = send_one(delivery(op, fields=FIELDS, channels=channels, contact_id="gone-p"))
    assert result == Sent("survivor-p", replaces="gone-p")
    first, again = sent_json(route, 0), sent_json(route, 1)
    assert first["contactID"] == "gone-p"
    assert again == {k: v for k, v in first.items() if k != "contactID"}
    assert (again["mobilePhone"], again["email"], again["srcID"]) == (PHONE, EMAIL, "1001")


def test_defect_8_a_deactivation_of_a_gone_persona_marks_the_persona_that_answers(
    api: respx.MockRouter,
) -> None:
    route = api.post(LOYALTY).mock(side_effect=[GONE, ok("survivor-p")])
    result = send_one(delivery("deactivate", contact_id="gone-p", fields=FIELDS))
    assert result == Sent("survivor-p", replaces="gone-p")
    # only what finds the persona: a deactivation changes nothing else of the person
    assert sent_json(route, 1) == {
        "uid": UID,
        "srcID": "1001",
        "mobilePhone": PHONE,
        "email": EMAIL,
        "customAttributes": {"treezStatus": "DEACTIVATED"},
    }


def test_defect_8_a_deactivation_of_a_gone_persona_without_mapped_fields_matches_by_srcid(
    api: respx.MockRouter,
) -> None:
    route = api.post(LOYALTY).mock(side_effect=[GONE, ok("p7")])
    result = send_one(delivery("deactivate", contact_id="gone-p", fields=None))
    assert result == Sent("p7", replaces="gone-p")
    deactivated = {"treezStatus": "DEACTIVATED"}
    assert sent_json(route, 1) == {"uid": UID, "srcID": "1001", "customAttributes": deactivated}


def test_a_gone_persona_whose_match_answers_no_id_is_reported_and_replaces_nothing(
    api: respx.MockRouter,
) -> None:
    api.post(LOYALTY).mock(
        side_effect=[GONE, httpx.Response(200, json={"success": True, "data": {}})]
    )
    result = send_one(delivery("upsert", fields=FIELDS, contact_id="gone-p"))
    assert isinstance(result, Sent)
    assert (result.contact_id, result.replaces) == (None, None)
    assert result.conflict is not None
    assert result.conflict.startswith("unknown_contact: ")


def test_merge_makes_no_http_call_and_names_the_survivor_persona(api: respx.MockRouter) -> None:
    merge = delivery(
        "merge",
        "200",
        from_customer_id="200",
        into_customer_id="100",
        from_contact_id="absorbed-p",
        into_contact_id="survivor-p",
    )
    assert send_one(merge) == Sent("survivor-p")
    assert api.calls.call_count == 0


def test_unknown_operation_is_fatal_without_a_call(api: respx.MockRouter) -> None:
    result = send_one(delivery("explode"))
    assert isinstance(result, FatalDelivery)
    assert api.calls.call_count == 0


def test_send_returns_one_result_per_operation_in_order(api: respx.MockRouter) -> None:
    api.post(LOYALTY).mock(
        side_effect=[ok("a"), refusal(400, "invalid_request", "birthday: bad"), ok("c")]
    )

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        batch = [delivery("upsert", str(n), fields=FIELDS, outbox_id=n) for n in (1, 2, 3)]
        return await sink.send(batch)

    first, second, third = run_sink(scenario, batch_size=3)
    assert first == Sent("a")
    assert isinstance(second, FatalDelivery)
    assert third == Sent("c")


def test_lookup_reads_the_persona(api: respx.MockRouter) -> None:
    persona = {"contactID": "p1", "email": EMAIL, "emailOptIn": False}
    route = api.get("/api/v2/persona/p1").respond(200, json={"success": True, "data": persona})

    async def scenario(sink: AlpineIQSink) -> Any:
        return await sink.lookup("p1")

    assert run_sink(scenario) == persona
    assert route.calls.last.request.headers["x-apikey"] == API_KEY


def test_lookup_of_an_unknown_persona_is_none(api: respx.MockRouter) -> None:
    api.get("/api/v2/persona/gone").mock(return_value=refusal(404, "not_found", "no persona"))

    async def scenario(sink: AlpineIQSink) -> Any:
        return await sink.lookup("gone")

    assert run_sink(scenario) is None


def test_lookup_refused_raises_a_fatal_error(api: respx.MockRouter) -> None:
    api.get("/api/v2/persona/p1").mock(return_value=refusal(401, "unauthorized", "bad key"))

    async def scenario(sink: AlpineIQSink) -> Any:
        return await sink.lookup("p1")

    with pytest.raises(FatalDelivery) as info:
        run_sink(scenario)
    assert info.value.status_code == 401


def test_backfill_upserts_in_chunks_of_bulk_size_with_results_in_order(
    api: respx.MockRouter,
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        members = json.loads(request.content)
        results = [{"srcID": m["srcID"], "contactID": f"p-{m['srcID']}"} for m in members]
        return httpx.Response(200, json={"success": True, "data": {"results": results}})

    bulk = api.post(BULK).mock(side_effect=answer)
    loyalty = api.post(LOYALTY).mock(return_value=ok("p-unsub"))
    deliveries = [
        delivery(
            "upsert", str(n), fields={"email": f"c{n}@example.com", "emailOptIn": True}, outbox_id=n
        )
        for n in range(7)
    ]
    deliveries.insert(3, delivery("unsubscribe", "u1", channels=["email", "sms"], outbox_id=99))

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        return await sink.backfill(deliveries)

    results = run_sink(scenario, bulk_size=3)
    assert [len(json.loads(call.request.content)) for call in bulk.calls] == [3, 3, 1]
    sent = [m for call in bulk.calls for m in json.loads(call.request.content)]
    assert [m["srcID"] for m in sent] == [str(n) for n in range(7)]
    assert all("uid" not in m and not CONSENT_KEYS & m.keys() for m in sent)
    assert loyalty.call_count == 1  # the other operations go one by one
    assert results == [
        Sent("p-0"),
        Sent("p-1"),
        Sent("p-2"),
        Sent("p-unsub"),
        Sent("p-3"),
        Sent("p-4"),
        Sent("p-5"),
        Sent("p-6"),
    ]


def test_backfill_failure_of_one_chunk_fails_only_its_members(api: respx.MockRouter) -> None:
    def ok_bulk(count: int) -> httpx.Response:
        results = [{"contactID": f"p{n}"} for n in range(count)]
        return httpx.Response(200, json={"success": True, "data": {"results": results}})

    api.post(BULK).mock(side_effect=[ok_bulk(2), refusal(503, "down", "maintenance"), ok_bulk(1)])

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        batch = [delivery("upsert", str(n), fields=FIELDS, outbox_id=n) for n in range(5)]
        return await sink.backfill(batch)

    results = run_sink(scenario, bulk_size=2)
    assert results[:2] == [Sent("p0"), Sent("p1")]
    assert all(isinstance(r, RetriableDelivery) and r.status_code == 503 for r in results[2:4])
    assert results[4] == Sent("p0")


def test_backfill_with_an_unexpected_success_body_gives_one_result_each(
    api: respx.MockRouter,
) -> None:
    api.post(BULK).respond(200, json={"success": True, "data": ["queued"]})

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        batch = [delivery("upsert", str(n), fields=FIELDS, outbox_id=n) for n in range(2)]
        return await sink.backfill(batch)

    assert run_sink(scenario) == [Sent(), Sent()]


ECHO = f"email: {EMAIL} and mobilePhone: {PHONE} (+1 310 555 1234) do not match"


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "invalid_request"), (401, "unauthorized"), (403, "forbidden"), (404, "not_found")],
)
def test_refusals_are_fatal_and_name_the_status_not_the_customer(
    api: respx.MockRouter, status: int, code: str
) -> None:
    api.post(LOYALTY).mock(return_value=refusal(status, code, ECHO))
    result = send_one(delivery("upsert", fields=FIELDS))
    assert isinstance(result, FatalDelivery)
    assert not isinstance(result, RetriableDelivery)
    assert result.status_code == status
    message = str(result)
    assert str(status) in message
    assert code in message
    for text in (message, repr(result)):
        assert EMAIL not in text
        assert "555" not in text  # no part of the phone either
        assert API_KEY not in text


@pytest.mark.parametrize("retry_after", ["7", "0"])
def test_429_is_retriable_with_its_retry_after(api: respx.MockRouter, retry_after: str) -> None:
    api.post(LOYALTY).mock(
        return_value=refusal(429, "rate_limited", "slow down", **{"Retry-After": retry_after})
    )
    result = send_one(delivery("upsert", fields=FIELDS))
    assert isinstance(result, RetriableDelivery)
    assert result.status_code == 429
    assert result.retry_after == float(retry_after)


def test_429_without_retry_after_is_retriable(api: respx.MockRouter) -> None:
    api.post(LOYALTY).mock(return_value=refusal(429, "rate_limited", "slow down"))
    result = send_one(delivery("upsert", fields=FIELDS))
    assert isinstance(result, RetriableDelivery)
    assert result.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_5xx_and_timeouts_answered_are_retriable(api: respx.MockRouter, status: int) -> None:
    api.post(LOYALTY).mock(return_value=httpx.Response(status, text="<html>oops</html>"))
    result = send_one(delivery("upsert", fields=FIELDS))
    assert isinstance(result, RetriableDelivery)
    assert result.status_code == status
    assert str(status) in str(result)


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.ConnectTimeout("slow"),
        httpx.RemoteProtocolError("dropped"),
    ],
)
def test_transport_errors_are_retriable(api: respx.MockRouter, error: Exception) -> None:
    api.post(LOYALTY).mock(side_effect=error)
    for op in ("upsert", "unsubscribe", "deactivate"):
        result = send_one(delivery(op, fields=FIELDS, contact_id="p1"))
        assert isinstance(result, RetriableDelivery), op
        assert result.status_code is None
        assert API_KEY not in str(result)


def test_the_api_key_never_shows_in_reprs_or_errors(api: respx.MockRouter) -> None:
    api.post(LOYALTY).mock(
        side_effect=[refusal(401, "unauthorized", "bad key"), httpx.ConnectError("refused")]
    )
    api.get("/api/v2/persona/p1").mock(return_value=refusal(403, "forbidden", "no access"))

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        texts = [repr(sink), str(sink), repr(sink.config), str(sink.config)]
        errors: list[Any] = await sink.send([delivery("upsert", fields=FIELDS)])
        errors += await sink.send([delivery("upsert", fields=FIELDS)])
        try:
            await sink.lookup("p1")
        except DeliveryError as exc:
            errors.append(exc)
        return texts + [text for e in errors for text in (str(e), repr(e), repr(e.args))]

    texts = run_sink(scenario)
    assert len(texts) == 4 + 3 * 3
    assert "aiq" in texts[0]
    assert all(API_KEY not in text for text in texts)
    # the key was really sent, so the check above means something
    assert all(call.request.headers["x-apikey"] == API_KEY for call in api.calls)


def test_configuration_refuses_a_loyaltycontact_path() -> None:
    for field in ("upsert_path", "bulk_path", "lookup_path"):
        with pytest.raises(ValidationError, match="loyaltyContact"):
            aiq_config(**{field: "/api/v2/LOYALTYCONTACT/1234"})


def test_the_sink_paces_at_its_configured_rate() -> None:
    # the sink paces each request itself (the worker's limiter, which counts batches, is off)
    sink = AlpineIQSink(aiq_config())
    assert sink.rate_limit == ()
    assert sink.config.rate_limit == (Rate(20, 1.0),)  # the documented default guess
    sink = AlpineIQSink(aiq_config(rate_limit=["5/s", "100/min"]))
    assert sink.config.rate_limit == (Rate(5, 1.0), Rate(100, 60.0))
    assert not sink.capabilities.native_merge
    asyncio.run(sink.aclose())


# ---- flows through the fake --------------------------------------------------------------------

SURVIVOR, ABSORBED = "100", "200"


def config_text(
    *, rate: str = "500/s", extra: str = "", policy: str = "", dest_policy: str = ""
) -> str:
    """A config.yaml with one Alpine IQ destination for the seed's dispensary."""
    return (
        "store: sqlite:///connector.db\n"
        "dispensaries:\n"
        f"  {DISPENSARY}:\n"
        "    webhook_token: tok\n"
        f"{policy}"
        "    destinations:\n"
        "      - name: aiq\n"
        "        type: alpineiq\n"
        f"        api_key: {API_KEY}\n"
        f'        uid: "{UID}"\n'
        "        mapping: alpineiq.yaml\n"
        f'        rate_limit: "{rate}"\n'
        f"{extra}{dest_policy}"
    )


RESUBSCRIBE_DISPENSARY = "    policy:\n      resubscribe: on_source_opt_in\n"
RESUBSCRIBE_DESTINATION = "        policy:\n          resubscribe: on_source_opt_in\n"

Scenario = Callable[[Flow, AlpineIQFake], Awaitable[None]]


def run_flow(
    tmp_path: Path,
    scenario: Scenario,
    *,
    fake: AlpineIQFake | None = None,
    config: str | None = None,
    retry: RetryPolicy = FAST_RETRY,
) -> AlpineIQFake:
    """Run ``scenario`` over a fresh store and the fake (no rate limit unless given); the
    fake must never have been asked for ``/loyaltyContact``."""
    fake = fake or AlpineIQFake(api_key=API_KEY, uid=UID, rate_limit_per_second=None)

    async def go() -> None:
        flow = Flow(
            tmp_path,
            config or config_text(),
            app=fake.app,
            sink_factory=AlpineIQSink,
            base_url=BASE_URL,
            retry=retry,
        )
        try:
            await scenario(flow, fake)
        finally:
            await flow.close()

    asyncio.run(go())
    assert fake.texted == []
    assert not [c for c in fake.calls if "loyaltycontact" in c.path.lower()]
    return fake


def person(customer: str, n: int) -> dict[str, Any]:
    return {"email": f"c{customer}@example.com", "phone": f"310555{n:04d}"}


def contact_of(flow: Flow, customer: str) -> str | None:
    return flow.contact_ids().get((DISPENSARY, "aiq", customer))


def resolved_of(flow: Flow, customer: str) -> str | None:
    """The persona a customer resolves to: a merged-away customer, the survivor's."""
    return flow.store.resolve_contact_ids(DISPENSARY, "aiq", [customer]).get(customer)


def loyalty_calls(fake: AlpineIQFake, customer: str | None = None) -> list[Any]:
    return [
        c
        for c in fake.calls_to(LOYALTY)
        if customer is None or (isinstance(c.body, dict) and c.body.get("srcID") == customer)
    ]


def assert_all_done(flow: Flow) -> None:
    assert {row["status"] for row in flow.outbox()} <= {"done"}, flow.outbox()
    assert flow.dead_letters() == []


def test_create_sends_one_upsert_and_records_the_persona(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        assert flow.ops() == ["upsert"]
        assert_all_done(flow)
        (call,) = fake.calls
        assert (call.method, call.path, call.status) == ("POST", LOYALTY, 200)
        assert call.body["uid"] == UID
        assert call.body["srcID"] == "1001"
        assert "contactID" not in call.body
        assert not CONSENT_KEYS & call.body.keys()
        contact = contact_of(flow, "1001")
        assert contact is not None
        assert is_contact_id(contact)
        persona = fake.persona(contact)
        assert persona is not None
        assert (persona["srcID"], persona["email"], persona["mobilePhone"]) == (
            "1001",
            "c1001@example.com",
            "+13105550001",
        )
        assert (persona["firstName"], persona["city"], persona["tags"]) == (
            "Jules",
            "Inglewood",
            ["SENIOR"],
        )
        assert fake.consent(contact) == {"email": None, "sms": None}  # loyalty is not consent

    run_flow(tmp_path, scenario)


def test_update_names_the_persona_and_changes_it_in_place(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        contact = contact_of(flow, "1001")
        await flow.deliver(
            event_body(
                "1001",
                2,
                email="new@example.com",
                phone="3105550001",
                first_name="jimmie",
                rewards_balance=120,
            )
        )
        assert flow.ops() == ["upsert", "upsert"]
        assert_all_done(flow)
        update = fake.calls[-1]
        assert update.body["contactID"] == contact
        assert update.body["srcID"] == "1001"
        assert len(fake.personas) == 1
        persona = fake.persona(str(contact))
        assert persona is not None
        assert (persona["email"], persona["firstName"], persona["loyaltyPoints"]) == (
            "new@example.com",
            "Jimmie",
            120,
        )
        assert contact_of(flow, "1001") == contact

    run_flow(tmp_path, scenario)


def test_no_op_updates_send_nothing(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        first = event_body("1001", 1, **person("1001", 1))
        await flow.deliver(first)
        assert len(fake.calls) == 1
        await flow.deliver(first)  # an identical re-delivery
        await flow.deliver(first, first)
        assert len(fake.calls) == 1
        # newer, but nothing Alpine IQ is sent changes (notes, licence are not mapped)
        await flow.deliver(
            event_body(
                "1001", 2, notes="likes sativa", drivers_license="D1234567", **person("1001", 1)
            )
        )
        await flow.deliver(event_body("1001", 3, **person("1001", 1)))
        assert len(fake.calls) == 1
        assert flow.ops() == ["upsert"]
        # and a real change after all that is sent
        await flow.deliver(event_body("1001", 4, last_name="Jackson", **person("1001", 1)))
        assert len(fake.calls) == 2
        assert fake.calls[-1].body["lastName"] == "Jackson"

    run_flow(tmp_path, scenario)


def test_opt_out_on_first_sight_upserts_then_unsubscribes(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, opt_out="true", **person("1001", 1)))
        assert flow.ops() == ["upsert", "unsubscribe"]
        assert_all_done(flow)
        upsert, unsubscribe = fake.calls
        assert not CONSENT_KEYS & upsert.body.keys()
        contact = contact_of(flow, "1001")
        assert contact is not None
        assert unsubscribe.body["contactID"] == contact
        assert (unsubscribe.body["emailOptIn"], unsubscribe.body["smsOptIn"]) == (False, False)
        assert unsubscribe.body["mobilePhone"] == "+13105550001"
        assert fake.consent(contact) == {"email": False, "sms": False}
        assert "+13105550001" in fake.sms_opted_out_numbers
        assert len(fake.personas) == 1

    run_flow(tmp_path, scenario)


def test_seed_delivery_without_email_or_phone_still_reaches_alpine_iq(tmp_path: Path) -> None:
    # the real Treez delivery: no e-mail, no phone, opted out; srcID alone identifies it
    seed = (Path(__file__).parent / "data" / "seed_body.json").read_bytes()

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(seed)
        assert flow.ops() == ["upsert", "unsubscribe"]
        assert_all_done(flow)
        (persona,) = fake.personas.values()
        assert persona["srcID"] == "3904"
        assert (persona["emailOptIn"], persona["smsOptIn"]) == (False, False)

    run_flow(tmp_path, scenario)


def test_an_opt_out_still_reaches_alpine_iq_when_the_mapping_fails(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        contact = str(contact_of(flow, "1001"))
        await flow.deliver(
            event_body("1001", 2, birthday="1990-13-45", opt_out="true", **person("1001", 1))
        )
        (dead,) = flow.dead_letters()
        assert (dead["op"], dead["reason"].startswith("mapping failed")) == ("upsert", True)
        unsubscribe = fake.calls[-1]
        # the fields that can be mapped go with it (to find the person by phone and
        # e-mail should the persona id be gone); the one that cannot is left out
        assert {k: unsubscribe.body[k] for k in ("uid", "srcID", "contactID")} == {
            "uid": UID,
            "srcID": "1001",
            "contactID": contact,
        }
        assert (unsubscribe.body["emailOptIn"], unsubscribe.body["smsOptIn"]) == (False, False)
        assert "birthday" not in unsubscribe.body
        assert unsubscribe.body["email"] == "c1001@example.com"
        assert fake.consent(contact) == {"email": False, "sms": False}

    run_flow(tmp_path, scenario)


def test_a_later_opt_in_does_not_resubscribe_by_default(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        await flow.deliver(event_body("1001", 2, opt_out="true", **person("1001", 1)))
        contact = str(contact_of(flow, "1001"))
        assert fake.consent(contact) == {"email": False, "sms": False}
        calls = len(fake.calls)
        await flow.deliver(event_body("1001", 3, opt_out="false", **person("1001", 1)))
        await flow.deliver(event_body("1001", 4, opt_out=False, **person("1001", 1)))
        assert len(fake.calls) == calls  # nothing to tell Alpine IQ
        await flow.deliver(
            event_body("1001", 5, opt_out="false", first_name="Jimmie", **person("1001", 1))
        )
        assert flow.ops() == ["upsert", "unsubscribe", "upsert"]
        assert "subscribe" not in flow.ops()
        assert_all_done(flow)
        assert not CONSENT_KEYS & fake.calls[-1].body.keys()
        assert fake.consent(contact) == {"email": False, "sms": False}
        assert all(c.action == "opt_out" for c in fake.consent_log)

    run_flow(tmp_path, scenario)


@pytest.mark.parametrize(
    "placement", ["dispensary", "destination"], ids=["dispensary-policy", "destination-policy"]
)
def test_resubscribe_policy_opts_email_back_in_but_alpine_iq_refuses_sms(
    tmp_path: Path, placement: str
) -> None:
    config = (
        config_text(policy=RESUBSCRIBE_DISPENSARY)
        if placement == "dispensary"
        else config_text(dest_policy=RESUBSCRIBE_DESTINATION)
    )

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        await flow.deliver(event_body("1001", 2, opt_out="true", **person("1001", 1)))
        await flow.deliver(event_body("1001", 3, opt_out="false", **person("1001", 1)))
        assert flow.ops() == ["upsert", "unsubscribe", "subscribe"]
        assert_all_done(flow)
        subscribe = fake.calls[-1]
        assert (subscribe.body["emailOptIn"], subscribe.body["smsOptIn"]) == (True, True)
        contact = str(contact_of(flow, "1001"))
        assert subscribe.body["contactID"] == contact
        # Alpine IQ never re-opts a number that opted out of SMS; the answer is still 200,
        # so the connector cannot tell (nothing dead-lettered, no conflict)
        assert fake.consent(contact) == {"email": True, "sms": False}
        assert [(c.channel, c.action) for c in fake.consent_log][-2:] == [
            ("email", "opt_in"),
            ("sms", "reopt_refused"),
        ]
        assert flow.conflicts() == []
        # one flip, one subscribe: a repeated false sends nothing more
        await flow.deliver(event_body("1001", 4, opt_out="false", **person("1001", 1)))
        assert flow.ops().count("subscribe") == 1

    run_flow(tmp_path, scenario, config=config)


def test_resubscribe_policy_never_subscribes_someone_who_never_opted_out(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, opt_out="false", **person("1001", 1)))
        await flow.deliver(event_body("1001", 2, opt_out=None, **person("1001", 1)))
        await flow.deliver(event_body("1001", 3, opt_out="false", **person("1001", 1)))
        assert flow.ops() == ["upsert"]
        assert all(not CONSENT_KEYS & c.body.keys() for c in fake.calls)

    run_flow(tmp_path, scenario, config=config_text(policy=RESUBSCRIBE_DISPENSARY))


def survivor_event(version: int, **changes: Any) -> bytes:
    fields = {"status": "MERGED", **person(SURVIVOR, 100), **changes}
    return event_body(SURVIVOR, version, merged_customer_ids=[ABSORBED], **fields)


def absorbed_event(version: int, **changes: Any) -> bytes:
    fields = {"status": "DEACTIVATED", **person(ABSORBED, 200), **changes}
    return event_body(ABSORBED, version, merged_into_customer_id=SURVIVOR, **fields)


MERGE_ORDERS = {
    "survivor-first": lambda: [[survivor_event(5)], [absorbed_event(5)]],
    "absorbed-first": lambda: [[absorbed_event(5)], [survivor_event(5)]],
    "one-batch": lambda: [[absorbed_event(5), survivor_event(5)]],
    "repeated": lambda: [
        [absorbed_event(5)],
        [survivor_event(5)],
        [absorbed_event(5), survivor_event(5)],
        [absorbed_event(6)],
        [survivor_event(6)],
    ],
}


@pytest.mark.parametrize("order", list(MERGE_ORDERS))
def test_merge_of_two_known_customers_resolves_the_absorbed_id_to_the_survivor(
    tmp_path: Path, order: str
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(
            event_body(SURVIVOR, 1, **person(SURVIVOR, 100)),
            event_body(ABSORBED, 1, **person(ABSORBED, 200)),
        )
        survivor = contact_of(flow, SURVIVOR)
        absorbed = contact_of(flow, ABSORBED)
        assert survivor
        assert absorbed
        assert survivor != absorbed
        for batch in MERGE_ORDERS[order]():
            await flow.deliver(*batch)
        assert_all_done(flow)
        assert "merge" not in flow.ops()  # Alpine IQ has no merge API
        assert flow.ops(ABSORBED) == ["upsert"]  # nothing for B after its first upsert
        assert resolved_of(flow, ABSORBED) == survivor
        assert contact_of(flow, SURVIVOR) == survivor
        # the absorbed persona is left alone (Alpine IQ merges personas itself)
        assert len(loyalty_calls(fake, ABSORBED)) == 1
        assert fake.persona(absorbed) is not None
        calls = len(fake.calls)
        # later: a stray payload of B (opted out, changed) is recorded, not applied; its
        # opt-out is owed to the survivor's persona and, Alpine IQ having no merge, to B's
        # own persona, which lives on (the same person opted out in one of their records)
        await flow.deliver(
            event_body(
                ABSORBED,
                9,
                status="ACTIVE",
                opt_out="true",
                first_name="Stray",
                **person(ABSORBED, 200),
            )
        )
        sent = fake.calls[calls:]
        assert sorted(c.body["contactID"] for c in sent) == sorted([survivor, absorbed])
        assert all(c.body.get("emailOptIn") is False for c in sent), [c.body for c in sent]
        assert all(c.body.get("firstName") != "Stray" for c in sent)  # nothing applied
        # the survivor's own updates still go to its persona
        await flow.deliver(survivor_event(10, last_name="Jackson"))
        last = fake.calls[-1]
        assert (last.body["srcID"], last.body["contactID"]) == (SURVIVOR, survivor)
        assert all(c.body.get("contactID") != absorbed for c in fake.calls[calls + 2 :])
        persona = fake.persona(survivor)
        assert persona is not None
        assert persona["firstName"] == "Jules"
        assert flow.conflicts() == []

    run_flow(tmp_path, scenario)


@pytest.mark.parametrize("absorbed_known", [False, True], ids=["both-new", "absorbed-known"])
@pytest.mark.parametrize("order", ["survivor-first", "absorbed-first", "one-batch"])
def test_merge_resolves_the_absorbed_id_even_when_the_survivor_was_new(
    tmp_path: Path, order: str, absorbed_known: bool
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        if absorbed_known:
            await flow.deliver(event_body(ABSORBED, 1, **person(ABSORBED, 200)))
        for batch in MERGE_ORDERS[order]():
            await flow.deliver(*batch)
        assert_all_done(flow)
        survivor = contact_of(flow, SURVIVOR)
        assert survivor is not None
        assert resolved_of(flow, ABSORBED) == survivor

    run_flow(tmp_path, scenario)


def test_an_absorbed_customers_queued_upsert_never_reaches_the_survivor_persona(
    tmp_path: Path,
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body(SURVIVOR, 1, **person(SURVIVOR, 100)))
        survivor = str(contact_of(flow, SURVIVOR))
        # B's last update and its merge arrive together (before B's upsert went out)
        await flow.deliver(
            event_body(ABSORBED, 1, first_name="Bee", **person(ABSORBED, 200)),
            absorbed_event(5),
        )
        persona = fake.persona(survivor)
        assert persona is not None
        assert (persona["srcID"], persona["email"], persona["firstName"]) == (
            SURVIVOR,
            f"c{SURVIVOR}@example.com",
            "Jules",
        )
        assert all(c.body.get("contactID") != survivor for c in loyalty_calls(fake, ABSORBED))

    run_flow(tmp_path, scenario)


def test_deactivation_marks_the_persona_once(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        contact = str(contact_of(flow, "1001"))
        await flow.deliver(event_body("1001", 2, status="DEACTIVATED", **person("1001", 1)))
        await flow.deliver(event_body("1001", 3, status="DEACTIVATED", **person("1001", 1)))
        assert flow.ops() == ["upsert", "deactivate"]
        assert_all_done(flow)
        deactivate = fake.calls[-1]
        assert deactivate.body == {
            "uid": UID,
            "contactID": contact,
            "srcID": "1001",
            "customAttributes": {"treezStatus": "DEACTIVATED"},
        }
        persona = fake.persona(contact)
        assert persona is not None
        assert persona["customAttributes"]["treezStatus"] == "DEACTIVATED"
        assert len(fake.calls) == 2

    run_flow(tmp_path, scenario)


def test_deactivated_on_first_sight_never_reaches_alpine_iq(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, status="DEACTIVATED", **person("1001", 1)))
        assert flow.ops() == ["deactivate"]
        assert_all_done(flow)
        assert fake.calls == []

    run_flow(tmp_path, scenario)


def test_reactivation_lifts_the_deactivated_tag(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        await flow.deliver(event_body("1001", 2, status="DEACTIVATED", **person("1001", 1)))
        await flow.deliver(event_body("1001", 3, status="ACTIVE", **person("1001", 1)))
        assert flow.ops() == ["upsert", "deactivate", "upsert"]
        persona = fake.persona(str(contact_of(flow, "1001")))
        assert persona is not None
        assert persona["customAttributes"]["treezStatus"] == "ACTIVE"
        assert "treez-deactivated" not in persona["tags"]

    run_flow(tmp_path, scenario)


def external(customer: str, version: int, contact_id: str | None, **changes: Any) -> bytes:
    ids = {"aiq_contact_id": contact_id, "sticky_cards_contact_id": None}
    return event_body(customer, version, external_ids=ids, **{**person(customer, 3), **changes})


def test_treez_external_id_of_an_existing_persona_is_used_to_match(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            answer = await client.post(
                LOYALTY,
                headers={"X-APIKEY": API_KEY},
                json={"uid": UID, "email": "old@example.com", "firstName": "Old"},
            )
        existing = answer.json()["data"]["contactID"]
        await flow.deliver(external("1001", 1, existing))
        assert_all_done(flow)
        upsert = fake.calls[-1]
        assert upsert.body["contactID"] == existing
        assert list(fake.personas) == [existing]  # updated, not duplicated
        persona = fake.persona(existing)
        assert persona is not None
        assert persona["srcID"] == "1001"
        assert contact_of(flow, "1001") == existing
        assert flow.conflicts() == []

    run_flow(tmp_path, scenario)


def test_treez_external_id_disagreeing_with_the_map_is_a_conflict_and_the_map_wins(
    tmp_path: Path,
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(external("1001", 1, None))
        recorded = contact_of(flow, "1001")
        assert recorded is not None
        other = "e" * 24
        await flow.deliver(external("1001", 2, other, first_name="Vincent"))
        assert_all_done(flow)
        assert contact_of(flow, "1001") == recorded
        assert fake.calls[-1].body["contactID"] == recorded
        assert all(c.body.get("contactID") != other for c in fake.calls)
        (conflict,) = flow.conflicts()
        assert (conflict["customer_id"], conflict["destination"], conflict["kind"]) == (
            "1001",
            "aiq",
            "external_id_mismatch",
        )
        assert other not in conflict["detail"]

    run_flow(tmp_path, scenario)


def test_treez_external_id_of_a_missing_persona_is_reported_and_the_customer_still_synced(
    tmp_path: Path,
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(external("1001", 1, "f" * 24))
        await flow.deliver(external("1001", 2, "f" * 24, opt_out="true"))
        assert flow.dead_letters() == []
        assert [c["kind"] for c in flow.conflicts()], "the bad external id is reported"
        persona = fake.persona_by_src("1001")
        assert persona is not None
        assert (persona["emailOptIn"], persona["smsOptIn"]) == (False, False)

    run_flow(tmp_path, scenario)


def test_a_persona_merged_away_by_alpine_iq_still_gets_the_opt_out(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("600", 1, email="a600@example.com", phone="3105550600"))
        await flow.deliver(event_body("601", 1, email="b601@example.com", phone=None))
        # the second customer gives the family's shared phone: two personas share it
        await flow.deliver(event_body("601", 2, email="b601@example.com", phone="3105550600"))
        gone = contact_of(flow, "601")
        merged = fake.run_nightly_merge()
        assert [gone] in merged.values()
        await flow.deliver(
            event_body("601", 3, email="b601@example.com", phone="3105550600", opt_out="true")
        )
        assert flow.dead_letters() == []
        sharing = [p for p in fake.personas.values() if p["mobilePhone"] == "+13105550600"]
        assert sharing
        assert all(p["smsOptIn"] is False for p in sharing)

    run_flow(tmp_path, scenario)


FAMILY_PHONE = "3105550600"


async def merged_away(flow: Flow, fake: AlpineIQFake, customer: str) -> tuple[str, str]:
    """``customer``'s persona X absorbed by Alpine IQ's nightly merge into an older persona Y
    sharing its phone (one made by a sign-up form): returns (X, Y)."""
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        answer = await client.post(
            LOYALTY,
            headers={"X-APIKEY": API_KEY},
            json={"uid": UID, "mobilePhone": FAMILY_PHONE, "email": "family@example.com"},
        )
    survivor = answer.json()["data"]["contactID"]
    email = f"c{customer}@example.com"
    await flow.deliver(event_body(customer, 1, email=email, phone=None))
    gone = str(contact_of(flow, customer))
    # the customer gives the family's phone: sent by contactID, two personas now share it
    await flow.deliver(event_body(customer, 2, email=email, phone=FAMILY_PHONE))
    assert contact_of(flow, customer) == gone
    assert fake.run_nightly_merge() == {survivor: [gone]}
    assert flow.conflicts() == []
    return gone, survivor


def test_defect_8_after_a_nightly_merge_the_map_moves_to_the_survivor_persona(
    tmp_path: Path,
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        gone, survivor = await merged_away(flow, fake, "601")
        email = "c601@example.com"
        before = len(fake.calls)
        await flow.deliver(
            event_body("601", 3, email=email, phone=FAMILY_PHONE, first_name="vincent")
        )
        refused, matched = fake.calls[before:]
        assert (refused.status, refused.body["contactID"]) == (404, gone)
        assert (matched.status, matched.response["data"]["contactID"]) == (200, survivor)
        assert "contactID" not in matched.body
        assert contact_of(flow, "601") == survivor  # the map moved
        (report,) = flow.conflicts()
        assert (report["customer_id"], report["destination"], report["kind"]) == (
            "601",
            "aiq",
            "contact_replaced",
        )
        assert gone in report["detail"]
        assert survivor in report["detail"]
        assert email not in report["detail"]

        # the next update costs one call and reports nothing new
        before = len(fake.calls)
        await flow.deliver(
            event_body("601", 4, email=email, phone=FAMILY_PHONE, first_name="vince")
        )
        (update,) = fake.calls[before:]
        assert (update.status, update.body["contactID"]) == (200, survivor)
        assert len(flow.conflicts()) == 1

        # and a deactivation lands on the survivor at once
        before = len(fake.calls)
        await flow.deliver(
            event_body("601", 5, email=email, phone=FAMILY_PHONE, status="DEACTIVATED")
        )
        (deactivate,) = fake.calls[before:]
        assert (deactivate.status, deactivate.body["contactID"]) == (200, survivor)
        persona = fake.persona(survivor)
        assert persona is not None
        assert persona["customAttributes"]["treezStatus"] == "DEACTIVATED"
        assert persona["firstName"] == "Vince"
        assert_all_done(flow)
        assert len(flow.conflicts()) == 1
        assert list(fake.personas) == [survivor]

    run_flow(tmp_path, scenario)


def test_defect_8_a_deactivation_of_a_persona_merged_away_deactivates_the_survivor(
    tmp_path: Path,
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        gone, survivor = await merged_away(flow, fake, "601")
        before = len(fake.calls)
        await flow.deliver(
            event_body("601", 3, email="c601@example.com", phone=FAMILY_PHONE, status="DEACTIVATED")
        )
        assert flow.ops("601")[-1] == "deactivate"
        refused, matched = fake.calls[before:]
        assert (refused.status, refused.body["contactID"]) == (404, gone)
        assert matched.status == 200
        assert matched.body["customAttributes"] == {"treezStatus": "DEACTIVATED"}
        persona = fake.persona(survivor)
        assert persona is not None
        assert persona["customAttributes"]["treezStatus"] == "DEACTIVATED"
        assert list(fake.personas) == [survivor]  # found, not created
        assert contact_of(flow, "601") == survivor
        assert [c["kind"] for c in flow.conflicts()] == ["contact_replaced"]
        assert_all_done(flow)

    run_flow(tmp_path, scenario)


def test_defect_8_an_opt_out_of_a_persona_merged_away_moves_the_map_too(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        _, survivor = await merged_away(flow, fake, "601")
        await flow.deliver(
            event_body("601", 3, email="c601@example.com", phone=FAMILY_PHONE, opt_out="true")
        )
        assert flow.ops("601")[-1] == "unsubscribe"
        assert fake.consent(survivor) == {"email": False, "sms": False}
        assert contact_of(flow, "601") == survivor
        assert [c["kind"] for c in flow.conflicts()] == ["contact_replaced"]
        assert_all_done(flow)

    run_flow(tmp_path, scenario)


def test_a_5xx_is_retried_and_delivered(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        fake.fail_next(503)
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        assert_all_done(flow)
        assert fake.statuses() == [503, 200]
        (row,) = flow.outbox()
        assert row["attempts"] == 2
        assert len(fake.personas) == 1

    run_flow(tmp_path, scenario)


def test_a_429_is_retried_no_sooner_than_its_retry_after(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        fake.fail_next(429, retry_after=1)
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        assert_all_done(flow)
        refused, accepted = fake.calls
        assert (refused.status, accepted.status) == (429, 200)
        # the test's retry policy would retry after ~10 ms: the wait is Retry-After's
        assert accepted.at - refused.at >= 0.95

    run_flow(tmp_path, scenario)


YEAR = 365 * 86_400
# waits of 0.2 s at most; dead-lettered at the third attempt once 0.3 s have passed
SHORT_BOUND = RetryPolicy(
    initial_seconds=0.01,
    max_seconds=0.2,
    jitter_seconds=0.0,
    min_attempts=3,
    min_elapsed_seconds=0.3,
)


def test_defect_10_a_year_long_retry_after_waits_max_seconds(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        fake.fail_next(429, retry_after=YEAR)
        await flow.deliver(event_body("1001", 1, **person("1001", 1)), timeout=5.0)
        assert_all_done(flow)
        refused, accepted = fake.calls
        assert (refused.status, accepted.status) == (429, 200)
        assert 0.15 <= accepted.at - refused.at <= 1.5

    run_flow(tmp_path, scenario, retry=SHORT_BOUND)


def test_defect_10_an_operation_always_answered_a_year_long_retry_after_is_dead_lettered(
    tmp_path: Path,
) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        fake.fail_next(429, count=10, retry_after=YEAR)
        await flow.deliver(event_body("1001", 1, **person("1001", 1)), timeout=5.0)
        assert fake.statuses() == [429, 429, 429]
        (dead,) = flow.dead_letters()
        assert (dead["op"], dead["status_code"], dead["attempts"]) == ("upsert", 429, 3)
        assert [row["status"] for row in flow.outbox()] == ["dead"]

    run_flow(tmp_path, scenario, retry=SHORT_BOUND)


@pytest.mark.parametrize("status", [400, 401, 403])
def test_a_refusal_is_dead_lettered_with_a_safe_reason(tmp_path: Path, status: int) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        fake.fail_next(status)
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        assert fake.statuses() == [status]  # not retried
        (dead,) = flow.dead_letters()
        assert dead["status_code"] == status
        assert str(status) in dead["reason"]
        for text in (dead["reason"], str(flow.outbox()[0]["last_error"])):
            assert API_KEY not in text
            assert "c1001@example.com" not in text

    run_flow(tmp_path, scenario)


def test_a_wrong_api_key_is_a_fatal_401(tmp_path: Path) -> None:
    fake = AlpineIQFake(api_key="another-key", uid=UID, rate_limit_per_second=None)

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(event_body("1001", 1, **person("1001", 1)))
        assert fake.statuses() == [401]
        (dead,) = flow.dead_letters()
        assert dead["status_code"] == 401
        assert API_KEY not in dead["reason"]

    run_flow(tmp_path, scenario, fake=fake)


BURST = 60


def burst(count: int = BURST) -> list[bytes]:
    return [event_body(str(5000 + n), 1, **person(str(5000 + n), n)) for n in range(count)]


def test_a_burst_paced_at_the_vendor_limit_is_delivered_without_a_429_storm(
    tmp_path: Path,
) -> None:
    fake = AlpineIQFake(api_key=API_KEY, uid=UID, rate_limit_per_second=30)

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(*burst(), timeout=30)
        assert_all_done(flow)
        assert Counter(flow.ops()) == {"upsert": BURST}
        statuses = Counter(fake.statuses())
        assert set(statuses) <= {200, 429}
        assert statuses[200] == BURST
        assert statuses[429] <= 3, statuses  # a stray one at a window's edge, not a storm
        assert {p["srcID"] for p in fake.personas.values()} == {str(5000 + n) for n in range(BURST)}
        assert len(set(flow.contact_ids().values())) == BURST

    run_flow(tmp_path, scenario, fake=fake, config=config_text(rate="30/s"))


def test_a_burst_paced_below_the_vendor_limit_gets_no_429(tmp_path: Path) -> None:
    fake = AlpineIQFake(api_key=API_KEY, uid=UID, rate_limit_per_second=20)

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(*burst(30), timeout=30)
        assert_all_done(flow)
        assert Counter(fake.statuses()) == {200: 30}

    run_flow(tmp_path, scenario, fake=fake, config=config_text(rate="15/s"))


def test_a_burst_with_batches_still_respects_the_rate_limit(tmp_path: Path) -> None:
    fake = AlpineIQFake(api_key=API_KEY, uid=UID, rate_limit_per_second=20)
    config = config_text(rate="20/s", extra="        batch_size: 10\n")

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(*burst(40), timeout=30)
        statuses = Counter(fake.statuses())
        assert statuses[429] <= 3, statuses
        assert_all_done(flow)

    run_flow(tmp_path, scenario, fake=fake, config=config)


def test_a_backlog_goes_through_the_bulk_path_and_records_every_persona(
    tmp_path: Path,
) -> None:
    """A reconciliation's worth of customers queued at once: the worker claims bulk_size of
    them and upserts them through createUpdateMembers, not one call each; every customer
    ends with its persona recorded."""
    count = 120

    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.post(*burst(count))  # all queued before the worker starts
        await flow.drain(timeout=30)
        assert_all_done(flow)
        bulk = fake.calls_to("/api/v1.1/createUpdateMembers/")
        real_time = loyalty_calls(fake)
        assert bulk, "the backlog went through the bulk path"
        assert len(bulk) + len(real_time) < count / 4
        assert len(fake.personas) == count
        ids = flow.contact_ids()
        assert len(ids) == count
        assert all(ids.values())

    run_flow(
        tmp_path,
        scenario,
        config=config_text(extra="        bulk_size: 50\n        concurrency: 2\n"),
    )


def test_a_trickle_stays_on_the_real_time_path(tmp_path: Path) -> None:
    async def scenario(flow: Flow, fake: AlpineIQFake) -> None:
        await flow.deliver(*burst(3))
        assert fake.calls_to("/api/v1.1/createUpdateMembers/") == []
        assert len(loyalty_calls(fake)) == 3

    run_flow(
        tmp_path,
        scenario,
        config=config_text(extra="        bulk_size: 50\n        concurrency: 2\n"),
    )


def test_a_bulk_call_refused_for_one_member_falls_back_to_one_call_each(
    api: respx.MockRouter,
) -> None:
    """A stale contactID makes the whole bulk call a 404: the members go through the
    real-time path instead (with its stale-id fallback), none is dead-lettered for another."""
    api.post(BULK).respond(
        404, json={"success": False, "error": {"code": "not_found", "message": "x"}}
    )
    real_time = api.post(LOYALTY).mock(return_value=ok("p9"))

    async def scenario(sink: AlpineIQSink) -> list[Any]:
        batch = [delivery("upsert", str(n), fields=FIELDS, outbox_id=n) for n in range(3)]
        return await sink.backfill(batch)

    assert run_sink(scenario) == [Sent("p9")] * 3
    assert real_time.call_count == 3
