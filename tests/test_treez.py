"""The Treez customer model and webhook envelope, against the real delivery and its quirks."""

from __future__ import annotations

import copy
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.errors import EventValidationError
from connector.treez import (
    Customer,
    CustomerEvent,
    CustomerStatus,
    NotJsonError,
    OtherEvent,
    TestPing,
    check_customer,
    check_event_json,
    parse_customer,
    parse_event,
    parse_stored_event,
)


def customer_event(body: dict[str, Any]) -> CustomerEvent:
    event = parse_event(body)
    assert isinstance(event, CustomerEvent)
    return event


def problems(body: Any) -> dict[str, str]:
    with pytest.raises(EventValidationError) as caught:
        parse_event(body)
    return {p.where: p.what for p in caught.value.problems}


def test_seed_delivery_parses_faithfully(seed_body: dict[str, Any]) -> None:
    event = customer_event(seed_body)
    c = event.customer
    assert event.dispensary_short_name == "partnersandbox3"
    assert c.customer_id == "3904"
    assert (c.first_name, c.last_name) == ("Jules", "Winnfield")
    assert c.status == CustomerStatus.ACTIVE
    assert c.birthday == date(1948, 2, 12)
    assert c.opt_out is True
    assert c.last_update == datetime(2026, 4, 24, 18, 38, 21, tzinfo=UTC)
    assert c.last_update.utcoffset() == timedelta(hours=-7)
    assert c.signup_date == c.last_update
    assert c.last_visit_date is None  # 2000-01-01 00:00:00.000 means never visited
    assert c.permit_expiration is None  # "N/A"
    assert c.state_medical_id == "N/A"  # text keeps the placeholder; mappings null it
    assert c.caregiver_license_number == ""
    assert c.email is None
    assert c.phone is None
    assert c.customer_groups == ["SENIOR"]
    assert c.rewards_balance == 0
    assert c.rewards_type == "POINTS"
    assert c.addresses[0].city == "INGLEWOOD"
    assert c.addresses[0].primary is True
    assert c.primary_address is c.addresses[0]
    assert c.merged_customer_ids == []
    assert c.merged_into_customer_id is None
    assert c.external_ids.aiq_contact_id is None
    assert c.verification_reasons[0]["verification_reason"] == "NEW"
    assert not c.is_deactivated
    assert not c.is_merged_away


def test_seed_bytes_are_the_documented_delivery(seed_bytes: bytes) -> None:
    assert len(seed_bytes) == 1403
    assert customer_event(json.loads(seed_bytes)).customer.customer_id == "3904"


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        ("true", True),
        ("false", False),
        ("TRUE", True),
        (" False ", False),
        (True, True),
        (False, False),
        (None, None),
        ("", None),
        ("   ", None),
        (" TRUE ", True),
        ("fAlSe", False),
    ],
)
def test_opt_out_forms(make_customer: Any, sent: Any, read: bool | None) -> None:
    assert make_customer(opt_out=sent).opt_out is read


OPT_OUT_REFUSAL = 'must be true or false (a boolean, or the text "true" or "false")'


@pytest.mark.parametrize(
    "sent",
    [
        "yes",
        "no",
        "y",
        "n",
        "1",
        "0",
        1,
        0,
        "N/A",
        " YES ",
        "t",
        "f",
        "on",
        "off",
        "maybe",
        2,
        1.5,
        0.0,
        [],
        {},
        ["true"],
        "t r u e",
        "true false",
    ],
)
def test_opt_out_values_other_than_true_false_and_null_are_refused_everywhere(
    seed_body: dict[str, Any], sent: Any
) -> None:
    # the receiver (its quick check and its rule model), the planner's re-parse of what was
    # stored and the reconciliation's check of a pulled customer all refuse it, naming the field
    seed_body["data"]["opt_out"] = sent
    raw = json.dumps(seed_body)
    assert problems(seed_body) == {"data.opt_out": OPT_OUT_REFUSAL}
    for read in (check_event_json, parse_stored_event):
        with pytest.raises(EventValidationError) as caught:
            read(raw)
        assert [(p.where, p.what) for p in caught.value.problems] == [
            ("data.opt_out", OPT_OUT_REFUSAL)
        ]
    with pytest.raises(EventValidationError) as caught:
        check_customer(seed_body["data"])
    assert [p.where for p in caught.value.problems] == ["opt_out"]


@pytest.mark.parametrize(("sent", "read"), [("", None), (" ", None), ("\t\n", None)])
def test_opt_out_empty_text_says_nothing_and_is_never_false(
    seed_body: dict[str, Any], sent: str, read: None
) -> None:
    seed_body["data"]["opt_out"] = sent
    raw = json.dumps(seed_body)
    check_event_json(raw)
    event, dropped = parse_stored_event(raw)
    assert isinstance(event, CustomerEvent)
    assert event.customer.opt_out is read
    assert dropped == []


def test_ids_as_integers_become_text(make_customer: Any) -> None:
    c = make_customer(
        customer_id=3904,
        merged_customer_ids=[17, "18"],
        merged_into_customer_id=99,
        external_ids={"aiq_contact_id": 12345, "sticky_cards_contact_id": None},
    )
    assert c.customer_id == "3904"
    assert c.merged_customer_ids == ["17", "18"]
    assert c.merged_into_customer_id == "99"
    assert c.external_ids.aiq_contact_id == "12345"
    assert c.is_merged_away


@pytest.mark.parametrize("bad", ["", "  ", None, True, 1.5, [], {}])
def test_customer_id_must_be_an_id(seed_body: dict[str, Any], bad: Any) -> None:
    seed_body["data"]["customer_id"] = bad
    assert "data.customer_id" in problems(seed_body)


def test_merge_fields_and_statuses(make_customer: Any) -> None:
    survivor = make_customer(status="MERGED", merged_customer_ids=[3905])
    absorbed = make_customer(
        status="DEACTIVATED",
        verification_status="NOT_APPLICABLE",
        merged_into_customer_id="3904",
    )
    assert survivor.status == CustomerStatus.MERGED
    assert survivor.merged_customer_ids == ["3905"]
    assert absorbed.is_deactivated
    assert absorbed.is_merged_away
    assert make_customer(merged_into_customer_id="N/A").merged_into_customer_id is None


def test_unknown_enum_values_and_extra_fields_are_kept(make_customer: Any) -> None:
    c = make_customer(
        status="SUSPENDED", gender="X", patient_type="VETERAN", loyalty_tier={"name": "gold"}
    )
    assert (c.status, c.gender, c.patient_type) == ("SUSPENDED", "X", "VETERAN")
    assert c.model_extra == {"loyalty_tier": {"name": "gold"}}
    assert c.model_dump()["loyalty_tier"] == {"name": "gold"}


def test_extra_fields_in_nested_objects_are_kept(make_customer: Any) -> None:
    c = make_customer(
        addresses=[{"type": "address_of_record", "city": "LA", "country": "US", "primary": "true"}],
        external_ids={"aiq_contact_id": None, "springbig_id": "sb-1"},
    )
    assert c.addresses[0].model_extra == {"country": "US"}
    assert c.addresses[0].primary is True
    assert c.external_ids.model_extra == {"springbig_id": "sb-1"}


@pytest.mark.parametrize(
    "field", ["addresses", "customer_groups", "merged_customer_ids", "caregiver_details"]
)
def test_null_lists_read_as_empty(make_customer: Any, field: str) -> None:
    assert getattr(make_customer(**{field: None}), field) == []


def test_null_external_ids_read_as_empty(make_customer: Any) -> None:
    c = make_customer(external_ids=None)
    assert c.external_ids.aiq_contact_id is None


def test_last_update_is_an_instant(make_customer: Any) -> None:
    # 01:30 at -07:00 is later than 03:00 at -04:00 (08:30 UTC vs 07:00 UTC): not text order
    west = make_customer(last_update="2026-11-01T01:30:00.000-07:00").last_update
    east = make_customer(last_update="2026-11-01T03:00:00.000-04:00").last_update
    assert west > east
    assert make_customer(last_update="2026-04-24T18:38:21Z").last_update.tzinfo is not None


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("2026-04-24T11:38:21.000", "Input should have timezone info"),
        ("yesterday", "must be an ISO 8601 timestamp with an offset, as text"),
        ("1714000000", "must be an ISO 8601 timestamp with an offset, as text"),
        (1714000000, "must be an ISO 8601 timestamp with an offset, as text"),
        (None, "must be an ISO 8601 timestamp with an offset, as text"),
    ],
)
def test_last_update_must_be_a_timestamp_with_offset(
    seed_body: dict[str, Any], bad: Any, message: str
) -> None:
    seed_body["data"]["last_update"] = bad
    found = problems(seed_body)
    assert list(found) == ["data.last_update"]
    assert found["data.last_update"].startswith(message)


