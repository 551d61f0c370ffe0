"""The ``braze`` destination (connector/destinations/braze.py).

Three groups:

- **Configuration**: the settings, what the capabilities derive from them, ``connector check``
  and ``connector map`` with mappings/braze.yaml.
- **The adapter through respx**, one documented answer at a time: 201 success, 201 with
  non-fatal ``errors[]``, 202 for merges, 400, 401, 403, 404, 429 with ``X-RateLimit-Reset``,
  5xx and timeouts, and the request each operation makes.
- **Whole flows through the fake** (tests/fakes/braze.py) with the real store, planner and
  worker (tests/vendor_flow.py): what Braze ends up holding.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import respx
from click.testing import CliRunner
from fakes.braze import BrazeFake
from fakes.clock import HandClock
from vendor_flow import DISPENSARY, Flow, event_body

from connector.cli import main
from connector.config import ConfigError, load_config
from connector.delivery.base import Delivery, Result, Sent
from connector.delivery.worker import CONTRACT_KEYS
from connector.destinations import capabilities, where
from connector.destinations.braze import BrazeDestination, BrazeSink
from connector.errors import FatalDelivery, QuotaPause, RetriableDelivery

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
MAPPING = ROOT / "mappings" / "braze.yaml"
SEED = Path(__file__).resolve().parent / "data" / "seed_body.json"
BASE = "https://rest.iad-01.braze.com"
KEY = "braze-rest-5d2f1c9e7a3b4d6f8e0a"  # never in a repr, an error or check's output
FAKE_KEY = "braze-test-rest-key"  # the fake's default
SMS = "sms-marketing"
EMAIL_GROUP = "email-news"
SHOP = "shop1"
TRACK = "/users/track"
MERGE = "/users/merge"
STATUS = "/v2/subscription/status/set"
PERSON = {"email": "mia@example.com", "phone": "(213) 555-0142"}


def ext(customer: str, dispensary: str = SHOP) -> str:
    return f"treez-{dispensary}-{customer}"


# ---- configuration -----------------------------------------------------------------------------


@pytest.fixture
def mapping_dir(tmp_path: Path) -> Path:
    shutil.copy(MAPPING, tmp_path / "braze.yaml")
    return tmp_path


def braze_config(base: Path, **extra: Any) -> BrazeDestination:
    data = {
        "name": "bz",
        "type": "braze",
        "api_key": KEY,
        "rest_endpoint": BASE,
        "mapping": "braze.yaml",
        "pace": False,
        "sms_subscription_groups": [SMS],
        **extra,
    }
    return BrazeDestination.model_validate(data, context={"base_dir": base})


def test_the_batch_is_the_object_limit_unless_set(mapping_dir: Path) -> None:
    assert capabilities(braze_config(mapping_dir)).batch_size == 75
    assert capabilities(braze_config(mapping_dir, objects_per_request=50)).batch_size == 50
    assert capabilities(braze_config(mapping_dir, batch_size=10)).batch_size == 10
    found = capabilities(braze_config(mapping_dir))
    assert found.native_merge is True
    assert found.matches_on == ("external_id",)
    assert found.consent_needs_fields is True
    assert found.bulk_size == 75
    assert [str(r) for r in found.default_rate_limit] == ["3000/3s"]
    sink = BrazeSink(braze_config(mapping_dir))
    assert sink.capabilities == found  # one place builds them


@pytest.mark.parametrize(
    ("extra", "where_"),
    [
        ({"api_key": " "}, "api_key"),
        ({"rest_endpoint": "not a url"}, "rest_endpoint"),
        ({"objects_per_request": 76}, "objects_per_request"),
        ({"objects_per_request": 50, "batch_size": 60}, "batch_size"),
        ({"sms_subscription_groups": [""]}, "sms_subscription_groups"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_settings_are_refused(mapping_dir: Path, extra: dict[str, Any], where_: str) -> None:
    with pytest.raises(ValueError, match=where_):
        braze_config(mapping_dir, **extra)


def test_rest_endpoint_is_required(mapping_dir: Path) -> None:
    data = {"name": "bz", "type": "braze", "api_key": KEY, "mapping": "braze.yaml"}
    with pytest.raises(ValueError, match="rest_endpoint"):
        BrazeDestination.model_validate(data, context={"base_dir": mapping_dir})


def test_where_names_the_host_and_never_the_key(mapping_dir: Path) -> None:
    config = braze_config(mapping_dir, rest_endpoint=f"{BASE}/some/path?x=1")
    text = where(config)
    assert text.startswith(BASE)
    assert "/some/path" not in text
    assert KEY not in text


def write_config(folder: Path) -> Path:
    (folder / "mappings").mkdir(exist_ok=True)
    shutil.copy(MAPPING, folder / "mappings" / "braze.yaml")
    path = folder / "config.yaml"
    block = f"""\
        - name: bz
          type: braze
          api_key: ${{BRAZE_API_KEY}}
          rest_endpoint: {BASE}
          mapping: mappings/braze.yaml
          sms_subscription_groups: [{SMS}]
        """
    path.write_text(
        "dispensaries:\n  shop1:\n    webhook_token: tok\n    destinations:\n"
        + textwrap.indent(textwrap.dedent(block), "      "),
        encoding="utf-8",
    )
    return path


def test_check_and_map_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path)
    monkeypatch.setenv("BRAZE_API_KEY", KEY)
    runner = CliRunner()
    checked = runner.invoke(main, ["check", "--config", str(path)])
    assert checked.exit_code == 0, checked.output
    assert f"braze → {BASE}" in checked.output
    assert KEY not in checked.output
    mapped = runner.invoke(
        main, ["map", "--show-values", str(SEED), "--config", str(path), "--destination", "bz"]
    )
    assert mapped.exit_code == 0, mapped.output
    contact = json.loads(mapped.stdout)
    assert contact["external_id"] == "treez-shop1-3904"
    assert contact["first_name"] == "Jules"
    assert contact["dob"] == "1948-02-12"
    assert contact["treez_opt_out"] is True  # the seed customer opted out
    assert "email_subscribe" not in contact

    monkeypatch.delenv("BRAZE_API_KEY")
    failed = runner.invoke(main, ["check", "--config", str(path)])
    assert failed.exit_code != 0
    assert "BRAZE_API_KEY" in failed.output


def test_an_empty_key_from_the_environment_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"BRAZE_API_KEY": ""})
    assert "api_key" in str(info.value)


# ---- the adapter through respx -----------------------------------------------------------------


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


def fields_of(customer: str = "1001", **overrides: Any) -> dict[str, Any]:
    return {
        "external_id": ext(customer),
        "first_name": "Mia",
        "email": "mia@example.com",
        "treez_opt_out": False,
        **overrides,
    }


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False, using="httpx") as mock:
        yield mock


def success(processed: int = 1, errors: list[Any] | None = None) -> httpx.Response:
    body: dict[str, Any] = {"message": "success", "attributes_processed": processed}
    if errors:
        body["errors"] = errors
    return httpx.Response(201, json=body)


def run(config: BrazeDestination, work: Callable[[BrazeSink], Awaitable[T]]) -> T:
    async def go() -> T:
        sink = BrazeSink(config, httpx.AsyncClient())
        try:
            return await work(sink)
        finally:
            await sink.aclose()

    return asyncio.run(go())


def send(config: BrazeDestination, *deliveries: Delivery) -> list[Result]:
    return run(config, lambda sink: sink.send(list(deliveries)))


def sent(router: respx.MockRouter) -> list[tuple[str, Any]]:
    return [(c.request.url.path, json.loads(c.request.content)) for c in router.calls]


def test_upsert_posts_users_track_keyed_by_the_mapped_external_id(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    route = router.post(TRACK).mock(return_value=success())
    [result] = send(braze_config(mapping_dir), delivery("upsert", fields=fields_of()))
    assert result == Sent(ext("1001"))
    request = route.calls.last.request
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    [item] = json.loads(request.content)["attributes"]
    assert item == {
        "external_id": ext("1001"),
        "first_name": "Mia",
        "email": "mia@example.com",
        "treez_opt_out": False,
    }


def test_upsert_of_a_known_contact_uses_it_and_never_sends_consent_from_the_mapping(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    fields = fields_of(email_subscribe="opted_in", braze_id="b1", subscription_groups=[{}])
    [result] = send(
        braze_config(mapping_dir), delivery("upsert", contact_id="old-id", fields=fields)
    )
    assert result == Sent("old-id")
    [(_, body)] = sent(router)
    [item] = body["attributes"]
    assert item["external_id"] == "old-id"
    assert not {"email_subscribe", "braze_id", "subscription_groups"} & set(item)


def test_an_opted_out_upsert_carries_unsubscribed_in_the_same_object(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    config = braze_config(mapping_dir, email_subscription_groups=[EMAIL_GROUP])
    send(config, delivery("upsert", fields=fields_of(treez_opt_out=True)))
    send(config, delivery("upsert", fields=fields_of(treez_opt_out=False)))
    [(_, opted_out), (_, opted_in)] = sent(router)
    assert opted_out["attributes"][0]["email_subscribe"] == "unsubscribed"
    # and out of every configured group in the same object (a recreated profile too)
    assert opted_out["attributes"][0]["subscription_groups"] == [
        {"subscription_group_id": SMS, "subscription_state": "unsubscribed"},
        {"subscription_group_id": EMAIL_GROUP, "subscription_state": "unsubscribed"},
    ]
    assert "email_subscribe" not in opted_in["attributes"][0]
    assert "subscription_groups" not in opted_in["attributes"][0]


def test_a_batch_goes_in_one_call_and_a_non_fatal_error_fails_only_its_operation(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    answer = success(
        2,
        [{"type": "'email' is not a valid email address", "input_array": "attributes", "index": 1}],
    )
    router.post(TRACK).mock(return_value=answer)
    router.post(STATUS).mock(return_value=httpx.Response(201, json={"message": "success"}))
    results = send(
        braze_config(mapping_dir),
        delivery("upsert", "1", fields=fields_of("1")),
        delivery("upsert", "2", fields=fields_of("2", email="bad-address-5551234")),
        delivery("unsubscribe", "3", contact_id=ext("3")),
    )
    assert [(p, len(b.get("attributes", []))) for p, b in sent(router)] == [(TRACK, 3), (STATUS, 0)]
    assert results[0] == Sent(ext("1"))
    assert isinstance(results[1], FatalDelivery)
    assert "attributes[1]" in str(results[1])
    assert "bad-address" not in str(results[1])
    assert results[2] == Sent(ext("3"))


def test_an_error_text_that_could_quote_a_value_is_withheld(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    answer = success(
        0, [{"type": "mia@example.com is invalid", "input_array": "attributes", "index": 0}]
    )
    router.post(TRACK).mock(return_value=answer)
    [result] = send(braze_config(mapping_dir), delivery("upsert", fields=fields_of()))
    assert isinstance(result, FatalDelivery)
    assert "mia@example.com" not in str(result)


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (400, {"message": "Max Input Length Exceeded"}, FatalDelivery),
        (401, {"message": "Unknown or missing REST API Key"}, FatalDelivery),
        (403, {"message": "Forbidden"}, FatalDelivery),
        (404, {"message": "Unknown REST API Key"}, FatalDelivery),
        (500, {"message": "Internal Server Error"}, RetriableDelivery),
        (503, None, RetriableDelivery),
    ],
)
def test_fatal_and_retriable_answers_fail_every_operation_of_the_call(
    router: respx.MockRouter,
    mapping_dir: Path,
    status: int,
    body: dict[str, Any] | None,
    kind: type[Exception],
) -> None:
    answer = httpx.Response(status, json=body) if body else httpx.Response(status, text="oops")
    router.post(TRACK).mock(return_value=answer)
    results = send(
        braze_config(mapping_dir),
        delivery("upsert", "1", fields=fields_of("1")),
        delivery("deactivate", "2", contact_id=ext("2")),
    )
    assert all(isinstance(r, kind) for r in results), results
    assert all(f"HTTP {status}" in str(r) for r in results)
    if body:
        assert body["message"] in str(results[0])
    assert all(KEY not in str(r) for r in results)


def test_an_auth_error_that_quotes_the_key_never_shows_it(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    answer = httpx.Response(401, json={"message": f"Invalid API key: {KEY}"})
    router.post(TRACK).mock(return_value=answer)
    [result] = send(braze_config(mapping_dir), delivery("upsert", fields=fields_of()))
    assert isinstance(result, FatalDelivery)
    assert KEY not in str(result)
    assert result.body is not None
    assert KEY not in result.body


def test_a_timeout_is_retriable(router: respx.MockRouter, mapping_dir: Path) -> None:
    router.post(TRACK).mock(side_effect=httpx.ReadTimeout("slow"))
    [result] = send(braze_config(mapping_dir), delivery("upsert", fields=fields_of()))
    assert isinstance(result, RetriableDelivery)


def test_a_429_raises_a_quota_pause_until_the_reset(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    reset = int(time.time()) + 30  # within Braze's windows (a pause is an hour at most)
    headers = {
        "x-ratelimit-limit": "3000",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": str(reset),
    }
    router.post(TRACK).mock(
        return_value=httpx.Response(429, json={"message": "Rate Limit Exceeded"}, headers=headers)
    )
    with pytest.raises(QuotaPause) as info:
        send(braze_config(mapping_dir), delivery("upsert", fields=fields_of()))
    assert info.value.until == reset
    assert info.value.status_code == 429
    assert KEY not in str(info.value)


def test_a_429_without_a_reset_is_an_ordinary_retriable_error(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=httpx.Response(429, json={"message": "slow down"}))
    [result] = send(braze_config(mapping_dir), delivery("upsert", fields=fields_of()))
    assert isinstance(result, RetriableDelivery)
    assert not isinstance(result, QuotaPause)


def test_unsubscribe_sets_email_and_leaves_the_sms_groups(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    router.post(STATUS).mock(return_value=httpx.Response(201, json={"message": "success"}))
    config = braze_config(mapping_dir, email_subscription_groups=[EMAIL_GROUP])
    results = send(
        config,
        delivery("unsubscribe", "1", contact_id=ext("1")),
        delivery("unsubscribe", "2", contact_id=ext("2"), channels=["sms"]),
    )
    assert results == [Sent(ext("1")), Sent(ext("2"))]
    (_, track), (_, status) = sent(router)
    assert track == {"attributes": [{"external_id": ext("1"), "email_subscribe": "unsubscribed"}]}
    assert status == {
        "subscription_groups": [
            {
                "subscription_group_id": SMS,
                "subscription_state": "unsubscribed",
                "external_ids": [ext("1"), ext("2")],
            },
            {
                "subscription_group_id": EMAIL_GROUP,
                "subscription_state": "unsubscribed",
                "external_ids": [ext("1")],
            },
        ]
    }


def test_an_unsubscribe_before_the_profile_exists_creates_it_unsubscribed(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    router.post(STATUS).mock(return_value=httpx.Response(201, json={"message": "success"}))
    fields = fields_of(phone="+12135550142")
    [result] = send(braze_config(mapping_dir), delivery("unsubscribe", fields=fields))
    assert result == Sent(ext("1001"))
    [item] = sent(router)[0][1]["attributes"]
    assert item == {
        "external_id": ext("1001"),
        "email": "mia@example.com",
        "phone": "+12135550142",
        "email_subscribe": "unsubscribed",
    }


def test_an_unsubscribe_with_nothing_to_address_waits(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    [result] = send(braze_config(mapping_dir), delivery("unsubscribe"))
    assert isinstance(result, RetriableDelivery)
    assert router.calls.call_count == 0


def test_a_failed_group_call_fails_its_unsubscribes_only(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success(2))
    router.post(STATUS).mock(return_value=httpx.Response(500, json={"message": "boom"}))
    results = send(
        braze_config(mapping_dir),
        delivery("upsert", "1", fields=fields_of("1")),
        delivery("unsubscribe", "2", contact_id=ext("2")),
    )
    assert results[0] == Sent(ext("1"))
    assert isinstance(results[1], RetriableDelivery)


def test_subscribe_never_opts_in_and_never_creates(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    router.post(STATUS).mock(return_value=httpx.Response(201, json={"message": "success"}))
    [result] = send(braze_config(mapping_dir), delivery("subscribe", contact_id=ext("1001")))
    assert result == Sent(ext("1001"))
    (_, track), (_, status) = sent(router)
    assert track == {
        "attributes": [
            {
                "external_id": ext("1001"),
                "_update_existing_only": True,
                "email_subscribe": "subscribed",
            }
        ]
    }
    assert status["subscription_groups"][0]["subscription_state"] == "subscribed"
    assert "opted_in" not in json.dumps(sent(router))


def test_merge_posts_users_merge_and_splits_at_50(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    route = router.post(MERGE).mock(return_value=httpx.Response(202, json={"message": "success"}))
    merges = [
        delivery(
            "merge", str(i), outbox_id=i, from_contact_id=ext(str(i)), into_contact_id=ext("9999")
        )
        for i in range(51)
    ]
    results = send(braze_config(mapping_dir), *merges)
    assert results == [Sent(ext("9999"))] * 51
    bodies = [json.loads(c.request.content) for c in route.calls]
    assert [len(b["merge_updates"]) for b in bodies] == [50, 1]
    assert bodies[0]["merge_updates"][0] == {
        "identifier_to_merge": {"external_id": ext("0")},
        "identifier_to_keep": {"external_id": ext("9999")},
    }


def test_merge_shortcuts(router: respx.MockRouter, mapping_dir: Path) -> None:
    results = send(
        braze_config(mapping_dir),
        delivery("merge", "1", into_contact_id="b"),  # the absorbed never reached Braze
        delivery("merge", "2", from_contact_id="a"),  # the survivor not known yet
        delivery("merge", "3", from_contact_id="b", into_contact_id="b"),
    )
    assert results[0] == Sent("b")
    assert isinstance(results[1], RetriableDelivery)
    assert results[2] == Sent("b")
    assert router.calls.call_count == 0


def test_a_refused_merge_request_fails_its_merges(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    answer = httpx.Response(400, json={"message": "identifiers must be objects of the same type"})
    router.post(MERGE).mock(return_value=answer)
    [result] = send(
        braze_config(mapping_dir), delivery("merge", from_contact_id="a", into_contact_id="b")
    )
    assert isinstance(result, FatalDelivery)
    assert "same type" in str(result)


def test_deactivate_sets_the_status_attribute_update_only(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    results = send(
        braze_config(mapping_dir),
        delivery("deactivate", "1", contact_id=ext("1")),
        delivery("deactivate", "2"),  # never reached Braze: nothing to do
    )
    assert results == [Sent(ext("1")), Sent()]
    [(_, body)] = sent(router)
    assert body == {
        "attributes": [
            {"external_id": ext("1"), "_update_existing_only": True, "treez_status": "DEACTIVATED"}
        ]
    }


def test_a_merged_away_customers_operations_never_create_a_profile(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    router.post(STATUS).mock(return_value=httpx.Response(201, json={"message": "success"}))

    async def claims(contact: str | None, kind: str | None) -> tuple[list[str], list[Any]]:
        return (["2002"] if contact == ext("2001") else ["1001"]), []

    async def work(sink: BrazeSink) -> list[Result]:
        sink.bind_identity_map(claims)
        return await sink.send(
            [
                delivery("upsert", "2001", contact_id=ext("2001"), fields=fields_of("2001")),
                delivery("upsert", "1001", contact_id=ext("1001"), fields=fields_of("1001")),
                delivery("subscribe", "2001", contact_id=ext("2001"), outbox_id=3),
            ]
        )

    results = run(braze_config(mapping_dir), work)
    [(_, body)] = sent(router)
    absorbed, own = body["attributes"]
    assert absorbed["_update_existing_only"] is True
    assert "_update_existing_only" not in own
    assert isinstance(results[2], Sent)
    assert results[2].conflict is not None  # not subscribed


def test_backfill_sends_the_object_limit_a_call(
    router: respx.MockRouter, mapping_dir: Path
) -> None:
    router.post(TRACK).mock(return_value=success())
    upserts = [
        delivery("upsert", str(i), outbox_id=i, fields=fields_of(str(i))) for i in range(120)
    ]
    config = braze_config(mapping_dir, objects_per_request=50)
    results = run(config, lambda sink: sink.backfill(upserts))
    assert results == [Sent(ext(str(i))) for i in range(120)]
    assert [len(body["attributes"]) for _, body in sent(router)] == [50, 50, 20]


def test_the_key_never_shows_in_a_repr(mapping_dir: Path) -> None:
    config = braze_config(mapping_dir)
    assert KEY not in repr(BrazeSink(config))
    assert KEY not in repr(config)


# ---- the adapter against the fake --------------------------------------------------------------


def test_a_429_of_the_fake_pauses_until_its_reset(mapping_dir: Path) -> None:
    clock = HandClock(1_800_000_000.0)
    fake = BrazeFake(clock=clock, rate_limits={"track": (2, 3.0)})
    config = braze_config(mapping_dir, api_key=FAKE_KEY)

    async def go() -> None:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app))
        sink = BrazeSink(config, client, wall=clock)
        try:
            for customer in ("1", "2"):
                await sink.send([delivery("upsert", customer, fields=fields_of(customer))])
            with pytest.raises(QuotaPause) as info:
                await sink.send([delivery("upsert", "3", fields=fields_of("3"))])
            assert info.value.until == 1_800_000_003
            clock.set(3.0)
            assert await sink.send([delivery("upsert", "3", fields=fields_of("3"))]) == [
                Sent(ext("3"))
            ]
        finally:
            await sink.aclose()

    asyncio.run(go())
    assert [c.status for c in fake.calls] == [201, 201, 429, 201]


def test_pacing_keeps_a_burst_under_the_fakes_track_limit(mapping_dir: Path) -> None:
    fake = BrazeFake(rate_limits={"track": (3_000, 3.0)})
    config = braze_config(mapping_dir, api_key=FAKE_KEY, pace=True, objects_per_request=1)

    async def go() -> None:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app))
        sink = BrazeSink(config, client)
        try:
            for customer in range(40):
                await sink.send(
                    [delivery("upsert", str(customer), fields=fields_of(str(customer)))]
                )
        finally:
            await sink.aclose()

    asyncio.run(go())
    assert {c.status for c in fake.calls} == {201}
    assert len(fake.profiles) == 40


# ---- flows through the fake --------------------------------------------------------------------


def flow_config(*dispensaries: str, policy: str | None = None) -> str:
    """config.yaml: each dispensary with one ``bz`` destination on the fake's workspace."""
    lines = ["store: sqlite:///connector.db", "dispensaries:"]
    for name in dispensaries or (DISPENSARY,):
        lines += [f"  {name}:", f"    webhook_token: token-{name}"]
        if policy is not None:
            lines += ["    policy:", f"      resubscribe: {policy}"]
        lines += [
            "    destinations:",
            "      - name: bz",
            "        type: braze",
            f"        api_key: {FAKE_KEY}",
            f"        rest_endpoint: {BASE}",
            "        mapping: braze.yaml",
            "        pace: false",
            f"        sms_subscription_groups: [{SMS}]",
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def clock() -> HandClock:
    return HandClock(1_800_000_000.0)


@pytest.fixture
def fake(clock: HandClock) -> BrazeFake:
    return BrazeFake(clock=clock, subscription_groups=[SMS], merge_delay=5.0)


@asynccontextmanager
async def braze_flow(work: Path, fake: BrazeFake, policy: str | None = None) -> AsyncIterator[Flow]:
    flow = Flow(
        work, flow_config(policy=policy), app=fake.app, sink_factory=BrazeSink, base_url=BASE
    )
    try:
        yield flow
    finally:
        await flow.close()


def me(customer: str) -> str:
    return ext(customer, DISPENSARY)


def test_flow_create_update_and_no_op(tmp_path: Path, fake: BrazeFake) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body("1001", 1, first_name="mia", **PERSON))
            profile = fake.profile(me("1001"))
            assert profile is not None
            assert profile["first_name"] == "Mia"
            assert profile["phone"] == "+12135550142"
            assert profile["email_subscribe"] == "subscribed"  # Braze's default stands
            assert flow.contact_ids() == {(DISPENSARY, "bz", "1001"): me("1001")}

            await flow.deliver(event_body("1001", 2, last_name="Wallace", **PERSON))
            profile = fake.profile(me("1001"))
            assert profile is not None
            assert profile["last_name"] == "Wallace"
            calls = len(fake.calls)
            await flow.deliver(
                event_body("1001", 3, notes="same mapping", last_name="Wallace", **PERSON)
            )
            assert len(fake.calls) == calls  # nothing the mapping carries changed
            assert len(fake.profiles) == 1
            assert flow.ops() == ["upsert", "upsert"]
            assert fake.subscribes == []

    asyncio.run(go())


