"""A Klaviyo profile that is gone (deleted by a marketer or by a data-privacy deletion request)
is never made again by an operation other than an upsert (connector/destinations/klaviyo.py).

A deactivation, an unsubscribe or a subscribe whose profile answers 404 looks the customer's
profile up by its identifiers with ``GET /api/profiles?filter=`` (a read) instead of
``POST /api/profile-import`` (which makes the profile when none matches), skips a profile
another customer of the store holds, and marks nothing when none is left. The subscription
jobs make a profile for identifiers no profile holds, so none is sent then either. An opt-out
still reaches a profile of the customer's that exists.

Examples against the fake (tests/fakes/klaviyo.py), with its call list checked, and a
hypothesis property over one customer's operations and deletions in any order.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from fakes.klaviyo import KlaviyoFake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_klaviyo import (
    BASE,
    FAKE_KEY,
    IMPORT,
    MAPPING,
    SHOP,
    delivery,
    existing_profile,
    klaviyo_config,
    klaviyo_flow,
)
from vendor_flow import DISPENSARY, event_body

from connector.delivery.base import Delivery, Result, Sent
from connector.destinations.klaviyo import KLAVIYO_REVISION, KlaviyoSink
from connector.errors import FatalDelivery, RetriableDelivery

T = TypeVar("T")
JSONAPI = "application/vnd.api+json"
PROFILES = "/api/profiles"
UNSUBSCRIBE = "/api/profile-subscription-bulk-delete-jobs"
SUBSCRIBE = "/api/profile-subscription-bulk-create-jobs"
CUSTOMER = "1001"
EXTERNAL_ID = f"treez-{SHOP}-{CUSTOMER}"
MIA = {"email": "mia@example.com", "phone_number": "+12135550142"}
FIELDS = {"external_id": EXTERNAL_ID, **MIA, "first_name": "Mia"}


@pytest.fixture(scope="module")
def mapping_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("klaviyo-gone")
    shutil.copy(MAPPING, base / "klaviyo.yaml")
    return base


def on_fake(
    base: Path,
    fake: KlaviyoFake,
    work: Callable[[KlaviyoSink], Awaitable[T]],
    owners: dict[str, list[str]] | None = None,
) -> T:
    """``work`` against a sink talking to ``fake``; ``owners``: the identity map's answer
    (profile id -> the customers of the store linked to it), when bound."""
    config = klaviyo_config(base, api_key=FAKE_KEY, revision=KLAVIYO_REVISION)

    async def go() -> T:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app))
        sink = KlaviyoSink(config, client)
        if owners is not None:

            async def claims(
                contact_id: str | None, kind: str | None
            ) -> tuple[list[str], list[tuple[str, str]]]:
                return list(owners.get(contact_id or "", [])), []

            sink.bind_identity_map(claims)
        try:
            return await work(sink)
        finally:
            await sink.aclose()

    return asyncio.run(go())


def send(base: Path, fake: KlaviyoFake, *deliveries: Delivery, **kw: Any) -> list[Result]:
    return on_fake(base, fake, lambda sink: sink.send(list(deliveries)), **kw)


made_elsewhere = existing_profile  # a sign-up form, another integration


def upserted(base: Path, fake: KlaviyoFake) -> str:
    [result] = send(base, fake, delivery("upsert", CUSTOMER, fields=FIELDS))
    assert isinstance(result, Sent)
    assert result.contact_id is not None
    return result.contact_id


def calls_after(fake: KlaviyoFake, mark: int) -> list[tuple[str, str, int]]:
    return [(c.method, c.path, c.status) for c in fake.calls[mark:]]


def filters_after(fake: KlaviyoFake, mark: int) -> list[str]:
    found = []
    for call in fake.calls[mark:]:
        if call.path == PROFILES:
            found.extend(httpx.QueryParams(call.query).get_list("filter"))
    return found


SEARCHES = [
    f'equals(external_id,"{EXTERNAL_ID}")',
    f'equals(email,"{MIA["email"]}")',
    f'equals(phone_number,"{MIA["phone_number"]}")',
]


# ---- deactivate ------------------------------------------------------------------------------


def test_a_deactivation_of_a_deleted_profile_makes_no_profile(mapping_dir: Path) -> None:
    fake = KlaviyoFake(seed=3, rate_limits=False)
    gone = upserted(mapping_dir, fake)
    fake.delete_profile(gone)  # a data-privacy deletion request
    mark = len(fake.calls)

    [result] = send(
        mapping_dir, fake, delivery("deactivate", CUSTOMER, contact_id=gone, fields=FIELDS)
    )

    assert fake.profiles == {}
    assert calls_after(fake, mark) == [
        ("POST", IMPORT, 404),  # the properties update to the id held
        ("GET", PROFILES, 200),  # looked up by external id, e-mail, phone: nothing
        ("GET", PROFILES, 200),
        ("GET", PROFILES, 200),
    ]
    assert filters_after(fake, mark) == SEARCHES
    assert isinstance(result, Sent)
    assert (result.contact_id, result.replaces) == (None, None)
    assert result.conflict is not None
    assert result.conflict.startswith("unknown_contact: ")
    assert gone in result.conflict
    assert "nothing was marked" in result.conflict
    assert "mia" not in result.conflict
    assert "2135550142" not in result.conflict


def test_flow_a_deactivation_after_a_privacy_deletion_makes_no_profile(tmp_path: Path) -> None:
    """Through the store, planner and worker: Treez deactivates a customer whose Klaviyo
    profile was deleted; nothing is made, the deactivation is done (not dead-lettered) and
    reported, and the identity map still names the gone id (no profile replaced it)."""
    shutil.copy(MAPPING, tmp_path / "klaviyo.yaml")
    fake = KlaviyoFake(seed=11)
    phone = "(213) 555-0142"

    async def go() -> None:
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body(CUSTOMER, 1, email=MIA["email"], phone=phone))
            gone = flow.contact_ids()[(DISPENSARY, "kl", CUSTOMER)]
            fake.delete_profile(gone)
            mark = len(fake.calls)
            await flow.deliver(
                event_body(CUSTOMER, 2, status="DEACTIVATED", email=MIA["email"], phone=phone)
            )
            assert fake.profiles == {}
            assert [c for c in calls_after(fake, mark) if c[0] == "POST"] == [("POST", IMPORT, 404)]
            assert flow.dead_letters() == []
            assert [(r["op"], r["status"]) for r in flow.outbox()][-1] == ("deactivate", "done")
            assert [c["kind"] for c in flow.conflicts()] == ["unknown_contact"]
            assert flow.contact_ids()[(DISPENSARY, "kl", CUSTOMER)] == gone

    asyncio.run(go())


def test_a_deactivation_of_a_gone_profile_marks_the_customers_profile_that_exists(
    mapping_dir: Path,
) -> None:
    """Merged away in Klaviyo into a profile that now holds the customer's external id:
    found by a read, then updated by its id."""
    fake = KlaviyoFake(seed=3, rate_limits=False)
    gone = upserted(mapping_dir, fake)
    fake.delete_profile(gone)
    kept = asyncio.run(made_elsewhere(fake, external_id=EXTERNAL_ID, email="mia@work.example"))
    mark = len(fake.calls)

    [result] = send(
        mapping_dir, fake, delivery("deactivate", CUSTOMER, contact_id=gone, fields=FIELDS)
    )

    assert result == Sent(kept, None, replaces=gone)
    assert list(fake.profiles) == [kept]
    profile = fake.profile(kept)
    assert profile is not None
    assert profile.properties["treez_status"] == "DEACTIVATED"
    assert profile.email == "mia@work.example"  # identifiers are never moved by it
    assert calls_after(fake, mark) == [
        ("POST", IMPORT, 404),
        ("GET", PROFILES, 200),
        ("POST", IMPORT, 200),  # by id: an update
    ]
    assert fake.calls[-1].body["data"]["id"] == kept


def test_a_deactivation_never_marks_a_profile_another_customer_holds(mapping_dir: Path) -> None:
    fake = KlaviyoFake(seed=3, rate_limits=False)
    gone = upserted(mapping_dir, fake)
    fake.delete_profile(gone)
    # the same e-mail, now the profile of a store-mate (a family's shared address)
    theirs = asyncio.run(made_elsewhere(fake, email=MIA["email"], first_name="Jules"))

    [result] = send(
        mapping_dir,
        fake,
        delivery("deactivate", CUSTOMER, contact_id=gone, fields=FIELDS),
        owners={theirs: ["2002"]},
    )

    assert isinstance(result, Sent)
    assert result.contact_id is None
    assert result.conflict is not None
    assert result.conflict.startswith("unknown_contact: ")
    profile = fake.profile(theirs)
    assert profile is not None
    assert "treez_status" not in profile.properties
    assert list(fake.profiles) == [theirs]


def test_a_profile_deleted_between_the_lookup_and_the_update_is_not_made(
    mapping_dir: Path,
) -> None:
    fake = KlaviyoFake(seed=3, rate_limits=False)
    gone = upserted(mapping_dir, fake)
    fake.delete_profile(gone)
    other = asyncio.run(made_elsewhere(fake, external_id=EXTERNAL_ID))
    real_app = fake.app

    async def deleting(scope: Any, receive: Any, send_: Any) -> None:
        # the profile found is deleted right after the lookup answers
        await real_app(scope, receive, send_)
        if scope.get("path") == PROFILES and other in fake.profiles:
            fake.delete_profile(other)

    config = klaviyo_config(mapping_dir, api_key=FAKE_KEY, revision=KLAVIYO_REVISION)

    async def go() -> list[Result]:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=deleting))
        sink = KlaviyoSink(config, client)
        try:
            return await sink.send(
                [delivery("deactivate", CUSTOMER, contact_id=gone, fields=FIELDS)]
            )
        finally:
            await sink.aclose()

    [result] = asyncio.run(go())

    assert fake.profiles == {}
    assert isinstance(result, Sent)
    assert result.contact_id is None
    assert result.conflict is not None
    assert other in result.conflict


# ---- consent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["unsubscribe", "subscribe"])
def test_a_consent_change_of_a_deleted_profile_makes_no_profile(mapping_dir: Path, op: str) -> None:
    fake = KlaviyoFake(seed=3, rate_limits=False)
    gone = upserted(mapping_dir, fake)
    fake.delete_profile(gone)
    mark = len(fake.calls)

    [result] = send(mapping_dir, fake, delivery(op, CUSTOMER, contact_id=gone, fields=FIELDS))

    assert fake.profiles == {}
    assert calls_after(fake, mark) == [
        ("GET", f"{PROFILES}/{gone}", 404),
        ("GET", PROFILES, 200),
        ("GET", PROFILES, 200),
        ("GET", PROFILES, 200),
    ]  # no subscription job: it would make a profile for the e-mail and phone
    assert fake.unsubscribes == []
    assert fake.subscribes == []
    assert isinstance(result, Sent)
    assert result.contact_id is None
    assert result.conflict is not None
    assert result.conflict.startswith("unknown_contact: ")


def test_an_opt_out_of_a_gone_profile_reaches_the_customers_profile_that_exists(
    mapping_dir: Path,
) -> None:
    """Consent beats everything: a profile of the customer's that lives on (found by the
    e-mail: a sign-up form's) is unsubscribed, addressed by what it holds."""
    fake = KlaviyoFake(seed=3, rate_limits=False)
    gone = upserted(mapping_dir, fake)
    fake.delete_profile(gone)
    signup = asyncio.run(made_elsewhere(fake, email=MIA["email"]))

    [result] = send(
        mapping_dir, fake, delivery("unsubscribe", CUSTOMER, contact_id=gone, fields=FIELDS)
    )

    assert result == Sent(signup, None, replaces=gone)
    assert list(fake.profiles) == [signup]
    assert fake.consent(signup)["email"] == "UNSUBSCRIBED"
    [job] = fake.calls_to(UNSUBSCRIBE)
    [entry] = job.body["data"]["attributes"]["profiles"]["data"]
    assert entry["attributes"]["email"] == MIA["email"]
    assert "phone_number" not in entry["attributes"]  # the sign-up profile holds none


