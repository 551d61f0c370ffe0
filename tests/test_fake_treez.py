"""The fake of Treez's v2 Customer API (tests/fakes/treez_api.py) behaves as
``shared/docs/treez.md`` documents, driven in-process through ``httpx.ASGITransport`` with a
hand-driven clock; one test runs it as a process.

Each documented behaviour has a test: token auth (form fields, the answer's shape, 2-hour
expiry, the 401), the lastUpdated pull (date format, page size limit, pages from 1, short or
empty last page), the lookup by id, the sliding one-second limit of 10 requests per store, and
the generated population (shaped as the seed delivery). Where treez.md is silent the fake's
assumptions (listed in its docstring) are pinned here too, so that changing one is a decision.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import re
import signal
import subprocess
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import phonenumbers
import pytest
from fakes._serve import listening_port
from fakes.clock import HandClock
from fakes.treez_api import (
    CUSTOMER_DOESNT_EXIST,
    CUSTOMER_FIELDS,
    INVALID_CREDENTIALS,
    INVALID_DATE_FORMAT,
    METHOD_NOT_ALLOWED,
    MODEL_VALIDATION_FAIL,
    NEVER_VISITED,
    NOT_FOUND,
    RESPONSE_LIMIT_EXCEEDS,
    TOO_MANY_REQUESTS,
    UNAUTHORIZED,
    PageRequest,
    TreezFake,
    generate_customers,
    parse_timestamp,
    serve,
    to_ms,
)

from connector.treez import parse_customer

ROOT = Path(__file__).resolve().parent.parent
# The seed delivery's last_update, 2026-04-24T11:38:21.000-07:00, is the fake's "now".
START = dt.datetime(2026, 4, 24, 18, 38, 21, tzinfo=dt.UTC)
EPOCH = "2000-01-01T00:00:00.000Z"
FORM = "application/x-www-form-urlencoded"

Client = httpx.AsyncClient
Scenario = Callable[[Client], Awaitable[None]]


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


@pytest.fixture
def fake(clock: HandClock) -> TreezFake:
    return TreezFake.generate(200, seed=7, clock=clock, now=START)


def run(fake: TreezFake, scenario: Scenario) -> None:
    async def drive() -> None:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=fake.base_url) as client:
            await scenario(client)

    asyncio.run(drive())


async def get_token(client: Client, fake: TreezFake, **fields: str) -> httpx.Response:
    form = {"client_id": fake.client_id, "apikey": fake.api_key, **fields}
    return await client.post("/config/api/gettokens", data=form)


async def login(client: Client, fake: TreezFake) -> dict[str, str]:
    """The headers of an authenticated call, as treez.md documents them."""
    response = await get_token(client, fake)
    assert response.status_code == 200, response.text
    return {"authorization": response.json()["access_token"], "client_id": fake.client_id}


def pull_path(after: str, page: int | str, size: int | str, *, encode: bool = True) -> str:
    date = quote(after, safe="") if encode else after
    return f"/customer/lastUpdated/after/{date}/page/{page}/pagesize/{size}"


async def pull(
    client: Client, headers: dict[str, str], after: str, page: int | str, size: int | str = 50
) -> httpx.Response:
    return await client.get(pull_path(after, page, size), headers=headers)


async def pages(
    client: Client,
    headers: dict[str, str],
    *,
    clock: HandClock | None,
    after: str = EPOCH,
    size: int = 50,
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every page from 1 until a short or empty one, as treez.md tells clients to stop; with
    a ``clock``, paced at one request per 0.125 s (8 a second, within the limit)."""
    page = 1
    while True:
        if clock is not None:
            clock.advance(0.125)
        response = await pull(client, headers, after, page, size)
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        yield data
        if len(data) < size:
            return
        page += 1


async def pull_all(
    client: Client,
    headers: dict[str, str],
    *,
    clock: HandClock | None,
    after: str = EPOCH,
    size: int = 50,
) -> list[dict[str, Any]]:
    return [
        customer
        async for page in pages(client, headers, clock=clock, after=after, size=size)
        for customer in page
    ]


