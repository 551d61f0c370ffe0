"""The mapping's written ``apply`` (one function of straight-line code per mapping) against
what it stands for: each field's ``run`` in turn, nulls left out unless sent, dotted targets
nested; and the fast paths of the transforms and selectors it calls."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from test_properties import SEED, mutated_seed

from connector.errors import EventValidationError, FieldMappingError
from connector.mapping import Mapping, compile_mapping_text, load_mapping
from connector.mapping._paths import Context
from connector.treez import Customer, CustomerEvent, parse_event

ROOT = Path(__file__).parent.parent
SHIPPED = [load_mapping(path) for path in sorted((ROOT / "mappings").glob("*.yaml"))]
ODD = compile_mapping_text(
    """
id: customer_id
who.first: {from: first_name, transform: [strip, title]}
who.last: {from: last_name, on_null: send}
who.nick: {from: nickname, default: none given}
groups: {from: customer_groups, placeholders: [SENIOR]}
tags: {from: caregiver_details, on_null: send}
balance: rewards_balance
visited: {from: last_visit_date, transform: [{date: iso}], on_null: send}
born: {from: birthday, transform: [{date: iso}]}
born_us: {from: birthday, transform: [{date: "%m/%d/%Y"}]}
primary_city: {from: "addresses[primary=true].city"}
other_city: {from: "addresses[primary=false].city", on_null: send}
typed_city: {from: "addresses[type=address_of_record].city"}
quoted_city: {from: "addresses[primary='true'].city", on_null: send}
null_city: {from: "addresses[street2=null].city", on_null: send}
opted: {from: opt_out, transform: [bool], on_error: null}
constant: {value: [1, 2]}
store: {from: dispensary, transform: [upper]}
not_a_number: {from: first_name, transform: [strip, int], on_error: null, default: 0}
reason: "verification_reasons[0].verification_reason"
last_city: {from: "addresses[-1].city", transform: [lower]}
aiq: {from: external_ids.aiq_contact_id, on_null: send}
unknown: {from: loyalty_tier.level, on_null: send}
""",
    name="odd",
)


def reference(mapping: Mapping, customer: Customer, dispensary: str) -> dict[str, Any]:
    """What ``apply`` means, written as the loop it replaces."""
    ctx = Context(customer, dispensary)
    out: dict[str, Any] = {}
    for field in mapping.fields:
        value = field.run(ctx)
        if value is None and not field.send_null:
            continue
        node = out
        for key in field.keys[:-1]:
            node = node.setdefault(key, {})
        node[field.keys[-1]] = value
    return out


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "mapped", fn(*args)
    except FieldMappingError as exc:
        return "failed", str(exc)


@given(mutated_seed())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_apply_is_its_fields_runs_in_turn(body: dict[str, Any]) -> None:
    try:
        event = parse_event(copy.deepcopy(body))
    except EventValidationError:
        return
    assert isinstance(event, CustomerEvent)
    for mapping in [*SHIPPED, ODD]:
        got = outcome(mapping.apply, event.customer, "store-1")
        assert got == outcome(reference, mapping, event.customer, "store-1")
        if got[0] == "mapped":  # same keys in the same order, at every level
            assert repr(got[1]) == repr(reference(mapping, event.customer, "store-1"))


def customer(**data: Any) -> Customer:
    event = parse_event({**SEED, "data": {**SEED["data"], **data}})
    assert isinstance(event, CustomerEvent)
    return event.customer


def test_odd_mapping_on_the_seed() -> None:
    assert ODD.apply(customer(), "store-1") == {
        "id": "3904",
        "who": {"first": "Jules", "last": "Winnfield", "nick": "none given"},
        "groups": [],
        "tags": [],
        "balance": 0,
        "visited": None,
        "born": "1948-02-12",
        "born_us": "02/12/1948",
        "primary_city": "INGLEWOOD",
        "other_city": None,
        "typed_city": "INGLEWOOD",
        "quoted_city": None,
        "null_city": None,
        "opted": True,
        "constant": [1, 2],
        "store": "STORE-1",
        "not_a_number": 0,
        "reason": "NEW",
        "last_city": "inglewood",
        "aiq": None,
        "unknown": None,
    }


def test_paths_read_extras_and_plain_objects() -> None:
    mapped = ODD.apply(
        customer(
            loyalty_tier={"level": "gold"},
            verification_reasons=[{"verification_reason": " N/A "}],
            external_ids={"aiq_contact_id": 42},
        ),
        "s",
    )
    assert mapped["unknown"] == "gold"
    assert "reason" not in mapped  # a placeholder
    assert mapped["aiq"] == "42"


def test_selectors_by_boolean_text_and_null() -> None:
    addresses = [
        {"city": "A", "primary": False, "street2": "x", "type": "true"},
        {"city": "B", "primary": None, "street2": None},
        {"city": "C", "primary": True, "type": "home"},
    ]
    mapped = ODD.apply(customer(addresses=addresses), "s")
    assert mapped["primary_city"] == "C"
    assert mapped["other_city"] == "A"
    assert mapped["quoted_city"] is None  # quoted "true" matches text only: none is "true"
    assert mapped["null_city"] == "B"
    quoted = compile_mapping_text("c: {from: \"addresses[type='true'].city\"}", name="q")
    assert quoted.apply(customer(addresses=addresses), "s") == {"c": "A"}
    bare = compile_mapping_text('c: {from: "addresses[type=true].city"}', name="b")
    assert bare.apply(customer(addresses=addresses), "s") == {"c": "A"}  # text "true" too


@pytest.mark.parametrize(
    ("value", "iso", "us"),
    [
        (date(2001, 2, 3), "2001-02-03", "02/03/2001"),
        (datetime(2001, 2, 3, 4, 5, 6), "2001-02-03T04:05:06", "02/03/2001"),
        (
            datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-7))),
            "2001-02-03T04:05:06-07:00",
            "02/03/2001",
        ),
        ("2001-02-03", "2001-02-03", "02/03/2001"),
        ([date(2001, 2, 3), None, "2001-02-04"], ["2001-02-03", "2001-02-04"], None),
        (None, None, None),
    ],
)
def test_date_transform_fast_paths(value: Any, iso: Any, us: Any) -> None:
    iso_mapping = compile_mapping_text("d: {from: x, transform: [{date: iso}]}", name="i")
    us_mapping = compile_mapping_text('d: {from: x, transform: [{date: "%m/%d/%Y"}]}', name="u")
    plain = compile_mapping_text("d: {from: x, transform: [date]}", name="p")
    ctx = Context(customer(x=value), "s")
    assert iso_mapping.fields[0].run(ctx) == iso
    if us is not None:
        assert us_mapping.fields[0].run(ctx) == us
    if not isinstance(value, list) and value is not None:
        assert plain.fields[0].run(ctx) == str(iso)[:10]


def test_date_transform_with_a_zone_converts_timestamps() -> None:
    mapping = compile_mapping_text(
        "d: {from: x, transform: [{date: {format: iso, tz: UTC}}]}", name="z"
    )
    stamp = datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-7)))
    assert mapping.fields[0].run(Context(customer(x=stamp), "s")) == (
        stamp.astimezone(UTC).isoformat()
    )


def test_lists_of_text_lose_their_placeholders_others_are_made_json() -> None:
    mapping = compile_mapping_text("g: {from: x, default: [none]}", name="g")
    run = mapping.fields[0].run
    assert run(Context(customer(x=["A", "N/A", " ", "", "B"]), "s")) == ["A", "B"]
    assert run(Context(customer(x=[]), "s")) == []
    assert run(Context(customer(x=["A", 1, None, "N/A", [" "]]), "s")) == ["A", 1, []]
    assert run(Context(customer(x={"a": "N/A"}), "s")) == {"a": "N/A"}


@pytest.mark.parametrize(
    ("text", "step"),
    [
        ("x: {from: first_name, transform: [strip, int]}", "int"),
        ("x: {from: first_name, transform: [int]}", "int"),
        ("x: {from: first_name, transform: [strip, lower, float, str]}", "float"),
        ("x: {from: customer_groups, transform: [join, int]}", "int"),
    ],
)
def test_a_failing_transform_is_named_as_by_the_fields_run(text: str, step: str) -> None:
    mapping = compile_mapping_text(text, name="failing")
    got = outcome(mapping.apply, customer(), "s")
    assert got == outcome(reference, mapping, customer(), "s")
    assert got[0] == "failed"
    assert f"transform '{step}' failed" in got[1]