def test_flow_opt_out_unsubscribes_email_and_sms_and_an_opt_in_changes_nothing(
    tmp_path: Path, fake: BrazeFake
) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body("1001", 1, **PERSON))
            await flow.deliver(event_body("1001", 2, opt_out="true", **PERSON))
            assert fake.consent(me("1001")) == {"email": "unsubscribed", SMS: "unsubscribed"}
            [status] = fake.calls_to(STATUS)
            assert status.body["subscription_groups"][0]["external_ids"] == [me("1001")]

            await flow.deliver(event_body("1001", 3, opt_out="false", first_name="Mimi", **PERSON))
            assert fake.consent(me("1001")) == {"email": "unsubscribed", SMS: "unsubscribed"}
            assert fake.subscribes == []
            # the opt-out also changes the mapped treez_opt_out: an upsert with it
            assert flow.ops() == ["upsert", "upsert", "unsubscribe", "upsert"]
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_flow_opt_out_on_first_sight_is_never_subscribed_for_a_moment(
    tmp_path: Path, fake: BrazeFake
) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body("1001", 1, opt_out="true", **PERSON))
            assert fake.email_history(me("1001")) == ["unsubscribed"]
            assert fake.consent(me("1001")) == {"email": "unsubscribed", SMS: "unsubscribed"}
            assert flow.ops() == ["upsert", "unsubscribe"]
            assert fake.subscribes == []

    asyncio.run(go())


