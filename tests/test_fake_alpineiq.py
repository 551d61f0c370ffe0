"""The fake of Alpine IQ's loyalty API (tests/fakes/alpineiq.py) behaves as our documented
assumption says, in process through httpx's ASGI transport (and once as a process)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes._serve import listening_port
from fakes.alpineiq import AlpineIQFake, Call, ConsentChange, is_contact_id
from fakes.clock import HandClock

ROOT = Path(__file__).resolve().parent.parent
BASE_URL = "https://lab.alpineiq.com"
KEY = "aiq_test_key"
UID = "1234"
LOYALTY = "/api/v2/loyalty"
BULK = f"/api/v1.1/createUpdateMembers/{UID}"
_UNSET: Any = object()


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1000.0)


@pytest.fixture
def fake(clock: HandClock) -> AlpineIQFake:
    return AlpineIQFake(clock=clock)


def request(
    fake: AlpineIQFake,
    method: str,
    path: str,
    body: Any = _UNSET,
    *,
    key: str | None = KEY,
    content: bytes | None = None,
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            headers = {} if key is None else {"X-APIKEY": key}
            if content is not None:
                headers["Content-Type"] = "application/json"
                return await client.request(method, path, content=content, headers=headers)
            if body is _UNSET:
                return await client.request(method, path, headers=headers)
            return await client.request(method, path, json=body, headers=headers)

    return asyncio.run(go())


def upsert(fake: AlpineIQFake, **member: Any) -> httpx.Response:
    return request(fake, "POST", LOYALTY, {"uid": UID, **member})


def contact_id_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    contact_id = response.json()["data"]["contactID"]
    assert isinstance(contact_id, str)
    return contact_id


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert isinstance(message, str)
    return message


# ---- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "wrong-key"])
def test_401_without_the_right_api_key(fake: AlpineIQFake, key: str | None) -> None:
    for method, path in [("POST", LOYALTY), ("POST", BULK), ("GET", "/api/v2/persona/x")]:
        body = [{"srcID": "1"}] if path == BULK else {"uid": UID, "srcID": "1"}
        response = request(fake, method, path, None if method == "GET" else body, key=key)
        error_of(response, 401, "unauthorized")
    assert fake.personas == {}
    assert fake.statuses() == [401, 401, 401]


def test_403_for_another_uid_in_the_path_or_the_body(fake: AlpineIQFake) -> None:
    error_of(
        request(fake, "POST", "/api/v1.1/createUpdateMembers/999", [{"srcID": "1"}]),
        403,
        "forbidden",
    )
    error_of(request(fake, "POST", "/api/v2/loyaltyContact/999", {}), 403, "forbidden")
    error_of(request(fake, "POST", LOYALTY, {"uid": "999", "srcID": "1"}), 403, "forbidden")
    assert "uid" in error_of(request(fake, "POST", LOYALTY, {"srcID": "1"}), 400, "invalid_request")
    assert fake.personas == {}
    assert fake.texted == []


def test_other_uid_and_key_are_configurable() -> None:
    fake = AlpineIQFake(api_key="k2", uid="77")
    assert request(fake, "POST", LOYALTY, {"uid": "77", "srcID": "1"}, key="k2").status_code == 200
    error_of(request(fake, "POST", LOYALTY, {"uid": UID, "srcID": "1"}, key="k2"), 403, "forbidden")
    error_of(request(fake, "POST", LOYALTY, {"uid": "77", "srcID": "1"}), 401, "unauthorized")


def test_unknown_routes_and_methods(fake: AlpineIQFake) -> None:
    error_of(request(fake, "POST", "/api/v1.1/createUpdateMember/1234", {}), 404, "not_found")
    response = request(fake, "GET", LOYALTY)
    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"
    error_of(request(fake, "POST", "/api/v2/persona/abc", {}), 405, "method_not_allowed")


# ---- real-time upsert --------------------------------------------------------------------------


FULL = {
    "srcID": "treez-1",
    "mobilePhone": "+15551234567",
    "email": "Ada@Example.com",
    "firstName": "Ada",
    "lastName": "Lovelace",
    "birthday": "1990-02-28",
    "address": "1 Main St",
    "city": "Denver",
    "state": "CO",
    "zip": "80202",
    "loyaltyPoints": 120,
    "favoriteStore": "Downtown",
    "tags": ["vip"],
    "customAttributes": {"tier": "gold", "visits": 3},
}


def test_create_answers_a_new_24_hex_id(fake: AlpineIQFake, clock: HandClock) -> None:
    response = upsert(fake, **FULL)
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "success": True,
        "data": {"contactID": body["data"]["contactID"], "created": True},
    }
    contact_id = body["data"]["contactID"]
    assert is_contact_id(contact_id)
    persona = fake.personas[contact_id]
    assert {k: persona[k] for k in FULL} == FULL
    assert persona["createdAt"] == clock.now
    assert persona["merged_from"] == []
    assert fake.persona_by_src("treez-1") == persona
    assert fake.persona_by_src("nobody") is None
    assert fake.consent(contact_id) == {"email": None, "sms": None}
    other = contact_id_of(upsert(fake, srcID="treez-2"))
    assert other != contact_id
    assert is_contact_id(other)


@pytest.mark.parametrize(
    "key",
    [
        {"mobilePhone": "+15551234567"},
        {"mobilePhone": "5551234567"},  # 10 digits: the same North American number
        {"email": "ada@example.com"},  # case does not matter
        {"srcID": "treez-1"},
        {"contactID": None},  # filled in with the created id
    ],
)
def test_update_by_each_match_key(
    fake: AlpineIQFake, clock: HandClock, key: dict[str, Any]
) -> None:
    contact_id = contact_id_of(upsert(fake, **FULL))
    if "contactID" in key:
        key = {"contactID": contact_id}
    clock.now += 5
    update = {
        **key,
        "lastName": "King",
        "firstName": None,  # null: left alone
        "loyaltyPoints": 150.5,
        "tags": ["vip", "medical"],
        "customAttributes": {"visits": 4, "budtender": "Sam"},
    }
    response = upsert(fake, **update)
    assert response.json() == {"success": True, "data": {"contactID": contact_id, "created": False}}
    [persona] = fake.personas.values()
    assert persona["lastName"] == "King"
    assert persona["firstName"] == "Ada"
    assert persona["city"] == "Denver"  # absent: left alone
    assert persona["loyaltyPoints"] == 150.5
    assert persona["tags"] == ["vip", "medical"]
    assert persona["customAttributes"] == {"tier": "gold", "visits": 4, "budtender": "Sam"}
    assert persona["updatedAt"] == clock.now
    assert persona["createdAt"] == clock.now - 5


def test_phone_wins_over_email_and_src_id(fake: AlpineIQFake) -> None:
    by_phone = contact_id_of(upsert(fake, srcID="a", mobilePhone="5550000001"))
    by_email = contact_id_of(upsert(fake, srcID="b", email="b@example.com"))
    # A family member on the same phone: Alpine IQ files them under the phone's persona and
    # the POS id is replaced.
    response = upsert(fake, srcID="c", mobilePhone="+15550000001", email="b@example.com")
    assert response.json()["data"] == {"contactID": by_phone, "created": False}
    assert fake.personas[by_phone]["srcID"] == "c"
    assert fake.persona_by_src("a") is None
    assert fake.personas[by_phone]["email"] == "b@example.com"
    # two personas now carry the email: the oldest is found
    assert contact_id_of(upsert(fake, email="B@example.com", lastName="L")) == by_phone
    assert contact_id_of(upsert(fake, srcID="b", lastName="M")) == by_email
    assert len(fake.personas) == 2


def test_unknown_contact_id_is_404(fake: AlpineIQFake) -> None:
    message = error_of(upsert(fake, contactID="0" * 24, srcID="1"), 404, "not_found")
    assert "contactID" in message
    assert fake.personas == {}


def test_get_persona(fake: AlpineIQFake) -> None:
    contact_id = contact_id_of(upsert(fake, **FULL, smsOptIn=True))
    response = request(fake, "GET", f"/api/v2/persona/{contact_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    assert body["data"] == fake.personas[contact_id]
    assert body["data"]["smsOptIn"] is True
    error_of(request(fake, "GET", "/api/v2/persona/" + "f" * 24), 404, "not_found")


# ---- 400s --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("member", "field"),
    [
        ({"firstName": "Ada"}, "contactID|mobilePhone|email|srcID"),
        ({"srcID": None, "email": None}, "contactID|mobilePhone|email|srcID"),
        ({"srcID": "1", "birthday": "1990-13-01"}, "birthday"),
        ({"srcID": "1", "birthday": "02/28/1990"}, "birthday"),
        ({"srcID": "1", "birthday": "1990-02-30"}, "birthday"),
        ({"srcID": "1", "mobilePhone": "555-123-4567"}, "mobilePhone"),
        ({"srcID": "1", "mobilePhone": "+0551234567"}, "mobilePhone"),
        ({"mobilePhone": "12345"}, "mobilePhone"),
        ({"srcID": ""}, "srcID"),
        ({"srcID": 42}, "srcID"),
        ({"srcID": "1", "tags": "vip"}, "tags"),
        ({"srcID": "1", "customAttributes": ["x"]}, "customAttributes"),
        ({"srcID": "1", "loyaltyPoints": "12"}, "loyaltyPoints"),
        ({"srcID": "1", "loyaltyPoints": True}, "loyaltyPoints"),
        ({"srcID": "1", "smsOptIn": "yes"}, "smsOptIn"),
        ({"srcID": "1", "phone": "5551234567"}, "phone"),  # not in our assumption
    ],
)
def test_400_names_the_field(fake: AlpineIQFake, member: dict[str, Any], field: str) -> None:
    message = error_of(upsert(fake, **member), 400, "invalid_request")
    assert message.startswith(f"{field}:"), message
    assert fake.personas == {}


def test_400_for_a_body_that_is_not_a_member(fake: AlpineIQFake) -> None:
    bad_json = request(fake, "POST", LOYALTY, content=b'{"uid": "1234",')
    assert error_of(bad_json, 400, "invalid_request").startswith("body:")
    assert fake.calls[-1].body == '{"uid": "1234",'
    error_of(request(fake, "POST", LOYALTY, [{"uid": UID}]), 400, "invalid_request")


# ---- consent -----------------------------------------------------------------------------------


def test_sms_reopt_in_is_refused_for_a_number_that_opted_out(
    fake: AlpineIQFake, clock: HandClock
) -> None:
    contact_id = contact_id_of(upsert(fake, srcID="1", mobilePhone="5551230000", smsOptIn=True))
    assert fake.consent(contact_id) == {"email": None, "sms": True}
    clock.now += 1
    upsert(fake, srcID="1", smsOptIn=False)
    assert fake.consent(contact_id)["sms"] is False
    clock.now += 1
    response = upsert(fake, srcID="1", smsOptIn=True)
    assert response.json()["data"] == {"contactID": contact_id, "created": False}
    assert fake.consent(contact_id)["sms"] is False
    phone = "+15551230000"
    assert fake.consent_log == [
        ConsentChange(1000.0, contact_id, "sms", "opt_in", phone),
        ConsentChange(1001.0, contact_id, "sms", "opt_out", phone),
        ConsentChange(1002.0, contact_id, "sms", "reopt_refused", phone),
    ]
    assert fake.sms_opted_out_numbers == {phone}


def test_sms_reopt_in_is_refused_for_the_number_on_another_persona(fake: AlpineIQFake) -> None:
    upsert(fake, srcID="1", mobilePhone="+15551230000", smsOptIn=False)
    other = contact_id_of(upsert(fake, srcID="2", email="two@example.com"))
    upsert(fake, contactID=other, mobilePhone="5551230000", smsOptIn=True)
    assert fake.consent(other) == {"email": None, "sms": None}
    assert fake.consent_log[-1].action == "reopt_refused"
    # another number may opt in
    upsert(fake, contactID=other, mobilePhone="5559990000", smsOptIn=True)
    assert fake.consent(other)["sms"] is True


def test_email_reopt_in_is_allowed(fake: AlpineIQFake) -> None:
    contact_id = contact_id_of(upsert(fake, email="e@example.com", emailOptIn=True))
    upsert(fake, email="e@example.com", emailOptIn=False)
    assert fake.consent(contact_id) == {"email": False, "sms": None}
    upsert(fake, email="e@example.com", emailOptIn=True)
    upsert(fake, email="e@example.com", emailOptIn=True)  # no change: not logged
    upsert(fake, email="e@example.com", firstName="E")  # absent: left alone
    assert fake.consent(contact_id) == {"email": True, "sms": None}
    assert [(c.channel, c.action) for c in fake.consent_log] == [
        ("email", "opt_in"),
        ("email", "opt_out"),
        ("email", "opt_in"),
    ]
    with pytest.raises(KeyError):
        fake.consent("nobody")


# ---- bulk upsert -------------------------------------------------------------------------------


def test_bulk_answers_results_in_request_order(fake: AlpineIQFake) -> None:
    existing = contact_id_of(upsert(fake, srcID="s2", email="two@example.com"))
    members = [
        {"srcID": "s1", "mobilePhone": "5550000001", "tags": ["a"]},
        {"srcID": "s2", "email": "two@example.com", "birthday": "1980-01-01"},
        {"srcID": "s3", "email": "three@example.com", "smsOptIn": False},
        {"srcID": "s4", "mobilePhone": "+15550000001", "tags": ["b"]},  # same phone as s1
    ]
    response = request(fake, "POST", BULK, members)
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True
    results = body["data"]["results"]
    assert [r["srcID"] for r in results] == ["s1", "s2", "s3", "s4"]
    assert [r["created"] for r in results] == [True, False, True, False]
    assert results[1]["contactID"] == existing
    assert results[3]["contactID"] == results[0]["contactID"]
    assert fake.personas[results[0]["contactID"]]["tags"] == ["a", "b"]
    assert fake.personas[existing]["birthday"] == "1980-01-01"
    assert fake.consent(results[2]["contactID"])["sms"] is False
    assert len(fake.personas) == 3


def test_bulk_limit_is_413(clock: HandClock) -> None:
    fake = AlpineIQFake(bulk_limit=3, clock=clock)
    too_many = [{"srcID": str(i)} for i in range(4)]
    assert "3" in error_of(request(fake, "POST", BULK, too_many), 413, "too_large")
    assert request(fake, "POST", BULK, too_many[:3]).status_code == 200
    assert AlpineIQFake().bulk_limit == 1000


def test_bulk_fails_whole_on_one_invalid_item(fake: AlpineIQFake) -> None:
    members: list[Any] = [{"srcID": str(i)} for i in range(5)]
    members[3]["birthday"] = "1990-2-3"
    message = error_of(request(fake, "POST", BULK, members), 400, "invalid_request")
    assert message.startswith("[3].birthday:"), message
    members[3] = {"uid": UID, "srcID": "3"}
    assert error_of(request(fake, "POST", BULK, members), 400, "invalid_request").startswith(
        "[3].uid:"
    )
    members[3] = "s3"
    assert error_of(request(fake, "POST", BULK, members), 400, "invalid_request").startswith("[3]:")
    members[3] = {"contactID": "a" * 24}
    assert "[3].contactID" in error_of(request(fake, "POST", BULK, members), 404, "not_found")
    not_an_array: list[Any] = [[], {"srcID": "1"}]
    for body in not_an_array:
        error_of(request(fake, "POST", BULK, body), 400, "invalid_request")
    assert fake.personas == {}


# ---- the forbidden endpoint --------------------------------------------------------------------


def test_loyalty_contact_is_accepted_and_recorded_as_texted(fake: AlpineIQFake) -> None:
    upsert(fake, srcID="1", mobilePhone="5551234567")
    assert fake.texted == []
    body = {"mobilePhone": "5551234567"}
    assert request(fake, "POST", f"/api/v2/loyaltyContact/{UID}", body).status_code == 200
    assert request(fake, "POST", f"/api/v1.1/loyaltyContact/{UID}", body).status_code == 200
    assert request(fake, "POST", f"/api/v2/loyaltyContact/{UID}", body, key=None).status_code == 401
    texted = fake.texted
    assert [c.path for c in texted] == [
        f"/api/v2/loyaltyContact/{UID}",
        f"/api/v1.1/loyaltyContact/{UID}",
    ]
    assert texted[0].body == body
    assert len(fake.calls_to("/api/v2/loyaltyContact")) == 2
    assert len(fake.calls_to("/api/")) == 4


# ---- rate limit and scripted failures ----------------------------------------------------------


def test_rate_limit_429_then_allowed_once_the_window_moves(clock: HandClock) -> None:
    fake = AlpineIQFake(rate_limit_per_second=3, clock=clock)
    for i in range(3):
        assert upsert(fake, srcID=str(i)).status_code == 200
        clock.now += 0.1
    response = upsert(fake, srcID="x")
    error_of(response, 429, "rate_limited")
    assert response.headers["retry-after"] == "1"
    assert request(fake, "GET", "/api/v2/persona/x").status_code == 429  # all endpoints
    clock.now = 1000.99
    assert upsert(fake, srcID="x").status_code == 429
    clock.now = 1001.0  # the first request left the window
    assert upsert(fake, srcID="x").status_code == 200
    assert upsert(fake, srcID="y").status_code == 429
    assert fake.persona_by_src("y") is None
    assert fake.statuses() == [200, 200, 200, 429, 429, 429, 200, 429]
    assert [c.at for c in fake.calls][-2:] == [1001.0, 1001.0]


def test_default_rate_limit_and_no_limit(clock: HandClock) -> None:
    fake = AlpineIQFake(clock=clock)
    assert [upsert(fake, srcID="1").status_code for _ in range(21)][-2:] == [200, 429]
    unlimited = AlpineIQFake(rate_limit_per_second=None, clock=clock)
    assert {upsert(unlimited, srcID="1").status_code for _ in range(40)} == {200}


def test_fail_next_scripts_answers_in_order(fake: AlpineIQFake) -> None:
    fake.fail_next(503, count=2)
    fake.fail_next(429)
    fake.fail_next(500)
    first, second = upsert(fake, srcID="1"), upsert(fake, srcID="1")
    for response in (first, second):
        error_of(response, 503, "server_error")
        assert "retry-after" not in response.headers
    throttled = upsert(fake, srcID="1")
    error_of(throttled, 429, "rate_limited")
    assert throttled.headers["retry-after"] == "1"
    error_of(request(fake, "POST", BULK, [{"srcID": "1"}]), 500, "server_error")
    assert fake.personas == {}
    assert upsert(fake, srcID="1").status_code == 200
    assert fake.statuses() == [503, 503, 429, 500, 200]
    with pytest.raises(ValueError, match="4xx or 5xx"):
        fake.fail_next(200)


# ---- records -----------------------------------------------------------------------------------


def test_every_call_is_recorded_and_reset_forgets(fake: AlpineIQFake, clock: HandClock) -> None:
    contact_id = contact_id_of(upsert(fake, srcID="1", smsOptIn=False, mobilePhone="5551230000"))
    request(fake, "GET", f"/api/v2/persona/{contact_id}")
    request(fake, "POST", f"/api/v2/loyaltyContact/{UID}", {})
    fake.fail_next(502)
    calls = fake.calls
    assert calls[0] == Call(
        "POST",
        LOYALTY,
        200,
        {"uid": UID, "srcID": "1", "smsOptIn": False, "mobilePhone": "5551230000"},
        clock.now,
        {"success": True, "data": {"contactID": contact_id, "created": True}},
    )
    assert [(c.method, c.status) for c in calls] == [("POST", 200), ("GET", 200), ("POST", 200)]
    assert fake.calls_to("/api/v2/persona") == [calls[1]]
    fake.reset()
    assert fake.calls == fake.texted == []
    assert fake.consent_log == []
    assert fake.personas == {}
    assert fake.sms_opted_out_numbers == set()
    # scripted failures are gone; ids start again from the seed
    assert contact_id_of(upsert(fake, srcID="9")) == contact_id
    assert fake.consent(contact_id) == {"email": None, "sms": None}


# ---- nightly merge -----------------------------------------------------------------------------


def test_nightly_merge_joins_personas_sharing_a_phone(fake: AlpineIQFake, clock: HandClock) -> None:
    oldest = contact_id_of(upsert(fake, srcID="mom", email="mom@example.com", tags=["a"]))
    clock.now += 1
    kid = contact_id_of(
        upsert(
            fake,
            srcID="kid",
            email="kid@example.com",
            firstName="Kid",
            tags=["b"],
            customAttributes={"x": 1},
            emailOptIn=False,
        )
    )
    clock.now += 1
    alone = contact_id_of(upsert(fake, srcID="alone", mobilePhone="5559999999"))
    # Both get the family phone through their own contact id (matching by phone would have
    # found the first one): two personas now share it.
    upsert(fake, contactID=kid, mobilePhone="5551112222")
    upsert(fake, contactID=oldest, mobilePhone="+15551112222", emailOptIn=True)
    assert fake.run_nightly_merge() == {oldest: [kid]}
    personas = fake.personas
    assert set(personas) == {oldest, alone}
    survivor = personas[oldest]
    assert survivor["srcID"] == "mom"
    assert survivor["email"] == "mom@example.com"
    assert survivor["firstName"] == "Kid"  # a gap filled from the absorbed persona
    assert survivor["tags"] == ["a", "b"]
    assert survivor["customAttributes"] == {"x": 1}
    assert survivor["merged_from"] == [kid]
    assert fake.consent(oldest)["email"] is False  # an opt-out survives the merge
    assert "merged into" in error_of(
        request(fake, "GET", f"/api/v2/persona/{kid}"), 404, "not_found"
    )
    error_of(upsert(fake, contactID=kid, srcID="kid"), 404, "not_found")
    assert fake.run_nightly_merge() == {}


# ---- process mode ------------------------------------------------------------------------------


def test_process_mode_serves_and_exits_cleanly_on_sigterm() -> None:
    command = [sys.executable, "-m", "tests.fakes.alpineiq", "--port", "0", "--no-rate-limit"]
    command += ["--api-key", "k9", "--uid", "42"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            port = listening_port(process)
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, headers={"X-APIKEY": "k9"}, timeout=5.0) as client:
                statuses = [
                    client.post(LOYALTY, json={"uid": "42", "srcID": "1"}).status_code
                    for _ in range(25)
                ]
                assert statuses == [200] * 25
                assert client.post(LOYALTY, json={"uid": UID, "srcID": "1"}).status_code == 403
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20.0)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr
