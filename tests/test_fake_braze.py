"""The fake of Braze's REST API (tests/fakes/braze.py) does what Braze's documentation says,
in process through httpx's ASGI transport (and once as a process)."""

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
from fakes.braze import DEFAULT_API_KEY, BrazeFake
from fakes.clock import HandClock

ROOT = Path(__file__).resolve().parent.parent
BASE_URL = "https://rest.iad-01.braze.com"
TRACK = "/users/track"
MERGE = "/users/merge"
STATUS = "/v2/subscription/status/set"
SMS = "sms-marketing"


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1_800_000_000.0)


@pytest.fixture
def fake(clock: HandClock) -> BrazeFake:
    return BrazeFake(clock=clock, subscription_groups=[SMS], merge_delay=5.0)


def post(
    fake: BrazeFake,
    path: str,
    body: Any = None,
    *,
    key: str | None = DEFAULT_API_KEY,
    content: bytes | None = None,
) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            if content is not None:
                return await client.post(path, content=content, headers=headers)
            return await client.post(path, json=body, headers=headers)

    return asyncio.run(go())


def track(fake: BrazeFake, *attributes: dict[str, Any]) -> httpx.Response:
    return post(fake, TRACK, {"attributes": list(attributes)})


# ---- auth, routes, bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "wrong"])
def test_a_missing_or_wrong_bearer_key_is_401(fake: BrazeFake, key: str | None) -> None:
    response = post(fake, TRACK, {"attributes": [{"external_id": "a"}]}, key=key)
    assert response.status_code == 401
    assert "message" in response.json()
    assert fake.profiles == []


def test_another_scheme_is_401(fake: BrazeFake) -> None:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            headers = {"Authorization": f"Basic {DEFAULT_API_KEY}"}
            return await client.post(TRACK, json={"attributes": []}, headers=headers)

    assert asyncio.run(go()).status_code == 401


def test_unknown_paths_are_404_and_bodies_must_be_json_objects(fake: BrazeFake) -> None:
    assert post(fake, "/users/nothing", {}).status_code == 404
    assert post(fake, TRACK, content=b"not json").status_code == 400
    assert post(fake, TRACK, [{"external_id": "a"}]).status_code == 400


# ---- /users/track ------------------------------------------------------------------------------


def test_track_creates_by_external_id_subscribed_by_default_and_answers_201(
    fake: BrazeFake,
) -> None:
    response = track(fake, {"external_id": "a", "first_name": "Jules", "points": 3})
    assert response.status_code == 201
    assert response.json() == {"message": "success", "attributes_processed": 1}
    profile = fake.profile("a")
    assert profile is not None
    assert profile["first_name"] == "Jules"
    assert profile["points"] == 3
    assert profile["email_subscribe"] == "subscribed"
    assert fake.email_history("a") == ["subscribed"]
    assert fake.subscribes == []  # Braze's default is no opt-in of ours


def test_track_updates_the_same_profile_and_null_removes_an_attribute(fake: BrazeFake) -> None:
    track(fake, {"external_id": "a", "first_name": "Jules", "city": "X"})
    track(fake, {"external_id": "a", "first_name": "Mia", "city": None})
    assert len(fake.profiles) == 1
    profile = fake.profile("a")
    assert profile is not None
    assert profile["first_name"] == "Mia"
    assert "city" not in profile


def test_a_profile_created_unsubscribed_never_was_subscribed(fake: BrazeFake) -> None:
    track(fake, {"external_id": "a", "email": "a@example.com", "email_subscribe": "unsubscribed"})
    assert fake.email_history("a") == ["unsubscribed"]
    track(fake, {"external_id": "b", "email": "b@example.com"})
    track(fake, {"external_id": "b", "email_subscribe": "unsubscribed"})
    assert fake.email_history("b") == ["subscribed", "unsubscribed"]


