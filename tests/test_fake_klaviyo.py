"""The fake of Klaviyo's profiles API (tests/fakes/klaviyo.py) behaves as Klaviyo documents,
driven in-process through ``httpx.ASGITransport`` with a hand-driven clock.

Request bodies sent here and the fake's success answers are checked against the schemas of
Klaviyo's OpenAPI document (``shared/vendor-specs/klaviyo/profiles.openapi.json``) by a small
validator below (jsonschema is not installed): ``$ref``, ``allOf``/``oneOf``, ``type``,
``nullable``, ``enum``, ``required``, ``properties``, ``items``, date-time and uri formats.
Success answers are validated *closed*: a property the schema does not name is an error, so the
fake cannot invent fields.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes._serve import listening_port
from fakes.clock import HandClock
from fakes.klaviyo import MAX_BULK_BYTES, RATE_LIMITS, KlaviyoFake, RateLimit, serve

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "tests" / "data" / "vendor-specs" / "klaviyo" / "profiles.openapi.json"
BASE = "https://a.klaviyo.com"
JSONAPI = "application/vnd.api+json"
KEY = "pk_test_fake"
HEADERS = {
    "Authorization": f"Klaviyo-API-Key {KEY}",
    "revision": "2026-07-15",
    "Accept": JSONAPI,
    "Content-Type": JSONAPI,
}
CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")

Client = httpx.AsyncClient
Scenario = Callable[[Client], Awaitable[None]]


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


@pytest.fixture
def fake(clock: HandClock) -> KlaviyoFake:
    return KlaviyoFake(clock=clock, seed=7)


def run(fake: KlaviyoFake, scenario: Scenario, headers: dict[str, str] | None = None) -> None:
    async def drive() -> None:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(
            transport=transport, base_url=BASE, headers=HEADERS if headers is None else headers
        ) as client:
            await scenario(client)

    asyncio.run(drive())


async def post(client: Client, path: str, body: Any, **headers: str) -> httpx.Response:
    return await client.post(path, content=json.dumps(body), headers=headers)


def profile(id: str | None = None, **attributes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "profile", "attributes": attributes}
    if id is not None:
        data["id"] = id
    return {"data": data}


def consent_job(kind: str, consent: str, *profiles: dict[str, Any]) -> dict[str, Any]:
    """A subscription job body; each profile is ``{"email"?, "phone_number"?}`` and gets the
    marketing channel of each identifier it has."""
    items = []
    for attrs in profiles:
        subscriptions: dict[str, Any] = {}
        if "email" in attrs:
            subscriptions["email"] = {"marketing": {"consent": consent}}
        if "phone_number" in attrs:
            subscriptions["sms"] = {"marketing": {"consent": consent}}
        items.append({"type": "profile", "attributes": {**attrs, "subscriptions": subscriptions}})
    return {
        "data": {
            "type": f"profile-subscription-bulk-{kind}-job",
            "attributes": {"profiles": {"data": items}},
        }
    }


def unsubscribe(*profiles: dict[str, Any]) -> dict[str, Any]:
    return consent_job("delete", "UNSUBSCRIBED", *profiles)


def subscribe(*profiles: dict[str, Any]) -> dict[str, Any]:
    return consent_job("create", "SUBSCRIBED", *profiles)


def bulk_job(*profiles: dict[str, Any]) -> dict[str, Any]:
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": [p["data"] for p in profiles]}},
        }
    }


def merge(destination: str, *sources: str) -> dict[str, Any]:
    return {
        "data": {
            "type": "profile-merge",
            "id": destination,
            "relationships": {
                "profiles": {"data": [{"type": "profile", "id": s} for s in sources]}
            },
        }
    }


def the_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The single JSON:API error object of an error answer, its common shape checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == JSONAPI
    errors: list[dict[str, Any]] = response.json()["errors"]
    assert len(errors) == 1
    error = errors[0]
    uuid.UUID(error["id"])
    assert error["status"] == status
    assert error["code"] == code
    assert isinstance(error["title"], str)
    assert error["title"]
    assert isinstance(error["detail"], str)
    assert error["detail"]
    assert isinstance(error["source"], dict)
    return error


# ---- a small OpenAPI schema validator ----------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


class Spec:
    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.document
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def _flatten(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` resolved, its ``allOf`` members merged into one schema (properties both
        name become an ``allOf`` of the two), so that a closed check sees every name."""
        nullable = schema.get("nullable", False)
        schema = self._resolve(schema)
        if "allOf" not in schema:
            return {**schema, "nullable": True} if nullable else schema
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        properties: dict[str, Any] = dict(merged.get("properties", {}))
        for part in map(self._flatten, schema["allOf"]):
            for name, sub in part.get("properties", {}).items():
                properties[name] = {"allOf": [properties[name], sub]} if name in properties else sub
            merged["required"] = [*merged.get("required", []), *part.get("required", [])]
            for key, value in part.items():
                if key not in ("properties", "required"):
                    merged.setdefault(key, value)
        merged["properties"] = properties
        return merged

    def errors(self, value: Any, schema: dict[str, Any], path: str, closed: bool) -> list[str]:
        schema = self._flatten(schema)
        if value is None and schema.get("nullable"):
            return []
        out: list[str] = []
        if "oneOf" in schema:
            matching = [s for s in schema["oneOf"] if not self.errors(value, s, path, closed)]
            if len(matching) != 1:
                out.append(f"{path}: matches {len(matching)} schemas of oneOf")
        kind = schema.get("type")
        if kind is not None and not _TYPES[kind](value):
            return [*out, f"{path}: expected {kind}, got {value!r:.60}"]
        if "enum" in schema and value not in schema["enum"]:
            out.append(f"{path}: {value!r} not in {schema['enum']}")
        if isinstance(value, dict):
            for name in schema.get("required", []):
                if name not in value:
                    out.append(f"{path}: missing required {name!r}")
            properties = schema.get("properties")
            for name, item in value.items():
                if properties and name in properties:
                    out += self.errors(item, properties[name], f"{path}.{name}", closed)
            if closed and properties is not None and (extra := set(value) - set(properties)):
                out.append(f"{path}: properties not in the schema: {sorted(extra)}")
        if isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                out += self.errors(item, schema["items"], f"{path}[{index}]", closed)
        if isinstance(value, str) and schema.get("format") == "date-time":
            try:
                dt.datetime.fromisoformat(value)
            except ValueError:
                out.append(f"{path}: {value!r} is not a date-time")
        uri = isinstance(value, str) and schema.get("format") == "uri"
        if uri and not str(value).startswith(("http://", "https://")):
            out.append(f"{path}: {value!r} is not a uri")
        return out

    def check(self, value: Any, name: str, *, closed: bool = False) -> None:
        """Fail unless ``value`` validates against ``#/components/schemas/<name>``."""
        ref = {"$ref": f"#/components/schemas/{name}"}
        problems = self.errors(value, ref, "$", closed)
        assert not problems, f"{name}: {problems[:5]}"

    def check_error(self, value: Any) -> None:
        schema = self.document["components"]["responses"]["ClientError"]["content"][JSONAPI]
        problems = self.errors(value, schema["schema"], "$", False)
        assert not problems, problems[:5]