def test_last_update_missing(seed_body: dict[str, Any]) -> None:
    del seed_body["data"]["last_update"]
    assert problems(seed_body) == {"data.last_update": "is missing"}


def test_last_visit_date_without_zone(make_customer: Any) -> None:
    c = make_customer(last_visit_date="2026-05-01 14:02:03.000")
    assert c.last_visit_date == datetime(2026, 5, 1, 14, 2, 3)
    assert make_customer(last_visit_date="2000-01-01 00:00:00.000").last_visit_date is None
    assert make_customer(last_visit_date=None).last_visit_date is None


@pytest.mark.parametrize("placeholder", ["N/A", "", "  "])
def test_date_placeholders_read_as_null(make_customer: Any, placeholder: str) -> None:
    c = make_customer(
        birthday=placeholder,
        permit_expiration=placeholder,
        drivers_license_expiration=placeholder,
        signup_date=placeholder,
    )
    assert (c.birthday, c.permit_expiration, c.drivers_license_expiration, c.signup_date) == (
        None,
        None,
        None,
        None,
    )


def test_odd_dates_are_kept_as_sent_not_refused(make_customer: Any) -> None:
    # A bad permit date must not stop a customer's consent change from syncing.
    c = make_customer(permit_expiration="12/31/2027", birthday="1948-02-12")
    assert c.permit_expiration == "12/31/2027"
    assert make_customer(permit_expiration="2027-12-31").permit_expiration == date(2027, 12, 31)


def test_numbers_as_text_fields(make_customer: Any) -> None:
    c = make_customer(phone=3105551234, addresses=[{"zipcode": 90301, "primary": True}])
    assert c.phone == "3105551234"
    assert c.addresses[0].zipcode == "90301"


def test_missing_dispensary_short_name_is_tolerated(seed_body: dict[str, Any]) -> None:
    del seed_body["dispensary_short_name"]
    assert customer_event(seed_body).dispensary_short_name is None


def test_test_ping() -> None:
    assert isinstance(parse_event({"test": True}), TestPing)
    assert parse_event({"test": "ping", "dispensary_short_name": "s1"}) == TestPing("s1")


@pytest.mark.parametrize("kind", ["TICKET", "PRODUCT", "TICKET_STATUS", "ticket_by_status"])
def test_other_event_types_are_classified_not_validated(kind: str) -> None:
    event = parse_event({"event_type": kind, "data": [1, 2, 3]})
    assert isinstance(event, OtherEvent)
    assert event.event_type == kind.upper()


def test_event_type_is_case_insensitive_for_customer(seed_body: dict[str, Any]) -> None:
    seed_body["event_type"] = "customer"
    assert customer_event(seed_body).customer.customer_id == "3904"


@pytest.mark.parametrize(
    ("body", "where", "what"),
    [
        ([], "body", "must be a JSON object"),
        ("CUSTOMER", "body", "must be a JSON object"),
        ({}, "event_type", "is missing"),
        ({"event_type": ""}, "event_type", "String should have at least 1 character"),
        ({"event_type": 7}, "event_type", "Input should be a valid string"),
        ({"event_type": "CUSTOMER"}, "data", "is missing"),
        ({"event_type": "CUSTOMER", "data": []}, "data", "must be an object"),
        (
            {"event_type": "CUSTOMER", "data": {"last_update": "2026-04-24T11:38:21.000-07:00"}},
            "data.customer_id",
            "is missing",
        ),
    ],
)
def test_envelope_errors_name_the_field(body: Any, where: str, what: str) -> None:
    assert problems(body)[where] == what