def test_explicit_opt_ins_are_recorded(fake: BrazeFake) -> None:
    track(fake, {"external_id": "a", "email_subscribe": "unsubscribed"})
    track(fake, {"external_id": "a", "email_subscribe": "subscribed"})
    track(fake, {"external_id": "b", "email_subscribe": "opted_in"})
    assert [(c.external_id, c.previous, c.state) for c in fake.subscribes] == [
        ("a", "unsubscribed", "subscribed"),
        ("b", None, "opted_in"),
    ]


def test_email_subscribe_from_track_reaches_every_profile_with_that_email(
    fake: BrazeFake,
) -> None:
    track(fake, {"external_id": "a", "email": "Same@example.com"})
    track(fake, {"external_id": "b", "email": "same@example.com"})
    track(fake, {"external_id": "a", "email_subscribe": "unsubscribed"})
    assert fake.consent("b")["email"] == "unsubscribed"


def test_one_bad_object_is_a_non_fatal_error_and_the_rest_is_processed(fake: BrazeFake) -> None:
    response = track(
        fake,
        {"external_id": "a"},
        {"first_name": "no identifier"},
        {"external_id": "c", "email": "not-an-email"},
        {"external_id": "d", "email_subscribe": "maybe"},
        {"external_id": "e"},
    )
    assert response.status_code == 201
    data = response.json()
    assert data["message"] == "success"
    assert data["attributes_processed"] == 2
    assert [(e["input_array"], e["index"]) for e in data["errors"]] == [
        ("attributes", 1),
        ("attributes", 2),
        ("attributes", 3),
    ]
    assert all(isinstance(e["type"], str) for e in data["errors"])
    assert {p["external_id"] for p in fake.profiles} == {"a", "e"}


def test_update_existing_only_never_creates(fake: BrazeFake) -> None:
    response = track(fake, {"external_id": "a", "_update_existing_only": True, "x": 1})
    assert response.status_code == 201
    assert fake.profile("a") is None
    track(fake, {"external_id": "a"})
    track(fake, {"external_id": "a", "_update_existing_only": True, "x": 1})
    assert fake.profile("a") == {**(fake.profile("a") or {}), "x": 1}


@pytest.mark.parametrize("limit", [75, 50])
def test_more_objects_than_the_limit_is_a_fatal_400(clock: HandClock, limit: int) -> None:
    fake = BrazeFake(clock=clock, objects_per_request=limit)
    ok = post(fake, TRACK, {"attributes": [{"external_id": str(i)} for i in range(limit)]})
    assert ok.status_code == 201
    over = post(fake, TRACK, {"attributes": [{"external_id": str(i)} for i in range(limit + 1)]})
    assert over.status_code == 400
    assert over.json()["message"] == "Max Input Length Exceeded"


def test_the_combined_limit_counts_every_array(clock: HandClock) -> None:
    fake = BrazeFake(clock=clock, objects_per_request=50, combined_limit=True)
    events = [{"external_id": "a", "name": "visit", "time": "2026-01-01T00:00:00Z"}] * 25
    body = {"attributes": [{"external_id": str(i)} for i in range(26)], "events": events}
    assert post(fake, TRACK, body).status_code == 400
    body["attributes"] = body["attributes"][:25]
    assert post(fake, TRACK, body).status_code == 201


def test_subscription_groups_in_track(fake: BrazeFake) -> None:
    group = {"subscription_group_id": SMS, "subscription_state": "unsubscribed"}
    track(fake, {"external_id": "a", "subscription_groups": [group]})
    assert fake.consent("a") == {"email": "subscribed", SMS: "unsubscribed"}
    unknown = {"subscription_group_id": "nope", "subscription_state": "unsubscribed"}
    response = track(fake, {"external_id": "b", "subscription_groups": [unknown]})
    assert response.json()["errors"][0]["index"] == 0


# ---- /v2/subscription/status/set ---------------------------------------------------------------


