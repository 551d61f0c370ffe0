"""The fast path of parse_event_json (msgspec's decoder, connector/treez.py
_fast_customer_event) reads every body exactly as the pydantic models do
(_parse_event_json_model, the path before it): the same models (values, types, the fields
set, extras, the zone class of timestamps, the order of __dict__), or the same error with the
same problems. Over mutated seed bodies (types swapped, nulls, fields deleted and added,
repeated names, odd text, broken JSON) and the edge cases each of its refusals is for."""

from __future__ import annotations

import copy
import json
import re
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from connector import treez
from connector.treez import CustomerEvent, ReceivedCustomer

HERE = Path(__file__).parent
SEED_TEXT = (HERE / "data" / "seed_body.json").read_text()
SEEDS = [json.loads(SEED_TEXT)] + [
    # the samples' timestamps are templates ("{t1}"), filled in when they are sent
    json.loads(re.sub(r'"\{t\w+\}"', f'"2026-05-{n + 1:02d}T10:00:00.000-07:00"', path.read_text()))
    for n, path in enumerate(sorted((HERE.parent / "connector" / "samples").glob("[0-9]*.json")))
]
FIELDS = list(treez.Customer.model_fields)


def _deep(value: Any) -> Any:
    """``value`` with every type spelled out (True is not 1, a TzInfo not a timezone)."""
    if isinstance(value, BaseModel):
        state = value.__getstate__()
        return (
            type(value).__name__,
            [(k, _deep(v)) for k, v in state["__dict__"].items()],
            sorted(state["__pydantic_fields_set__"]),
            _deep(state["__pydantic_extra__"]),
            state["__pydantic_private__"],
        )
    if isinstance(value, dict):
        return ("dict", [(_deep(k), _deep(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_deep(v) for v in value])
    if isinstance(value, datetime):
        zone = value.tzinfo
        return ("datetime", value.isoformat(), type(zone).__name__, repr(zone))
    if isinstance(value, date):
        return ("date", value.isoformat())
    return (type(value).__name__, repr(value))


def _outcome(read: Any, raw: bytes | str) -> Any:
    try:
        event = read(raw)
    except Exception as exc:  # the same kind of error with the same problems
        problems = [(p.where, p.what) for p in getattr(exc, "problems", [])]
        return ("error", type(exc).__name__, str(exc), problems)
    if isinstance(event, CustomerEvent):
        return ("customer", _deep(event.customer), event.dispensary_short_name, event.kind)
    return ("other", type(event).__name__, repr(event))


def _same(raw: bytes | str) -> bool:
    """Whether both paths read ``raw`` alike (asserted), and whether the fast path took it."""
    new = _outcome(treez.parse_event_json, raw)
    old = _outcome(treez._parse_event_json_model, raw)
    assert new == old
    fast = treez._fast_customer_event(raw)
    if fast is not None:
        # the receiver's check takes what the fast path takes, with the same id and timestamp
        checked = treez.check_event_json(raw)
        assert isinstance(checked, ReceivedCustomer)
        assert checked.customer_id == fast.customer.customer_id
        assert checked.last_update == fast.customer.last_update
        assert checked.dispensary_short_name == fast.dispensary_short_name
    return fast is not None


def test_the_seed_takes_the_fast_path() -> None:
    raw = SEED_TEXT.encode()
    assert _same(raw)
    assert _same(SEED_TEXT)
    for body in SEEDS:
        _same(json.dumps(body).encode())


# --- generated bodies ---

DATEISH = st.text(alphabet="0123456789-:T tZz.+/NA", max_size=32)
TIMESTAMPS = st.sampled_from(
    [
        "2026-04-24T11:38:21.000-07:00",
        "2026-04-24T11:38:21Z",
        "2026-04-24t11:38:21z",
        "2026-04-24 11:38:21.000",
        "2026-04-24 11:38:21+05:30",
        "2026-04-24T11:38:21.1234567+00:00",
        "2026-04-24T11:38:21.5-23:59",
        "2026-04-24T11:38:21+24:00",
        "2026-04-24T24:00:00Z",
        "2026-04-24T11:38:60Z",
        "2026-02-29T00:00:00Z",
        "2024-02-29T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "2000-01-01 00:00:00.000",
        "2000-01-01T00:00:00.000-07:00",
        "2000-01-01",
        "2026-04-24",
        "1948-02-12",
        "1948-02-30",
        "19480212",
        "2026-W01-1",
        " 2026-04-24T11:38:21Z",
        "2026-04-24T11:38:21Z ",
        "12/03/1990",
        "1700000000",
        "1700000000.5",
        "now",
        "today",
        "inf",
        "N/A",
        "n/a",
        "",
        " ",
        "\u3000",
    ]
)
ODD: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            None,
            "",
            " ",
            "N/A",
            "null",
            "None",
            "true",
            "false",
            "TRUE",
            " yes ",
            "1",
            "0",
            0,
            1,
            -1,
            2,
            77,
            1.0,
            1.5,
            -0.0,
            0.1,
            1e300,
            2**63,
            2**64 + 1,
            -(2**63) - 1,
            10**40,
            True,
            False,
            [],
            {},
            [None],
            ["a", 1, True, None],
            [{"a": "b", "c": None}],
            [{"a": {"deeper": 1}}],
            [[["deep"]]],
            [1.5],
            [{"x": 0.1}],
            {"a": 1},
            "x" * 129,
            "é",
            "😀",
            "\u2028",
            "a\x00b",
        ]
    ),
    TIMESTAMPS,
    DATEISH,
    st.text(max_size=8),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.none(), st.booleans()), max_size=3),
)
ADDRESS = st.one_of(
    ODD,
    st.fixed_dictionaries(
        {},
        optional={
            **dict.fromkeys(treez.Address.model_fields, ODD),
            "country": ODD,
        },
    ),
)
CHANGE = st.dictionaries(
    st.sampled_from([*FIELDS, "extra_field", "test", "opt\\u005fout"]),
    st.one_of(
        ODD,
        st.lists(ADDRESS, max_size=2),
        st.fixed_dictionaries(
            {},
            optional={"aiq_contact_id": ODD, "sticky_cards_contact_id": ODD, "other": ODD},
        ),
    ),
    max_size=4,
)
ENVELOPE = st.dictionaries(
    st.sampled_from(["event_type", "dispensary_short_name", "test", "data", "other"]),
    st.one_of(ODD, st.sampled_from(["CUSTOMER", "customer", " CUSTOMER ", "TICKET"])),
    max_size=2,
)


