"""Attack on issue 17's Alpine IQ backfill (d96a0e5): two bulk calls under way at once only
for disjoint people. Histories of a few customers sharing e-mails, phones and personas, their
upserts permuted and duplicated so one customer lands in several chunks: no person the vendor
matches (customer/srcID, persona, phone, e-mail, as the fake normalises them) is ever in two
calls under way at once, and every result comes back in place."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import respx
from fakes.alpineiq import _email_key, phone_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_alpineiq import BASE_URL, BULK, aiq_config
from test_alpineiq import delivery as aiq_delivery

from connector.delivery.base import Delivery, Sent
from connector.destinations.alpineiq import AlpineIQSink


def _person(member: dict[str, Any]) -> set[str]:
    """Who the vendor takes a member to be, normalised as the fake matches."""
    found = {f"src:{member['srcID']}"}
    if member.get("contactID") is not None:
        found.add(f"persona:{member['contactID']}")
    if (phone := phone_key(member.get("mobilePhone"))) is not None:
        found.add(f"phone:{phone}")
    if (email := _email_key(member.get("email"))) is not None:
        found.add(f"email:{email}")
    return found


def backfill(
    deliveries: list[Delivery], bulk_size: int, personas: dict[str, set[str]] | None = None
) -> tuple[list[Any], list[tuple[set[str], set[str]]]]:
    """The backfill through respx; (results, pairs of the people of two calls under way at
    once). ``personas``: personas the vendor already holds, by id, with their keys: a member
    matching one of its keys is that persona too."""
    under_way: dict[int, set[str]] = {}
    overlaps: list[tuple[set[str], set[str]]] = []
    known = personas or {}

    async def answer(request: httpx.Request) -> httpx.Response:
        members = json.loads(request.content)
        people: set[str] = set()
        for member in members:
            keys = _person(member)
            people |= keys
            people |= {f"persona:{p}" for p, held in known.items() if held & keys}
        overlaps.extend((people, other) for other in under_way.values())
        under_way[id(request)] = people
        await asyncio.sleep(0.005)
        del under_way[id(request)]
        results = [{"contactID": f"p-{m['srcID']}"} for m in members]
        return httpx.Response(200, json={"success": True, "data": {"results": results}})

    async def go() -> list[Any]:
        sink = AlpineIQSink(aiq_config(bulk_size=bulk_size))
        try:
            return await sink.backfill(deliveries)
        finally:
            await sink.aclose()

    with respx.mock(base_url=BASE_URL, assert_all_called=False) as api:
        api.post(BULK).mock(side_effect=answer)
        results = asyncio.run(go())
    return results, overlaps


EMAILS = ["a@example.com", "A@Example.COM", "b@example.com", None]
PHONES = ["+12135550100", "+12135550101", None]
UPSERT = st.fixed_dictionaries(
    {
        "customer": st.sampled_from(["c0", "c1", "c2", "c3", "c4"]),
        "email": st.sampled_from(EMAILS),
        "phone": st.sampled_from(PHONES),
        "persona": st.sampled_from([None, None, "P1", "P2"]),
    }
)


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    history=st.lists(UPSERT, min_size=2, max_size=10),
    copies=st.lists(st.integers(0, 9), max_size=4),
    order=st.randoms(use_true_random=False),
    bulk_size=st.integers(1, 3),
)
def test_no_person_in_two_calls_at_once(
    history: list[dict[str, Any]], copies: list[int], order: Any, bulk_size: int
) -> None:
    history = history + [history[c % len(history)] for c in copies]
    order.shuffle(history)
    deliveries = []
    for n, entry in enumerate(history):
        fields = {
            k: v for k, v in (("email", entry["email"]), ("mobilePhone", entry["phone"])) if v
        }
        deliveries.append(
            aiq_delivery(
                "upsert",
                entry["customer"],
                fields=fields,
                contact_id=entry["persona"],
                outbox_id=n,
            )
        )
    results, overlaps = backfill(deliveries, bulk_size)
    assert results == [Sent(f"p-{d.customer_id}") for d in deliveries]
    for mine, other in overlaps:
        assert not (mine & other)


def test_one_customers_upsert_and_unsubscribe_in_different_chunks_keep_their_order() -> None:
    """The unsubscribe is sent before any bulk call (as before d96a0e5), and two upserts of one
    customer in two chunks never run at once."""
    sent: list[str] = []
    deliveries = [
        aiq_delivery("upsert", "c0", fields={"email": "a@example.com"}, outbox_id=1),
        aiq_delivery("upsert", "c1", fields={"email": "b@example.com"}, outbox_id=2),
        aiq_delivery("unsubscribe", "c0", fields={"email": "a@example.com"}, outbox_id=3),
        aiq_delivery("upsert", "c0", fields={"email": "a@example.com"}, outbox_id=4),
    ]

    def record(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        members = body if isinstance(body, list) else [body]
        sent.append(",".join(f"{m['srcID']}:{'emailOptIn' in m}" for m in members))
        results = [{"contactID": f"p-{m['srcID']}"} for m in members]
        return httpx.Response(200, json={"success": True, "data": {"results": results}})

    async def go() -> list[Any]:
        sink = AlpineIQSink(aiq_config(bulk_size=2))
        try:
            return await sink.backfill(deliveries)
        finally:
            await sink.aclose()

    with respx.mock(base_url=BASE_URL, assert_all_called=False) as api:
        api.route().mock(side_effect=record)
        asyncio.run(go())
    assert sent[0] == "c0:True"  # the opt-out first
    assert sent[1:] == ["c0:False,c1:False", "c0:False"]
    upserts = [d for d in deliveries if d.op == "upsert"]
    _, overlaps = backfill(upserts, 2)
    assert all(not (a & b) for a, b in overlaps)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"mobilePhone": "2135550100"}, {"mobilePhone": "+12135550100"}),
        ({"email": " same@example.com"}, {"email": "same@example.com"}),
    ],
)
def test_two_forms_of_one_phone_or_email_never_run_at_once(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    deliveries = [
        aiq_delivery("upsert", "c0", fields=first, outbox_id=0),
        aiq_delivery("upsert", "c1", fields=second, outbox_id=1),
    ]
    _, overlaps = backfill(deliveries, bulk_size=1)
    assert all(not (a & b) for a, b in overlaps)


def test_two_customers_matching_one_held_persona_never_run_at_once() -> None:
    deliveries = [
        aiq_delivery("upsert", "c0", fields={"mobilePhone": "+12135550100"}, outbox_id=0),
        aiq_delivery("upsert", "c1", fields={"email": "family@example.com"}, outbox_id=1),
    ]
    held = {"P9": {"phone:+12135550100", "email:family@example.com"}}
    _, overlaps = backfill(deliveries, bulk_size=1, personas=held)
    assert all(not (a & b) for a, b in overlaps)
