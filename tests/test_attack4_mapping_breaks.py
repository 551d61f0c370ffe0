"""Adversary (attack4): what breaks in the mapping under values the parsers accept. Each break
is a strict xfail naming where it is; apply and run agree on each (the written apply is not
the cause: the transform is)."""

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


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason=(
        "connector/mapping/_transforms.py _date.one: parsed.astimezone(tz) on an aware "
        "timestamp near year 1 or 9999 raises OverflowError, not TransformFailed, so a field "
        "with on_error: null does not swallow it; apply (and run alike) raise it out of "
        "Mapping.apply, and the planner (planner.py, which catches FieldMappingError only) "
        "fails the whole event, its consent operations included"
    ),
)
@pytest.mark.parametrize(("signup", "zone"), EDGES)
def test_date_with_a_zone_on_an_edge_timestamp_is_swallowed(signup: str, zone: str) -> None:
    event = _event(signup)
    mapping = _mapping(zone, "null")
    assert mapping.apply(event.customer, "store-1") == {"id": "3904"}


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason=(
        "connector/mapping/_transforms.py _date.one: the OverflowError of astimezone escapes "
        "as itself; with on_error: fail it is not a FieldMappingError naming the field"
    ),
)
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
    """The guard: the written apply raises what each field's run raises (the same class and
    message); the break above is the transform's, not apply's."""
    event = _event(signup)
    for on_error in ("null", "fail"):
        mapping = _mapping(zone, on_error)
        with pytest.raises(OverflowError) as applied:
            mapping.apply(event.customer, "store-1")
        with pytest.raises(OverflowError) as ran:
            _run_each(mapping, event)
        assert str(applied.value) == str(ran.value)


@pytest.mark.xfail(
    strict=True,
    raises=OverflowError,
    reason=(
        "connector/planner.py plan: Mapping.apply's OverflowError (from _transforms.py "
        "_date.one's astimezone) escapes plan(), which catches FieldMappingError only: an "
        "opted-out customer whose signup_date is 0001-01-01T00:00:00Z gets no unsubscribe "
        "planned for any destination while a field maps it with date: {tz: ...}, "
        "on_error: null"
    ),
)
def test_an_edge_timestamp_does_not_block_the_unsubscribe() -> None:
    event = _event("0001-01-01T00:00:00Z")
    assert event.customer.opt_out is True
    planned = plan(
        event.customer, "store-1", {}, [DestinationSpec("d", _mapping("America/New_York", "null"))]
    )
    assert "unsubscribe" in [operation.op for operation in planned.operations]


def test_an_ordinary_timestamp_plans_the_unsubscribe() -> None:
    """The guard for the xfail above: the same mapping and customer, a timestamp in range."""
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


@pytest.mark.xfail(
    strict=True,
    raises=IndentationError,
    reason=(
        "connector/mapping/_engine.py _inline_template: each template part nests the rest one "
        "indentation level deeper in the written apply; from 99 parts the code passes "
        "CPython's 100 levels and compile() raises IndentationError (not a MappingError) when "
        "the mapping is loaded; before the mapping branch a template rendered in a loop"
    ),
)
def test_a_template_of_many_parts_compiles() -> None:
    _maps_or_is_refused(_template(99))


@pytest.mark.xfail(
    strict=True,
    raises=IndentationError,
    reason=(
        "connector/mapping/_engine.py _inline_path: each step of a path nests one level "
        "deeper; a path of 100 steps under a list of any values (verification_reasons[0].a.a"
        "...) passes check_path and makes compile() raise IndentationError, not a MappingError"
        " (already so at 2e6bdbc)"
    ),
)
def test_a_deep_path_compiles_or_is_refused() -> None:
    _maps_or_is_refused(_deep_path(100))


@pytest.mark.parametrize("parts", [1, 2, 50, 98])
def test_templates_of_up_to_98_parts_map_as_their_run(parts: int) -> None:
    mapping = compile_mapping_text(_template(parts), name="many")
    who = customer()
    assert mapping.apply(who, "s") == {"x": "-".join(["Jules"] * parts)}
    assert mapping.apply(who, "s") == {"x": mapping.fields[0].run(Context(who, "s"))}