def failure(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    """The FAIL envelope of an error answer, its documented shape checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"resultCode", "resultReason", "resultDetail", "data"}
    assert body["resultCode"] == "FAIL"
    assert body["resultReason"] == reason
    assert isinstance(body["resultDetail"], str)
    assert body["data"] is None
    return body


def order_key(customer: dict[str, Any]) -> tuple[int, int]:
    return parse_timestamp(customer["last_update"]), int(customer["customer_id"])


# ---- token -------------------------------------------------------------------------------------


def test_token_answer_has_the_documented_shape(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        response = await get_token(client, fake)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {
            "resultCode",
            "access_token",
            "expires_in",
            "refresh_token",
            "expires_at",
        }
        assert body["resultCode"] == "SUCCESS"
        assert body["expires_in"] == "7200"  # a string, as documented
        assert body["expires_at"] == "2026-04-24T13:38:21.000-0700"  # now + 2 h, store time
        assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", body["access_token"])
        assert body["refresh_token"] != body["access_token"]
        again = await get_token(client, fake)
        assert again.json()["access_token"] != body["access_token"]

    run(fake, scenario)
    assert fake.token_requests == 2
    assert fake.counters["tokens_issued"] == 2


@pytest.mark.parametrize(
    ("fields", "store"),
    [
        ({"client_id": "someone_else"}, None),
        ({"apikey": "wrong"}, None),
        ({}, "another_store"),  # right credentials, another store's url
    ],
)
def test_wrong_credentials_are_a_401(
    fake: TreezFake, fields: dict[str, str], store: str | None
) -> None:
    async def scenario(client: Client) -> None:
        form = {"client_id": fake.client_id, "apikey": fake.api_key, **fields}
        url = "/config/api/gettokens"
        if store is not None:
            url = f"https://api.treez.io/v2.0/dispensary/{store}/config/api/gettokens"
        failure(await client.post(url, data=form), 401, INVALID_CREDENTIALS)

    run(fake, scenario)
    assert fake.token_requests == 1
    assert fake.counters.get("tokens_issued", 0) == 0


def test_token_request_needs_both_form_fields(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        path = "/config/api/gettokens"
        missing = await client.post(path, data={"client_id": fake.client_id})
        assert "apikey" in failure(missing, 400, MODEL_VALIDATION_FAIL)["resultDetail"]
        # The fields are form fields: a JSON body carries none.
        as_json = {"client_id": fake.client_id, "apikey": fake.api_key}
        failure(await client.post(path, json=as_json), 400, MODEL_VALIDATION_FAIL)
        wrong_method = await client.get(path)
        failure(wrong_method, 405, METHOD_NOT_ALLOWED)
        assert wrong_method.headers["allow"] == "POST"

    run(fake, scenario)


def test_tokens_expire_after_two_hours_by_the_clock(fake: TreezFake, clock: HandClock) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        clock.set(7199.999)
        assert (await client.get("/customer/1000", headers=headers)).status_code == 200
        clock.set(7200)
        body = failure(await client.get("/customer/1000", headers=headers), 401, UNAUTHORIZED)
        assert "expired" in body["resultDetail"]
        fresh = await login(client, fake)
        assert (await client.get("/customer/1000", headers=fresh)).status_code == 200

    run(fake, scenario)
    assert fake.token_requests == 2


def test_token_lifetime_is_configurable(clock: HandClock) -> None:
    fake = TreezFake(customers=3, clock=clock, now=START, token_lifetime=60)

    async def scenario(client: Client) -> None:
        response = await get_token(client, fake)
        assert response.json()["expires_in"] == "60"
        assert response.json()["expires_at"] == "2026-04-24T11:39:21.000-0700"
        headers = {"authorization": response.json()["access_token"], "client_id": fake.client_id}
        clock.advance(60)
        failure(await client.get("/customer/1000", headers=headers), 401, UNAUTHORIZED)

    run(fake, scenario)


def test_expire_tokens_forces_reauthentication(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        fake.expire_tokens()
        failure(await client.get("/customer/1000", headers=headers), 401, UNAUTHORIZED)
        assert (await client.get("/customer/1000", headers=await login(client, fake))).is_success

    run(fake, scenario)
    assert fake.counters["unauthorized"] == 1


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"authorization": None}, "no authorization"),
        ({"authorization": "not-a-token"}, "unknown"),
        ({"authorization": "Bearer {token}"}, "unknown"),  # documented: the bare token
        ({"client_id": None}, "client_id"),
        ({"client_id": "someone_else"}, "client_id"),
    ],
)
def test_calls_need_the_token_and_the_client_id_header(
    fake: TreezFake, change: dict[str, str | None], detail: str
) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        for name, value in change.items():
            if value is None:
                del headers[name]
            else:
                headers[name] = value.format(token=headers["authorization"])
        for path in ("/customer/1000", pull_path(EPOCH, 1, 10)):
            body = failure(await client.get(path, headers=headers), 401, UNAUTHORIZED)
            assert detail in body["resultDetail"]

    run(fake, scenario)


def test_a_token_is_bound_to_its_store(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        other = "https://api.treez.io/v2.0/dispensary/another_store/customer/1000"
        failure(await client.get(other, headers=headers), 401, UNAUTHORIZED)

    run(fake, scenario)


# ---- the lastUpdated pull ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "after",
    [
        "2026-04-24T11:38:21.000-07:00",
        "2026-04-24T18:38:21.000Z",
        "2026-04-25T00:08:21.000+05:30",
    ],
)
@pytest.mark.parametrize("encode", [True, False])
def test_accepted_date_forms(fake: TreezFake, after: str, encode: bool) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        fake.update("1005", last_update="2026-04-24T11:38:21.000-07:00")
        fake.update("1006", last_update="2026-04-24T11:38:21.001-07:00")
        response = await client.get(pull_path(after, 1, 50, encode=encode), headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["resultCode"] == "SUCCESS"
        ids = [c["customer_id"] for c in body["data"]]
        # the three forms are the same instant: strictly after it, 1006 but not 1005
        assert "1006" in ids
        assert "1005" not in ids

    run(fake, scenario)


@pytest.mark.parametrize(
    "after",
    [
        "2026-04-24",
        "2026-04-24T11:38:21-07:00",  # no milliseconds
        "2026-04-24T11:38:21.000",  # no offset
        "2026-04-24T11:38:21.000-0700",  # offset without colon (XX, not XXX)
        "2026-04-24 11:38:21.000-07:00",
        "2026-04-24T11:38:21.0-07:00",
        "2026-13-01T00:00:00.000Z",
        "2026-02-30T00:00:00.000Z",
        "2026-04-24T25:00:00.000Z",
        "1777000000000",
        "yesterday",
    ],
)
def test_invalid_date_format_is_a_400(fake: TreezFake, after: str) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        body = failure(await pull(client, headers, after, 1), 400, INVALID_DATE_FORMAT)
        assert "yyyy-MM-dd'T'HH:mm:ss.SSSXXX" in body["resultDetail"]

    run(fake, scenario)


def test_date_is_checked_before_the_page_numbers(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        failure(await pull(client, headers, "bad", 0, 51), 400, INVALID_DATE_FORMAT)

    run(fake, scenario)


def test_page_size_is_at_most_50(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        assert len((await pull(client, headers, EPOCH, 1, 50)).json()["data"]) == 50
        body = failure(await pull(client, headers, EPOCH, 1, 51), 400, RESPONSE_LIMIT_EXCEEDS)
        assert "50" in body["resultDetail"]
        failure(await pull(client, headers, EPOCH, 1, 1000), 400, RESPONSE_LIMIT_EXCEEDS)

    run(fake, scenario)


@pytest.mark.parametrize(("page", "size"), [(0, 10), (1, 0), ("x", 10), (1, "-1"), ("1.5", 10)])
def test_page_numbers_must_be_whole_and_positive(
    fake: TreezFake, page: int | str, size: int | str
) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        failure(await pull(client, headers, EPOCH, page, size), 400, MODEL_VALIDATION_FAIL)

    run(fake, scenario)


def test_pages_start_at_1_in_last_update_then_id_order(fake: TreezFake, clock: HandClock) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        first = await pull(client, headers, EPOCH, 1, 7)
        body = first.json()
        assert set(body) == {"resultCode", "resultReason", "resultDetail", "data"}
        assert (body["resultCode"], body["resultReason"], body["resultDetail"]) == (
            "SUCCESS",
            None,
            None,
        )
        rows = await pull_all(client, headers, clock=clock, size=7)
        assert len(rows) == 200  # 28 full pages of 7 and a short one of 4
        assert [c["customer_id"] for c in rows] == fake.ids_after(EPOCH)
        assert sorted(rows, key=order_key) == rows
        assert sorted(c["customer_id"] for c in rows) == fake.customer_ids()
        clock.advance(1)  # the pull above was paced at 8 a second; these come at once
        last = await pull(client, headers, EPOCH, 29, 7)
        assert len(last.json()["data"]) == 4
        past_the_end = await pull(client, headers, EPOCH, 30, 7)
        assert past_the_end.status_code == 200
        assert past_the_end.json()["data"] == []
        assert (await pull(client, headers, EPOCH, 999, 50)).json()["data"] == []

    run(fake, scenario)


@pytest.mark.parametrize("inclusive", [False, True])
def test_after_is_strict_unless_told_otherwise(clock: HandClock, inclusive: bool) -> None:
    fake = TreezFake(customers=50, seed=2, clock=clock, now=START, after_inclusive=inclusive)
    pivot = fake.update("1010", last_update="2026-04-24T10:00:00.000-07:00")["last_update"]

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        rows = (await pull(client, headers, pivot, 1)).json()["data"]
        assert ("1010" in [c["customer_id"] for c in rows]) is inclusive

    run(fake, scenario)


def test_ties_are_ordered_by_customer_id_as_a_number(clock: HandClock) -> None:
    fake = TreezFake(customers=9_001, seed=1, clock=clock, now=START)  # ids 1000 to 10000
    stamp = "2026-04-24T11:00:00.000-07:00"
    for customer_id in ("10000", "9999", "1000", "2500"):
        fake.update(customer_id, last_update=stamp)

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        rows = (await pull(client, headers, "2026-04-24T10:59:59.999-07:00", 1)).json()["data"]
        tied = [c["customer_id"] for c in rows if c["last_update"] == stamp]
        assert tied == ["1000", "2500", "9999", "10000"]

    run(fake, scenario)


def test_generated_population_has_shared_seconds(clock: HandClock) -> None:
    """Bulk imports give many customers one last_update: paging must not depend on it."""
    fake = TreezFake.generate(2_000, seed=5, clock=clock, now=START)
    stamps = collections.Counter(fake.customer(i)["last_update"] for i in fake.customer_ids())  # type: ignore[index]
    assert max(stamps.values()) >= 5


def test_data_may_be_wrapped_in_an_object(clock: HandClock) -> None:
    fake = TreezFake(customers=5, clock=clock, now=START, data_wrapper="customers")

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        data = (await pull(client, headers, EPOCH, 1)).json()["data"]
        assert [c["customer_id"] for c in data["customers"]] == fake.ids_after(EPOCH)

    run(fake, scenario)


def test_deactivated_customers_can_be_left_out_of_the_pull(clock: HandClock) -> None:
    fake = TreezFake(customers=400, seed=3, clock=clock, now=START, list_deactivated=False)
    fake.deactivate("1001")

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        rows = await pull_all(client, headers, clock=clock)
        assert rows
        assert all(c["status"] != "DEACTIVATED" for c in rows)
        assert "1001" not in {c["customer_id"] for c in rows}
        response = await client.get("/customer/1001", headers=headers)
        assert response.json()["data"]["status"] == "DEACTIVATED"
        fake.update("1001", status="ACTIVE")
        assert (await pull_all(client, headers, clock=clock))[-1]["customer_id"] == "1001"

    run(fake, scenario)


# ---- one customer, unknown paths ----------------------------------------------------------------


def test_get_customer_by_id(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        response = await client.get("/customer/1042", headers=headers)
        assert response.status_code == 200
        body = response.json()
        assert body["resultCode"] == "SUCCESS"
        assert body["data"] == fake.customer("1042")
        assert body["data"]["customer_id"] == "1042"
        for unknown in ("999", "1200", "99999999", "abc"):
            response = await client.get(f"/customer/{unknown}", headers=headers)
            failure(response, 404, CUSTOMER_DOESNT_EXIST)

    run(fake, scenario)
    assert fake.customer("1200") is None


def test_unknown_paths_and_methods(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        for path in (
            "/customer/email/someone@example.com",  # not served by this fake
            "/customer/lastUpdated/after/x/page/1",
            "https://api.treez.io/v1/customer/1000",
            "https://api.treez.io/",
        ):
            failure(await client.get(path, headers=headers), 404, NOT_FOUND)
        wrong = await client.post("/customer/1000", headers=headers)
        failure(wrong, 405, METHOD_NOT_ALLOWED)
        assert wrong.headers["allow"] == "GET"
        assert (await client.get("/customer/1000/", headers=headers)).status_code == 200

    run(fake, scenario)


# ---- the rate limit ----------------------------------------------------------------------------


def test_the_eleventh_request_in_a_second_is_refused(fake: TreezFake, clock: HandClock) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)  # the token request is one of the ten
        for tenth in range(1, 10):
            clock.set(tenth / 10)
            assert (await client.get("/customer/1000", headers=headers)).status_code == 200
        clock.set(0.999)  # the token request is still in the window
        refused = await client.get("/customer/1000", headers=headers)
        failure(refused, 429, TOO_MANY_REQUESTS)
        assert "retry-after" not in refused.headers  # none documented
        failure(await get_token(client, fake), 429, TOO_MANY_REQUESTS)
        clock.set(1.0)  # one second later the token request has left the window
        assert (await client.get("/customer/1000", headers=headers)).status_code == 200
        failure(await client.get("/customer/1000", headers=headers), 429, TOO_MANY_REQUESTS)

    run(fake, scenario)
    assert fake.counters["throttled"] == 3
    assert fake.token_requests == 2  # a refused token request is still a token request


def test_the_window_slides(fake: TreezFake, clock: HandClock) -> None:
    """Ten requests at 0.5 s: a token bucket refilled at 10/s would let more through at
    0.75 s, a fixed one-second window would reset at 1.0 s; the sliding window waits until
    1.5 s."""

    async def scenario(client: Client) -> None:
        async def status() -> int:
            return (await client.get("/customer/1000", headers=headers)).status_code

        clock.set(0.5)
        headers = await login(client, fake)
        assert [await status() for _ in range(9)] == [200] * 9
        for moment in (0.75, 1.25, 1.499):
            clock.set(moment)
            assert await status() == 429
        clock.set(1.5)
        assert [await status() for _ in range(11)] == [200] * 10 + [429]

    run(fake, scenario)


def test_refused_requests_take_no_slot(fake: TreezFake, clock: HandClock) -> None:
    async def scenario(client: Client) -> None:
        async def status() -> int:
            return (await client.get("/customer/1000", headers=headers)).status_code

        headers = await login(client, fake)
        assert [await status() for _ in range(9)] == [200] * 9
        clock.set(0.5)
        assert [await status() for _ in range(20)] == [429] * 20
        clock.set(1.0)  # only the ten admitted requests counted
        assert [await status() for _ in range(11)] == [200] * 10 + [429]

    run(fake, scenario)


def test_the_limit_is_per_store(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        other = "https://api.treez.io/v2.0/dispensary/another_store/customer/1000"
        for _ in range(10):
            assert (await client.get(other, headers=headers)).status_code == 401
        assert (await client.get(other, headers=headers)).status_code == 429
        for _ in range(9):
            assert (await client.get("/customer/1000", headers=headers)).status_code == 200

    run(fake, scenario)


def test_the_limit_can_be_switched_off(clock: HandClock) -> None:
    fake = TreezFake(customers=3, clock=clock, now=START, rate_limit=None)

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        for _ in range(100):
            assert (await client.get("/customer/1000", headers=headers)).status_code == 200

    run(fake, scenario)
    assert fake.counters.get("throttled", 0) == 0


# ---- the generated population ------------------------------------------------------------------


def _same_json_type(value: Any, seed_value: Any) -> bool:
    if seed_value is None:
        return True  # null in the seed: text, a number or null in others
    if isinstance(seed_value, bool):
        return isinstance(value, bool)
    return isinstance(value, type(seed_value))


def test_generated_customers_are_shaped_as_the_seed(
    clock: HandClock, seed_data: dict[str, Any]
) -> None:
    assert list(seed_data) == list(CUSTOMER_FIELDS)
    fake = TreezFake.generate(2_000, seed=11, clock=clock, now=START)
    seed_address = seed_data["addresses"][0]
    for customer_id in fake.customer_ids():
        customer = fake.customer(customer_id)
        assert customer is not None
        assert list(customer) == list(seed_data), customer_id
        for name, value in customer.items():
            nullable = name == "opt_out"  # "null in some reads"
            assert _same_json_type(value, seed_data[name]) or (nullable and value is None), (
                customer_id,
                name,
                value,
            )
        assert set(customer["external_ids"]) == set(seed_data["external_ids"])
        for address in customer["addresses"]:
            assert list(address) == list(seed_address)
            assert address["type"] == "address_of_record"
        for reason in customer["verification_reasons"]:
            assert list(reason) == list(seed_data["verification_reasons"][0])
        parsed = parse_customer(customer)  # the connector's own model takes every one
        assert parsed.customer_id == customer_id


def test_generated_values_are_realistic(clock: HandClock) -> None:
    n = 5_000
    fake = TreezFake.generate(n, seed=12, clock=clock, now=START)
    customers = [fake.customer(i) for i in fake.customer_ids()]
    assert all(c is not None for c in customers)
    rows: list[dict[str, Any]] = customers  # type: ignore[assignment]
    phones = [c["phone"] for c in rows if c["phone"] is not None]
    emails = [c["email"] for c in rows if c["email"] is not None]
    assert len(set(phones)) == len(phones) > 0.8 * n  # unique per store
    assert len(set(emails)) == len(emails) > 0.75 * n
    for phone in phones:
        assert re.fullmatch(r"[2-9][0-9]{9}", phone)
        assert phonenumbers.is_valid_number(phonenumbers.parse("+1" + phone)), phone
    assert all(re.fullmatch(r"[a-z0-9._]+@[a-z.]+\.(com|net|org)", e) for e in emails)
    assert len({c["first_name"] for c in rows}) > 40
    assert len({c["last_name"] for c in rows}) > 40
    opt_outs = collections.Counter(c["opt_out"] for c in rows)
    assert set(opt_outs) == {"true", "false", None}
    assert 0.08 * n < opt_outs["true"] < 0.12 * n
    start_ms = to_ms(START)
    for c in rows:
        born = dt.date.fromisoformat(c["birthday"])
        assert 21 <= (START.date() - born).days / 365.25 <= 86
        updated = parse_timestamp(c["last_update"])
        assert start_ms - 366 * 86_400_000 < updated < start_ms
        assert parse_timestamp(c["signup_date"]) <= updated
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000-0[78]:00", c["last_update"])
        if c["last_visit_date"] != NEVER_VISITED:
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.000", c["last_visit_date"])
        aiq = c["external_ids"]["aiq_contact_id"]
        assert aiq is None or re.fullmatch(r"[0-9a-f]{24}", aiq)
        assert c["gender"] in {"M", "F", "U", "N"}
        assert c["patient_type"] in {"ADULT", "MEDICAL", "MEDICAL_MMID"}
    linked = sum(c["external_ids"]["aiq_contact_id"] is not None for c in rows)
    assert 0.2 * n < linked < 0.4 * n
    assert sum(c["external_ids"]["sticky_cards_contact_id"] is not None for c in rows) > 0
    assert sum(c["last_visit_date"] == NEVER_VISITED for c in rows) > 0
    assert sum(c["patient_type"] != "ADULT" for c in rows) > 0
    assert sum("SENIOR" in c["customer_groups"] for c in rows) > 0


def test_generated_merges_are_consistent(clock: HandClock) -> None:
    fake = TreezFake.generate(10_000, seed=13, clock=clock, now=START)
    rows = {i: fake.customer(i) for i in fake.customer_ids()}
    absorbed = [c for c in rows.values() if c and c["merged_into_customer_id"] is not None]
    assert 0.005 * 10_000 < len(absorbed) < 0.02 * 10_000
    id_types = set()
    for gone in absorbed:
        survivor = rows[gone["merged_into_customer_id"]]
        assert survivor is not None
        assert (gone["status"], gone["verification_status"]) == ("DEACTIVATED", "NOT_APPLICABLE")
        assert survivor["status"] == "MERGED"
        assert survivor["merged_into_customer_id"] is None
        assert gone["customer_id"] in [str(i) for i in survivor["merged_customer_ids"]]
        id_types |= {type(i) for i in survivor["merged_customer_ids"]}
        assert (gone["first_name"], gone["last_name"], gone["birthday"]) == (
            survivor["first_name"],
            survivor["last_name"],
            survivor["birthday"],
        )
        assert f"Merged customer {gone['customer_id']} on " in survivor["notes"]
        assert parse_timestamp(survivor["last_update"]) >= parse_timestamp(gone["last_update"])
    assert id_types == {int, str}  # treez.md: integers or strings
    assert any(len(c["merged_customer_ids"]) > 1 for c in rows.values() if c)
    deleted = [
        c
        for c in rows.values()
        if c and c["status"] == "DEACTIVATED" and c["merged_into_customer_id"] is None
    ]
    assert deleted


def test_generation_is_reproducible(clock: HandClock) -> None:
    one = TreezFake.generate(300, seed=21, clock=clock, now=START)
    same = TreezFake.generate(300, seed=21, clock=clock, now=START)
    other = TreezFake.generate(300, seed=22, clock=clock, now=START)
    ids = one.customer_ids()
    assert [one.customer(i) for i in ids] == [same.customer(i) for i in ids]
    assert [one.customer(i) for i in ids] != [other.customer(i) for i in ids]
    assert list(generate_customers(300, seed=21, now=START)) == [one.customer(i) for i in ids]


def test_a_population_of_100_000_pages_completely() -> None:
    fake = TreezFake.generate(100_000, seed=1, rate_limit=None, now=START)

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        ids: list[str] = []
        stamps: list[str] = []
        # Keeping ids only: 100,000 dicts kept alive would make the test measure the GC.
        async for page in pages(client, headers, clock=None):
            ids += [c["customer_id"] for c in page]
            stamps += [c["last_update"] for c in page]
        assert len(ids) == 100_000
        assert len(set(ids)) == 100_000
        assert set(ids) == set(fake.customer_ids())
        order = [(parse_timestamp(s), int(i)) for s, i in zip(stamps, ids, strict=True)]
        assert order == sorted(order)

    run(fake, scenario)
    assert fake.counters["pages"] == 2_001  # 2,000 full pages and an empty one


def test_a_population_of_100_000_takes_little_memory() -> None:
    tracemalloc.start()
    try:
        fake = TreezFake.generate(100_000, seed=1, now=START)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(fake) == 100_000
    assert peak < 20_000_000, f"{peak / 1e6:.1f} MB"


# ---- changing customers ------------------------------------------------------------------------


def test_update_bumps_last_update_to_the_clock(fake: TreezFake, clock: HandClock) -> None:
    newest = fake.ids_after(EPOCH)[-1]
    newest_update = fake.customer(newest)["last_update"]  # type: ignore[index]
    clock.set(30.5)
    changed = fake.update("1042", email="new@example.com", opt_out="true")
    assert changed["last_update"] == "2026-04-24T11:38:51.500-07:00"
    assert fake.ids_after(EPOCH)[-1] == "1042"

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        response = await client.get("/customer/1042", headers=headers)
        assert response.json()["data"]["email"] == "new@example.com"
        rows = (await pull(client, headers, newest_update, 1)).json()["data"]
        assert [c["customer_id"] for c in rows] == ["1042"]
        assert rows[0]["opt_out"] == "true"
        fake.touch("1001")
        assert fake.ids_after(newest_update) == ["1001", "1042"]  # the same instant: id order

    run(fake, scenario)
    with pytest.raises(KeyError):
        fake.update("99999", email="x@example.com")
    with pytest.raises(ValueError, match="not customer fields"):
        fake.update("1000", mail="x@example.com")
    with pytest.raises(ValueError, match="customer_id"):
        fake.update("1000", customer_id="1")
    assert fake.counters["updates"] == 2


def test_add_creates_the_next_customer_updated_now(fake: TreezFake, clock: HandClock) -> None:
    clock.advance(5)
    added = fake.add(first_name="Vincent", last_name="Vega", email=None, opt_out="false")
    assert added["customer_id"] == "1200"
    assert (added["first_name"], added["email"]) == ("Vincent", None)
    assert added["last_update"] == "2026-04-24T11:38:26.000-07:00"
    assert list(added) == list(CUSTOMER_FIELDS)
    assert len(fake) == 201

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        rows = await pull_all(client, headers, clock=clock)
        assert rows[-1] == added

    run(fake, scenario)


def test_merge_and_deactivate_helpers(fake: TreezFake, clock: HandClock) -> None:
    clock.advance(60)
    fake.merge("1010", "1020")
    survivor, gone = fake.customer("1010"), fake.customer("1020")
    assert survivor is not None
    assert gone is not None
    now = "2026-04-24T11:39:21.000-07:00"
    assert gone["status"] == "DEACTIVATED"
    assert gone["verification_status"] == "NOT_APPLICABLE"
    assert gone["merged_into_customer_id"] == "1010"
    assert survivor["status"] == "MERGED"
    assert "1020" in survivor["merged_customer_ids"]
    assert survivor["notes"].endswith(f"Merged customer 1020 on {now}.")
    assert survivor["last_update"] == gone["last_update"] == now
    assert fake.deactivate("1030")["status"] == "DEACTIVATED"
    assert fake.ids_after("2026-04-24T11:39:00.000-07:00") == ["1010", "1020", "1030"]
    active = TreezFake(customers=3, clock=clock, now=START, survivor_status="ACTIVE")
    active.merge("1000", "1001")
    assert active.customer("1000")["status"] == "ACTIVE"  # type: ignore[index]


def test_a_customer_moving_while_paging_skips_one_and_repeats_itself(
    clock: HandClock,
) -> None:
    """treez.md: paging by number over a changing set can skip or repeat rows. A customer
    updated between pages moves to the end: the row after the page boundary is skipped and
    the mover comes twice; a second pull over the overlap window catches the mover."""
    fake = TreezFake.generate(30, seed=4, clock=clock, now=START)
    order = fake.ids_after(EPOCH)
    seen: list[PageRequest] = []

    def staff_edit(fake: TreezFake, request: PageRequest) -> None:
        seen.append(request)
        if request.number == 2:
            clock.advance(1)
            fake.update(order[0], notes="edited while the sync paged")

    fake.on_page(staff_edit)
    run_started = fake.timestamp()

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        rows = await pull_all(client, headers, clock=clock, size=10)
        ids = [c["customer_id"] for c in rows]
        counts = collections.Counter(ids)
        assert {i for i, n in counts.items() if n > 1} == {order[0]}
        assert set(order) - set(ids) == {order[10]}  # the first row of page 2 was skipped
        assert rows[-1]["notes"] == "edited while the sync paged"
        fake.clear_hooks()
        overlap = dt.datetime.fromisoformat(run_started) - dt.timedelta(minutes=5)
        after = overlap.isoformat(timespec="milliseconds")
        again = await pull_all(client, headers, clock=clock, after=after)
        assert [c["customer_id"] for c in again] == [order[0]]

    run(fake, scenario)
    assert [(r.page, r.pagesize, r.number) for r in seen] == [
        (1, 10, 1),
        (2, 10, 2),
        (3, 10, 3),
        (4, 10, 4),
    ]
    assert seen[0].after == EPOCH


# ---- scripted failures -------------------------------------------------------------------------


def test_fail_next_answers_5xx_then_recovers(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        fake.fail_next(503, 2)
        failure(await get_token(client, fake), 503, "INTERNAL_SERVER_ERROR")
        headers_attempt = await get_token(client, fake)
        assert headers_attempt.status_code == 503
        headers = await login(client, fake)
        fake.fail_next(500, path="customer/lastUpdated")
        assert (await client.get("/customer/1000", headers=headers)).status_code == 200
        failure(await pull(client, headers, EPOCH, 1), 500, "INTERNAL_SERVER_ERROR")
        assert (await pull(client, headers, EPOCH, 1)).status_code == 200
        fake.fail_next(429)
        failure(await pull(client, headers, EPOCH, 1), 429, TOO_MANY_REQUESTS)

    run(fake, scenario)
    assert fake.counters["failures_injected"] == 4


def test_fail_next_timeout_raises_a_read_timeout(fake: TreezFake) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        fake.fail_next("timeout")
        with pytest.raises(httpx.ReadTimeout):
            await pull(client, headers, EPOCH, 1)
        assert (await pull(client, headers, EPOCH, 1)).status_code == 200

    run(fake, scenario)
    assert fake.statuses() == [200, None, 200]
    assert fake.counters["status_timeout"] == 1


@pytest.mark.parametrize(("status", "count"), [(200, 1), (302, 1), (600, 1), (503, 0)])
def test_fail_next_refuses_what_is_not_a_failure(fake: TreezFake, status: int, count: int) -> None:
    with pytest.raises(ValueError, match=r"fail_next|count"):
        fake.fail_next(status, count)


# ---- records -----------------------------------------------------------------------------------


def test_every_call_is_recorded_with_counters(fake: TreezFake, clock: HandClock) -> None:
    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        clock.advance(0.25)
        await pull(client, headers, EPOCH, 1, 20)
        await client.get("/customer/5", headers=headers)

    run(fake, scenario)
    token, page, missing = fake.calls
    base = "/v2.0/dispensary/partnersandbox3"
    assert (token.method, token.path, token.status, token.at) == (
        "POST",
        f"{base}/config/api/gettokens",
        200,
        1200.0,
    )
    assert (page.method, page.status, page.at, page.returned) == ("GET", 200, 1200.25, 20)
    assert page.path == f"{base}/customer/lastUpdated/after/{EPOCH}/page/1/pagesize/20"
    assert (missing.status, missing.reason, missing.returned) == (404, CUSTOMER_DOESNT_EXIST, None)
    assert fake.calls_to("/customer/lastUpdated/") == [page]
    assert fake.calls_to("/customer/", method="POST") == []
    assert fake.statuses() == [200, 200, 404]
    counters = fake.counters
    assert counters["requests"] == 3
    assert counters["token_requests"] == 1
    assert counters["pages"] == 1
    assert counters["customers_served"] == 20
    assert (counters["status_200"], counters["status_404"]) == (2, 1)
    fake.reset_records()
    assert (fake.calls, fake.counters, fake.token_requests) == ([], {}, 0)
    assert len(fake) == 200


# ---- over real HTTP ----------------------------------------------------------------------------


def test_served_from_a_thread() -> None:
    fake = TreezFake(customers=60, seed=3)
    with serve(fake) as base_url, httpx.Client(base_url=base_url, timeout=5.0) as client:
        assert base_url.endswith("/v2.0/dispensary/partnersandbox3")
        form = {"client_id": fake.client_id, "apikey": fake.api_key}
        token = client.post("/config/api/gettokens", data=form).json()["access_token"]
        headers = {"authorization": token, "client_id": fake.client_id}
        after = quote("2000-01-01T00:00:00.000-07:00", safe="")
        page = client.get(
            f"/customer/lastUpdated/after/{after}/page/2/pagesize/50", headers=headers
        )
        assert len(page.json()["data"]) == 10
    assert fake.counters["pages"] == 1


def test_process_mode_prints_listening_and_exits_cleanly_on_sigterm() -> None:
    command = [sys.executable, "-m", "tests.fakes.treez_api", "--port", "0", "--customers", "120"]
    command += ["--client-id", "cid", "--api-key", "key", "--seed", "3", "--no-rate-limit"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            port = listening_port(process)
            base_url = f"http://127.0.0.1:{port}/v2.0/dispensary/partnersandbox3"
            with httpx.Client(base_url=base_url, timeout=5.0) as client:
                path = "/config/api/gettokens"
                wrong = client.post(path, data={"client_id": "cid", "apikey": "nope"})
                assert wrong.status_code == 401
                token = client.post(path, data={"client_id": "cid", "apikey": "key"})
                headers = {"authorization": token.json()["access_token"], "client_id": "cid"}
                ids: list[str] = []
                for page in (1, 2, 3):
                    url = pull_path("2000-01-01T00:00:00.000Z", page, 50)
                    ids += [
                        c["customer_id"] for c in client.get(url, headers=headers).json()["data"]
                    ]
                assert len(ids) == len(set(ids)) == 120
                # --no-rate-limit: more than ten in a second pass
                for _ in range(15):
                    assert client.get("/customer/1000", headers=headers).status_code == 200
                expected = TreezFake(customers=120, seed=3).customer("1000")
                served = client.get("/customer/1000", headers=headers).json()["data"]
                assert expected is not None
                assert served["first_name"] == expected["first_name"]
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20.0)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr


def test_the_fake_serves_json() -> None:
    """Answers are compact UTF-8 JSON (names such as Núñez are not escaped)."""
    fake = TreezFake(customers=1)
    fake.update("1000", last_name="Núñez")

    async def scenario(client: Client) -> None:
        headers = await login(client, fake)
        response = await client.get("/customer/1000", headers=headers)
        assert "Núñez".encode() in response.content
        assert json.loads(response.content)["data"]["last_name"] == "Núñez"
        assert response.headers["content-length"] == str(len(response.content))

    run(fake, scenario)