@pytest.fixture(scope="module")
def spec() -> Spec:
    if not SPEC_PATH.exists():
        pytest.fail(f"Klaviyo's OpenAPI document is not at {SPEC_PATH}")
    return Spec(json.loads(SPEC_PATH.read_text(encoding="utf-8")))


def test_the_validator_rejects_wrong_shapes(spec: Spec) -> None:
    with pytest.raises(AssertionError, match="not in"):
        spec.check({"data": {"type": "person", "attributes": {}}}, "ProfileUpsertQuery")
    with pytest.raises(AssertionError, match="missing required 'attributes'"):
        spec.check({"data": {"type": "profile"}}, "ProfileUpsertQuery")
    with pytest.raises(AssertionError, match="expected string"):
        spec.check(profile(email=5), "ProfileUpsertQuery")
    with pytest.raises(AssertionError, match="not in the schema"):
        spec.check(
            {"data": {"type": "profile", "id": "x", "links": {"self": "https://x"}, "surprise": 1}},
            "PostProfileMergeResponse",
            closed=True,
        )
    spec.check(profile(email="a@b.co", location={"latitude": 1.5}), "ProfileUpsertQuery")


def test_the_request_bodies_of_these_tests_follow_the_spec(spec: Spec) -> None:
    spec.check(profile(email="a@b.co", location={"city": "Denver"}), "ProfileUpsertQuery")
    spec.check(profile(id="01GDDKASAP8TKDDA2GRZDSVP4H", first_name="A"), "ProfileUpsertQuery")
    spec.check(merge("01A", "01B"), "ProfileMergeQuery")
    both = {"email": "a@b.co", "phone_number": "+13035550101"}
    spec.check(subscribe(both), "SubscriptionCreateJobCreateQuery")
    spec.check(unsubscribe(both), "SubscriptionDeleteJobCreateQuery")
    spec.check(bulk_job(profile(email="a@b.co")), "ProfileImportJobCreateQuery")


# ---- defaults ----------------------------------------------------------------------------------


def test_defaults_follow_the_documented_limits() -> None:
    fake = KlaviyoFake()
    assert fake.api_key == "pk_test_fake"
    assert fake.rate_limits is True
    assert fake.job_polls_until_complete == 2
    assert fake.max_bulk_profiles == 10_000
    assert fake.max_bulk_bytes == MAX_BULK_BYTES == 5 * 1024 * 1024
    assert fake.max_unsubscribe_profiles == 100
    assert fake.max_subscribe_profiles == 1_000
    assert RATE_LIMITS["profile-import"] == RateLimit(75, 750)
    assert RATE_LIMITS["profile-merge"] == RateLimit(10, 150)
    assert RATE_LIMITS["bulk-import"] == RateLimit(10, 150)
    with pytest.raises(ValueError, match="unknown endpoints"):
        KlaviyoFake(limits={"profiles": RateLimit(1, 1)})


def test_the_spec_operations_state_the_rate_limits_the_fake_uses(spec: Spec) -> None:
    operations = {
        ("/api/profile-import", "post"): "profile-import",
        ("/api/profiles/{id}", "get"): "get-profile",
        ("/api/profile-merge", "post"): "profile-merge",
        ("/api/profile-subscription-bulk-create-jobs", "post"): "subscribe",
        ("/api/profile-subscription-bulk-delete-jobs", "post"): "unsubscribe",
        ("/api/profile-bulk-import-jobs", "post"): "bulk-import",
        ("/api/profile-bulk-import-jobs/{job_id}", "get"): "get-bulk-import-job",
        ("/api/profile-bulk-import-jobs/{id}/import-errors", "get"): "get-import-errors",
    }
    for (path, method), name in operations.items():
        stated = spec.document["paths"][path][method]["x-klaviyo-ratelimit"]
        limit = RATE_LIMITS[name]
        assert stated == {"burst": f"{limit.burst}/s", "steady": f"{limit.steady}/m"}, path


# ---- authentication, revision, media type, routing ---------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "not_authenticated"),
        ("Bearer pk_test_fake", "not_authenticated"),
        ("Klaviyo-API-Key", "not_authenticated"),
        ("Klaviyo-API-Key pk_live_other", "authentication_failed"),
    ],
)
def test_401_without_the_right_api_key(
    fake: KlaviyoFake, spec: Spec, authorization: str | None, code: str
) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "Authorization"}
    if authorization is not None:
        headers["Authorization"] = authorization

    async def scenario(client: Client) -> None:
        response = await post(client, "/api/profile-import", profile(email="a@b.co"))
        error = the_error(response, 401, code)
        assert error["source"] == {"pointer": "/data/"}
        spec.check_error(response.json())
        assert (await client.get("/api/profiles/01X")).status_code == 401

    run(fake, scenario, headers)
    assert fake.profiles == {}
    assert fake.statuses() == [401, 401]
    assert all("authorization" not in call.headers for call in fake.calls)