def test_flow_opt_in_resubscribes_only_under_the_policy(tmp_path: Path, fake: BrazeFake) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake, policy="on_source_opt_in") as flow:
            await flow.deliver(event_body("1001", 1, opt_out="true", **PERSON))
            await flow.deliver(event_body("1001", 2, opt_out="false", **PERSON))
            assert fake.consent(me("1001")) == {"email": "subscribed", SMS: "subscribed"}
            assert [(c.channel, c.state) for c in fake.subscribes] == [
                ("email", "subscribed"),
                (SMS, "subscribed"),
            ]
            assert "opted_in" not in json.dumps([c.body for c in fake.calls])
            assert flow.ops() == ["upsert", "unsubscribe", "upsert", "subscribe"]

    asyncio.run(go())


ABSORBED, SURVIVOR, FINAL = "2001", "2002", "2003"
VINCENT = {"email": "vincent@example.com"}
VEGA = {"email": "vega@example.com", "phone": "(310) 555-1234"}


def merge_pair(absorbed: str, survivor: str, version: int, **fields: Any) -> tuple[bytes, bytes]:
    return (
        event_body(survivor, version, merged_customer_ids=[absorbed], **VEGA),
        event_body(
            absorbed, version, status="DEACTIVATED", merged_into_customer_id=survivor, **fields
        ),
    )


@pytest.mark.parametrize("survivor_first", [True, False], ids=["survivor-first", "absorbed-first"])
def test_flow_merge_once_in_either_order_repeated_and_asynchronous(
    tmp_path: Path, fake: BrazeFake, clock: HandClock, survivor_first: bool
) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body(ABSORBED, 1, first_name="Vincent", **VINCENT),
                event_body(SURVIVOR, 1, **VEGA),
            )
            survivor, absorbed = merge_pair(ABSORBED, SURVIVOR, 2, **VINCENT)
            pair = [survivor, absorbed] if survivor_first else [absorbed, survivor]
            for _ in range(2):
                for body in pair:
                    await flow.deliver(body)
            [merge] = fake.calls_to(MERGE)
            assert merge.status == 202
            assert merge.body == {
                "merge_updates": [
                    {
                        "identifier_to_merge": {"external_id": me(ABSORBED)},
                        "identifier_to_keep": {"external_id": me(SURVIVOR)},
                    }
                ]
            }
            assert fake.profile(me(ABSORBED)) is not None  # not applied yet
            clock.advance(5.0)
            assert fake.profile(me(ABSORBED)) is None
            kept = fake.profile(me(SURVIVOR))
            assert kept is not None
            assert kept["email"] == "vega@example.com"
            assert flow.ops(ABSORBED) == ["upsert", "merge"]

            # a stray later payload of the absorbed id recreates nothing
            await flow.deliver(event_body(ABSORBED, 3, first_name="Vinnie", **VINCENT))
            assert fake.profile(me(ABSORBED)) is None
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_flow_an_absorbed_customers_opt_out_reaches_the_survivor_and_recreates_nothing(
    tmp_path: Path, fake: BrazeFake
) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body(ABSORBED, 1, **VINCENT), event_body(SURVIVOR, 1, **VEGA))
            for body in merge_pair(ABSORBED, SURVIVOR, 2, **VINCENT):
                await flow.deliver(body)
            fake.settle()
            await flow.deliver(event_body(ABSORBED, 3, opt_out="true", **VINCENT))
            assert fake.profile(me(ABSORBED)) is None
            assert fake.consent(me(SURVIVOR)) == {"email": "unsubscribed", SMS: "unsubscribed"}
            assert fake.subscribes == []

    asyncio.run(go())