def _text(body: Any, how: int) -> bytes | str:
    text = json.dumps(body, ensure_ascii=bool(how & 1))
    return text.encode() if how & 2 else text


@settings(
    max_examples=1500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.sampled_from(SEEDS),
    change=CHANGE,
    deleted=st.lists(st.sampled_from(FIELDS), max_size=2),
    envelope=ENVELOPE,
    how=st.integers(0, 3),
)
def test_mutated_bodies_read_as_by_the_models(
    seed: dict[str, Any],
    change: dict[str, Any],
    deleted: list[str],
    envelope: dict[str, Any],
    how: int,
) -> None:
    body = copy.deepcopy(seed)
    data = body.get("data")
    if isinstance(data, dict):
        for name in deleted:
            data.pop(name, None)
        for name, value in change.items():
            data[name.replace("\\u005f", "_") if how & 1 else name] = value
    body.update(envelope)
    _same(_text(body, how))


@settings(max_examples=600, derandomize=True, deadline=None)
@given(
    field=st.sampled_from(
        [
            "birthday",
            "drivers_license_expiration",
            "permit_expiration",
            "signup_date",
            "last_visit_date",
            "last_update",
        ]
    ),
    text=st.one_of(TIMESTAMPS, DATEISH, st.text(max_size=12)),
)
def test_dates_and_timestamps_read_as_by_the_models(field: str, text: str) -> None:
    body = json.loads(SEED_TEXT)
    body["data"][field] = text
    _same(json.dumps(body).encode())


@settings(max_examples=600, derandomize=True, deadline=None)
@given(
    position=st.integers(0, len(SEED_TEXT)),
    cut=st.integers(0, 3),
    insert=st.sampled_from(
        [
            "",
            ",",
            "{",
            "}",
            "[",
            "]",
            '"',
            "\\",
            "\\u",
            "\\ud800",
            "\\udc00",
            "\x00",
            "\t",
            "\n",
            "\x1f",
            "NaN",
            "Infinity",
            "-",
            "1e400",
            "\ufeff",
            "\xff",
            ', "a": 1',
            '"data": {}',
            "null",
            "0" * 20,
        ]
    ),
    as_bytes=st.booleans(),
)
def test_broken_text_reads_as_by_the_models(
    position: int, cut: int, insert: str, as_bytes: bool
) -> None:
    text = SEED_TEXT[:position] + insert + SEED_TEXT[position + cut :]
    raw: bytes | str = text.encode("utf-8", "surrogatepass") if as_bytes else text
    _same(raw)


