"""Nulls taken in pydantic's core (NullFirst, NullAsEmpty in connector/treez.py): a null list
is an empty one, a null id or consent is None, as when each field's Python validator read
the null; any other value still goes to those validators, with the same paths and messages;
and the JSON Schema of the webhook body is the types' own."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from connector.errors import EventValidationError
from connector.treez import (
    CustomerEvent,
    ExternalIds,
    parse_event,
    parse_event_json,
    parse_stored_event,
    webhook_body_schema,
)

SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
LISTS = (
    "verification_reasons",
    "caregiver_details",
    "addresses",
    "merged_customer_ids",
    "customer_groups",
    "imageList",
)


def body_with(**data: Any) -> dict[str, Any]:
    body = copy.deepcopy(SEED)
    body["data"].update(data)
    return body


@pytest.mark.parametrize("reader", ["dict", "json", "stored"])
def test_nulls_read_as_before(reader: str) -> None:
    nulls: dict[str, Any] = dict.fromkeys(
        [*LISTS, "external_ids", "opt_out", "merged_into_customer_id"]
    )
    body = body_with(**nulls)
    if reader == "dict":
        event = parse_event(body)
    elif reader == "json":
        event = parse_event_json(json.dumps(body))
    else:
        event, dropped = parse_stored_event(json.dumps(body))
        assert dropped == []
    assert isinstance(event, CustomerEvent)
    customer = event.customer
    for name in LISTS:
        assert getattr(customer, name) == []
        assert name in customer.model_fields_set
    assert customer.external_ids == ExternalIds()
    assert customer.opt_out is None
    assert customer.merged_into_customer_id is None


def test_ids_inside_external_ids_take_nulls_and_placeholders() -> None:
    body = body_with(external_ids={"aiq_contact_id": None, "sticky_cards_contact_id": " N/A "})
    event = parse_event_json(json.dumps(body))
    assert isinstance(event, CustomerEvent)
    assert event.customer.external_ids.aiq_contact_id is None
    assert event.customer.external_ids.sticky_cards_contact_id is None
    body = body_with(external_ids={"aiq_contact_id": 77})
    event = parse_event_json(json.dumps(body))
    assert isinstance(event, CustomerEvent)
    assert event.customer.external_ids.aiq_contact_id == "77"


@pytest.mark.parametrize(
    ("data", "where", "what"),
    [
        ({"addresses": "x"}, "data.addresses", "Input should be a valid list"),
        ({"customer_groups": {"a": 1}}, "data.customer_groups", "Input should be a valid list"),
        ({"merged_customer_ids": [" "]}, "data.merged_customer_ids[0]", "must not be empty"),
        (
            {"merged_into_customer_id": True},
            "data.merged_into_customer_id",
            "must be an id (text or a whole number)",
        ),
        (
            {"opt_out": "yes"},
            "data.opt_out",
            'must be true or false (a boolean, or the text "true" or "false")',
        ),
        (
            {"external_ids": {"aiq_contact_id": 1.5}},
            "data.external_ids.aiq_contact_id",
            "must be an id (text or a whole number)",
        ),
    ],
)
def test_other_values_meet_the_same_refusals(data: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(EventValidationError) as caught:
        parse_event_json(json.dumps(body_with(**data)))
    assert [(p.where, p.what) for p in caught.value.problems] == [(where, what)]


def test_schema_of_the_lists_and_ids_is_the_types_own() -> None:
    customer = webhook_body_schema()["$defs"]["Customer"]["properties"]
    assert customer["addresses"] == {
        "items": {"$ref": "#/components/schemas/Address"},
        "title": "Addresses",
        "type": "array",
    }
    assert customer["customer_groups"] == {
        "items": {"type": "string"},
        "title": "Customer Groups",
        "type": "array",
    }
    assert customer["merged_into_customer_id"] == {
        "anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}],
        "default": None,
        "title": "Merged Into Customer Id",
    }
    assert customer["external_ids"] == {"$ref": "#/components/schemas/ExternalIds"}