def test_every_problem_is_reported_with_its_path(seed_body: dict[str, Any]) -> None:
    data = seed_body["data"]
    data["opt_out"] = "perhaps"
    data["addresses"][0]["primary"] = "sometimes"
    data["merged_customer_ids"] = [1, None]
    del data["last_update"]
    found = problems(seed_body)
    assert set(found) == {
        "data.opt_out",
        "data.addresses[0].primary",
        "data.merged_customer_ids[1]",
        "data.last_update",
    }


def test_errors_never_carry_customer_values(seed_body: dict[str, Any]) -> None:
    data = seed_body["data"]
    data["first_name"] = ["Secret-Name-123"]
    data["opt_out"] = "SECRET-CONSENT"
    data["birthday"] = {"year": "SECRET-BDAY"}
    with pytest.raises(EventValidationError) as caught:
        parse_event(seed_body)
    text = str(caught.value)
    assert "data.first_name" in text
    assert "data.opt_out" in text
    assert "data.birthday" in text
    assert "SECRET" not in text


def test_parse_customer_for_api_records(seed_data: dict[str, Any]) -> None:
    record = copy.deepcopy(seed_data)
    record["opt_out"] = None  # some reads send null
    assert parse_customer(record).opt_out is None
    with pytest.raises(EventValidationError, match="customer_id: is missing"):
        parse_customer({"last_update": "2026-04-24T11:38:21.000-07:00"})


def test_customer_is_immutable(make_customer: Any) -> None:
    c: Customer = make_customer()
    with pytest.raises(Exception, match="frozen"):
        c.first_name = "Vincent"  # type: ignore[misc]


def test_offsets_survive_daylight_saving(make_customer: Any) -> None:
    pdt = make_customer(last_update="2026-11-01T01:30:00.000-07:00").last_update
    pst = make_customer(last_update="2026-11-01T01:10:00.000-08:00").last_update
    assert pst > pdt  # the same wall clock an hour later after the change
    assert pst.astimezone(UTC).hour == 9


def test_defect_11_the_stored_event_and_a_pulled_customer_are_screened_as_the_receiver_does(
    seed_body: dict[str, Any],
) -> None:
    # a stored body (webhook or reconciliation: json.dumps escapes a lone surrogate) holding
    # one outside the rules is planned without it; a pulled customer with one in a rule field
    # is refused by the reconciliation's check, naming the field, as the receiver does
    seed_body["data"]["notes"] = "a\ud800"
    seed_body["data"]["x\udc00"] = "1"
    seed_body["data"]["imageList"] = ["ok", {"deep": [[[[[[[[[[]]]]]]]]]]}, ["\udfff"]]
    raw = json.dumps(seed_body)
    event, dropped = parse_stored_event(raw)
    assert isinstance(event, CustomerEvent)
    assert {p.where for p in dropped} == {"data.notes", "data.x\\udc00", "data.imageList[2][0]"}
    assert event.customer.notes is None
    assert event.customer.imageList == ["ok", {"deep": [[[[[[[[[[]]]]]]]]]]}]
    assert event.customer.opt_out is True
    event.customer.model_dump_json()
    for name, value in [("customer_id", "3\ud8004"), ("status", "\udc00"), ("opt_out", "\ud800")]:
        bad = copy.deepcopy(seed_body)
        bad["data"][name] = value
        with pytest.raises(EventValidationError) as caught:
            parse_stored_event(json.dumps(bad))
        assert [p.where for p in caught.value.problems] == [f"data.{name}"]
        with pytest.raises(EventValidationError) as caught:
            check_customer(bad["data"])
        assert [p.where for p in caught.value.problems] == [name]


