"""NaN, Infinity and -Infinity through the real receiver (design.md, contract 1: "400 for
non-JSON"; "bad input gets a clear error that names what is wrong and where, and loses
nothing"). Python's json and pydantic's JSON parser read those literals as floats, which
reached the outbox as ``NaN`` (invalid JSON) for a destination. A body holding one is not
JSON (RFC 8259): answered 400, kept in quarantine with a reason naming the field's path and
never its value, and nothing is queued. An event already stored with one (accepted by an
older version) is planned with that field left out, its consent still applied."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_receiver import (
    DISPENSARY,
    SEED,
    SEED_LAST_UPDATE_US,
    Running,
    assert_error,
    eventually,
    run,
    settled_inbox,
)

from connector.store import NewEvent
from connector.store.schema import inbox, outbox, quarantine

LITERALS = ["NaN", "Infinity", "-Infinity"]


def _seed_text(**raw: str) -> str:
    """The seed body with customer fields written as the JSON text ``raw`` (a value of "@@"
    stands for the field; the literals cannot be written by json.dumps(allow_nan=False))."""
    body = json.loads(json.dumps(SEED))
    for name in raw:
        body["data"][name] = f"@@{name}@@"
    text = json.dumps(body)
    for name, value in raw.items():
        text = text.replace(f'"@@{name}@@"', value)
    return text


def _refuse(literal: str) -> Any:
    raise AssertionError(f"{literal} in an outbox payload")


def _no_non_finite(value: Any) -> bool:
    """Whether ``value`` (a decoded payload) holds no float that is not finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_no_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_non_finite(v) for v in value)
    return True


@pytest.mark.parametrize("literal", LITERALS)
@pytest.mark.parametrize(
    ("field", "where"),
    [
        ("rewards_balance", "data.rewards_balance"),
        ("points", "data.points"),  # a field Treez may add (kept as an extra)
        ("opt_out", "data.opt_out"),  # a field the consent rules stand on
    ],
)
def test_a_body_holding_nan_or_infinity_is_400_quarantined_and_nothing_is_queued(
    tmp_path: Path, store_url: str, literal: str, field: str, where: str
) -> None:
    raw = _seed_text(**{field: literal}).encode()

    async def scenario(rx: Running) -> None:
        response = await rx.post(raw)

        body = assert_error(response, 400, "not_json")
        assert where in body["detail"]
        (row,) = await rx.rows(quarantine)
        assert (row.dispensary, row.status_code, row.body) == (DISPENSARY, 400, raw)
        assert row.reason == (
            f"{where}: is not JSON (NaN and Infinity are not JSON numbers, RFC 8259)"
        )
        assert literal not in row.reason.replace("NaN and Infinity", "")  # never the value
        assert await rx.rows(inbox) == []
        assert await rx.rows(outbox) == []

    run(tmp_path, scenario, store=store_url)


def test_every_place_holding_one_is_named_nested_and_in_the_envelope(
    tmp_path: Path, store_url: str
) -> None:
    text = _seed_text(points='[1, {"tier": NaN}]', rewards_balance="-Infinity")
    raw = text.replace('"event_type"', '"extra": Infinity, "event_type"', 1).encode()

    async def scenario(rx: Running) -> None:
        assert_error(await rx.post(raw), 400, "not_json")
        (row,) = await rx.rows(quarantine)
        named = [part.split(":", 1)[0] for part in row.reason.split("; ")]
        assert sorted(named) == ["data.points[1].tier", "data.rewards_balance", "extra"]
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url)


def test_the_words_in_a_text_are_no_refusal(tmp_path: Path, store_url: str) -> None:
    raw = json.dumps(
        {**SEED, "data": {**SEED["data"], "notes": "NaN Infinity -Infinity", "NaN": 1.5}}
    ).encode()

    async def scenario(rx: Running) -> None:
        response = await rx.post(raw)

        assert response.status_code == 202, response.text
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "applied"
        assert await rx.rows(quarantine) == []

    run(tmp_path, scenario, store=store_url)


def test_an_event_stored_with_nan_is_planned_without_that_field(
    tmp_path: Path, store_url: str
) -> None:
    """An event an older version accepted (202: it must be planned): the fields holding a
    non-finite number are left out, the rest applied, consent included (the seed opts out),
    and no operation carries a non-finite number."""
    raw = _seed_text(rewards_balance="NaN", points="[1, Infinity]")

    async def scenario(rx: Running) -> None:
        store = rx.service.astore.store
        await rx.service.astore.call(
            store.add_events,
            [NewEvent(DISPENSARY, "webhook", "CUSTOMER", "3904", SEED_LAST_UPDATE_US, raw)],
        )
        rx.service.wake_processor()
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "applied"
        operations = await eventually(lambda: rx.rows(outbox), lambda r: len(r) >= 2, "outbox")
        assert sorted(op.op for op in operations) == ["unsubscribe", "upsert"]
        for operation in operations:
            decoded = json.loads(operation.payload, parse_constant=_refuse)  # valid JSON
            assert _no_non_finite(decoded)
            assert "rewards_balance" not in decoded.get("fields", {})
        assert await rx.rows(quarantine) == []

    run(tmp_path, scenario, store=store_url)


def test_an_event_stored_with_nan_in_a_consent_field_is_refused_when_planned(
    tmp_path: Path, store_url: str
) -> None:
    raw = _seed_text(opt_out="NaN")

    async def scenario(rx: Running) -> None:
        store = rx.service.astore.store
        await rx.service.astore.call(
            store.add_events,
            [NewEvent(DISPENSARY, "webhook", "CUSTOMER", "3904", SEED_LAST_UPDATE_US, raw)],
        )
        rx.service.wake_processor()
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "failed"
        (kept,) = await eventually(lambda: rx.rows(quarantine), lambda r: len(r) == 1, "quarantine")
        assert "data.opt_out" in kept.reason
        assert kept.body == raw.encode()
        assert await rx.rows(outbox) == []

    run(tmp_path, scenario, store=store_url)
