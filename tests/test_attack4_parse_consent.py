"""Adversary (attack4) of parse_event_json's fast path (connector/treez.py
_fast_customer_event): over seed bodies mutated where the fast path takes short cuts (ids kept
without _id's checks, consent "true" read without a call, timestamps by the inline regex,
external ids both null built inline, fields sets copied), it reads each body exactly as the
pydantic path (_parse_event_json_model) and as _CustomerEnvelope.model_validate_json do.
Consent first: opt_out never reads opted in (or missing) where the models read it otherwise."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_perf2_parse_fast import SEED_TEXT, _deep, _outcome

from connector import treez
from connector.treez import CustomerEvent

SEED = json.loads(SEED_TEXT)

IDS = [
    "3904",
    "١٢٣",
    "\uff11\uff12\uff13",
    "\uff21\uff22\uff23",
    "007",
    "0",
    "abc",
    "ABCdef",
    " 12 ",
    "12 34",
    "\t12",
    "12\n",
    "\u00a012",
    "x" * 128,
    "x" * 129,
    "9" * 128,
    "9" * 129,
    "ǅ",
    "²",
    "Ⅻ",
    "ß",
    "a-b",
    "a_b",
    "",
    " ",
    "N/A",
    "\u0000",
    "a\u007f",
    "\u200b",
    0,
    -0,
    7,
    -7,
    10**127,
    10**128,
    True,
    None,
    1.0,
    [],
    {},
]
OPT_OUTS = [
    "true",
    "True",
    "TRUE",
    " true ",
    "true\t",
    "\u00a0true",
    "\uff54\uff52\uff55\uff45",
    "false",
    "False",
    "FALSE",
    " false",
    True,
    False,
    1,
    0,
    "1",
    "0",
    "yes",
    "no",
    "y",
    None,
    "",
    "  ",
    "N/A",
    "null",
    [],
    {},
    1.0,
]
STAMPS = [
    "2026-04-24T11:38:21.000-07:00",
    "2026-04-24T11:38:21Z",
    "2026-04-24T11:38:21+00:00",
    "2026-04-24t11:38:21z",
    "2026-04-24 11:38:21Z",
    "2026-04-24T23:59:60Z",
    "2026-04-24T24:00:00Z",
    "2026-04-24T11:38:21.1234567Z",
    "2026-04-24T11:38:21.123456789+00:00",
    "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59Z",
    "9999-12-31T23:59:59-01:00",
    "2026-04-24T11:38:21+23:59",
    "2026-04-24T11:38:21+24:00",
    "2026-04-24T11:38:21-00:00",
    "2026-04-24T11:38:21+0530",
    "2026-04-24T11:38:21+05",
    "2026-04-24T11:38:21",
    "2026-02-29T00:00:00Z",
    "2024-02-29T00:00:00Z",
    "2000-01-01 00:00:00.000",
    "2000-01-01T00:00:00Z",
    "2000-01-01",
    "\u0661\u0669\u0664\u0668-\u0660\u0662-\u0661\u0662T00:00:00Z",
    "1700000000",
    " 2026-04-24T11:38:21Z",
    "2026-04-24T11:38:21Z ",
    "",
    "N/A",
]
EXTERNAL = [
    {"aiq_contact_id": None, "sticky_cards_contact_id": None},
    {"aiq_contact_id": None},
    {"sticky_cards_contact_id": None},
    {"aiq_contact_id": "", "sticky_cards_contact_id": None},
    {"aiq_contact_id": None, "sticky_cards_contact_id": "N/A"},
    {"aiq_contact_id": " 5 ", "sticky_cards_contact_id": 9},
    {"aiq_contact_id": {"x": 1}, "sticky_cards_contact_id": None},
    {"aiq_contact_id": None, "sticky_cards_contact_id": None, "extra": 1},
    {},
    None,
    [],
    "",
]


def _stamp(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.sampled_from(STAMPS))
    year = draw(st.sampled_from(["0001", "1999", "2026", "9999", "0000"]))
    hour = draw(st.sampled_from(["00", "11", "23", "24"]))
    second = draw(st.sampled_from(["00", "59", "60"]))
    fraction = draw(st.sampled_from(["", ".", ".1", ".000", ".123456", ".1234567", ".0" * 5]))
    sep = draw(st.sampled_from(["T", "t", " "]))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+23:59", "-07:00", "", "+24:00"]))
    return f"{year}-12-31{sep}{hour}:59:{second}{fraction}{zone}"


@st.composite
def bodies(draw: st.DrawFn) -> str | bytes:
    data = dict(SEED["data"])
    if draw(st.booleans()):
        data["customer_id"] = draw(st.one_of(st.sampled_from(IDS), st.text(max_size=4)))
    data["opt_out"] = draw(st.sampled_from(OPT_OUTS))
    for name in draw(
        st.lists(  # fewer changes, more bodies the fast path takes
            st.sampled_from(["last_update", "signup_date", "last_visit_date", "birthday"]),
            max_size=1,
            unique=True,
        )
    ):
        data[name] = _stamp(draw)
    if draw(st.booleans()):
        data["external_ids"] = draw(st.sampled_from(EXTERNAL))
    if draw(st.booleans()):
        data["merged_customer_ids"] = draw(st.lists(st.sampled_from(IDS[:12]), max_size=2))
    if draw(st.booleans()):
        data["merged_into_customer_id"] = draw(st.sampled_from([None, "", "N/A", "5", 5, " "]))
    if draw(st.integers(0, 4)) == 0:
        data["loyalty_tier"] = {"level": 1}  # an unknown field: the models keep it as extra
    items = list(data.items())
    if draw(st.booleans()):
        random.Random(draw(st.integers(0, 1000))).shuffle(items)
    envelope: dict[str, Any] = {"event_type": "CUSTOMER", "data": dict(items)}
    if draw(st.booleans()):
        envelope["dispensary_short_name"] = draw(st.sampled_from(["partnersandbox3", None, ""]))
    text = json.dumps(envelope, ensure_ascii=draw(st.booleans()))
    # a repeated name in data, before or after the one written: the last wins in both parsers
    repeat = draw(st.sampled_from([None, "opt_out", "customer_id", "last_update", "external_ids"]))
    if repeat is not None:
        other = json.dumps(draw(st.sampled_from(OPT_OUTS + IDS[:6] + STAMPS[:4])))
        if draw(st.booleans()):
            text = text.replace('"data": {', f'"data": {{"{repeat}": {other}, ', 1)
        else:
            text = text[:-2] + f', "{repeat}": {other}' + text[-2:]
    return text.encode() if draw(st.booleans()) else text


def _as_pydantic(raw: str | bytes) -> Any:
    """What pydantic's own model_validate_json makes of the body's customer, when it is one."""
    try:
        envelope = treez._CustomerEnvelope.model_validate_json(raw)
    except Exception:
        return None
    if envelope.event_type != "CUSTOMER" or (envelope.model_extra or {}).get("test") is not None:
        return None
    return _deep(envelope.data)


@settings(
    max_examples=3000,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(raw=bodies())
def test_mutated_bodies_read_as_by_the_models(raw: str | bytes) -> None:
    fast = treez._fast_customer_event(raw)
    got = _outcome(treez.parse_event_json, raw)
    assert got == _outcome(treez._parse_event_json_model, raw)
    if fast is not None:
        # whatever the fast path takes, pydantic's own JSON validation reads alike
        assert ("customer", _deep(fast.customer), fast.dispensary_short_name, "customer") == got
        assert _as_pydantic(raw) == _deep(fast.customer)


def _with_opt_out(value: Any, *, stamp: str | None = None) -> str:
    body = json.loads(SEED_TEXT)
    body["data"]["opt_out"] = value
    if stamp is not None:
        body["data"]["last_update"] = stamp
    return json.dumps(body)


@pytest.mark.parametrize("value", OPT_OUTS, ids=repr)
@pytest.mark.parametrize("stamp", [None, "2026-04-24T11:38:21Z", "2026-04-24t11:38:21.1234567z"])
def test_consent_reads_as_by_the_models(value: Any, stamp: str | None) -> None:
    for raw in (_with_opt_out(value, stamp=stamp), _with_opt_out(value, stamp=stamp).encode()):
        model = _outcome(treez._parse_event_json_model, raw)
        event = treez.parse_event_json(raw) if model[0] == "customer" else None
        assert _outcome(treez.parse_event_json, raw) == model
        if isinstance(event, CustomerEvent):
            reference = treez._parse_event_json_model(raw)
            assert isinstance(reference, CustomerEvent)
            assert event.customer.opt_out is reference.customer.opt_out
            assert "opt_out" in event.customer.model_fields_set


def test_consent_repeated_reads_the_last_as_the_models_do() -> None:
    for first, last in [("true", "false"), ("false", "true"), ("true", None), (None, "true")]:
        text = SEED_TEXT.replace(
            '"opt_out":"true"', f'"opt_out":{json.dumps(first)},"opt_out":{json.dumps(last)}'
        )
        event = treez.parse_event_json(text)
        reference = treez._parse_event_json_model(text)
        assert isinstance(event, CustomerEvent)
        assert isinstance(reference, CustomerEvent)
        assert event.customer.opt_out is reference.customer.opt_out
        assert event.customer.opt_out is {"true": True, "false": False, None: None}[last]


def test_events_share_no_mutable_state() -> None:
    """Two events read by the fast path share no fields set, list or model; a copy with an
    update (which adds to the fields set) leaves the module's sets as they were."""
    fields_before = set(treez._FAST_FIELDS)
    ids_before = set(treez._EXTERNAL_IDS_FIELDS)
    address_before = set(treez._FAST_ADDRESS_FIELDS)
    one, two = treez.parse_event_json(SEED_TEXT), treez.parse_event_json(SEED_TEXT.encode())
    assert treez._fast_customer_event(SEED_TEXT) is not None
    assert isinstance(one, CustomerEvent)
    assert isinstance(two, CustomerEvent)
    a, b = one.customer, two.customer
    assert a.__pydantic_fields_set__ is not b.__pydantic_fields_set__
    assert a.__pydantic_fields_set__ is not treez._FAST_FIELDS
    assert a.external_ids.__pydantic_fields_set__ is not b.external_ids.__pydantic_fields_set__
    assert a.external_ids.__dict__ is not b.external_ids.__dict__
    assert a.__pydantic_extra__ is not b.__pydantic_extra__
    for name in ["verification_reasons", "caregiver_details", "addresses", "customer_groups"]:
        assert getattr(a, name) is not getattr(b, name), name
        assert getattr(a, name) == getattr(b, name), name
    assert a.addresses[0].__pydantic_fields_set__ is not b.addresses[0].__pydantic_fields_set__
    # an empty list kept as decoded is each event's own
    assert a.merged_customer_ids is not b.merged_customer_ids
    copied = a.model_copy(update={"loyalty": 1})
    copied.__pydantic_fields_set__.add("zzz")
    a.external_ids.__pydantic_fields_set__.add("zzz")
    a.addresses[0].__pydantic_fields_set__.add("zzz")
    a.customer_groups.append("X")
    assert fields_before == treez._FAST_FIELDS
    assert ids_before == treez._EXTERNAL_IDS_FIELDS
    assert address_before == treez._FAST_ADDRESS_FIELDS
    three = treez.parse_event_json(SEED_TEXT)
    assert isinstance(three, CustomerEvent)
    assert _deep(three.customer) == _deep(b)
    assert "zzz" not in three.customer.model_fields_set