@pytest.mark.parametrize(
    "revision",
    [None, "", "2026-07-16", "2027-01-15", "2022-12-31", "2026-13-01", "15-07-2026", "latest"],
)
def test_400_invalid_revision(fake: KlaviyoFake, revision: str | None) -> None:
    headers = {k: v for k, v in HEADERS.items() if k != "revision"}
    if revision is not None:
        headers["revision"] = revision

    async def scenario(client: Client) -> None:
        response = await post(client, "/api/profile-import", profile(email="a@b.co"))
        error = the_error(response, 400, "invalid_revision")
        assert error["source"] == {"parameter": "revision"}

    run(fake, scenario, headers)
    assert fake.profiles == {}


@pytest.mark.parametrize("revision", ["2026-07-15", "2023-01-01", "2024-10-15", "2025-04-15.pre"])
def test_accepted_revisions(fake: KlaviyoFake, revision: str) -> None:
    async def scenario(client: Client) -> None:
        response = await post(
            client, "/api/profile-import", profile(email="a@b.co"), revision=revision
        )
        assert response.status_code == 201

    run(fake, scenario)
    assert fake.calls[0].headers["revision"] == revision


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_415_unless_the_body_is_json(fake: KlaviyoFake, content_type: str) -> None:
    async def scenario(client: Client) -> None:
        response = await client.post(
            "/api/profile-import",
            content=json.dumps(profile(email="a@b.co")),
            headers={"Content-Type": content_type},
        )
        the_error(response, 415, "unsupported_media_type")

    run(fake, scenario)


