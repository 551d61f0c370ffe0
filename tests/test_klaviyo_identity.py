"""Whose Klaviyo profile an operation reaches (connector/destinations/klaviyo.py): after a 409
``duplicate_profile``, and when the profile the identity map holds is gone.

- Defect 1: consent goes to our own profile, addressed by the e-mail and phone that profile
  holds (read back from Klaviyo), never by an identifier a 409 gave to another profile.
- Defect 12: a profile the identity map (or its ``treez_id_<dispensary>``) links to another
  customer of the same dispensary is never written for this one; the customer gets a profile
  of its own without the colliding identifiers, reported once and not sent again until they
  change. Across the stores of one account, one profile per person stays the rule.
- Defect 8: every operation recovers from a gone profile id (merged away, deleted) by
  finding the profile again by the identifiers, and says which id the new one replaces.

Each defect has respx tests (one documented answer at a time) and flows through the fake
(tests/fakes/klaviyo.py) with the real store, planner and worker (tests/vendor_flow.py).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
import sqlalchemy as sa
from fakes.klaviyo import KlaviyoFake
from test_klaviyo import (
    BASE,
    FAKE_KEY,
    IMPORT,
    MAPPING,
    MERGE,
    SHOP,
    SUBSCRIBE,
    UNSUBSCRIBE,
    delivery,
    error_answer,
    existing_profile,
    held_profiles,
    klaviyo_config,
    klaviyo_flow,
    not_found,
    profile_answer,
    send,
    sent_json,
)
from vendor_flow import DISPENSARY, event_body

from connector.delivery.base import Sent
from connector.destinations.klaviyo import KLAVIYO_REVISION, KlaviyoSink
from connector.errors import FatalDelivery, RetriableDelivery
from connector.store import open_store
from connector.store.schema import conflicts, contacts, customers

JSONAPI = "application/vnd.api+json"
MIA = {"email": "mia@example.com", "phone_number": "+12135550142"}
UNSUBSCRIBED = {"marketing": {"consent": "UNSUBSCRIBED"}}


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False, using="httpx") as mock:
        yield mock


@pytest.fixture
def mapping_dir(tmp_path: Path) -> Path:
    shutil.copy(MAPPING, tmp_path / "klaviyo.yaml")
    return tmp_path


@pytest.fixture
def fake() -> KlaviyoFake:
    return KlaviyoFake(seed=7)


def duplicate(profile_id: str) -> httpx.Response:
    return error_answer(
        409,
        "duplicate_profile",
        "Conflict.",
        "A profile already exists with one of these identifiers.",
        pointer="/data/attributes",
        meta={"duplicate_profile_id": profile_id},
    )


def job_profiles(request: httpx.Request) -> list[dict[str, Any]]:
    return [p["attributes"] for p in sent_json(request)["data"]["attributes"]["profiles"]["data"]]


async def merge_in_klaviyo(fake: KlaviyoFake, into: str, source: str) -> None:
    """A merge made in Klaviyo by someone else (a marketer, another store's connector)."""
    headers = {
        "authorization": f"Klaviyo-API-Key {FAKE_KEY}",
        "revision": KLAVIYO_REVISION,
        "content-type": JSONAPI,
    }
    body = {
        "data": {
            "type": "profile-merge",
            "id": into,
            "relationships": {"profiles": {"data": [{"type": "profile", "id": source}]}},
        }
    }
    transport = httpx.ASGITransport(app=fake.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=headers) as client:
        answer = await client.post(MERGE, content=json.dumps(body))
    assert answer.status_code == 201, answer.text


def text_of(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=str)


# ---- defect 1: consent after a 409 -----------------------------------------------------------


def test_defect_1_consent_is_addressed_by_what_our_profile_holds_not_the_mapped_email(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    """The mapped e-mail is one a 409 gave to Jules's profile: ours never got it."""
    read = held_profiles(router, {"01MIA": MIA})
    job = router.post(UNSUBSCRIBE).mock(return_value=httpx.Response(202))
    fields = {"email": "jules@example.com", "phone_number": MIA["phone_number"]}

    results = send(
        klaviyo_config(mapping_dir), delivery("unsubscribe", contact_id="01MIA", fields=fields)
    )

    assert results == [Sent("01MIA")]
    assert read.call_count == 1
    [call] = job.calls
    assert job_profiles(call.request) == [
        {**MIA, "subscriptions": {"email": UNSUBSCRIBED, "sms": UNSUBSCRIBED}}
    ]
    assert "jules@example.com" not in call.request.content.decode()


def test_defect_1_a_profile_holding_no_email_and_no_phone_is_reported_not_addressed(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    held_profiles(router, {"01BARE": {"email": None, "phone_number": None}})
    job = router.post(SUBSCRIBE).mock(return_value=httpx.Response(202))

    [result] = send(
        klaviyo_config(mapping_dir),
        delivery("subscribe", contact_id="01BARE", fields={"email": "jules@example.com"}),
    )

    assert isinstance(result, Sent)
    assert result.contact_id == "01BARE"
    assert result.conflict is not None
    assert result.conflict.startswith("no_identifier: ")
    assert "jules@example.com" not in result.conflict
    assert not job.calls


def test_defect_1_an_unknown_profile_is_found_by_its_identifiers_before_it_is_addressed(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    """No profile id: the profile is looked up by the identifiers first (a read: an
    opt-out never makes a profile), and the job addresses what the profile found holds."""
    imports = router.post(IMPORT).mock(return_value=profile_answer("01NEW", 201))
    found = {"type": "profile", "id": "01NEW", "attributes": {"email": "vince@example.com"}}
    search = router.get("/api/profiles").mock(
        return_value=httpx.Response(200, json={"data": [found]})
    )
    job = router.post(UNSUBSCRIBE).mock(return_value=httpx.Response(202))
    fields = {"external_id": f"treez-{SHOP}-2", "email": "vince@example.com", "first_name": "V"}

    [result] = send(klaviyo_config(mapping_dir), delivery("unsubscribe", "2", fields=fields))

    assert result == Sent("01NEW")
    assert imports.call_count == 0
    [call] = search.calls  # by the external id, which found it
    assert call.request.url.params["filter"] == f'equals(external_id,"treez-{SHOP}-2")'
    assert job_profiles(job.calls[0].request) == [
        {"email": "vince@example.com", "subscriptions": {"email": UNSUBSCRIBED}}
    ]


@pytest.mark.parametrize("policy", ["never", "on_source_opt_in"])
def test_defect_1_flow_opt_out_after_a_409_reaches_our_profile_never_the_other_persons(
    tmp_path: Path, fake: KlaviyoFake, policy: str
) -> None:
    async def go() -> None:
        jules = await existing_profile(
            fake, email="jules@example.com", first_name="Jules", external_id="shopify-9"
        )
        fake.suppress(jules, "UNSUBSCRIBE")  # Jules's own choice, long ago
        async with klaviyo_flow(tmp_path, fake, policy=policy) as flow:
            await flow.deliver(
                event_body("1001", 1, email="mia@example.com", phone="(213) 555-0142")
            )
            mine = flow.contact_ids()[(DISPENSARY, "kl", "1001")]
            # at the till Mia gives an e-mail Jules's profile holds: a 409
            await flow.deliver(
                event_body("1001", 2, email="jules@example.com", phone="(213) 555-0142")
            )
            await flow.deliver(
                event_body(
                    "1001", 3, opt_out="true", email="jules@example.com", phone="(213) 555-0142"
                )
            )

            assert fake.consent(mine) == {"email": "UNSUBSCRIBED", "sms": "UNSUBSCRIBED"}
            assert fake.consent(jules) == {"email": "NEVER_SUBSCRIBED", "sms": "NEVER_SUBSCRIBED"}

            await flow.deliver(
                event_body(
                    "1001", 4, opt_out="false", email="jules@example.com", phone="(213) 555-0142"
                )
            )
            touched = {c.profile_id for c in [*fake.unsubscribes, *fake.subscribes]}
            assert touched == {mine}
            assert fake.suppressions(jules) == ["UNSUBSCRIBE"]  # never lifted by us
            theirs = fake.profile(jules)
            assert theirs is not None
            assert theirs.attributes["first_name"] == "Jules"
            assert flow.dead_letters() == []
            if policy == "on_source_opt_in":
                assert len(fake.subscribes) == 2
                assert fake.consent(mine) == {"email": "SUBSCRIBED", "sms": "SUBSCRIBED"}
            else:
                assert fake.subscribes == []

    asyncio.run(go())


# ---- defect 12: a 409 against another customer's profile -------------------------------------


def test_defect_12_a_profile_naming_another_customer_of_this_store_is_never_written(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    """The identity map may not know the profile (a bulk job made it): its
    ``treez_id_<dispensary>`` names another customer, so it is another person's."""
    imports = router.post(IMPORT).mock(
        side_effect=[duplicate("01ANA"), profile_answer("01BEN", 201, email="ben@example.com")]
    )
    held_profiles(
        router,
        {
            "01ANA": {
                "email": "ana@example.com",
                "phone_number": "+13105550000",
                "properties": {f"treez_id_{SHOP}": "1001"},
            }
        },
    )
    fields = {
        "external_id": f"treez-{SHOP}-1002",
        "email": "ben@example.com",
        "phone_number": "+13105550000",
        "first_name": "Ben",
    }

    [result] = send(klaviyo_config(mapping_dir), delivery("upsert", "1002", fields=fields))

    assert isinstance(result, Sent)
    assert result.contact_id == "01BEN"
    assert result.conflict is not None
    kind, _, detail = result.conflict.partition(": ")
    assert kind == "duplicate_profile"
    assert "01ANA" in detail
    assert "phone" in detail
    assert "+13105550000" not in result.conflict
    assert "ben@" not in result.conflict
    assert " withheld phone_number:" in detail
    second = sent_json(imports.calls[1].request)["data"]
    assert "id" not in second  # a profile of its own, never 01ANA
    assert second["attributes"]["external_id"] == f"treez-{SHOP}-1002"
    assert second["attributes"]["email"] == "ben@example.com"
    assert "phone_number" not in second["attributes"]
    assert second["attributes"]["first_name"] == "Ben"


@pytest.mark.parametrize(
    "properties",
    [{}, {"treez_id_store2": "9001"}, {f"treez_id_{SHOP}": "1002"}],
    ids=["no-store", "another-store", "this-customer"],
)
def test_defect_12_a_profile_of_no_customer_of_this_store_is_the_same_person(
    router: respx.MockRouter, mapping_dir: Path, properties: dict[str, str]
) -> None:
    """Across the stores of one account one profile per person: written without identifiers."""
    imports = router.post(IMPORT).mock(side_effect=[duplicate("01MIA"), profile_answer("01MIA")])
    held_profiles(router, {"01MIA": {**MIA, "properties": properties}})
    fields = {"external_id": f"treez-{SHOP}-1002", **MIA, "first_name": "Mia"}

    [result] = send(klaviyo_config(mapping_dir), delivery("upsert", "1002", fields=fields))

    assert isinstance(result, Sent)
    assert result.contact_id == "01MIA"
    assert result.conflict is not None
    assert "withheld" not in result.conflict
    retry = sent_json(imports.calls[1].request)["data"]
    assert retry["id"] == "01MIA"
    assert not {"email", "phone_number"} & set(retry["attributes"])
    # the profile was keyed by no one: now by this customer, so a store-mate's import by the
    # same e-mail or phone is a 409 (read as another customer's), never a silent match
    assert retry["attributes"]["external_id"] == f"treez-{SHOP}-1002"


def test_defect_identity_b1_a_same_person_profile_keyed_already_keeps_its_external_id(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    """A profile of another store of the account keeps its own external_id (never re-keyed)."""
    imports = router.post(IMPORT).mock(side_effect=[duplicate("01MIA"), profile_answer("01MIA")])
    held_profiles(router, {"01MIA": {**MIA, "external_id": "treez-store2-9001"}})
    fields = {"external_id": f"treez-{SHOP}-1002", **MIA, "first_name": "Mia"}

    [result] = send(klaviyo_config(mapping_dir), delivery("upsert", "1002", fields=fields))

    assert isinstance(result, Sent)
    assert result.contact_id == "01MIA"
    retry = sent_json(imports.calls[1].request)["data"]
    assert not {"email", "phone_number", "external_id"} & set(retry["attributes"])


def test_defect_12_flow_two_customers_sharing_a_phone_get_a_profile_each(
    tmp_path: Path, fake: KlaviyoFake
) -> None:
    async def go() -> None:
        family = "(310) 555-0000"
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body("1001", 1, email="ana@example.com", phone=family, first_name="Ana")
            )
            await flow.deliver(
                event_body("1002", 1, email="ben@example.com", phone=family, first_name="Ben")
            )
            ids = flow.contact_ids()
            ana_id, ben_id = ids[(DISPENSARY, "kl", "1001")], ids[(DISPENSARY, "kl", "1002")]
            assert ana_id != ben_id
            ana, ben = fake.profile(ana_id), fake.profile(ben_id)
            assert ana is not None
            assert ben is not None
            assert ana.attributes["first_name"] == "Ana"
            assert ana.properties[f"treez_id_{DISPENSARY}"] == "1001"
            assert ana.phone_number == "+13105550000"
            assert (ben.external_id, ben.email, ben.phone_number) == (
                f"treez-{DISPENSARY}-1002",
                "ben@example.com",
                None,
            )
            assert ben.attributes["first_name"] == "Ben"
            [conflict] = flow.conflicts()
            assert (conflict["customer_id"], conflict["kind"]) == ("1002", "duplicate_profile")
            assert "0000" not in conflict["detail"]
            assert "ben@" not in conflict["detail"]

            # later updates of both: no flapping, no 409, no second report
            for version in (2, 3):
                await flow.deliver(
                    event_body(
                        "1002",
                        version,
                        email="ben@example.com",
                        phone=family,
                        first_name="Ben",
                        last_name=f"B{version}",
                    )
                )
                await flow.deliver(
                    event_body(
                        "1001",
                        version,
                        email="ana@example.com",
                        phone=family,
                        first_name="Ana",
                        last_name=f"A{version}",
                    )
                )
            assert ana.attributes["last_name"] == "A3"
            assert ben.attributes["last_name"] == "B3"
            assert ana.attributes["first_name"] == "Ana"
            assert ben.attributes["first_name"] == "Ben"
            assert Counter(fake.statuses())[409] == 1
            assert len(flow.conflicts()) == 1
            assert flow.dead_letters() == []
            assert len(fake.profiles) == 2

        # another process, the same store: the phone is still not sent
        mark = len(fake.calls)
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body(
                    "1002",
                    4,
                    email="ben@example.com",
                    phone=family,
                    first_name="Ben",
                    last_name="B4",
                )
            )
            [call] = fake.calls[mark:]
            assert (call.status, call.body["data"]["id"]) == (200, ben_id)
            assert "phone_number" not in call.body["data"]["attributes"]
            # until it changes
            await flow.deliver(
                event_body(
                    "1002",
                    5,
                    email="ben@example.com",
                    phone="(310) 555-0199",
                    first_name="Ben",
                    last_name="B4",
                )
            )
            assert ben.phone_number == "+13105550199"
            assert ana.phone_number == "+13105550000"
            assert len(flow.conflicts()) == 1

    asyncio.run(go())


def test_defect_12_flow_a_keyed_409_is_reported_once_and_the_email_not_sent_again(
    tmp_path: Path, fake: KlaviyoFake
) -> None:
    async def go() -> None:
        jules = await existing_profile(fake, email="jules@example.com", external_id="shopify-9")
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body("1001", 1, email="mia@example.com"))
            for version, name in ((2, "Vega"), (3, "Wallace"), (4, "Wallace-Vega")):
                await flow.deliver(
                    event_body("1001", version, email="jules@example.com", last_name=name)
                )
            assert Counter(fake.statuses())[409] == 1
            [conflict] = flow.conflicts()
            assert conflict["kind"] == "duplicate_profile"
            assert jules in conflict["detail"]
            mine = fake.profile(flow.contact_ids()[(DISPENSARY, "kl", "1001")])
            assert mine is not None
            assert (mine.email, mine.attributes["last_name"]) == ("mia@example.com", "Wallace-Vega")

    asyncio.run(go())


def test_contact_claims_resolves_owners_through_merges_and_reads_conflicts(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    rows = [("1001", "01P"), ("2001", "01Q"), ("2002", "01R"), ("3001", "01P")]
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(contacts),
            [
                {
                    "dispensary": SHOP,
                    "customer_id": c,
                    "destination": "kl",
                    "contact_id": p,
                    "delivered_hash": None,
                    "unsubscribed": False,
                    "deactivated": False,
                    "ops_planned": 0,
                    "updated_at": 0.0,
                }
                for c, p in rows
            ],
        )
        conn.execute(
            sa.insert(customers),
            [
                {
                    "dispensary": SHOP,
                    "customer_id": "3001",
                    "merged_into": "2001",
                    "merges": "[]",
                    "updated_at": 0.0,
                },
            ],
        )
        conn.execute(
            sa.insert(conflicts),
            [
                {
                    "dispensary": SHOP,
                    "customer_id": "1001",
                    "destination": "kl",
                    "kind": "duplicate_profile",
                    "detail": "a",
                    "created_at": 0.0,
                },
                {
                    "dispensary": SHOP,
                    "customer_id": "1001",
                    "destination": "kl",
                    "kind": "unknown_contact",
                    "detail": "b",
                    "created_at": 0.0,
                },
                {
                    "dispensary": "other",
                    "customer_id": "1001",
                    "destination": "kl",
                    "kind": "duplicate_profile",
                    "detail": "c",
                    "created_at": 0.0,
                },
            ],
        )

    owners, found = store.contact_claims(SHOP, "kl", "01P", "duplicate_profile")
    assert sorted(owners) == ["1001", "2001"]  # 3001 was merged into 2001
    assert found == [("1001", "a")]
    assert store.contact_claims(SHOP, "kl", "01Z") == ([], [])
    assert store.contact_claims("other", "kl", "01P") == ([], [])
    store.close()


# ---- defect 8: a profile id that is gone -----------------------------------------------------


def test_defect_8_a_deactivate_for_a_gone_profile_finds_it_again_and_marks_it(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    imports = router.post(IMPORT).mock(
        side_effect=[not_found("01GONE"), profile_answer("01NOW", 200, **MIA)]
    )
    found = {"type": "profile", "id": "01NOW", "attributes": MIA}
    router.get("/api/profiles").mock(return_value=httpx.Response(200, json={"data": [found]}))
    fields = {"external_id": f"treez-{SHOP}-1001", **MIA, "first_name": "Mia"}

    [result] = send(
        klaviyo_config(mapping_dir), delivery("deactivate", contact_id="01GONE", fields=fields)
    )

    assert isinstance(result, Sent)
    assert (result.contact_id, result.replaces) == ("01NOW", "01GONE")
    assert result.conflict is None  # the store reports the replacement (contact_replaced)
    again = sent_json(imports.calls[1].request)["data"]
    assert again["id"] == "01NOW"  # found by a read, then updated by id: never made
    assert again["attributes"] == {
        "properties": {f"treez_id_{SHOP}": "1001", "treez_status": "DEACTIVATED"},
    }


def test_defect_8_a_deactivate_with_nothing_to_find_the_gone_profile_by_is_reported(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    imports = router.post(IMPORT).mock(return_value=not_found("01GONE"))

    [result] = send(klaviyo_config(mapping_dir), delivery("deactivate", contact_id="01GONE"))

    assert isinstance(result, Sent)
    assert (result.contact_id, result.replaces) == (None, None)
    assert result.conflict is not None
    assert "01GONE" in result.conflict
    assert imports.call_count == 1


def test_defect_8_an_upsert_for_a_gone_profile_says_which_id_it_replaces(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(IMPORT).mock(side_effect=[not_found("01GONE"), profile_answer("01NOW", 201)])
    fields = {"external_id": f"treez-{SHOP}-1001", **MIA}

    [result] = send(
        klaviyo_config(mapping_dir), delivery("upsert", contact_id="01GONE", fields=fields)
    )

    assert isinstance(result, Sent)
    assert (result.contact_id, result.replaces) == ("01NOW", "01GONE")


def test_defect_8_an_unsubscribe_for_a_gone_profile_finds_it_again_by_its_identifiers(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    held_profiles(router, {})
    found = {"type": "profile", "id": "01NOW", "attributes": MIA}
    router.get("/api/profiles").mock(return_value=httpx.Response(200, json={"data": [found]}))
    job = router.post(UNSUBSCRIBE).mock(return_value=httpx.Response(202))
    fields = {"external_id": f"treez-{SHOP}-1001", **MIA}

    [result] = send(
        klaviyo_config(mapping_dir), delivery("unsubscribe", contact_id="01GONE", fields=fields)
    )

    assert isinstance(result, Sent)
    assert (result.contact_id, result.replaces) == ("01NOW", "01GONE")
    assert job_profiles(job.calls[0].request) == [
        {**MIA, "subscriptions": {"email": UNSUBSCRIBED, "sms": UNSUBSCRIBED}}
    ]


def test_defect_8_an_unsubscribe_for_a_gone_profile_without_fields_is_dead_lettered(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    """An opt-out is owed: when nothing is left to find the profile by, it stays visible
    (a dead letter to replay after the customer's next update) instead of vanishing."""
    held_profiles(router, {})

    [result] = send(klaviyo_config(mapping_dir), delivery("unsubscribe", contact_id="01GONE"))

    assert isinstance(result, FatalDelivery)
    assert "01GONE" in str(result)


@pytest.mark.parametrize("gone", ["source", "target"])
def test_defect_8_a_merge_with_a_gone_profile(
    router: respx.MockRouter, mapping_dir: Path, gone: str
) -> None:
    """The absorbed profile gone: nothing left to merge. The survivor's gone: retried, so
    that the survivor's next update (which finds its profile again) lets it through."""
    router.post(MERGE).mock(return_value=not_found("01X"))
    held_profiles(router, {"01SURVIVOR": {}} if gone == "source" else {"01ABSORBED": {}})
    merge = delivery(
        "merge",
        "2001",
        from_customer_id="2001",
        into_customer_id="2002",
        from_contact_id="01ABSORBED",
        into_contact_id="01SURVIVOR",
    )

    [result] = send(klaviyo_config(mapping_dir), merge)

    if gone == "source":
        assert result == Sent("01SURVIVOR")
    else:
        assert isinstance(result, RetriableDelivery)
        assert "01SURVIVOR" in str(result)


def test_defect_8_flow_a_deactivation_after_a_marketer_merged_the_profile_away(
    tmp_path: Path, fake: KlaviyoFake
) -> None:
    async def go() -> None:
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body("1001", 1, email="mia@example.com", phone="(213) 555-0142")
            )
            mine = flow.contact_ids()[(DISPENSARY, "kl", "1001")]
            work = await existing_profile(fake, email="mia@work.example", first_name="Mia")
            await merge_in_klaviyo(fake, work, mine)  # a marketer joins the two
            await flow.deliver(
                event_body(
                    "1001", 2, status="DEACTIVATED", email="mia@example.com", phone="(213) 555-0142"
                )
            )
            assert flow.dead_letters() == []
            assert list(fake.profiles) == [work]
            profile = fake.profile(work)
            assert profile is not None
            assert profile.properties["treez_status"] == "DEACTIVATED"
            kinds = [c["kind"] for c in flow.conflicts()]
            assert kinds == ["contact_replaced"]  # reported once, by the store
            assert flow.contact_ids()[(DISPENSARY, "kl", "1001")] == work  # the map moved
            assert "mia@" not in text_of(flow.conflicts())

    asyncio.run(go())


def test_defect_8_flow_an_opt_out_after_the_profile_was_deleted_makes_no_profile(
    tmp_path: Path, fake: KlaviyoFake
) -> None:
    """Deleted in Klaviyo (by a marketer, for a data-privacy request): the opt-out finds
    nothing of the customer's and makes nothing (it would bring the e-mail and phone back);
    that is reported, and the customer's next update makes a profile never subscribed."""

    async def go() -> None:
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body("1001", 1, email="mia@example.com", phone="(213) 555-0142")
            )
            fake.delete_profile(flow.contact_ids()[(DISPENSARY, "kl", "1001")])
            await flow.deliver(
                event_body(
                    "1001", 2, opt_out="true", email="mia@example.com", phone="(213) 555-0142"
                )
            )
            assert flow.dead_letters() == []
            assert fake.profiles == {}
            assert fake.calls_to("/api/profile-subscription-bulk-delete-jobs") == []
            assert "unknown_contact" in [c["kind"] for c in flow.conflicts()]

    asyncio.run(go())


def test_defect_8_flow_a_merge_whose_absorbed_profile_is_gone_is_not_dead_lettered(
    tmp_path: Path, fake: KlaviyoFake
) -> None:
    async def go() -> None:
        async with klaviyo_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body("2001", 1, email="vincent@example.com"),
                event_body("2002", 1, email="vega@example.com"),
            )
            ids = flow.contact_ids()
            absorbed, survivor = ids[(DISPENSARY, "kl", "2001")], ids[(DISPENSARY, "kl", "2002")]
            await merge_in_klaviyo(fake, survivor, absorbed)  # Klaviyo got there first
            await flow.deliver(
                event_body("2002", 2, merged_customer_ids=["2001"], email="vega@example.com"),
                event_body(
                    "2001",
                    2,
                    status="DEACTIVATED",
                    merged_into_customer_id="2002",
                    email="vincent@example.com",
                ),
            )
            assert flow.dead_letters() == []
            assert [r["status"] for r in flow.outbox() if r["op"] == "merge"] == ["done"]
            assert list(fake.profiles) == [survivor]

    asyncio.run(go())


def _link(flow: Any, customer_id: str, profile_id: str) -> None:
    """An identity-map entry as an older version left it (a profile recorded for a customer
    before the rules that keep store-mates apart)."""
    with flow.store.engine.begin() as conn:
        conn.execute(
            contacts.insert().values(
                dispensary=DISPENSARY,
                customer_id=customer_id,
                destination="kl",
                contact_id=profile_id,
                updated_at=0.0,
            )
        )


def test_defect_identity_b1_a_plain_import_matching_a_store_mates_profile_is_not_recorded(
    tmp_path: Path, fake: KlaviyoFake
) -> None:
    """No 409: Klaviyo matched Ana's e-mail to a profile the map gives to Ben (no external_id
    on it). It is never recorded for Ana; Ana gets her own, without the shared e-mail."""

    async def go() -> None:
        family = await existing_profile(fake, email="family@example.com")
        async with klaviyo_flow(tmp_path, fake) as flow:
            _link(flow, "1002", family)
            await flow.deliver(
                event_body(
                    "1001", 1, email="family@example.com", phone="(310) 555-0001", first_name="Ana"
                )
            )
            ana = flow.contact_ids()[(DISPENSARY, "kl", "1001")]
            assert ana is not None
            assert ana != family
            own = fake.profile(ana)
            assert own is not None
            # Klaviyo wrote Ana's phone onto Ben's profile when it matched: both identifiers
            # are withheld from her own (reported); Ben's profile is keyed by no one again
            assert (own.external_id, own.email, own.phone_number) == (
                f"treez-{DISPENSARY}-1001",
                None,
                None,
            )
            held = fake.profile(family)
            assert held is not None
            assert held.external_id is None
            [conflict] = flow.conflicts()
            assert (conflict["customer_id"], conflict["kind"]) == ("1001", "duplicate_profile")
            assert family in conflict["detail"]
            assert "family@" not in conflict["detail"]
            # reported once: the next update goes by Ana's own profile id
            await flow.deliver(
                event_body(
                    "1001", 2, email="family@example.com", phone="(310) 555-0001", first_name="Ana"
                )
            )
            assert len(flow.conflicts()) == 1

    asyncio.run(go())


@pytest.mark.parametrize("op", ["subscribe", "deactivate", "unsubscribe"])
def test_defect_identity_b2_a_profile_the_map_shares_with_a_store_mate_gets_no_consent_or_status(
    tmp_path: Path, fake: KlaviyoFake, op: str
) -> None:
    """A profile an older version recorded for two customers of one store: neither's subscribe
    nor deactivation reaches it (each reported); an opt-out does (never dropped)."""

    async def go() -> None:
        async with klaviyo_flow(tmp_path, fake, policy="on_source_opt_in") as flow:
            await flow.deliver(
                event_body(
                    "1001", 1, email="family@example.com", phone="(310) 555-0000", first_name="Ana"
                )
            )
            shared = flow.contact_ids()[(DISPENSARY, "kl", "1001")]
            assert shared is not None
            _link(flow, "1002", shared)
            sink = flow.sink()
            assert isinstance(sink, KlaviyoSink)
            subscribes = len(fake.subscribes)
            fields = {"email": "family@example.com", "phone_number": "+13105550000"}
            [result] = await sink.send(
                [delivery(op, "1002", contact_id=shared, fields=fields, dispensary=DISPENSARY)]
            )
            assert isinstance(result, Sent)
            assert result.conflict is not None
            assert result.conflict.startswith("shared_contact: ")
            profile = fake.profile(shared)
            assert profile is not None
            if op == "subscribe":
                assert len(fake.subscribes) == subscribes
            elif op == "deactivate":
                assert profile.properties.get("treez_status") != "DEACTIVATED"
            else:
                assert fake.consent(shared) == {"email": "UNSUBSCRIBED", "sms": "UNSUBSCRIBED"}

    asyncio.run(go())