def test_status_set_moves_groups_by_external_id(fake: BrazeFake) -> None:
    track(fake, {"external_id": "a"}, {"external_id": "b"})
    body = {
        "subscription_groups": [
            {
                "subscription_group_id": SMS,
                "subscription_state": "subscribed",
                "external_ids": ["a"],
            },
            {
                "subscription_group_id": SMS,
                "subscription_state": "unsubscribed",
                "external_ids": ["b", "nobody"],
            },
        ]
    }
    response = post(fake, STATUS, body)
    assert response.status_code == 201
    assert response.json() == {"message": "success"}
    assert fake.consent("a")[SMS] == "subscribed"
    assert fake.consent("b")[SMS] == "unsubscribed"
    assert fake.profile("nobody") is None  # no profile is created
    assert [(c.external_id, c.channel) for c in fake.subscribes] == [("a", SMS)]


@pytest.mark.parametrize(
    "entry",
    [
        {"subscription_group_id": SMS, "subscription_state": "maybe", "external_ids": ["a"]},
        {
            "subscription_group_id": "nope",
            "subscription_state": "subscribed",
            "external_ids": ["a"],
        },
        {"subscription_group_id": SMS, "subscription_state": "subscribed"},
        {
            "subscription_group_id": SMS,
            "subscription_state": "subscribed",
            "emails": ["a@example.com"],
            "phones": ["+13105550100"],
        },
        {
            "subscription_group_id": SMS,
            "subscription_state": "subscribed",
            "external_ids": [str(i) for i in range(51)],
        },
    ],
)
def test_status_set_refuses_a_bad_entry_whole(fake: BrazeFake, entry: dict[str, Any]) -> None:
    track(fake, {"external_id": "a"})
    good = {"subscription_group_id": SMS, "subscription_state": "subscribed", "external_ids": ["a"]}
    response = post(fake, STATUS, {"subscription_groups": [good, entry]})
    assert response.status_code == 400
    assert SMS not in fake.consent("a")  # nothing applied


# ---- /users/merge ------------------------------------------------------------------------------


def merge_body(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {
        "merge_updates": [
            {"identifier_to_merge": {"external_id": a}, "identifier_to_keep": {"external_id": b}}
            for a, b in pairs
        ]
    }


def test_a_merge_is_accepted_and_lands_later_on_the_clock(
    fake: BrazeFake, clock: HandClock
) -> None:
    track(fake, {"external_id": "a", "email": "a@example.com", "only_a": 1, "both": "a"})
    track(fake, {"external_id": "b", "both": "b"})
    response = post(fake, MERGE, merge_body(("a", "b")))
    assert response.status_code == 202
    assert response.json() == {"message": "success"}
    assert fake.profile("a") is not None  # asynchronous: still there
    assert len(fake.pending_merges) == 1
    clock.advance(5.0)
    assert fake.profile("a") is None
    kept = fake.profile("b")
    assert kept is not None
    assert kept["only_a"] == 1
    assert kept["both"] == "b"
    assert kept["email"] == "a@example.com"
    assert [(m.merged, m.kept) for m in fake.merges] == [("a", "b")]


def test_settle_applies_merges_at_once_and_a_merge_of_no_profile_fails_silently(
    fake: BrazeFake,
) -> None:
    track(fake, {"external_id": "a"}, {"external_id": "b"})
    assert post(fake, MERGE, merge_body(("a", "b"), ("a", "b"), ("x", "b"))).status_code == 202
    fake.settle()
    assert [(m.merged, m.kept) for m in fake.merges] == [("a", "b")]
    assert [(m.merged, m.kept) for m in fake.merge_failures] == [("a", "b"), ("x", "b")]


def test_a_track_after_the_merge_creates_a_new_profile_with_the_absorbed_id(
    fake: BrazeFake,
) -> None:
    track(fake, {"external_id": "a"}, {"external_id": "b"})
    post(fake, MERGE, merge_body(("a", "b")))
    fake.settle()
    track(fake, {"external_id": "a", "late": True})
    again = fake.profile("a")
    assert again is not None
    assert again["email_subscribe"] == "subscribed"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"merge_updates": "x"}, "'merge_updates' must be an array of objects"),
        (merge_body(*[("a", "b")] * 51), "more than 50 merge updates"),
        ({"merge_updates": [{"identifier_to_merge": {"external_id": "a"}}]}, "must only have"),
        (
            {
                "merge_updates": [
                    {
                        "identifier_to_merge": {"external_id": "a"},
                        "identifier_to_keep": {"user_alias": {"alias_name": "x"}},
                    }
                ]
            },
            "same type",
        ),
        (
            {
                "merge_updates": [
                    {
                        "identifier_to_merge": {"external_id": 1},
                        "identifier_to_keep": {"external_id": "b"},
                    }
                ]
            },
            "identifiers must be objects",
        ),
    ],
)
def test_merge_errors_are_400_with_the_documented_messages(
    fake: BrazeFake, body: dict[str, Any], message: str
) -> None:
    response = post(fake, MERGE, body)
    assert response.status_code == 400
    assert message in response.json()["message"]
    assert fake.pending_merges == []


