"""The Klaviyo fake's cheaper bulk import path (issue 17) answers and stores what it did:
the 100 KB check done 64 profiles at a time, the copied properties, the ids and timestamps,
and process mode's frozen state."""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
from typing import Any

import httpx
import pytest
from fakes import klaviyo
from fakes.klaviyo import KlaviyoFake

BASE = "https://a.klaviyo.com"
HEADERS = {
    "Authorization": "Klaviyo-API-Key pk_test_fake",
    "revision": "2026-07-15",
    "Content-Type": "application/vnd.api+json",
}
JOBS = "/api/profile-bulk-import-jobs"


def job_body(profiles: list[Any]) -> dict[str, Any]:
    return {
        "data": {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": profiles}}}
    }


def bulk_profile(i: int, **attributes: Any) -> dict[str, Any]:
    return {
        "type": "profile",
        "attributes": {"email": f"p{i}@example.com", "external_id": f"x{i}", **attributes},
    }


def run_job(fake: KlaviyoFake, profiles: list[Any]) -> tuple[dict[str, Any], list[Any]]:
    """POST a job, poll it until complete; (its attributes, its import errors)."""

    async def drive() -> tuple[dict[str, Any], list[Any]]:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=HEADERS) as c:
            posted = await c.post(JOBS, content=json.dumps(job_body(profiles)))
            assert posted.status_code == 202
            job_id = posted.json()["data"]["id"]
            statuses = []
            while True:
                attributes = (await c.get(f"{JOBS}/{job_id}")).json()["data"]["attributes"]
                statuses.append(attributes["status"])
                if attributes["status"] == "complete":
                    break
            assert statuses == ["processing", "processing", "complete"]
            errors = await c.get(f"{JOBS}/{job_id}/import-errors?page[size]=100")
            return attributes, errors.json()["data"]

    return asyncio.run(drive())


@pytest.mark.parametrize("freeze_state", [False, True])
def test_oversized_profiles_are_refused_at_every_place_of_their_slice(freeze_state: bool) -> None:
    fake = KlaviyoFake(rate_limits=False, seed=3, freeze_state=freeze_state)
    big = {0, 63, 64, 127, 130}
    profiles = [
        bulk_profile(i, properties={"note": "é" * 20_000} if i in big else {"n": i})
        for i in range(200)
    ]
    attributes, errors = run_job(fake, profiles)
    assert (attributes["completed_count"], attributes["failed_count"]) == (195, 5)
    assert [e["attributes"]["source"]["pointer"] for e in errors] == [
        f"/data/attributes/profiles/data/{i}" for i in sorted(big)
    ]
    assert {e["attributes"]["detail"] for e in errors} == {"A profile may not exceed 100 KB."}
    assert fake.profile_by_email("p63@example.com") is None
    assert fake.profile_by_email("p62@example.com") is not None
    assert gc.isenabled()


def test_a_frozen_state_stores_what_an_unfrozen_one_does() -> None:
    profiles = [
        bulk_profile(i, first_name="Ann", properties={"g": ["A"], "n": i}) for i in range(150)
    ]
    profiles[5]["attributes"]["email"] = "not an email"
    profiles[9] = bulk_profile(8)  # the same identifiers as profile 8: an update
    outcomes = []
    for freeze_state in (False, True):
        fake = KlaviyoFake(rate_limits=False, seed=5, freeze_state=freeze_state)
        attributes, errors = run_job(fake, profiles)
        stored = sorted(
            (p.attributes["email"], p.attributes["first_name"], p.properties)
            for p in fake.profiles.values()
        )
        outcomes.append((attributes["failed_count"], errors, stored))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == 1
    assert len(outcomes[0][2]) == 148


def test_stored_properties_are_copies_of_the_request() -> None:
    fake = KlaviyoFake(rate_limits=False, seed=1)
    first = bulk_profile(1, properties={"groups": ["A"], "nested": {"k": [1]}})
    again = {**bulk_profile(1), "meta": {"patch_properties": {"append": {"groups": "B"}}}}
    run_job(fake, [first])
    run_job(fake, [again])
    stored = fake.profile_by_email("p1@example.com")
    assert stored is not None
    assert stored.properties == {"groups": ["A", "B"], "nested": {"k": [1]}}
    recorded = fake.calls_to(JOBS, "POST")[0].body  # the fake's own parse of the request
    sent = recorded["data"]["attributes"]["profiles"]["data"][0]["attributes"]["properties"]
    assert sent == {"groups": ["A"], "nested": {"k": [1]}}
    stored.properties["nested"]["k"].append(2)
    assert sent == {"groups": ["A"], "nested": {"k": [1]}}


def test_ids_are_the_time_and_random_bits_in_crockford_base32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    fake = KlaviyoFake(seed=11)
    draws = KlaviyoFake(seed=11)._rng
    for seconds in (0.0, 1_700_000_000.123, 1_700_000_000.123, 1_799_999_999.999, 2**40 / 1000):
        monkeypatch.setattr(klaviyo.time, "time", lambda s=seconds: s)
        value = (int(seconds * 1000) << 80) | draws.getrandbits(80)
        expected = "".join(crockford[(value >> (5 * i)) & 31] for i in range(25, -1, -1))
        assert fake._new_id() == expected


def test_timestamps_are_utc_iso_to_the_microsecond() -> None:
    for _ in range(1000):
        before = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        stamp = klaviyo._iso_now()
        after = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
        assert before <= stamp <= after
        assert dt.datetime.fromisoformat(stamp).isoformat(timespec="microseconds") == stamp
