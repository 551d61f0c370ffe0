"""The backfill bulk paths: Alpine IQ's bulk calls one at a time, so never two at once for one
customer (or one phone or e-mail); Klaviyo's jobs built from each profile encoded once, the
same bytes and the same splits as before."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from test_alpineiq import BASE_URL, BULK, aiq_config
from test_alpineiq import delivery as aiq_delivery
from test_klaviyo import delivery as klaviyo_delivery
from test_klaviyo import klaviyo_config, mapping_dir  # noqa: F401 - a fixture

from connector.delivery._http import json_body
from connector.delivery.base import Delivery, Sent
from connector.destinations.alpineiq import AlpineIQSink
from connector.destinations.klaviyo import MAX_JOB_BYTES, KlaviyoSink


def aiq_backfill(deliveries: list[Delivery], bulk_size: int) -> tuple[list[Any], list[Any]]:
    """The backfill through respx, each bulk call answered after a pause; (results, the
    srcIDs of the calls under way each time a call starts)."""
    under_way: list[list[str]] = []
    current: dict[int, list[str]] = {}

    async def answer(request: httpx.Request) -> httpx.Response:
        members = json.loads(request.content)
        ids = [m["srcID"] for m in members]
        current[id(request)] = ids
        under_way.append(sorted(i for each in current.values() for i in each))
        await asyncio.sleep(0.02)
        del current[id(request)]
        results = [{"contactID": f"p-{m['srcID']}"} for m in members]
        return httpx.Response(200, json={"success": True, "data": {"results": results}})

    async def go() -> list[Any]:
        sink = AlpineIQSink(aiq_config(bulk_size=bulk_size))
        try:
            return await sink.backfill(deliveries)
        finally:
            await sink.aclose()

    with respx.mock(base_url=BASE_URL, assert_all_called=False) as api:
        route = api.post(BULK).mock(side_effect=answer)
        results = asyncio.run(go())
        assert route.call_count == -(-sum(d.op == "upsert" for d in deliveries) // bulk_size)
    return results, under_way


@pytest.mark.parametrize(
    "shared",
    [
        {"customer": "0"},  # the same customer in chunks 1 and 2
        {"fields": {"email": "SAME@example.com"}},
        {"fields": {"mobilePhone": "+12135550100"}},
        {"contact_id": "persona-1"},
    ],
)
def test_alpineiq_backfill_never_runs_one_person_in_two_calls_at_once(
    shared: dict[str, Any],
) -> None:
    def make(n: int) -> Delivery:
        fields = {"email": f"c{n}@example.com"}
        options: dict[str, Any] = {}
        customer = str(n)
        if n in (0, 2):
            fields.update(shared.get("fields", {}))
            customer = shared.get("customer", customer)
            if "contact_id" in shared:
                options["contact_id"] = shared["contact_id"]
        if n == 0 and "fields" in shared:
            fields["email"] = fields["email"].lower()  # matched whatever its case
        return aiq_delivery("upsert", customer, fields=fields, outbox_id=n, **options)

    deliveries = [make(n) for n in range(4)]
    results, under_way = aiq_backfill(deliveries, bulk_size=2)
    assert len(results) == 4
    first = {deliveries[0].customer_id, "1"}
    assert all(not (first <= set(ids) and "2" in ids) for ids in under_way)
    assert len(under_way) == 2  # one call at a time
    assert all(len(ids) == 2 for ids in under_way)


def old_jobs(sink: KlaviyoSink, deliveries: list[Delivery]) -> list[list[int]]:
    """The split as it was written before the profiles were encoded once."""
    jobs: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index in range(len(deliveries)):
        length = len(json.dumps(sink.bulk_profile(deliveries[index]), separators=(",", ":")))
        if current and (
            len(current) >= sink.config.bulk_size or size + length > MAX_JOB_BYTES - 4096
        ):
            jobs.append(current)
            current, size = [], 0
        current.append(index)
        size += length + 1
    if current:
        jobs.append(current)
    return jobs


def test_klaviyo_job_bodies_and_splits_are_as_before(mapping_dir: Path) -> None:  # noqa: F811
    notes = ["x" * 95_000, "é" * 30_000 + "😀" * 5_000, "plain", "ü" * 40_000]
    deliveries = [
        klaviyo_delivery(
            "upsert",
            f"c{n}",
            fields={"email": f"c{n}@example.com", "properties": {"notes": notes[n % 4]}},
            contact_id="01K3" if n == 5 else None,
            outbox_id=n,
        )
        for n in range(90)
    ]
    bodies: list[bytes] = []

    def create(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        job = {"type": "profile-bulk-import-job", "id": f"job{len(bodies)}"}
        return httpx.Response(202, json={"data": job})

    def poll(request: httpx.Request) -> httpx.Response:
        attributes = {"status": "complete"}
        return httpx.Response(200, json={"data": {"id": "j", "attributes": attributes}})

    async def no_sleep(seconds: float) -> None:
        return None

    config = klaviyo_config(mapping_dir)

    async def go() -> tuple[list[Any], list[list[int]]]:
        sink = KlaviyoSink(config, httpx.AsyncClient(), sleep=no_sleep)
        try:
            return await sink.backfill(deliveries), old_jobs(sink, deliveries)
        finally:
            await sink.aclose()

    with respx.mock(base_url=str(config.base_url), assert_all_called=False) as api:
        api.post("/api/profile-bulk-import-jobs").mock(side_effect=create)
        api.get(path__regex=r"^/api/profile-bulk-import-jobs/[^/]+$").mock(side_effect=poll)
        results, splits = asyncio.run(go())

    assert results == [Sent("01K3") if n == 5 else Sent(None) for n in range(90)]
    assert len(bodies) == len(splits) > 1
    sink = KlaviyoSink(config, httpx.AsyncClient())
    for body, split in zip(bodies, splits, strict=True):
        profiles = [sink.bulk_profile(deliveries[i]) for i in split]
        data = {"type": "profile-bulk-import-job", "attributes": {"profiles": {"data": profiles}}}
        assert body == json_body({"data": data})
        assert len(body) <= MAX_JOB_BYTES