def test_delete(fake: BrazeFake) -> None:
    track(fake, {"external_id": "a"})
    response = post(fake, "/users/delete", {"external_ids": ["a", "zz"]})
    assert response.status_code == 201
    assert response.json() == {"deleted": 1, "message": "success"}
    assert fake.profile("a") is None


# ---- rate limits -------------------------------------------------------------------------------


def test_track_is_limited_per_fixed_window_with_brazes_headers(clock: HandClock) -> None:
    clock.set(0.0)  # 1_800_000_000 is a multiple of 3: a window starts here
    fake = BrazeFake(clock=clock, rate_limits={"track": (3, 3.0)})
    answers = [track(fake, {"external_id": "a"}) for _ in range(3)]
    assert [r.headers["x-ratelimit-remaining"] for r in answers] == ["2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit"] == "3" for r in answers)
    reset = int(clock.start + 3)
    assert answers[0].headers["x-ratelimit-reset"] == str(reset)
    throttled = track(fake, {"external_id": "a"})
    assert throttled.status_code == 429
    assert "retry-after" not in throttled.headers
    assert throttled.headers["x-ratelimit-reset"] == str(reset)
    assert "message" in throttled.json()
    # another family has its own window
    assert post(fake, MERGE, merge_body(("a", "b"))).status_code == 202
    clock.advance(3.0)
    assert track(fake, {"external_id": "a"}).status_code == 201


def test_merge_and_delete_share_a_window(clock: HandClock) -> None:
    fake = BrazeFake(clock=clock, rate_limits={"users": (2, 60.0)})
    assert post(fake, MERGE, merge_body(("a", "b"))).status_code == 202
    assert post(fake, "/users/delete", {"external_ids": ["a"]}).status_code == 201
    assert post(fake, MERGE, merge_body(("a", "b"))).status_code == 429


def test_documented_default_limits() -> None:
    fake = BrazeFake()
    assert fake.rate_limits == {
        "track": (3_000, 3.0),
        "users": (20_000, 60.0),
        "subscription": (5_000, 60.0),
    }
    assert BrazeFake(rate_limits=False).rate_limits == {}


def test_fail_next_answers_scripted_statuses(fake: BrazeFake) -> None:
    fake.fail_next(500, 2)
    fake.fail_next(400, body={"message": "custom"})
    assert track(fake, {"external_id": "a"}).status_code == 500
    assert track(fake, {"external_id": "a"}).status_code == 500
    third = track(fake, {"external_id": "a"})
    assert third.status_code == 400
    assert third.json() == {"message": "custom"}
    assert track(fake, {"external_id": "a"}).status_code == 201


# ---- process mode ------------------------------------------------------------------------------


def test_process_mode_serves_and_exits_cleanly_on_sigterm() -> None:
    command = [sys.executable, "-m", "tests.fakes.braze", "--port", "0", "--api-key", "k9"]
    command += ["--merge-delay", "0"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            port = listening_port(process)
            headers = {"Authorization": "Bearer k9"}
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base, headers=headers, timeout=5.0) as client:
                response = client.post(TRACK, json={"attributes": [{"external_id": "a"}]})
                assert response.status_code == 201
                assert "x-ratelimit-reset" in response.headers
                assert (
                    client.post(TRACK, json={}, headers={"Authorization": "Bearer x"}).status_code
                    == 401
                )
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=20.0)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert process.returncode == 0, stderr