def test_flow_merge_chain_goes_into_the_final_survivor(tmp_path: Path, fake: BrazeFake) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(
                event_body(ABSORBED, 1, **VINCENT),
                event_body(SURVIVOR, 1, **VEGA),
                event_body(FINAL, 1, email="final@example.com"),
            )
            # B into C first, then A into B: A goes into C
            for body in merge_pair(SURVIVOR, FINAL, 2):
                await flow.deliver(body)
            for body in merge_pair(ABSORBED, SURVIVOR, 3):
                await flow.deliver(body)
            merges = [
                (u["identifier_to_merge"]["external_id"], u["identifier_to_keep"]["external_id"])
                for c in fake.calls_to(MERGE)
                for u in c.body["merge_updates"]
            ]
            assert merges == [(me(SURVIVOR), me(FINAL)), (me(ABSORBED), me(FINAL))]
            fake.settle()
            assert fake.merge_failures == []
            assert [p["external_id"] for p in fake.profiles] == [me(FINAL)]

    asyncio.run(go())


def test_flow_deactivation_and_reactivation(tmp_path: Path, fake: BrazeFake) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body("1001", 1, **PERSON))
            await flow.deliver(event_body("1001", 2, status="DEACTIVATED", **PERSON))
            profile = fake.profile(me("1001"))
            assert profile is not None
            assert profile["treez_status"] == "DEACTIVATED"
            assert profile["email"] == "mia@example.com"
            await flow.deliver(event_body("1001", 3, status="ACTIVE", **PERSON))
            profile = fake.profile(me("1001"))
            assert profile is not None
            assert profile["treez_status"] == "ACTIVE"
            assert flow.ops() == ["upsert", "deactivate", "upsert"]

    asyncio.run(go())