def test_plain_json_and_parameters_are_accepted_and_bad_json_is_400(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        response = await post(
            client,
            "/api/profile-import",
            profile(email="a@b.co"),
            **{"Content-Type": "application/json; charset=utf-8"},
        )
        assert response.status_code == 201
        broken = await client.post("/api/profile-import", content=b'{"data": ')
        the_error(broken, 400, "parse_error")

    run(fake, scenario)


def test_routing_trailing_slash_404_and_405(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        created = await post(client, "/api/profile-import/", profile(email="a@b.co"))
        assert created.status_code == 201
        profile_id = created.json()["data"]["id"]
        assert (await client.get(f"/api/profiles/{profile_id}/")).status_code == 200
        the_error(await client.get("/api/nothing-here"), 404, "not_found")
        wrong = await client.get("/api/profile-import")
        the_error(wrong, 405, "method_not_allowed")
        assert wrong.headers["allow"] == "POST"

    run(fake, scenario)
    assert [c.path for c in fake.calls][:2] == [
        "/api/profile-import",
        "/api/profiles/" + next(iter(fake.profiles)),
    ]


# ---- profile-import ----------------------------------------------------------------------------


def test_create_201_then_update_200(fake: KlaviyoFake, spec: Spec) -> None:
    first = profile(
        email="Ana@Example.com",
        phone_number="+13035550101",
        external_id="treez-1",
        first_name="Ana",
        last_name="Diaz",
        location={"city": "Denver", "region": "CO", "zip": "80202"},
        properties={"loyalty_points": 10, "store": "denver"},
    )
    second = profile(
        email="ana@example.com",  # matched case-insensitively
        first_name="Anna",
        last_name=None,  # null clears the field
        location={"zip": "80203"},
        properties={"loyalty_points": 12},
    )
    spec.check(first, "ProfileUpsertQuery")
    spec.check(second, "ProfileUpsertQuery")

    async def scenario(client: Client) -> None:
        created = await post(client, "/api/profile-import", first)
        assert created.status_code == 201
        assert created.headers["content-type"] == JSONAPI
        spec.check(created.json(), "PostProfileResponse", closed=True)
        data = created.json()["data"]
        profile_id = data["id"]
        assert len(profile_id) == 26
        assert set(profile_id) <= CROCKFORD
        assert data["links"]["self"] == f"{BASE}/api/profiles/{profile_id}/"
        assert data["attributes"]["email"] == "Ana@Example.com"
        assert data["attributes"]["location"]["city"] == "Denver"

        updated = await post(client, "/api/profile-import", second)
        assert updated.status_code == 200
        spec.check(updated.json(), "PostProfileResponse", closed=True)
        attributes = updated.json()["data"]["attributes"]
        assert updated.json()["data"]["id"] == profile_id
        assert attributes["email"] == "ana@example.com"
        assert attributes["first_name"] == "Anna"
        assert attributes["last_name"] is None
        assert attributes["phone_number"] == "+13035550101"  # absent: unchanged
        assert attributes["external_id"] == "treez-1"
        assert attributes["location"]["city"] == "Denver"
        assert attributes["location"]["zip"] == "80203"
        assert attributes["properties"] == {"loyalty_points": 12, "store": "denver"}

        got = await client.get(f"/api/profiles/{profile_id}")
        assert got.status_code == 200
        spec.check(got.json(), "GetProfileResponsePluralConversationsCompoundDocument", closed=True)
        assert got.json()["data"]["attributes"] == attributes

        missing = await client.get("/api/profiles/01GDDKASAP8TKDDA2GRZDSVP4H")
        the_error(missing, 404, "not_found")
        spec.check_error(missing.json())

    run(fake, scenario)
    [stored] = fake.profiles.values()
    assert fake.profile_by_email("ANA@example.com") is stored
    assert fake.profile_by_phone("+13035550101") is stored
    assert fake.profile_by_external_id("treez-1") is stored
    assert fake.consent(stored.id) == {"email": "NEVER_SUBSCRIBED", "sms": "NEVER_SUBSCRIBED"}


def test_subscriptions_are_answered_on_request(fake: KlaviyoFake, spec: Spec) -> None:
    async def scenario(client: Client) -> None:
        created = await post(
            client,
            "/api/profile-import?additional-fields[profile]=subscriptions",
            profile(email="a@b.co", phone_number="+13035550101"),
        )
        spec.check(created.json(), "PostProfileResponse", closed=True)
        marketing = created.json()["data"]["attributes"]["subscriptions"]["email"]["marketing"]
        assert marketing["consent"] == "NEVER_SUBSCRIBED"
        assert marketing["can_receive_email_marketing"] is False
        plain = await client.get(f"/api/profiles/{created.json()['data']['id']}")
        assert "subscriptions" not in plain.json()["data"]["attributes"]

    run(fake, scenario)


def test_patch_properties_append_unappend_unset(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        body = profile(email="a@b.co", properties={"tags": ["vip"], "old": 1, "keep": 2})
        await post(client, "/api/profile-import", body)
        patch = profile(email="a@b.co")
        patch["data"]["meta"] = {
            "patch_properties": {"append": {"tags": "edibles"}, "unset": ["old"]}
        }
        await post(client, "/api/profile-import", patch)
        patch["data"]["meta"] = {"patch_properties": {"unappend": {"tags": "vip"}}}
        answer = await post(client, "/api/profile-import", patch)
        assert answer.json()["data"]["attributes"]["properties"] == {"tags": ["edibles"], "keep": 2}

    run(fake, scenario)


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        ({}, "/data"),
        ({"data": {"type": "person", "attributes": {"email": "a@b.co"}}}, "/data/type"),
        ({"data": {"type": "profile"}}, "/data/attributes"),
        (profile(first_name="Nobody"), "/data/attributes"),
        (profile(email=None, phone_number=None), "/data/attributes"),
        (profile(email="not-an-email"), "/data/attributes/email"),
        (profile(phone_number="3035550101"), "/data/attributes/phone_number"),
        (profile(phone_number="+1303"), "/data/attributes/phone_number"),
        (profile(phone_number="+1 303 555 0101"), "/data/attributes/phone_number"),
        (profile(email="a@b.co", phone="+13035550101"), "/data/attributes/phone"),
        (profile(email="a@b.co", location={"town": "x"}), "/data/attributes/location/town"),
        (profile(email="a@b.co", properties=[1]), "/data/attributes/properties"),
    ],
)
def test_400_for_invalid_profiles_names_the_source(
    fake: KlaviyoFake, spec: Spec, body: dict[str, Any], pointer: str
) -> None:
    async def scenario(client: Client) -> None:
        response = await post(client, "/api/profile-import", body)
        error = the_error(response, 400, "invalid")
        assert error["source"] == {"pointer": pointer}
        spec.check_error(response.json())

    run(fake, scenario)
    assert fake.profiles == {}


def test_413_for_a_profile_import_over_100_kb(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        big = profile(email="a@b.co", properties={"notes": "x" * 110_000})
        the_error(await post(client, "/api/profile-import", big), 413, "payload_too_large")

    run(fake, scenario)


async def create(client: Client, **attributes: Any) -> str:
    response = await post(client, "/api/profile-import", profile(**attributes))
    assert response.status_code == 201, response.text
    profile_id: str = response.json()["data"]["id"]
    return profile_id


def test_409_duplicate_profile_when_identifiers_belong_to_different_profiles(
    fake: KlaviyoFake, spec: Spec
) -> None:
    async def scenario(client: Client) -> None:
        by_email = await create(client, email="a@b.co")
        by_phone = await create(client, phone_number="+13035550101")
        by_external = await create(client, external_id="treez-9")
        before = {p.id: dict(p.attributes) for p in fake.profiles.values()}

        both = profile(email="a@b.co", phone_number="+13035550101", first_name="X")
        response = await post(client, "/api/profile-import", both)
        error = the_error(response, 409, "duplicate_profile")
        spec.check_error(response.json())
        assert error["title"] == "Conflict."
        assert error["detail"] == "A profile already exists with one of these identifiers."
        assert error["source"] == {"pointer": "/data/attributes"}
        assert error["meta"] == {"duplicate_profile_id": by_email}

        phone_and_external = profile(phone_number="+13035550101", external_id="treez-9")
        response = await post(client, "/api/profile-import", phone_and_external)
        error = the_error(response, 409, "duplicate_profile")
        assert error["meta"] == {"duplicate_profile_id": by_phone}

        all_three = profile(email="a@b.co", phone_number="+13035550101", external_id="treez-9")
        error = the_error(
            await post(client, "/api/profile-import", all_three), 409, "duplicate_profile"
        )
        assert error["meta"]["duplicate_profile_id"] == by_email
        assert {p.id: dict(p.attributes) for p in fake.profiles.values()} == before
        assert by_external in before

    run(fake, scenario)


def test_409_when_the_matched_profile_has_another_external_id(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        owner = await create(client, email="a@b.co", external_id="treez-1")
        other = profile(email="a@b.co", external_id="treez-2")
        error = the_error(
            await post(client, "/api/profile-import", other), 409, "duplicate_profile"
        )
        assert error["meta"] == {"duplicate_profile_id": owner}
        phone_owner = await create(client, phone_number="+13035550101", external_id="treez-3")
        other = profile(phone_number="+13035550101", external_id="treez-4")
        error = the_error(
            await post(client, "/api/profile-import", other), 409, "duplicate_profile"
        )
        assert error["meta"] == {"duplicate_profile_id": phone_owner}

        same = profile(email="a@b.co", external_id="treez-1", first_name="A")
        assert (await post(client, "/api/profile-import", same)).status_code == 200
        without = profile(email="a@b.co", first_name="B")
        assert (await post(client, "/api/profile-import", without)).status_code == 200
        unkeyed = await create(client, email="c@d.co")
        keyed = await post(client, "/api/profile-import", profile(email="c@d.co", external_id="t5"))
        assert keyed.status_code == 200
        assert keyed.json()["data"]["id"] == unkeyed

    run(fake, scenario)
    assert fake.profile_by_external_id("treez-2") is None
    assert fake.profile_by_external_id("t5") is not None


def test_import_by_id(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        unknown = profile(id="01GDDKASAP8TKDDA2GRZDSVP4H", first_name="A")
        error = the_error(await post(client, "/api/profile-import", unknown), 404, "not_found")
        assert error["source"] == {"pointer": "/data/id"}
        first = await create(client, email="a@b.co")
        second = await create(client, email="c@d.co")
        taken = profile(id=first, email="c@d.co")
        error = the_error(
            await post(client, "/api/profile-import", taken), 409, "duplicate_profile"
        )
        assert error["meta"] == {"duplicate_profile_id": second}
        # The adapter's answer to a 409: update the duplicate by id, without identifiers.
        by_id = profile(id=second, first_name="Cy", properties={"treez_id_store": "7"})
        answer = await post(client, "/api/profile-import", by_id)
        assert answer.status_code == 200
        assert answer.json()["data"]["attributes"]["email"] == "c@d.co"
        moved = await post(client, "/api/profile-import", profile(id=first, email="new@b.co"))
        assert moved.status_code == 200

    run(fake, scenario)
    assert fake.profile_by_email("a@b.co") is None
    assert fake.profile_by_email("new@b.co") is not None


def test_a_deleted_profile_answers_404_everywhere_and_frees_its_identifiers(
    fake: KlaviyoFake,
) -> None:
    async def scenario(client: Client) -> None:
        gone = await create(client, email="a@b.co", phone_number="+13035550101")
        keep = await create(client, email="c@d.co")
        fake.delete_profile(gone)
        the_error(await client.get(f"/api/profiles/{gone}"), 404, "not_found")
        by_id = profile(id=gone, first_name="A")
        error = the_error(await post(client, "/api/profile-import", by_id), 404, "not_found")
        assert error["source"] == {"pointer": "/data/id"}
        the_error(await post(client, "/api/profile-merge", merge(keep, gone)), 404, "not_found")
        again = await post(client, "/api/profile-import", profile(email="a@b.co"))
        assert again.status_code == 201  # the e-mail is free: a new profile
        assert again.json()["data"]["id"] not in (gone, keep)

    run(fake, scenario)
    assert fake.profile_by_phone("+13035550101") is None


def test_a_subscription_job_changes_the_profile_holding_each_identifier(
    fake: KlaviyoFake,
) -> None:
    """The jobs take e-mail and phone, not ids: whoever holds them is changed."""

    async def scenario(client: Client) -> None:
        mia = await create(client, email="mia@b.co", phone_number="+13035550101")
        jules = await create(client, email="jules@b.co")
        await post(
            client,
            "/api/profile-subscription-bulk-delete-jobs",
            unsubscribe({"email": "jules@b.co"}),
        )
        assert fake.consent(jules) == {"email": "UNSUBSCRIBED", "sms": "NEVER_SUBSCRIBED"}
        assert fake.consent(mia) == {"email": "NEVER_SUBSCRIBED", "sms": "NEVER_SUBSCRIBED"}

    run(fake, scenario)


# ---- profile-merge -----------------------------------------------------------------------------


def test_merge_moves_missing_data_into_the_destination_and_deletes_the_source(
    fake: KlaviyoFake, clock: HandClock, spec: Spec
) -> None:
    async def scenario(client: Client) -> None:
        keep = await create(
            client, email="a@b.co", first_name="Ana", properties={"store": "denver", "n": 1}
        )
        gone = await create(
            client,
            phone_number="+13035550101",
            first_name="Anita",
            last_name="Diaz",
            location={"city": "Boulder"},
            properties={"store": "boulder", "points": 5},
        )
        await post(
            client,
            "/api/profile-subscription-bulk-delete-jobs",
            unsubscribe({"phone_number": "+13035550101"}),
        )
        body = merge(keep, gone)
        spec.check(body, "ProfileMergeQuery")
        response = await post(client, "/api/profile-merge", body)
        assert response.status_code == 201
        spec.check(response.json(), "PostProfileMergeResponse", closed=True)
        assert response.json()["data"]["id"] == keep
        the_error(await client.get(f"/api/profiles/{gone}"), 404, "not_found")
        attributes = (await client.get(f"/api/profiles/{keep}")).json()["data"]["attributes"]
        assert attributes["first_name"] == "Ana"
        assert attributes["last_name"] == "Diaz"
        assert attributes["phone_number"] == "+13035550101"
        assert attributes["location"]["city"] == "Boulder"
        assert attributes["properties"] == {"store": "denver", "n": 1, "points": 5}

    run(fake, scenario)
    assert set(fake.profiles) == {m.destination for m in fake.merges}
    [done] = fake.merges
    assert done.at == clock.now
    assert fake.profile_by_phone("+13035550101") is fake.profile(done.destination)
    assert fake.consent(done.destination)["sms"] == "UNSUBSCRIBED"  # consent follows the phone


def test_merge_errors(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        a = await create(client, email="a@b.co")
        b = await create(client, email="c@d.co")
        c = await create(client, email="e@f.co")
        error = the_error(await post(client, "/api/profile-merge", merge(a, a)), 400, "invalid")
        assert error["source"]["pointer"] == "/data/relationships/profiles/data/0/id"
        the_error(await post(client, "/api/profile-merge", merge(a, b, c)), 400, "invalid")
        the_error(await post(client, "/api/profile-merge", merge(a)), 400, "invalid")
        unknown = "01GDDKASAP8TKDDA2GRZDSVP4H"
        error = the_error(
            await post(client, "/api/profile-merge", merge(a, unknown)), 404, "not_found"
        )
        assert error["source"]["pointer"] == "/data/relationships/profiles/data/0/id"
        error = the_error(
            await post(client, "/api/profile-merge", merge(unknown, a)), 404, "not_found"
        )
        assert error["source"]["pointer"] == "/data/id"
        wrong = merge(a, b)
        wrong["data"]["type"] = "profile"
        the_error(await post(client, "/api/profile-merge", wrong), 400, "invalid")

    run(fake, scenario)
    assert len(fake.profiles) == 3
    assert fake.merges == []


# ---- subscriptions -----------------------------------------------------------------------------


def test_unsubscribe_then_subscribe_lifts_the_suppression_and_is_recorded(
    fake: KlaviyoFake, clock: HandClock
) -> None:
    both = {"email": "a@b.co", "phone_number": "+13035550101"}

    async def scenario(client: Client) -> None:
        profile_id = await create(client, **both)
        response = await post(
            client, "/api/profile-subscription-bulk-delete-jobs", unsubscribe(both)
        )
        assert response.status_code == 202
        assert response.content == b""
        assert fake.consent(profile_id) == {"email": "UNSUBSCRIBED", "sms": "UNSUBSCRIBED"}
        assert fake.suppressions(profile_id) == ["UNSUBSCRIBE"]
        assert fake.resubscriptions() == []
        got = await client.get(
            f"/api/profiles/{profile_id}", params={"additional-fields[profile]": "subscriptions"}
        )
        marketing = got.json()["data"]["attributes"]["subscriptions"]["email"]["marketing"]
        assert marketing["suppression"][0]["reason"] == "UNSUBSCRIBE"
        assert marketing["can_receive_email_marketing"] is False

        clock.advance(5)
        response = await post(
            client, "/api/profile-subscription-bulk-create-jobs", subscribe({"email": "a@b.co"})
        )
        assert response.status_code == 202
        assert fake.consent(profile_id) == {"email": "SUBSCRIBED", "sms": "UNSUBSCRIBED"}
        assert fake.suppressions(profile_id) == []  # the pitfall: subscribe lifts it

    run(fake, scenario)
    [change] = fake.subscribes
    assert (change.channel, change.previous, change.was_suppressed) == (
        "email",
        "UNSUBSCRIBED",
        True,
    )
    assert change.reopted
    assert fake.resubscriptions() == [change]
    assert change.at == clock.now
    assert [(c.channel, c.consent) for c in fake.unsubscribes] == [
        ("email", "UNSUBSCRIBED"),
        ("sms", "UNSUBSCRIBED"),
    ]


def test_subscribe_keeps_a_bounce_and_creates_unknown_profiles(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        profile_id = await create(client, email="a@b.co")
        fake.suppress(profile_id, "HARD_BOUNCE")
        job = subscribe({"email": "a@b.co"}, {"email": "new@b.co", "phone_number": "+13035550199"})
        job["data"]["relationships"] = {"list": {"data": {"type": "list", "id": "Ab12Cd"}}}
        assert (
            await post(client, "/api/profile-subscription-bulk-create-jobs", job)
        ).status_code == 202
        assert fake.suppressions(profile_id) == ["HARD_BOUNCE"]

    run(fake, scenario)
    new = fake.profile_by_email("new@b.co")
    assert new is not None
    assert new.phone_number == "+13035550199"
    assert fake.consent(new.id) == {"email": "SUBSCRIBED", "sms": "SUBSCRIBED"}
    assert {c.list_id for c in fake.subscribes} == {"Ab12Cd"}
    assert [c.reopted for c in fake.subscribes] == [True, False, False]  # the bounce was there


def test_unsubscribing_an_unknown_contact(clock: HandClock) -> None:
    """The spec: "a new profile will be created and then unsubscribed"; optionally ignored."""
    body = unsubscribe({"email": "ghost@b.co"})

    async def scenario(client: Client) -> None:
        response = await post(client, "/api/profile-subscription-bulk-delete-jobs", body)
        assert response.status_code == 202

    creating = KlaviyoFake(clock=clock)
    run(creating, scenario)
    ghost = creating.profile_by_email("ghost@b.co")
    assert ghost is not None
    assert creating.consent(ghost.id)["email"] == "UNSUBSCRIBED"
    ignoring = KlaviyoFake(clock=clock, unsubscribe_creates_profiles=False)
    run(ignoring, scenario)
    assert ignoring.profiles == {}
    assert ignoring.unsubscribes == []


def test_subscription_job_limits_and_validation(fake: KlaviyoFake) -> None:
    path = "/api/profile-subscription-bulk-delete-jobs"

    async def scenario(client: Client) -> None:
        hundred = [{"email": f"c{i}@b.co"} for i in range(100)]
        assert (await post(client, path, unsubscribe(*hundred))).status_code == 202
        too_many = unsubscribe(*hundred, {"email": "c100@b.co"})
        error = the_error(await post(client, path, too_many), 400, "invalid")
        assert error["source"] == {"pointer": "/data/attributes/profiles/data"}
        thousand_and_one = subscribe(*({"email": f"s{i}@b.co"} for i in range(1001)))
        response = await post(
            client, "/api/profile-subscription-bulk-create-jobs", thousand_and_one
        )
        the_error(response, 400, "invalid")
        no_email = unsubscribe({"phone_number": "+13035550101"})
        no_email["data"]["attributes"]["profiles"]["data"][0]["attributes"]["subscriptions"] = {
            "email": {"marketing": {"consent": "UNSUBSCRIBED"}}
        }
        error = the_error(await post(client, path, no_email), 400, "invalid")
        assert error["source"] == {"pointer": "/data/attributes/profiles/data/0/attributes/email"}
        wrong_consent = consent_job("delete", "SUBSCRIBED", {"email": "a@b.co"})
        the_error(await post(client, path, wrong_consent), 400, "invalid")
        wrong_type = unsubscribe({"email": "a@b.co"})
        wrong_type["data"]["type"] = "profile-subscription-bulk-create-job"
        the_error(await post(client, path, wrong_type), 400, "invalid")
        bad_phone = unsubscribe({"phone_number": "555-0101"})
        error = the_error(await post(client, path, bad_phone), 400, "invalid")
        assert error["source"]["pointer"].endswith("/attributes/phone_number")

    run(fake, scenario)
    assert len(fake.unsubscribes) == 100
    assert fake.subscribes == []


# ---- bulk import jobs --------------------------------------------------------------------------


def test_bulk_import_job_lifecycle(fake: KlaviyoFake, spec: Spec) -> None:
    async def scenario(client: Client) -> None:
        taken = await create(client, email="a@b.co", external_id="treez-1")
        body = bulk_job(
            profile(email="new@b.co", first_name="New"),
            profile(email="a@b.co", first_name="Updated"),
            profile(email="a@b.co", external_id="treez-2"),  # would be a 409
            profile(phone_number="555"),  # invalid
        )
        body["data"]["relationships"] = {"lists": {"data": [{"type": "list", "id": "Xy12"}]}}
        spec.check(body, "ProfileImportJobCreateQuery")
        created = await post(client, "/api/profile-bulk-import-jobs", body)
        assert created.status_code == 202
        spec.check(created.json(), "PostProfileImportJobResponse", closed=True)
        job = created.json()["data"]
        assert job["attributes"]["status"] == "queued"
        assert job["attributes"]["total_count"] == 4
        assert fake.profile_by_email("new@b.co") is None  # applied when the job completes

        url = f"/api/profile-bulk-import-jobs/{job['id']}"
        seen = []
        for _ in range(4):
            polled = await client.get(url)
            assert polled.status_code == 200
            spec.check(polled.json(), "GetProfileImportJobResponseCompoundDocument", closed=True)
            seen.append(polled.json()["data"]["attributes"])
        assert [s["status"] for s in seen] == ["processing", "processing", "complete", "complete"]
        assert fake.profile_by_email("new@b.co") is not None
        done = seen[-1]
        assert (done["completed_count"], done["failed_count"]) == (2, 2)
        assert done["completed_at"] is not None

        errors = await client.get(f"{url}/import-errors")
        assert errors.status_code == 200
        spec.check(errors.json(), "GetImportErrorResponseCollection", closed=True)
        found = errors.json()["data"]
        assert [e["attributes"]["code"] for e in found] == ["duplicate_profile", "invalid"]
        assert [e["attributes"]["source"]["pointer"] for e in found] == [
            "/data/attributes/profiles/data/2/attributes",
            "/data/attributes/profiles/data/3/attributes/phone_number",
        ]
        assert found[0]["attributes"]["original_payload"]["attributes"]["external_id"] == "treez-2"
        first = await client.get(f"{url}/import-errors", params={"page[size]": "1"})
        assert len(first.json()["data"]) == 1
        assert "next" in first.json()["links"]
        the_error(
            await client.get(f"{url}/import-errors", params={"page[size]": "0"}), 400, "invalid"
        )
        the_error(await client.get("/api/profile-bulk-import-jobs/01NOPE"), 404, "not_found")
        owner = fake.profile(taken)
        assert owner is not None
        assert (owner.attributes["first_name"], owner.external_id) == ("Updated", "treez-1")

    run(fake, scenario)
    [job] = fake.jobs.values()
    assert job.list_ids == ["Xy12"]


def test_job_polls_until_complete_is_configurable_and_jobs_can_be_completed(
    clock: HandClock,
) -> None:
    async def scenario(client: Client) -> None:
        created = await post(
            client, "/api/profile-bulk-import-jobs", bulk_job(profile(email="a@b.co"))
        )
        polled = await client.get(f"/api/profile-bulk-import-jobs/{created.json()['data']['id']}")
        assert polled.json()["data"]["attributes"]["status"] == "complete"

    run(KlaviyoFake(clock=clock, job_polls_until_complete=0), scenario)
    lazy = KlaviyoFake(clock=clock)

    async def no_polling(client: Client) -> None:
        await post(client, "/api/profile-bulk-import-jobs", bulk_job(profile(email="a@b.co")))

    run(lazy, no_polling)
    assert lazy.profile_by_email("a@b.co") is None
    lazy.complete_jobs()
    assert lazy.profile_by_email("a@b.co") is not None


def test_bulk_import_size_limits(fake: KlaviyoFake) -> None:
    fake.max_bulk_profiles = 3  # the default, 10,000, is checked in test_defaults_...

    async def scenario(client: Client) -> None:
        path = "/api/profile-bulk-import-jobs"
        three = [profile(email=f"p{i}@b.co") for i in range(3)]
        assert (await post(client, path, bulk_job(*three))).status_code == 202
        response = await post(client, path, bulk_job(*three, profile(email="p4@b.co")))
        error = the_error(response, 400, "invalid")
        assert error["source"] == {"pointer": "/data/attributes/profiles/data"}
        the_error(await post(client, path, bulk_job()), 400, "invalid")
        fake.max_bulk_bytes = 1_000
        big = bulk_job(profile(email="a@b.co", properties={"notes": "x" * 1_000}))
        the_error(await post(client, path, big), 413, "payload_too_large")

    run(fake, scenario)
    assert len(fake.jobs) == 1


# ---- rate limits -------------------------------------------------------------------------------


def test_the_76th_profile_import_in_a_second_is_throttled(
    fake: KlaviyoFake, clock: HandClock, spec: Spec
) -> None:
    async def scenario(client: Client) -> None:
        clock.advance(0.25)
        answers = []
        for i in range(76):
            answers.append(await post(client, "/api/profile-import", profile(email=f"c{i}@b.co")))
            clock.advance(0.001)
        assert [r.status_code for r in answers[:75]] == [201] * 75
        assert answers[0].headers["ratelimit-limit"] == "750"
        assert answers[0].headers["ratelimit-remaining"] == "749"
        assert answers[74].headers["ratelimit-remaining"] == "675"
        assert 1 <= int(answers[0].headers["ratelimit-reset"]) <= 60
        throttled = answers[75]
        error = the_error(throttled, 429, "throttled")
        spec.check_error(throttled.json())
        retry_after = int(throttled.headers["retry-after"])
        assert retry_after >= 1
        # Klaviyo: the RateLimit-* headers "are not returned when you actually hit a 429".
        assert "ratelimit-limit" not in throttled.headers
        assert "Expected available in 1 second" in error["detail"]
        other = await client.get("/api/profiles/01GDDKASAP8TKDDA2GRZDSVP4H")  # its own limit
        assert other.status_code == 404
        clock.advance(retry_after)
        again = await post(client, "/api/profile-import", profile(email="c75@b.co"))
        assert again.status_code == 201
        assert again.headers["ratelimit-remaining"] == "674"

    run(fake, scenario)
    assert fake.statuses().count(429) == 1
    assert len(fake.profiles) == 76


def test_the_steady_window_retry_after_reaches_the_end_of_the_minute(clock: HandClock) -> None:
    fake = KlaviyoFake(clock=clock, limits={"profile-import": RateLimit(3, 6)})

    async def scenario(client: Client) -> None:
        statuses = []
        for second in range(3):
            for i in range(3 if second < 2 else 1):
                body = profile(email=f"c{second}-{i}@b.co")
                statuses.append((await post(client, "/api/profile-import", body)).status_code)
            clock.advance(1)
        assert statuses == [201] * 6 + [429]
        throttled = fake.calls[-1]
        assert throttled.status == 429
        clock.now = 1200.0 + 2.5
        blocked = await post(client, "/api/profile-import", profile(email="late@b.co"))
        assert blocked.status_code == 429
        assert blocked.headers["retry-after"] == "58"  # ceil(1260 - 1202.5)
        clock.now = 1260.0
        assert (
            await post(client, "/api/profile-import", profile(email="ok@b.co"))
        ).status_code == 201

    run(fake, scenario)


def test_merges_are_limited_to_10_a_second(fake: KlaviyoFake, clock: HandClock) -> None:
    async def scenario(client: Client) -> None:
        unknown = merge("01GDDKASAP8TKDDA2GRZDSVP4H", "01GDDKASAP8TKDDA2GRZDSVP4J")
        statuses = [
            (await post(client, "/api/profile-merge", unknown)).status_code for _ in range(11)
        ]
        assert statuses == [404] * 10 + [429]
        clock.advance(1)
        assert (await post(client, "/api/profile-merge", unknown)).status_code == 404

    run(fake, scenario)


def test_sliding_windows_are_stricter_than_fixed_ones(clock: HandClock) -> None:
    limits = {"get-profile": RateLimit(2, 100)}
    times = [0.0, 0.5, 0.9, 1.05, 1.2, 1.55]

    def statuses(window: Any) -> list[int]:
        fake = KlaviyoFake(clock=clock, limits=limits, rate_window=window)
        got: list[int] = []

        async def scenario(client: Client) -> None:
            for at in times:
                clock.now = 1200.0 + at
                response = await client.get("/api/profiles/01X")
                got.append(response.status_code)
                if response.status_code == 429:
                    assert response.headers["retry-after"] == "1"

        run(fake, scenario)
        return got

    assert statuses("fixed") == [404, 404, 429, 404, 404, 429]
    assert statuses("sliding") == [404, 404, 429, 404, 429, 404]


def test_no_rate_limits_when_disabled(clock: HandClock) -> None:
    fake = KlaviyoFake(clock=clock, rate_limits=False)

    async def scenario(client: Client) -> None:
        for i in range(100):
            response = await post(client, "/api/profile-import", profile(email=f"c{i}@b.co"))
            assert response.status_code == 201
            assert "ratelimit-limit" not in response.headers

    run(fake, scenario)


def test_throttling_comes_after_authentication(fake: KlaviyoFake) -> None:
    async def scenario(client: Client) -> None:
        for _ in range(12):
            await post(client, "/api/profile-merge", merge("01A", "01B"), Authorization="Nope")
        assert (await post(client, "/api/profile-merge", merge("01A", "01B"))).status_code == 404

    run(fake, scenario)


# ---- records -----------------------------------------------------------------------------------


def test_calls_are_recorded_and_reset_forgets_everything(
    fake: KlaviyoFake, clock: HandClock
) -> None:
    async def scenario(client: Client) -> None:
        await post(
            client, "/api/profile-import", profile(email="a@b.co"), **{"Idempotency-Key": "k1"}
        )
        clock.advance(1)
        await client.get("/api/profiles/01X", params={"fields[profile]": "email"})

    run(fake, scenario)
    first, second = fake.calls
    assert (first.method, first.path, first.status) == ("POST", "/api/profile-import", 201)
    assert first.body == profile(email="a@b.co")
    assert first.headers == {
        "revision": "2026-07-15",
        "idempotency-key": "k1",
        "content-type": JSONAPI,
    }
    assert first.response["data"]["attributes"]["email"] == "a@b.co"
    assert (second.method, second.status, second.body, second.at) == ("GET", 404, None, clock.now)
    assert second.query == "fields%5Bprofile%5D=email"
    assert fake.calls_to("/api/profile-import") == [first]
    assert fake.calls_to("/api/profiles/", method="GET") == [second]
    fake.reset()
    assert (fake.calls, fake.profiles, fake.subscribes, fake.jobs) == ([], {}, [], {})


# ---- over real HTTP ----------------------------------------------------------------------------


def test_served_from_a_thread() -> None:
    fake = KlaviyoFake(seed=3)
    with serve(fake) as base_url, httpx.Client(base_url=base_url, headers=HEADERS) as client:
        response = client.post("/api/profile-import", content=json.dumps(profile(email="a@b.co")))
        assert response.status_code == 201
        assert response.json()["data"]["links"]["self"].startswith(base_url)
    assert fake.profile_by_email("a@b.co") is not None


def test_process_mode_prints_listening_and_exits_cleanly_on_sigterm() -> None:
    command = [sys.executable, "-m", "tests.fakes.klaviyo", "--port", "0", "--no-rate-limits"]
    command += ["--api-key", "pk_bench"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            port = listening_port(process)
            headers = {**HEADERS, "Authorization": "Klaviyo-API-Key pk_bench"}
            base_url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base_url, headers=headers, timeout=5.0) as client:
                body = json.dumps(profile(email="a@b.co"))
                assert client.post("/api/profile-import", content=body).status_code == 201
                assert client.post("/api/profile-import", content=body).status_code == 200
                wrong = client.get("/api/profiles/01X", headers={"Authorization": "x"})
                assert wrong.status_code == 401
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20.0)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr
