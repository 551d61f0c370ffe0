"""The mapping's written ``apply`` writes more inline (connector/mapping/_engine.py): templates,
what the transforms' shortcuts say they do to some classes of values (null passes, int of an
int, bool of a bool, date's isoformat, map's table for text...), the settling of a field's
result, and the Context made on first use. Over customers whose fields hold any class of value
(text with placeholders and spaces, numbers, booleans, dates and timestamps, lists, objects,
models) and odd dispensaries, it maps as each field's ``run`` in turn does, failures included.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_perf_mapping_apply import SHIPPED, customer, outcome, reference

from connector.mapping import compile_mapping_text
from connector.mapping._transforms import SHORTCUTS, BuildEnv, build_transform
from connector.treez import Address, Customer, ExternalIds

INLINE = compile_mapping_text(
    """
id: {template: "treez-{dispensary}-{customer_id}"}
only_literal: {template: "{{fixed}}"}
empty_template: {template: "", on_null: send, default: none}
parts: {template: "{first_name}/{rewards_balance}/{banned}/{birthday}/{signup_date}"}
nested: {template: "{external_ids.aiq_contact_id}:{addresses[0].city}:{loyalty_tier.level}"}
own_placeholders: {template: "{last_name}!", placeholders: [Winnfield!, X]}
shop: {template: "{dispensary}-{status}-{verification_reasons[0].verification_reason}"}
groups_text: {template: "{customer_groups}"}
born: {from: birthday, transform: [date]}
born_iso: {from: birthday, transform: [{date: iso}]}
born_us: {from: birthday, transform: [{date: "%m/%d/%Y"}], on_error: null}
signed: {from: signup_date, transform: [{date: iso}]}
signed_utc: {from: signup_date, transform: [{date: {format: iso, tz: UTC}}], on_error: null}
visited: {from: last_visit_date, transform: [date], on_null: send}
balance: {from: rewards_balance, transform: [int], on_error: null, default: -1}
balance_float: {from: rewards_balance, transform: [float], on_error: null}
opted: {from: opt_out, transform: [bool]}
banned_text: {from: banned, transform: [str]}
warned: {from: warning_1, transform: [bool], on_error: null}
gender: {from: gender, transform: [{map: {values: {M: male, F: female}, default: unknown}}]}
gender_kept: {from: gender, transform: [{map: {values: {M: male, "true": yes, "1": one}}}]}
groups_joined: {from: customer_groups, transform: [join, upper]}
groups_split: {from: notes, transform: [split]}
short: {from: nickname, transform: [truncate: 3], on_error: null}
hashed: {from: email, transform: [strip, lower, sha256]}
phone: {from: phone, transform: [e164], on_error: null}
dropped: {from: middle_name, transform: [{null_if: [X, "1"]}], on_null: send}
either: {from: middle_name, transform: [{first_non_null: [nickname, dispensary]}]}
first: {from: first_name, transform: [strip, title], on_error: null}
upper_city: {from: "addresses[primary=true].city", transform: [strip, upper], on_null: send}
groups: customer_groups
status: {from: status, default: none}
store: dispensary
numbered: {from: state_medical_id, transform: [strip, int, str], on_error: null}
""",
    name="inline",
)

TEXT = st.one_of(
    st.sampled_from(["", "N/A", " N/A ", " ", "x", " Jules ", "M", "F", "true", "1", "12", "1.5"]),
    st.text(max_size=5),
)
STAMP = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2040, 1, 1),
    timezones=st.one_of(
        st.none(),
        st.just(UTC),
        st.builds(timezone, st.sampled_from([timedelta(hours=-7), timedelta(hours=5, minutes=30)])),
    ),
)
SCALAR = st.one_of(
    st.none(),
    TEXT,
    st.sampled_from([float("inf"), float("nan"), 2.0, 0.5, -0.0, True, False, 0, 1]),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 1, 1)),
    STAMP,
)
ANY = st.one_of(
    SCALAR,
    st.lists(SCALAR, max_size=3),
    st.dictionaries(st.sampled_from(["a", "level"]), SCALAR, max_size=2),
    st.builds(ExternalIds.model_construct, aiq_contact_id=st.one_of(st.none(), TEXT)),
)
FIELDS = [
    "customer_id",
    "first_name",
    "middle_name",
    "nickname",
    "last_name",
    "birthday",
    "email",
    "phone",
    "gender",
    "state_medical_id",
    "notes",
    "banned",
    "warning_1",
    "rewards_balance",
    "status",
    "signup_date",
    "last_visit_date",
    "opt_out",
    "customer_groups",
]
ADDRESSES = st.lists(
    st.builds(
        Address.model_construct,
        city=st.one_of(st.none(), TEXT),
        primary=st.one_of(st.none(), st.booleans()),
    ),
    max_size=2,
)


@st.composite
def customers(draw: st.DrawFn) -> Customer:
    """The seed's customer with any class of value in some fields (as no validation gives,
    which apply must still map as run does)."""
    data = dict(customer().__dict__)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        data[name] = draw(ANY)
    if draw(st.booleans()):
        data["addresses"] = draw(st.one_of(st.none(), ADDRESSES))
    if draw(st.booleans()):
        data["external_ids"] = draw(ANY)
    extra = {"loyalty_tier": draw(ANY)} if draw(st.booleans()) else {}
    return Customer.model_construct(**data, **extra)


DISPENSARY = st.one_of(st.sampled_from(["store-1", "N/A", " ", ""]), st.text(max_size=3))


@given(who=customers(), dispensary=DISPENSARY)
@settings(max_examples=600, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_inline_apply_maps_as_each_fields_run(who: Customer, dispensary: str) -> None:
    for mapping in [INLINE, *SHIPPED]:
        got = outcome(mapping.apply, who, dispensary)
        assert got == outcome(reference, mapping, who, dispensary)
        if got[0] == "mapped":  # the same values of the same classes, keys in the same order
            assert repr(got[1]) == repr(reference(mapping, who, dispensary))


def test_inline_apply_on_the_seed() -> None:
    mapped = INLINE.apply(customer(), "store-1")
    assert mapped["id"] == "treez-store-1-3904"
    assert mapped["only_literal"] == "{fixed}"
    assert mapped["empty_template"] == "none"
    assert mapped["parts"] == "Jules/0/false/1948-02-12/2026-04-24T11:38:21-07:00"
    assert "nested" not in mapped  # a null part
    assert "own_placeholders" not in mapped  # its result is one of its placeholders
    assert INLINE.apply(customer(last_name="Vega"), "s")["own_placeholders"] == "Vega!"
    assert mapped["gender"] == "unknown"
    assert mapped["gender_kept"] == "U"
    assert mapped["balance"] == 0
    assert mapped["opted"] is True
    assert mapped["banned_text"] == "false"


ARGS = [
    ("strip", None),
    ("date", None),
    ("date", "iso"),
    ("date", {"format": "iso", "tz": "UTC"}),
    ("date", "%m/%d/%Y"),
    ("int", None),
    ("float", None),
    ("bool", None),
    ("str", None),
    ("join", None),
    ("split", None),
    ("map", {"values": {"M": "male", "true": "yes"}}),
    ("map", {"values": {"M": "male"}, "default": None}),
    ("truncate", 2),
    ("sha256", None),
    ("null_if", ["x", 1]),
    ("e164", None),
]


@pytest.mark.parametrize(("name", "arg"), ARGS)
@given(value=ANY)
@settings(max_examples=150, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
def test_each_shortcut_says_what_its_transform_does(name: str, arg: Any, value: Any) -> None:
    """A transform's Shortcut, taken literally, gives what the transform returns."""
    _, transform = build_transform(name if arg is None else {name: arg}, BuildEnv(frozenset()))
    shortcut = SHORTCUTS[transform]
    cls = value.__class__
    if cls in shortcut.keep:
        assert repr(transform(value, None)) == repr(value)
    for called, method in shortcut.call:
        if cls is called:
            assert transform(value, None) == getattr(value, method)()
    if shortcut.table is not None and cls is str:
        miss = value if shortcut.keep_miss else shortcut.miss
        assert repr(transform(value, None)) == repr(shortcut.table.get(value, miss))


def test_first_non_null_has_no_shortcut() -> None:
    env = BuildEnv(frozenset())
    _, transform = build_transform({"first_non_null": ["nickname"]}, env)
    assert transform not in SHORTCUTS
