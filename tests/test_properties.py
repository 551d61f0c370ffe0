"""Rules that must hold for every input, checked with hypothesis."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.errors import EventValidationError, FieldMappingError
from connector.mapping import compile_mapping_text, load_mapping
from connector.treez import CustomerEvent, parse_event

ROOT = Path(__file__).parent.parent
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
HTTP_MAPPING = load_mapping(ROOT / "mappings" / "http.yaml")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
# values a Treez field plausibly carries, and odd ones
field_values = (
    json_values
    | st.sampled_from(
        [
            "N/A",
            "",
            "true",
            "false",
            "2026-04-24T11:38:21.000-07:00",
            "2000-01-01 00:00:00.000",
            "1948-02-12",
        ]
    )
    | st.dates().map(str)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
)
seed_fields = sorted(SEED["data"])


@st.composite
def mutated_seed(draw: st.DrawFn) -> dict[str, Any]:
    body = copy.deepcopy(SEED)
    for name in draw(
        st.lists(st.sampled_from([*seed_fields, "new_field"]), max_size=6, unique=True)
    ):
        if draw(st.booleans()):
            body["data"][name] = draw(field_values)
        else:
            body["data"].pop(name, None)
    return body


@given(json_values)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_any_json_parses_or_fails_with_a_validation_error(body: Any) -> None:
    try:
        parse_event(body)
    except EventValidationError as exc:
        assert exc.problems


@given(mutated_seed())
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_seed_with_any_field_values_parses_or_fails_cleanly(body: dict[str, Any]) -> None:
    try:
        event = parse_event(body)
    except EventValidationError as exc:
        assert all(p.where.startswith("data") for p in exc.problems)
        return
    assert isinstance(event, CustomerEvent)
    assert event.customer.last_update.tzinfo is not None
    assert event.customer.opt_out in (True, False, None)


def _outcome(body: dict[str, Any]) -> tuple[str, str]:
    event = parse_event(copy.deepcopy(body))
    assert isinstance(event, CustomerEvent)
    try:
        return "mapped", json.dumps(HTTP_MAPPING.apply(event.customer, "store-1"))
    except FieldMappingError as exc:
        return "failed", str(exc)


@given(mutated_seed())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_mapping_is_deterministic_and_json_safe(body: dict[str, Any]) -> None:
    try:
        parse_event(copy.deepcopy(body))
    except EventValidationError:
        return
    first, second = _outcome(body), _outcome(body)
    assert first == second
    if first[0] == "mapped":
        contact = json.loads(first[1])
        assert "N/A" not in first[1]
        assert list(contact) == [t for t in HTTP_MAPPING.targets if t in contact]


EVERY_TRANSFORM = compile_mapping_text(
    """
a: {from: first_name, transform: [strip, lower, upper, title, {truncate: 5}, sha256]}
b: {from: phone, transform: [e164]}
c: {from: birthday, transform: [{date: "%d.%m.%Y"}]}
d: {from: rewards_balance, transform: [float, int, str, bool]}
e: {from: customer_groups, transform: [{null_if: [X]}, {map: {values: {SENIOR: s}}}, join, split]}
f: {from: email, transform: [{first_non_null: [nickname, last_name]}]}
g: {template: "{dispensary}/{customer_id}/{addresses[primary=true].zipcode}"}
""",
    name="every-transform",
)


@given(mutated_seed())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_transforms_fail_only_with_field_mapping_errors(body: dict[str, Any]) -> None:
    try:
        event = parse_event(body)
    except EventValidationError:
        return
    assert isinstance(event, CustomerEvent)
    try:
        out = EVERY_TRANSFORM.apply(event.customer, "store-1")
    except FieldMappingError as exc:
        assert exc.field in EVERY_TRANSFORM.targets
        return
    json.dumps(out)