# --- the edge cases the fast path refuses, or takes, on purpose ---


def _seed_with(**data: Any) -> dict[str, Any]:
    body = json.loads(SEED_TEXT)
    body["data"].update(data)
    return body


def _with_text(old: str, new: str) -> str:
    assert old in SEED_TEXT
    return SEED_TEXT.replace(old, new, 1)


@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        # repeated names: the last copy wins everywhere, in the data and in the envelope
        (_with_text('"opt_out":"true"', '"opt_out":"true","opt_out":"false"'), True),
        (_with_text('"customer_id":"3904"', '"customer_id":"1","customer_id":"3904"'), True),
        (_with_text('"event_type":"CUSTOMER"', '"event_type":"X","event_type":"CUSTOMER"'), True),
        (
            _with_text(
                '"verification_reason":"NEW"', '"verification_reason":"NEW","verification_reason":1'
            ),
            True,
        ),
        # a name written with escapes is the same name
        (_with_text('"opt_out"', '"opt\\u005fout"'), True),
        # "null" is text, not a null
        (_with_text('"first_name":"Jules"', '"first_name":"null"'), True),
        (_with_text('"opt_out":"true"', '"opt_out":"null"'), False),
        # big whole numbers, fractions, and the number forms JSON does not have
        (
            _with_text('"rewards_balance":0', '"rewards_balance":123456789012345678901234567890'),
            True,
        ),
        (_with_text('"rewards_balance":0', '"rewards_balance":1.5'), True),
        (_with_text('"rewards_balance":0', '"rewards_balance":-0.0'), True),
        (_with_text('"rewards_balance":0', '"rewards_balance":1e400'), False),
        (_with_text('"rewards_balance":0', '"rewards_balance":NaN'), False),
        (_with_text('"customer_id":"3904"', '"customer_id":' + "9" * 129), False),
        (_with_text('"caregiver_details":[]', '"caregiver_details":[1.5]'), False),
        (_with_text('"caregiver_details":[]', '"caregiver_details":[' + "1" * 5000 + "]"), False),
        # a number where text is expected is text to the models, left to them
        (_with_text('"first_name":"Jules"', '"first_name":12'), False),
        (_with_text('"banned":false', '"banned":"false"'), False),
        # unicode, escaped or as such, and lone surrogates
        (_with_text('"Jules"', '"J\\u00fcles \\ud83d\\ude00"'), True),
        (_with_text('"Jules"', '"Jüles 😀"'), True),
        (_with_text('"Jules"', '"J\\ud800"'), False),
        (_with_text('"Jules"', '"J\\udc00x"'), False),
        # nesting: shallow lists of any values are taken, deeper ones left to the models
        (_with_text('"imageList":[]', '"imageList":[["a"], {"b": null}]'), True),
        (_with_text('"imageList":[]', '"imageList":[[["a"]]]'), False),
        (_with_text('"imageList":[]', '"imageList":' + "[" * 300 + "]" * 300), False),
        (_with_text('"imageList":[]', '"imageList":' + "[" * 600 + "]" * 600), False),
        # unknown fields are kept by the models, so left to them
        (_with_text('"status"', '"surprise":1,"status"'), False),
        (_with_text('"event_type"', '"test":true,"event_type"'), False),
        # missing fields (the sample of an older delivery)
        (_with_text('"dispensary_short_name":"partnersandbox3",', ""), True),
        (_with_text('"nickname":null,', ""), False),
        # null lists, nested objects and placeholders
        (_with_text('"addresses":[', '"addresses":null,"x":['), False),
        (
            _with_text(
                '"external_ids":{"aiq_contact_id":null,"sticky_cards_contact_id":null}',
                '"external_ids":null',
            ),
            True,
        ),
        (
            _with_text(
                '"external_ids":{"aiq_contact_id":null,"sticky_cards_contact_id":null}',
                '"external_ids":{}',
            ),
            True,
        ),
        (_with_text('"aiq_contact_id":null', '"aiq_contact_id":" N/A "'), True),
        (_with_text('"aiq_contact_id":null', '"aiq_contact_id":77'), True),
        (_with_text('"permit_expiration":"N/A"', '"permit_expiration":" n/a "'), True),
        (_with_text('"birthday":"1948-02-12"', '"birthday":"1948-02-30"'), True),
        (_with_text('"birthday":"1948-02-12"', '"birthday":"2020-01-01T00:00:00"'), True),
        (
            _with_text(
                '"last_visit_date":"2000-01-01 00:00:00.000"',
                '"last_visit_date":"2000-01-01T00:00:00Z"',
            ),
            True,
        ),
        (
            _with_text(
                '"last_update":"2026-04-24T11:38:21.000-07:00"',
                '"last_update":"2026-04-24T11:38:21"',
            ),
            False,
        ),
        (
            _with_text(
                '"last_update":"2026-04-24T11:38:21.000-07:00"', '"last_update":"1700000000"'
            ),
            False,
        ),
        # not JSON, or not a CUSTOMER event
        (SEED_TEXT[:-1], False),
        ("\ufeff" + SEED_TEXT, False),
        (_with_text('"CUSTOMER"', '"customer"'), False),
        (_with_text('"CUSTOMER"', '"TICKET"'), False),
    ],
)
def test_edge_cases_read_as_by_the_models(raw: str, fast: bool) -> None:
    for form in (raw, raw.encode("utf-8", "surrogatepass")):
        assert _same(form) is fast