def test_an_opt_out_before_the_profile_is_made_waits_and_makes_none(mapping_dir: Path) -> None:
    fake = KlaviyoFake(seed=3, rate_limits=False)

    [result] = send(mapping_dir, fake, delivery("unsubscribe", CUSTOMER, fields=FIELDS))

    assert isinstance(result, RetriableDelivery)
    assert fake.profiles == {}
    assert fake.calls_to(UNSUBSCRIBE) == []
    assert fake.calls_to(IMPORT) == []


def test_a_phone_is_looked_up_as_sent(mapping_dir: Path) -> None:
    """``+`` in a query string reads as a space unless encoded: the lookup by phone finds
    the profile holding it."""
    fake = KlaviyoFake(seed=3, rate_limits=False)
    signup = asyncio.run(made_elsewhere(fake, phone_number=MIA["phone_number"]))

    [result] = send(
        mapping_dir,
        fake,
        delivery("unsubscribe", CUSTOMER, fields={"phone_number": MIA["phone_number"]}),
    )

    assert result == Sent(signup)
    assert fake.consent(signup)["sms"] == "UNSUBSCRIBED"


# ---- merge -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gone", ["source", "target", "both"])
def test_a_merge_with_a_deleted_profile_makes_no_profile(mapping_dir: Path, gone: str) -> None:
    fake = KlaviyoFake(seed=3, rate_limits=False)
    source = asyncio.run(made_elsewhere(fake, external_id=f"treez-{SHOP}-2001"))
    target = asyncio.run(made_elsewhere(fake, external_id=f"treez-{SHOP}-2002"))
    for name, profile_id in (("source", source), ("target", target)):
        if gone in (name, "both"):
            fake.delete_profile(profile_id)
    before = set(fake.profiles)
    imports = len(fake.calls_to(IMPORT))
    merge = delivery(
        "merge",
        "2001",
        from_customer_id="2001",
        into_customer_id="2002",
        from_contact_id=source,
        into_contact_id=target,
    )

    send(mapping_dir, fake, merge)

    assert set(fake.profiles) <= before
    assert len(fake.calls_to(IMPORT)) == imports