def test_null_external_ids_are_each_events_own() -> None:
    text = SEED_TEXT.replace(
        '"external_ids":{"aiq_contact_id":null,"sticky_cards_contact_id":null}',
        '"external_ids":null',
    )
    one, two = treez.parse_event_json(text), treez.parse_event_json(text)
    reference = treez._parse_event_json_model(text)
    assert isinstance(one, CustomerEvent)
    assert isinstance(two, CustomerEvent)
    assert isinstance(reference, CustomerEvent)
    assert one.customer.external_ids is not two.customer.external_ids
    assert _deep(one.customer.external_ids) == _deep(reference.customer.external_ids)
    assert one.customer.external_ids.model_fields_set == set()


@pytest.mark.parametrize("value", IDS, ids=repr)
@pytest.mark.parametrize("where", ["customer_id", "merged_customer_ids", "aiq_contact_id"])
def test_ids_read_as_by_the_models(value: Any, where: str) -> None:
    body = json.loads(SEED_TEXT)
    if where == "customer_id":
        body["data"]["customer_id"] = value
    elif where == "merged_customer_ids":
        body["data"]["merged_customer_ids"] = [value]
    else:
        body["data"]["external_ids"] = {"aiq_contact_id": value, "sticky_cards_contact_id": None}
    for ascii_only in (True, False):
        text = json.dumps(body, ensure_ascii=ascii_only)
        for raw in (text, text.encode()):
            assert _outcome(treez.parse_event_json, raw) == _outcome(
                treez._parse_event_json_model, raw
            )
            fast = treez._fast_customer_event(raw)
            if fast is not None:
                assert _as_pydantic(raw) == _deep(fast.customer)


@pytest.mark.parametrize("stamp", STAMPS, ids=repr)
@pytest.mark.parametrize(
    "field", ["last_update", "signup_date", "last_visit_date", "birthday", "permit_expiration"]
)
def test_stamps_read_as_by_the_models(stamp: str, field: str) -> None:
    body = json.loads(SEED_TEXT)
    body["data"][field] = stamp
    for raw in (json.dumps(body), json.dumps(body).encode()):
        assert _outcome(treez.parse_event_json, raw) == _outcome(treez._parse_event_json_model, raw)
        fast = treez._fast_customer_event(raw)
        if fast is not None:
            assert _as_pydantic(raw) == _deep(fast.customer)