def test_flow_a_bad_input_in_a_batch_dead_letters_only_its_operation(
    tmp_path: Path, fake: BrazeFake
) -> None:
    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            flow.start()
            bodies = [event_body(str(3000 + i), 1, email=f"c{i}@example.com") for i in range(5)]
            # the fake refuses this one object (an e-mail Braze finds invalid)
            bodies[2] = event_body("3002", 1, email="c2@example")
            await flow.deliver(*bodies)
            [dead] = flow.dead_letters()
            assert "attributes[" in dead["reason"]
            assert "c2@example" not in dead["reason"]
            done = {r["customer_id"] for r in flow.outbox() if r["status"] == "done"}
            assert done == {"3000", "3001", "3003", "3004"}
            assert len(fake.profiles) == 4
            assert len(fake.calls_to(TRACK)) == 1  # the batch went in one call

    asyncio.run(go())


def test_flow_a_profile_deleted_in_braze_comes_back_unsubscribed_when_opted_out(
    tmp_path: Path, fake: BrazeFake
) -> None:
    """A gone id: Braze has no 404 for it; the next update recreates the profile under the
    same external id, and an opted-out customer's comes back unsubscribed in that call."""

    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body("1001", 1, opt_out="true", **PERSON))
            assert fake.delete(me("1001"))
            await flow.deliver(event_body("1001", 2, first_name="Mimi", **PERSON))
            assert fake.email_history(me("1001")) == ["unsubscribed"]
            assert flow.contact_ids() == {(DISPENSARY, "bz", "1001"): me("1001")}
            assert fake.subscribes == []

    asyncio.run(go())