# ---- the fake: what the adapter relies on ----------------------------------------------------


def get(fake: KlaviyoFake, path: str, **params: str) -> httpx.Response:
    headers = {"authorization": f"Klaviyo-API-Key {FAKE_KEY}", "revision": KLAVIYO_REVISION}

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await client.get(path, params=params, headers=headers)

    return asyncio.run(go())


def test_the_fake_filters_profiles_by_identifier_without_making_any() -> None:
    fake = KlaviyoFake(seed=5, rate_limits=False)
    mia = asyncio.run(made_elsewhere(fake, email="Mia@Example.com", external_id="x-1"))
    vince = asyncio.run(made_elsewhere(fake, phone_number="+12135550199"))

    def ids(expression: str, **params: str) -> list[str]:
        answer = get(fake, PROFILES, filter=expression, **params)
        assert answer.status_code == 200, answer.text
        return [p["id"] for p in answer.json()["data"]]

    assert ids('equals(email,"mia@example.COM")') == [mia]  # e-mail: case-insensitive
    assert ids("equals(external_id,'x-1')") == [mia]
    assert ids('equals(phone_number,"+12135550199")') == [vince]
    assert ids('equals(email,"nobody@example.com")') == []
    assert ids(f'any(id,["{vince}","{mia}","01NOPE"])') == [vince, mia]
    assert ids(f'any(id,["{vince}","{mia}"])', **{"page[size]": "1"}) == [vince]
    assert len(fake.profiles) == 2
    answer = get(fake, PROFILES, filter='equals(email,"mia@example.com")')
    assert answer.json()["data"][0]["attributes"]["external_id"] == "x-1"