def test_null_lists_are_empty_and_set() -> None:
    body = _seed_with(**dict.fromkeys(treez._NULL_AS_EMPTY))
    raw = json.dumps(body).encode()
    assert _same(raw)
    event = treez.parse_event_json(raw)
    assert isinstance(event, CustomerEvent)
    for name in treez._NULL_AS_EMPTY:
        assert getattr(event.customer, name) == []


# --- well-shaped bodies: the values the fast path takes, so that it takes most of them ---

TEXT = st.one_of(
    st.none(),
    st.text(max_size=8),
    st.sampled_from(["", " ", "N/A", " n/a ", "null", "x" * 129, " 77 ", "\u3000"]),
    TIMESTAMPS,
)
ID_ = st.one_of(TEXT, st.integers(), st.integers(-5, 10**12), st.sampled_from([2**64, 10**200]))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4))
ELEMENTS = st.one_of(
    st.none(),
    st.lists(
        st.one_of(
            SCALAR,
            st.lists(SCALAR, max_size=2),
            st.dictionaries(st.text(max_size=3), SCALAR, max_size=2),
        ),
        max_size=3,
    ),
)
SHAPED_ADDRESS = st.fixed_dictionaries(
    {
        **{name: TEXT for name in treez.Address.model_fields if name != "primary"},
        "primary": st.one_of(st.none(), st.booleans()),
    }
)
SHAPED: dict[str, st.SearchStrategy[Any]] = {
    name: TEXT for name, f in treez.Customer.model_fields.items() if f.annotation == str | None
}
SHAPED.update(
    {
        "customer_id": ID_,
        "merged_into_customer_id": st.one_of(st.none(), ID_),
        "merged_customer_ids": st.one_of(st.none(), st.lists(ID_, max_size=3)),
        "last_update": st.one_of(TIMESTAMPS, DATEISH),
        "opt_out": st.one_of(
            st.none(),
            st.booleans(),
            st.sampled_from(["true", "false", " TRUE ", "False", "", " ", "yes", "1", "N/A"]),
        ),
        **{
            name: st.one_of(st.none(), st.booleans())
            for name in ("is_caregiver", "banned", "warning_1", "warning_2")
        },
        "rewards_balance": st.one_of(
            st.none(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
        ),
        "verification_reasons": ELEMENTS,
        "caregiver_details": ELEMENTS,
        "imageList": ELEMENTS,
        "customer_groups": st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=3)),
        "addresses": st.one_of(st.none(), st.lists(SHAPED_ADDRESS, max_size=2)),
        "external_ids": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {}, optional={"aiq_contact_id": ID_, "sticky_cards_contact_id": ID_}
            ),
        ),
        **{
            name: st.one_of(TEXT, TIMESTAMPS, DATEISH)
            for name in (
                "birthday",
                "drivers_license_expiration",
                "permit_expiration",
                "signup_date",
                "last_visit_date",
            )
        },
    }
)
assert set(SHAPED) == set(FIELDS)


@settings(
    max_examples=1500,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.sampled_from(SEEDS[:9]),  # the CUSTOMER ones
    change=st.lists(st.sampled_from(FIELDS), max_size=5, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: SHAPED[name] for name in names})
    ),
    how=st.integers(0, 3),
    name=st.one_of(st.none(), TEXT),
)
def test_well_shaped_bodies_read_as_by_the_models(
    seed: dict[str, Any], change: dict[str, Any], how: int, name: str | None
) -> None:
    body = copy.deepcopy(seed)
    body["data"].update(change)
    body["data"].setdefault("last_update", "2026-04-24T11:38:21.000-07:00")  # 09-malformed's
    body["dispensary_short_name"] = name
    _same(_text(body, how))