def test_flow_a_429_pauses_the_destination_until_brazes_reset_with_no_attempt_counted(
    tmp_path: Path,
) -> None:
    """Braze's own 429 (fixed 3 s window of one request here): the worker pauses the whole
    destination until ``X-RateLimit-Reset`` and then delivers, the pause costing no attempt."""
    fake = BrazeFake(subscription_groups=[SMS], rate_limits={"track": (1, 3.0)})

    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            while time.time() % 3.0 > 0.2:  # start at the beginning of a window
                await asyncio.sleep(0.02)
            await flow.deliver(event_body("1001", 1, **PERSON))
            await flow.deliver(event_body("1002", 1, email="jules@example.com"), timeout=10.0)
            statuses = [c.status for c in fake.calls]
            assert statuses == [201, 429, 201]
            throttled = fake.calls[1]
            assert throttled.response == {"message": "Rate Limit Exceeded"}
            retried = fake.calls[2]
            assert retried.at >= math.ceil(throttled.at / 3.0) * 3.0  # not before the reset
            [row] = [r for r in flow.outbox() if r["customer_id"] == "1002"]
            assert (row["status"], row["attempts"]) == ("done", 1)
            assert flow.dead_letters() == []

    asyncio.run(go())


def test_flow_a_replayed_opt_out_of_a_merged_away_customer_recreates_nothing(
    tmp_path: Path, fake: BrazeFake
) -> None:
    """A gone id: the absorbed customer's opt-out was dead-lettered before the merge and is
    replayed after Braze applied it. Sent as it was, it would create a new user under the
    absorbed external id; it goes update-only, so nothing is created (the survivor got the
    opt-out from the merge itself)."""

    async def go() -> None:
        async with braze_flow(tmp_path, fake) as flow:
            await flow.deliver(event_body(ABSORBED, 1, **VINCENT), event_body(SURVIVOR, 1, **VEGA))
            fake.fail_next(400, 2)
            await flow.deliver(event_body(ABSORBED, 2, opt_out="true", **VINCENT))
            assert {d["op"] for d in flow.dead_letters()} >= {"unsubscribe"}
            for body in merge_pair(ABSORBED, SURVIVOR, 3, **VINCENT):
                await flow.deliver(body)
            fake.settle()
            assert fake.profile(me(ABSORBED)) is None
            assert fake.consent(me(SURVIVOR)) == {"email": "unsubscribed", SMS: "unsubscribed"}

            replayed = await asyncio.to_thread(flow.store.replay)
            assert replayed.replayed >= 1
            await flow.drain()
            [*_, last] = fake.calls_to(TRACK)
            assert last.body["attributes"][0]["external_id"] == me(ABSORBED)
            assert last.body["attributes"][0]["_update_existing_only"] is True
            assert fake.profile(me(ABSORBED)) is None
            assert [p["external_id"] for p in fake.profiles] == [me(SURVIVOR)]
            assert fake.subscribes == []

    asyncio.run(go())
