"""Adversary (attack4): what broke in the mapping under values the parsers accept (a date
moved to a zone past year 1 or 9999 raised OverflowError past on_error and blocked the
unsubscribe; a template of 99 parts or a path of 100 steps did not compile), fixed since;
apply and run agree on each."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_perf2_parse_fast import SEED_TEXT
from test_perf_mapping_apply import customer

from connector import treez
from connector.errors import FieldMappingError, MappingError
from connector.mapping import compile_mapping_text
from connector.mapping._paths import Context
from connector.planner import DestinationSpec, plan
from connector.treez import CustomerEvent

# a timestamp Treez's model accepts (an aware datetime in range) that leaves the range of
# datetime once moved to the zone the mapping names
EDGES = [
    ("0001-01-01T00:00:00Z", "America/New_York"),
    ("0001-01-01T00:00:00+01:00", "UTC"),
    ("9999-12-31T23:59:59Z", "Asia/Tokyo"),
    ("9999-12-31T23:59:59-01:00", "UTC"),
]


def _event(signup: str) -> CustomerEvent:
    body = json.loads(SEED_TEXT)
    body["data"]["signup_date"] = signup
    raw = json.dumps(body).encode()
    assert treez._fast_customer_event(raw) is not None  # the fast path takes it...
    event = treez.parse_event_json(raw)
    reference = treez._parse_event_json_model(raw)
    assert isinstance(event, CustomerEvent)
    assert isinstance(reference, CustomerEvent)
    assert event.customer.signup_date == reference.customer.signup_date  # ...as the models do
    return event


def _mapping(zone: str, on_error: str) -> Any:
    return compile_mapping_text(
        f"id: customer_id\n"
        f"signed: {{from: signup_date, transform: [{{date: {{format: iso, tz: {zone}}}}}],"
        f" on_error: {on_error}}}\n",
        name="edge",
    )


@pytest.mark.parametrize(("signup", "zone"), EDGES)
def test_date_with_a_zone_on_an_edge_timestamp_is_swallowed(signup: str, zone: str) -> None:
    event = _event(signup)
    mapping = _mapping(zone, "null")
    assert mapping.apply(event.customer, "store-1") == {"id": "3904"}


@pytest.mark.parametrize(("signup", "zone"), EDGES)
def test_date_with_a_zone_on_an_edge_timestamp_fails_the_field(signup: str, zone: str) -> None:
    event = _event(signup)
    mapping = _mapping(zone, "fail")
    with pytest.raises(FieldMappingError) as caught:
        mapping.apply(event.customer, "store-1")
    assert caught.value.field == "signed"


def _run_each(mapping: Any, event: CustomerEvent) -> None:
    ctx = Context(event.customer, "store-1")
    for field in mapping.fields:
        field.run(ctx)


@pytest.mark.parametrize(("signup", "zone"), EDGES)
def test_apply_and_run_agree_on_the_edge(signup: str, zone: str) -> None:
    """The guard: the written apply fails the field as each field's run fails it (the same
    class and message)."""
    event = _event(signup)
    mapping = _mapping(zone, "fail")
    with pytest.raises(FieldMappingError) as applied:
        mapping.apply(event.customer, "store-1")
    with pytest.raises(FieldMappingError) as ran:
        _run_each(mapping, event)
    assert str(applied.value) == str(ran.value)


def test_an_edge_timestamp_does_not_block_the_unsubscribe() -> None:
    event = _event("0001-01-01T00:00:00Z")
    assert event.customer.opt_out is True
    planned = plan(
        event.customer, "store-1", {}, [DestinationSpec("d", _mapping("America/New_York", "null"))]
    )
    assert "unsubscribe" in [operation.op for operation in planned.operations]


def test_an_ordinary_timestamp_plans_the_unsubscribe() -> None:
    """The guard: the same mapping and customer, a timestamp in range."""
    event = _event("2001-01-01T00:00:00Z")
    planned = plan(
        event.customer, "store-1", {}, [DestinationSpec("d", _mapping("America/New_York", "null"))]
    )
    assert [operation.op for operation in planned.operations] == ["upsert", "unsubscribe"]


# --- the written apply's nesting: one indentation level a template part or a path step ---


def _template(parts: int) -> str:
    return 'x: {template: "' + "-".join(["{first_name}"] * parts) + '"}\n'


def _deep_path(steps: int) -> str:
    return 'x: {from: "verification_reasons[0].' + ".".join(["a"] * steps) + '", on_null: send}\n'


def _maps_or_is_refused(text: str) -> None:
    """A mapping file either compiles into an apply that maps as each field's run, or is
    refused with a MappingError naming its problem (what load_mapping's callers catch)."""
    try:
        mapping = compile_mapping_text(text, name="deep")
    except MappingError:
        return
    who = customer(verification_reasons=[{"a": {"a": None}}])
    ctx = Context(who, "store-1")
    assert mapping.apply(who, "store-1") == {f.target: f.run(ctx) for f in mapping.fields}


def test_a_template_of_many_parts_compiles() -> None:
    _maps_or_is_refused(_template(99))


def test_a_deep_path_compiles_or_is_refused() -> None:
    _maps_or_is_refused(_deep_path(100))


@pytest.mark.parametrize("parts", [1, 2, 50, 98])
def test_templates_of_up_to_98_parts_map_as_their_run(parts: int) -> None:
    mapping = compile_mapping_text(_template(parts), name="many")
    who = customer()
    assert mapping.apply(who, "s") == {"x": "-".join(["Jules"] * parts)}
    assert mapping.apply(who, "s") == {"x": mapping.fields[0].run(Context(who, "s"))}


def test_a_transform_raising_anything_else_still_plans_the_unsubscribe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: a mapping raising what no transform should (a bug) costs the
    upsert, never the opt-out; the failure names the exception's class, not its text."""
    event = _event("2001-01-01T00:00:00Z")
    mapping = _mapping("UTC", "null")

    def broken(*_args: Any) -> Any:
        raise KeyError("a customer's value")

    monkeypatch.setattr(mapping, "apply", broken)
    planned = plan(event.customer, "store-1", {}, [DestinationSpec("d", mapping)])
    assert [operation.op for operation in planned.operations] == ["unsubscribe"]
    assert [failure.message for failure in planned.failures] == [
        "the mapping failed unexpectedly (KeyError)"
    ]