def test_defect_11_depth_is_screened_past_128_levels_only(seed_body: dict[str, Any]) -> None:
    def nested(depth: int) -> Any:
        value: Any = 1
        for _ in range(depth):
            value = [value]
        return value

    for depth, kept in [(128, True), (129, False), (300, False)]:
        body = copy.deepcopy(seed_body)
        body["data"]["unknown"] = nested(depth)
        raw = json.dumps(body)
        assert check_event_json(raw).kind == "customer"
        event, dropped = parse_stored_event(raw)
        assert isinstance(event, CustomerEvent)
        # a list field: its element too deep is left out
        assert (event.customer.model_extra or {})["unknown"] == (nested(depth) if kept else [])
        assert [p.where for p in dropped] == ([] if kept else ["data.unknown[0]"])
        event.customer.model_dump_json()
        body["data"]["external_ids"] = {"other": nested(depth - 1)}
        if kept:
            check_event_json(json.dumps(body))
        else:
            with pytest.raises(EventValidationError, match=r"data\.external_ids: is nested"):
                check_event_json(json.dumps(body))


def test_defect_11_how_deep_a_body_may_nest_does_not_depend_on_the_stack(
    seed_body: dict[str, Any],
) -> None:
    # json.loads stops at the recursion limit less the frames on the stack: the receiver (a
    # shallow stack) read a body 600 levels deep and answered 202, the planner (deeper) could not
    seed_body["data"]["unknown"] = json.loads("[" * 600 + "]" * 600)
    raw = json.dumps(seed_body)

    def deep_down(frames: int, read: Any) -> str:
        if frames:
            return deep_down(frames - 1, read)
        try:
            read(raw)
        except NotJsonError as exc:
            return exc.problems[0].what
        return "read"

    seen = {
        deep_down(frames, read)
        for frames in (0, 500)
        for read in (check_event_json, parse_stored_event)
    }
    assert seen == {"is not JSON we read (nested past 512 levels)"}


# --- a repeated name: the last copy wins, alike wherever a body is read ---


def _with_members(seed_body: dict[str, Any], where: str, members: str) -> str:
    """The seed's JSON text with the raw ``members`` (repeated names) opening the envelope
    (``where`` "envelope") or its ``data`` object (``where`` "data")."""
    body = copy.deepcopy(seed_body)
    for name in ("customer_id", "opt_out", "status"):
        if where == "data" and name in members:
            del body["data"][name]
    text = json.dumps(body)
    if where == "envelope":
        if "event_type" in members:
            body.pop("event_type")
            text = json.dumps(body)
        return "{" + members + ", " + text[1:]
    head, tail = text.split('"data": {', 1)
    return head + '"data": {' + members + ", " + tail


_REPEATS = {
    "customer_id": ("data", '"customer_id": "1", "customer_id": "2"'),
    "customer_id-escaped": ("data", '"customer_id": "1", "customer\\u005fid": "2"'),
    "customer_id-first-wrong": ("data", '"customer_id": {"x": 1}, "customer_id": 2'),
    "customer_id-last-wrong": ("data", '"customer_id": 2, "customer_id": ""'),
    "opt_out-true-then-false": ("data", '"opt_out": "true", "opt_out": "false"'),
    "opt_out-yes-then-false": ("data", '"opt_out": "yes", "opt_out": "false"'),
    "opt_out-false-then-true": ("data", '"opt_out": false, "opt_out": "true"'),
    "status": ("data", '"status": "ACTIVE", "status": "DEACTIVATED"'),
    "event_type-customer-then-product": (
        "envelope",
        '"event_type": "CUSTOMER", "event_type": "PRODUCT"',
    ),
    "event_type-product-then-customer": (
        "envelope",
        '"event_type": "PRODUCT", "event_type": "CUSTOMER"',
    ),
    "data-twice": ("envelope", '"data": {"customer_id": "9"}'),
}