@pytest.mark.parametrize(
    "params",
    [
        {"filter": 'equals(first_name,"Mia")'},
        {"filter": "equals(email,mia@example.com)"},
        {"filter": 'any(email,"mia@example.com")'},
        {"filter": 'equals(email,["mia@example.com"])'},
        {"page[size]": "101"},
    ],
)
def test_the_fake_refuses_a_filter_it_does_not_allow(params: dict[str, str]) -> None:
    answer = get(KlaviyoFake(rate_limits=False), PROFILES, **params)
    assert answer.status_code == 400
    [error] = answer.json()["errors"]
    assert error["code"] == "invalid"
    assert error["source"]["parameter"] in params


def test_the_fake_answers_404_for_an_import_by_an_unknown_id() -> None:
    """The shape the adapter reads: a JSON:API error object, code ``not_found``, and no
    profile made."""
    fake = KlaviyoFake(rate_limits=False)
    headers = {
        "authorization": f"Klaviyo-API-Key {FAKE_KEY}",
        "revision": KLAVIYO_REVISION,
        "content-type": JSONAPI,
    }
    body = {"data": {"type": "profile", "id": "01GONE", "attributes": {"properties": {"a": 1}}}}

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await client.post(IMPORT, content=json.dumps(body), headers=headers)

    answer = asyncio.run(go())
    assert answer.status_code == 404
    [error] = answer.json()["errors"]
    assert (error["status"], error["code"]) == (404, "not_found")
    assert fake.profiles == {}


