"""No outbox payload ever holds a number that is not finite (NaN, Infinity), whatever numeric
value a customer field carries and however the event arrives: a webhook the receiver accepts,
an event stored by an older version (accepted before NaN was refused), a customer pulled by
the reconciliation (its quick path, Treez's text, and its careful path, a decoded record).
Plus the parse and mapping rules this stands on, each example naming a path, never a value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.config_base import PolicyConfig
from connector.delivery._http import json_body
from connector.errors import EventValidationError, FieldMappingError, MappingError
from connector.mapping import compile_mapping_text, load_mapping
from connector.planner import ContactState, CustomerState, DestinationSpec, content_hash, plan
from connector.reconcile import Reconciler, _pulled
from connector.store.plans import _COMPACT_JSON
from connector.treez import (
    CustomerEvent,
    NotJsonError,
    check_customer,
    check_event_json,
    parse_event_json,
    parse_stored_event,
)
from connector.treez_api import customer_texts

ROOT = Path(__file__).resolve().parent.parent
SEED: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
DISPENSARY = "partnersandbox3"

# a mapping that sends the numeric fields as they are, through the numeric transforms, and
# inside lists and objects: what a user's own mapping may do
RAW_MAPPING = compile_mapping_text(
    """
email: email
balance: rewards_balance
balance_float: {from: rewards_balance, transform: [float], on_error: null, default: 0}
balance_int: {from: rewards_balance, transform: [int], on_error: null}
balance_text: {from: rewards_balance, transform: [str], on_error: null}
balance_or_points: {from: rewards_balance, transform: [{first_non_null: [points]}]}
points: points
reasons: verification_reasons
details: caregiver_details
tier: {from: "addresses[0].tier"}
""",
    name="raw.yaml",
)


def _specs(**options: Any) -> list[DestinationSpec]:
    shipped = [
        DestinationSpec(path.stem, load_mapping(path), **options)
        for path in sorted((ROOT / "mappings").glob("*.yaml"))
    ]
    return [*shipped, DestinationSpec("raw", RAW_MAPPING, **options)]


SPEC_SETS = [
    _specs(),
    _specs(
        policy=PolicyConfig(resubscribe="on_source_opt_in"),
        native_merge=False,
        external_id_key="aiq_contact_id",
        consent_fields=True,  # consent calls carry the mapped contact (apply_partial)
    ),
]


def _refuse(literal: str) -> Any:
    raise AssertionError(f"{literal} in a payload")


def _finite_throughout(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_throughout(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite_throughout(v) for v in value)
    return True


def _assert_payloads_finite(stored: str) -> None:
    """Plan ``stored`` as the pipeline does (when it parses), against no state and an
    opted-out one, with every spec set; each operation's body, as the outbox writes it and as
    a request carries it, is valid JSON holding no number that is not finite."""
    try:
        event, _ = parse_stored_event(stored)
    except EventValidationError:
        return  # refused when planned: kept in quarantine, nothing queued
    if not isinstance(event, CustomerEvent):
        return
    customer = event.customer
    opted_out = CustomerState(
        customer.customer_id,
        last_update_us=0,
        opt_out=True,
        contacts={spec.name: ContactState("c-1", "h", unsubscribed=True) for spec in _specs()},
    )
    for specs in SPEC_SETS:
        for states in ({}, {customer.customer_id: opted_out}):
            planned = plan(customer, DISPENSARY, states, specs, digest=content_hash(customer))
            for operation in planned.operations:
                assert _finite_throughout(operation.body), operation.destination
                # the outbox's encoder (connector/store/plans.py) and a request's body
                written = _COMPACT_JSON(operation.body)
                assert json.loads(written, parse_constant=_refuse) == operation.body
                sent = json_body(operation.body)
                assert json.loads(sent, parse_constant=_refuse) == operation.body


# --- the numeric values, as JSON text ---

_LITERALS = st.sampled_from(["NaN", "Infinity", "-Infinity"])
_NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    # past a float's range (1e400 reads as inf), and near it
    st.builds(lambda m, e: f"{m}e{e}", st.integers(-9, 9), st.integers(-400, 400)),
    st.builds(lambda d: "1" + "0" * d + ".5", st.integers(300, 320)),
    # text a lax parser reads as a float
    st.sampled_from(['"NaN"', '"nan"', '"inf"', '"-Infinity"', '"1e400"', '"2.5"']),
)
NUMERIC = st.one_of(_LITERALS, _NUMBERS)
_PLACES = {
    "rewards_balance": "{}",
    "points": "{}",
    "points_list": "[1, {}]",
    "verification_reasons": '[{{"score": {}}}]',
    "caregiver_details": '[{{"age": {}}}]',
    "notes": "{}",
    "addresses": '[{{"street1": "1 Main St", "primary": true, "tier": {}}}]',
}


@st.composite
def bodies(draw: st.DrawFn) -> str:
    """The seed body with one to three of its fields holding a drawn numeric value."""
    places = draw(st.lists(st.sampled_from(sorted(_PLACES)), min_size=1, max_size=3, unique=True))
    record = dict(SEED["data"])
    values = {}
    for place in places:
        record[place] = f"@@{place}@@"
        values[place] = _PLACES[place].format(draw(NUMERIC))
    text = json.dumps({**SEED, "data": record})
    for place, value in values.items():
        text = text.replace(f'"@@{place}@@"', value)
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_no_outbox_payload_holds_a_non_finite_number(text: str) -> None:
    try:
        check_event_json(text, source="body")
    except NotJsonError:
        # the receiver refuses it (400): only NaN and Infinity, never a number of JSON's
        assert any(word in text for word in ("NaN", "Infinity"))
    # planned as accepted, or as stored by an older version that accepted it
    _assert_payloads_finite(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_no_pulled_customer_yields_a_non_finite_number(text: str) -> None:
    customer = json.dumps(json.loads(text)["data"])
    # the page as Treez sends it: read by msgspec (the quick path), or by json when msgspec
    # refuses it (NaN), each customer then a decoded record (the careful path)
    page = ('{"resultCode":"SUCCESS","data":[' + customer + "]}").encode()
    texts = customer_texts(page)
    pulled: list[Any] = _pulled(DISPENSARY, texts) if texts is not None else [json.loads(customer)]
    for customers in (pulled, [json.loads(customer)]):
        events, _, _ = Reconciler._events(DISPENSARY, customers, "reconcile", 7)
        for event in events:
            _assert_payloads_finite(event.body)


# --- examples ---


def _seed(**raw: str) -> str:
    record = dict(SEED["data"])
    for name in raw:
        record[name] = f"@@{name}@@"
    text = json.dumps({**SEED, "data": record})
    for name, value in raw.items():
        text = text.replace(f'"@@{name}@@"', value)
    return text


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_each_parse_of_a_webhook_refuses_the_literals_naming_the_path(literal: str) -> None:
    text = _seed(points=f'{{"tiers": [1, {literal}]}}')
    for parse in (check_event_json, parse_event_json):
        with pytest.raises(NotJsonError) as refused:
            parse(text, source="body")
        (problem,) = refused.value.problems
        assert problem.where == "data.points.tiers[1]"
        assert literal not in problem.what.replace("NaN and Infinity", "")
    with pytest.raises(NotJsonError):
        check_event_json(text.encode(), source="body")  # bytes alike


def test_a_stored_event_leaves_the_field_out_and_keeps_consent() -> None:
    text = _seed(rewards_balance="NaN", points="[1, -Infinity]", opt_out='"true"')
    event, dropped = parse_stored_event(text)
    assert isinstance(event, CustomerEvent)
    assert event.customer.opt_out is True
    assert event.customer.rewards_balance is None
    assert (event.customer.model_extra or {})["points"] == [1]  # a list loses the element
    assert sorted(p.where for p in dropped) == ["data.points[1]", "data.rewards_balance"]


@pytest.mark.parametrize("value", ["1e400", '"NaN"', '"-inf"'])
def test_a_balance_that_is_not_finite_json_is_left_out_when_planned(value: str) -> None:
    text = _seed(rewards_balance=value)
    check_event_json(text)  # JSON, and outside the rules: accepted
    event, dropped = parse_stored_event(text)
    assert isinstance(event, CustomerEvent)
    assert event.customer.rewards_balance is None
    assert [p.where for p in dropped] == ["data.rewards_balance"]


def test_a_pulled_record_with_nan_in_a_consent_field_is_refused() -> None:
    record = json.loads(_seed(opt_out="NaN"))["data"]
    with pytest.raises(EventValidationError) as refused:
        check_customer(record, source="pulled customer")
    assert [p.where for p in refused.value.problems] == ["opt_out"]


def test_the_mapping_refuses_a_value_that_is_not_finite_as_a_transform_failure() -> None:
    text = _seed(points="1e400")  # JSON: an unknown field, kept as it is (inf)
    event, _ = parse_stored_event(text)
    assert isinstance(event, CustomerEvent)
    mapping = compile_mapping_text(
        "email: email\npoints: points\nsoft: {from: points, on_error: null, default: 0}\n"
    )
    with pytest.raises(FieldMappingError) as failed:
        mapping.apply(event.customer, DISPENSARY)
    assert failed.value.field == "points"
    assert "finite" in failed.value.reason
    # consent calls carry what can be mapped: the field is left out, its default kept
    partial = mapping.apply_partial(event.customer, DISPENSARY)
    assert "points" not in partial
    assert partial["soft"] == 0


@pytest.mark.parametrize(
    "text",
    [
        "x: {value: .nan}\n",
        "x: {value: [1, .inf]}\n",
        "x: {from: email, default: -.inf}\n",
        "x: {from: gender, transform: [{map: {values: {M: .nan}}}]}\n",
        "x: {from: gender, transform: [{map: {values: {M: 1}, default: .inf}}]}\n",
    ],
)
def test_a_mapping_with_a_constant_that_is_not_finite_is_refused_when_loaded(text: str) -> None:
    with pytest.raises(MappingError) as refused:
        compile_mapping_text(text, name="m.yaml")
    assert "finite" in str(refused.value)
    assert "field 'x'" in str(refused.value)


def test_a_page_holding_nan_is_read_by_json_and_its_customer_refused_or_left_out() -> None:
    customer = json.dumps(json.loads(_seed(rewards_balance="NaN"))["data"])
    page = ('{"resultCode":"SUCCESS","data":[' + customer + "]}").encode()
    assert customer_texts(page) is None  # msgspec refuses NaN: the careful path reads it
    events, rejected, _ = Reconciler._events(DISPENSARY, [json.loads(customer)], "reconcile", 7)
    assert rejected == []
    (stored,) = events
    event, dropped = parse_stored_event(stored.body)
    assert isinstance(event, CustomerEvent)
    assert event.customer.rewards_balance is None
    assert [p.where for p in dropped] == ["data.rewards_balance"]