@pytest.mark.parametrize("name", list(_REPEATS))
def test_a_repeated_name_is_read_by_its_last_copy_everywhere(
    seed_body: dict[str, Any], name: str
) -> None:
    """A body repeating a name is neither refused for it nor read two ways: the receiver's
    check (its quick path and the model behind it), the planner's parse and json.loads with
    parse_event all take the last copy (the inbox row's customer_id is the planned one)."""
    from connector.treez import _check_with_model, _quick_check

    where, members = _REPEATS[name]
    raw = _with_members(seed_body, where, members)
    decoded = json.loads(raw)  # Python's json: the last copy wins
    if name == "data-twice":  # the envelope's first "data" is replaced by the seed's
        assert decoded["data"]["customer_id"] == seed_body["data"]["customer_id"]

    def outcome(read: Any) -> Any:
        try:
            event = read()
        except EventValidationError as exc:
            return ("refused", sorted(p.where for p in exc.problems))
        if isinstance(event, tuple):  # parse_stored_event: (event, fields left out)
            event = event[0]
        if isinstance(event, CustomerEvent):
            return ("customer", event.customer.customer_id, event.customer.opt_out)
        if isinstance(event, OtherEvent):
            return ("other", event.event_type)
        return ("customer", event.customer_id, None)

    expected = outcome(lambda: parse_event(decoded))
    stored = outcome(lambda: parse_stored_event(raw))
    checked = outcome(lambda: check_event_json(raw))
    by_model = outcome(lambda: _check_with_model(raw, "body"))
    assert stored == expected
    # the receiver's check names only the id; the opt-out is the planner's to read
    assert checked[:2] == by_model[:2] == expected[:2]
    quick = _quick_check(raw)
    if quick is not None:
        assert ("customer", quick.customer_id) == expected[:2]
    if expected[0] == "customer":
        data = decoded["data"]
        assert expected[1] == str(data["customer_id"])
        if "opt_out" in members:
            assert expected[2] is (data["opt_out"] in (True, "true"))


SEED_DATA: dict[str, Any] = json.loads(
    (Path(__file__).parent / "data" / "seed_body.json").read_bytes()
)["data"]
_VALUES = {
    "customer_id": st.sampled_from(["1", "2", 3, "", " 4 ", None, [], "x" * 200]),
    "opt_out": st.sampled_from([True, False, "true", "FALSE", "", "yes", 1, None]),
    "status": st.sampled_from(["ACTIVE", "DEACTIVATED", None, 5]),
    "last_update": st.sampled_from(
        ["2026-04-24T11:38:21.000-07:00", "2026-05-01T00:00:00Z", "1700000000", None]
    ),
    "merged_into_customer_id": st.sampled_from([None, "7", "", {}]),
    "first_name": st.sampled_from(["Jules", None, {"given": "x"}]),
}


@given(
    members=st.lists(
        st.sampled_from(sorted(_VALUES)).flatmap(
            lambda name: st.tuples(st.just(name), _VALUES[name])
        ),
        min_size=1,
        max_size=8,
    ),
    event_types=st.lists(st.sampled_from(["CUSTOMER", "PRODUCT", "customer"]), max_size=2),
)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_repeated_names_the_receiver_and_the_planner_agree(
    members: list[tuple[str, Any]], event_types: list[str]
) -> None:
    """Generated bodies repeating rule fields (and the event type) with sound and wrong
    values: whatever the receiver accepts, the planner reads as the same customer, with the
    last copy's consent; whatever it refuses, the planner refuses too, and so it would the
    body written without the repeats (the last copies)."""
    data = copy.deepcopy(SEED_DATA)
    for name, _ in members:
        data.pop(name, None)
    head = json.dumps(data)[:-1]  # the seed's customer without the names drawn, left open
    text = head + "".join(f", {json.dumps(n)}: {json.dumps(v)}" for n, v in members) + "}"
    types = "".join(f'"event_type": {json.dumps(t)}, ' for t in event_types)
    raw = '{"event_type": "CUSTOMER", ' + types + '"data": ' + text + "}"
    decoded = json.loads(raw)
    try:
        checked = check_event_json(raw)
    except EventValidationError:
        with pytest.raises(EventValidationError):
            parse_stored_event(raw)
        with pytest.raises(EventValidationError):  # refused for a value, not for a repeat
            check_event_json(json.dumps(decoded))
        return
    event, _ = parse_stored_event(raw)
    if isinstance(checked, OtherEvent):
        assert isinstance(event, OtherEvent)
        assert event.event_type == decoded["event_type"].upper()
        return
    assert isinstance(event, CustomerEvent)
    assert not isinstance(checked, TestPing)
    assert (
        checked.customer_id
        == event.customer.customer_id
        == str(decoded["data"]["customer_id"]).strip()
    )
    last_opt_out = decoded["data"].get("opt_out")
    assert event.customer.opt_out is (
        None if last_opt_out in (None, "") else str(last_opt_out).lower() == "true"
    )