# ---- the property ----------------------------------------------------------------------------

OPS = st.lists(
    st.sampled_from(
        ["upsert", "deactivate", "unsubscribe", "subscribe", "delete", "signup", "claim"]
    ),
    min_size=1,
    max_size=12,
)


def ours(fake: KlaviyoFake) -> set[str]:
    """The live profiles holding one of the customer's identifiers."""
    return {
        p.id
        for p in fake.profiles.values()
        if p.external_id == EXTERNAL_ID
        or (p.email or "").lower() == MIA["email"]
        or p.phone_number == MIA["phone_number"]
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_only_an_upsert_ever_makes_a_profile_and_a_deleted_one_stays_deleted(
    mapping_dir: Path, ops: list[str]
) -> None:
    """One customer's upserts, deactivations, opt-outs and (under the resubscribe policy)
    subscribes, with deletions of its profile in Klaviyo, sign-up forms making a profile with
    its e-mail, and a store-mate's claim on the profile found, in any order and repeated:

    - no operation but an upsert adds a profile to Klaviyo (subscription jobs included);
    - after a deletion, no profile holding the customer's identifiers exists until an upsert
      (or someone else's sign-up form) makes one;
    - an opt-out that names a profile has unsubscribed the channels that profile holds."""
    fake = KlaviyoFake(seed=1, rate_limits=False)
    owners: dict[str, list[str]] = {}
    contact: str | None = None  # what the identity map holds for the customer
    erased = False

    async def scenario(sink: KlaviyoSink) -> None:
        nonlocal contact, erased
        for op in ops:
            before = set(fake.profiles)
            if op == "delete":
                for profile_id in ours(fake):
                    fake.delete_profile(profile_id)
                erased = True
                continue
            if op == "signup":
                if fake.profile_by_email(MIA["email"]) is None:
                    await made_elsewhere(fake, email=MIA["email"])
                    erased = False
                continue
            if op == "claim":  # a store-mate's profile now, in the identity map
                for profile_id in ours(fake):
                    if profile_id != contact:
                        owners[profile_id] = ["2002"]
                continue
            mark = len(fake.calls)
            [result] = await sink.send([delivery(op, CUSTOMER, contact_id=contact, fields=FIELDS)])
            made = set(fake.profiles) - before
            if op == "upsert":
                erased = False
            else:
                assert made == set(), (op, calls_after(fake, mark))
                assert all(not (c.path == IMPORT and c.status == 201) for c in fake.calls[mark:]), (
                    op
                )
            if erased:
                assert ours(fake) == set(), op
            if isinstance(result, Sent) and result.contact_id is not None:
                if contact is None or result.replaces == contact:
                    contact = result.contact_id
                if op == "unsubscribe":
                    reached = fake.profile(result.contact_id)
                    assert reached is not None
                    if reached.email is not None:
                        assert fake.consent(reached.id)["email"] == "UNSUBSCRIBED"
                    if reached.phone_number is not None:
                        assert fake.consent(reached.id)["sms"] == "UNSUBSCRIBED"
            assert not isinstance(result, FatalDelivery), (op, str(result))

    on_fake(mapping_dir, fake, scenario, owners=owners)
