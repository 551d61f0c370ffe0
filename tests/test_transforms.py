"""Every transform of the mapping language, driven through compile_mapping_text + apply.

Each test maps one field ``p`` of a customer built from the real seed delivery (see
conftest.make_customer). Fields the Customer model does not declare (``mobile``, ``tags``) are
kept by the Customer model as sent, which lets a test feed a raw number, list or object.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from connector.errors import FieldMappingError, MappingError
from connector.mapping import TRANSFORMS, compile_mapping_text

DISPENSARY = "dispensary1"


@pytest.fixture
def run(make_customer):
    """run("{from: notes, transform: [strip]}", notes=" x ") → the mapped dict for field p."""

    def apply(spec: str, **overrides: Any) -> dict[str, Any]:
        mapping = compile_mapping_text(f"p: {spec}\n")
        return mapping.apply(make_customer(**overrides), DISPENSARY)

    return apply


def load_error(spec: str) -> MappingError:
    with pytest.raises(MappingError) as info:
        compile_mapping_text(f"p: {spec}\n")
    return info.value


# --- text transforms ---


@pytest.mark.parametrize(
    ("transform", "value", "expected"),
    [
        ("strip", "  Jules \t", "Jules"),
        ("lower", "JuLes@Example.COM", "jules@example.com"),
        ("upper", "ca", "CA"),
        ("title", "2515 SHEPHERD WAY", "2515 Shepherd Way"),
    ],
)
def test_text_transforms(run, transform, value, expected):
    assert run(f"{{from: notes, transform: [{transform}]}}", notes=value) == {"p": expected}


def test_strip_to_empty_text_reads_as_null(run):
    assert run("{from: notes, transform: [strip]}", notes="x   ") == {"p": "x"}
    assert run("{from: first_name, transform: [upper, strip]}", first_name="\t") == {}


# --- null_if ---


@pytest.mark.parametrize(
    ("spec", "overrides", "expected"),
    [
        ("{from: gender, transform: [{null_if: U}]}", {}, {}),
        ("{from: gender, transform: [{null_if: U}]}", {"gender": "F"}, {"p": "F"}),
        ("{from: gender, transform: [{null_if: [U, N]}]}", {"gender": "N"}, {}),
        ("{from: gender, transform: [{null_if: [U, N]}]}", {"gender": "M"}, {"p": "M"}),
        # numbers and their text compare equal
        ("{from: rewards_balance, transform: [{null_if: 0}]}", {}, {}),
        ("{from: rewards_balance, transform: [{null_if: '0'}]}", {}, {}),
        ("{from: rewards_balance, transform: [{null_if: 0}]}", {"rewards_balance": 7}, {"p": 7}),
        # a list loses the matching elements
        (
            "{from: customer_groups, transform: [{null_if: VIP}]}",
            {"customer_groups": ["SENIOR", "VIP", "STAFF"]},
            {"p": ["SENIOR", "STAFF"]},
        ),
    ],
)
def test_null_if(run, spec, overrides, expected):
    assert run(spec, **overrides) == expected


# --- e164 ---


@pytest.mark.parametrize(
    ("source", "transform", "value", "expected"),
    [
        ("phone", "e164", "(310) 555-1234", "+13105551234"),
        ("phone", "e164", "310.555.1234", "+13105551234"),
        ("phone", "e164", "+44 20 7946 0018", "+442079460018"),  # an explicit country wins
        ("phone", "{e164: GB}", "020 7946 0018", "+442079460018"),
        ("phone", "{e164: {region: gb}}", "020 7946 0018", "+442079460018"),
        ("mobile", "e164", 3105551234, "+13105551234"),  # a number given as an int
        ("mobile", "{e164: GB}", 2079460018, "+442079460018"),
    ],
)
def test_e164_formats_valid_numbers(run, source, transform, value, expected):
    spec = f"{{from: {source}, transform: [{transform}]}}"
    assert run(spec, **{source: value}) == {"p": expected}


def test_e164_int_constant(run):
    assert run("{value: 2025550143, transform: [e164]}") == {"p": "+12025550143"}


@pytest.mark.parametrize("phone", ["12", "555-0000-1", "not a phone", "+1 000 000 0000"])
def test_e164_invalid_number_is_null(run, phone):
    assert run("{from: phone, transform: [e164]}", phone=phone) == {}
    assert run("{from: phone, transform: [e164], on_null: send}", phone=phone) == {"p": None}


def test_e164_default_region_is_us(run):
    # A UK national number is not a valid US number.
    assert run("{from: phone, transform: [e164]}", phone="020 7946 0018") == {}


# --- date ---


@pytest.mark.parametrize(
    ("transform", "value", "expected"),
    [
        # Treez's three forms, default format YYYY-MM-DD
        ("date", "1948-02-12", "1948-02-12"),
        ("date", "2026-04-24T11:38:21.000-07:00", "2026-04-24"),
        ("date", "2000-01-01 00:00:00.000", "2000-01-01"),
        # strftime formats
        ("{date: '%m/%d/%Y'}", "1948-02-12", "02/12/1948"),
        ("{date: '%d.%m.%Y %H:%M'}", "2026-04-24T11:38:21.000-07:00", "24.04.2026 11:38"),
        # iso
        ("{date: iso}", "1948-02-12", "1948-02-12"),
        ("{date: iso}", "2026-04-24T11:38:21.000-07:00", "2026-04-24T11:38:21-07:00"),
        ("{date: iso}", "2000-01-01 00:00:00.000", "2000-01-01T00:00:00"),
        ("{date: {format: iso}}", " 1948-02-12 ", "1948-02-12"),
        # tz converts an aware timestamp (and may change the day)
        (
            "{date: {tz: UTC, format: iso}}",
            "2026-04-24T11:38:21.000-07:00",
            "2026-04-24T18:38:21+00:00",
        ),
        ("{date: {tz: UTC}}", "2026-04-24T23:38:21.000-07:00", "2026-04-25"),
        (
            "{date: {tz: Asia/Tokyo, format: '%Y-%m-%d %H:%M'}}",
            "2026-04-24T11:38:21.000-07:00",
            "2026-04-25 03:38",
        ),
        # parse reads another form
        ("{date: {parse: '%m/%d/%Y'}}", "02/12/1948", "1948-02-12"),
        ("{date: {parse: '%d/%m/%Y', format: iso}}", "12/02/1948", "1948-02-12T00:00:00"),
    ],
)
def test_date_formats_text(run, transform, value, expected):
    assert run(f"{{from: notes, transform: [{transform}]}}", notes=value) == {"p": expected}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # values the Customer model has already parsed (a date, an aware datetime)
        ("{from: birthday, transform: [date]}", "1948-02-12"),
        ("{from: birthday, transform: [{date: '%Y%m%d'}]}", "19480212"),
        ("{from: signup_date, transform: [{date: iso}]}", "2026-04-24T11:38:21-07:00"),
        (
            "{from: signup_date, transform: [{date: {tz: UTC, format: iso}}]}",
            "2026-04-24T18:38:21+00:00",
        ),
    ],
)
def test_date_formats_parsed_values(run, spec, expected):
    assert run(spec) == {"p": expected}


# --- int, float, bool, str ---


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ("notes", {"notes": "42"}, 42),
        ("notes", {"notes": " -7 "}, -7),
        ("notes", {"notes": "3.0"}, 3),
        ("rewards_balance", {"rewards_balance": 5.0}, 5),
        ("rewards_balance", {"rewards_balance": 0}, 0),
        ("is_caregiver", {"is_caregiver": True}, 1),
    ],
)
def test_int(run, source, overrides, expected):
    result = run(f"{{from: {source}, transform: [int]}}", **overrides)
    assert result == {"p": expected}
    assert type(result["p"]) is int


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ("notes", {"notes": "2.5"}, 2.5),
        ("notes", {"notes": " 10 "}, 10.0),
        ("rewards_balance", {"rewards_balance": 3}, 3.0),
    ],
)
def test_float(run, source, overrides, expected):
    result = run(f"{{from: {source}, transform: [float]}}", **overrides)
    assert result == {"p": expected}
    assert type(result["p"]) is float


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ("notes", {"notes": "true"}, True),
        ("notes", {"notes": " Yes "}, True),
        ("notes", {"notes": "on"}, True),
        ("notes", {"notes": "1"}, True),
        ("notes", {"notes": "FALSE"}, False),
        ("notes", {"notes": "n"}, False),
        ("notes", {"notes": "off"}, False),
        ("rewards_balance", {"rewards_balance": 1}, True),
        ("rewards_balance", {"rewards_balance": 0}, False),
        ("opt_out", {}, True),  # the seed's "true" text, normalised by the model
        ("banned", {}, False),
    ],
)
def test_bool(run, source, overrides, expected):
    result = run(f"{{from: {source}, transform: [bool]}}", **overrides)
    assert result == {"p": expected}
    assert type(result["p"]) is bool


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ("rewards_balance", {}, "0"),
        ("rewards_balance", {"rewards_balance": 2.5}, "2.5"),
        ("opt_out", {}, "true"),
        ("banned", {}, "false"),
        ("birthday", {}, "1948-02-12"),
        ("signup_date", {}, "2026-04-24T11:38:21-07:00"),
        ("first_name", {}, "Jules"),
    ],
)
def test_str(run, source, overrides, expected):
    assert run(f"{{from: {source}, transform: [str]}}", **overrides) == {"p": expected}


# --- join, split ---


@pytest.mark.parametrize(
    ("transform", "groups", "expected"),
    [
        ("join", ["SENIOR", "VIP"], "SENIOR, VIP"),
        ("{join: '|'}", ["SENIOR", "VIP", "STAFF"], "SENIOR|VIP|STAFF"),
        ("{join: {separator: ' / '}}", ["A", "B"], "A / B"),
        ("join", ["A", "", "N/A", "B"], "A, B"),  # placeholders and empties are skipped
        ("join", ["ONLY"], "ONLY"),
    ],
)
def test_join(run, transform, groups, expected):
    spec = f"{{from: customer_groups, transform: [{transform}]}}"
    assert run(spec, customer_groups=groups) == {"p": expected}


def test_join_of_numbers_and_non_list(run):
    assert run("{from: tags, transform: [{join: '-'}]}", tags=[1, 2.5, True]) == {"p": "1-2.5-true"}
    assert run("{from: first_name, transform: [join]}") == {"p": "Jules"}


@pytest.mark.parametrize(
    ("transform", "text", "expected"),
    [
        ("split", "a,b,c", ["a", "b", "c"]),
        ("split", " a , b ,, c ,", ["a", "b", "c"]),
        ("{split: ';'}", "VIP; SENIOR", ["VIP", "SENIOR"]),
        ("{split: {separator: ' '}}", "x  y", ["x", "y"]),
        ("split", "single", ["single"]),
    ],
)
def test_split(run, transform, text, expected):
    assert run(f"{{from: notes, transform: [{transform}]}}", notes=text) == {"p": expected}


def test_split_leaves_a_list_alone_and_round_trips_with_join(run):
    assert run("{from: customer_groups, transform: [split]}") == {"p": ["SENIOR"]}
    assert run("{from: notes, transform: [split, {join: '|'}]}", notes=" a, b ,,c ") == {
        "p": "a|b|c"
    }


# --- map ---

GENDER_MAP = "{map: {values: {M: male, F: female, N: not_specified}, default: unknown}}"


@pytest.mark.parametrize(
    ("transform", "gender", "expected"),
    [
        (GENDER_MAP, "M", "male"),
        (GENDER_MAP, "F", "female"),
        (GENDER_MAP, "U", "unknown"),  # a miss gets the default
        ("{map: {values: {M: male, F: female}}}", "F", "female"),
        ("{map: {values: {M: male, F: female}}}", "X", "X"),  # no default: passes through
        ("{map: {values: {M: male}, default: null}}", "X", None),  # explicit null default
    ],
)
def test_map(run, transform, gender, expected):
    spec = f"{{from: gender, transform: [{transform}], on_null: send}}"
    assert run(spec, gender=gender) == {"p": expected}


@pytest.mark.parametrize(
    ("opt_out", "expected"),
    [("true", "unsubscribed"), ("false", "subscribed"), (True, "unsubscribed")],
)
def test_map_with_yaml_bool_keys(run, opt_out, expected):
    spec = "{from: opt_out, transform: [{map: {values: {true: unsubscribed, false: subscribed}}}]}"
    assert run(spec, opt_out=opt_out) == {"p": expected}


def test_map_with_number_keys_and_lists(run):
    spec = "{from: rewards_balance, transform: [{map: {values: {0: none, 1: some}}}]}"
    assert run(spec) == {"p": "none"}
    spec = "{from: customer_groups, transform: [{map: {values: {SENIOR: senior_citizen}}}]}"
    assert run(spec, customer_groups=["SENIOR", "VIP"]) == {"p": ["senior_citizen", "VIP"]}


# --- sha256 ---


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize(
    ("spec", "overrides", "expected"),
    [
        ("{from: email, transform: [sha256]}", {"email": "a@b.co"}, sha("a@b.co")),
        (
            "{from: email, transform: [strip, lower, sha256]}",
            {"email": " Jules@Example.COM "},
            sha("jules@example.com"),
        ),
        ("{from: rewards_balance, transform: [sha256]}", {}, sha("0")),
        ("{from: customer_id, transform: [sha256]}", {}, sha("3904")),
        (
            "{from: customer_groups, transform: [sha256]}",
            {"customer_groups": ["A", "B"]},
            [sha("A"), sha("B")],
        ),
    ],
)
def test_sha256(run, spec, overrides, expected):
    assert run(spec, **overrides) == {"p": expected}


def test_sha256_is_the_known_digest(run):
    # The well-known SHA-256 of "abc", independent of hashlib in this test.
    assert run("{from: notes, transform: [sha256]}", notes="abc") == {
        "p": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    }


# --- first_non_null ---


@pytest.mark.parametrize(
    ("spec", "overrides", "expected"),
    [
        # email is null in the seed, phone too; first_name is the first with a value
        ("{from: email, transform: [{first_non_null: [phone, first_name]}]}", {}, {"p": "Jules"}),
        # a value that is already there is kept
        (
            "{from: email, transform: [{first_non_null: [first_name]}]}",
            {"email": "j@x.co"},
            {"p": "j@x.co"},
        ),
        # placeholders ("N/A" in notes) count as null
        (
            "{from: email, transform: [{first_non_null: [notes, last_name]}]}",
            {},
            {"p": "Winnfield"},
        ),
        # paths may be nested, selected or the dispensary; a single path may be given bare
        (
            "{from: email, transform: [{first_non_null: ['addresses[primary=true].city']}]}",
            {},
            {"p": "INGLEWOOD"},
        ),
        ("{from: email, transform: [{first_non_null: dispensary}]}", {}, {"p": DISPENSARY}),
        # nothing found: null, omitted
        ("{from: email, transform: [{first_non_null: [phone, notes]}]}", {}, {}),
        # the placeholder source itself reads as null first
        ("{from: notes, transform: [{first_non_null: [first_name]}]}", {}, {"p": "Jules"}),
    ],
)
def test_first_non_null(run, spec, overrides, expected):
    assert run(spec, **overrides) == expected


# --- truncate ---


@pytest.mark.parametrize(
    ("spec", "overrides", "expected"),
    [
        ("{from: notes, transform: [{truncate: 3}]}", {"notes": "abcdef"}, "abc"),
        ("{from: notes, transform: [{truncate: 10}]}", {"notes": "short"}, "short"),
        ("{from: notes, transform: [{truncate: 1}]}", {"notes": "xy"}, "x"),
        (
            "{from: customer_groups, transform: [{truncate: 2}]}",
            {"customer_groups": ["A", "B", "C"]},
            ["A", "B"],
        ),
    ],
)
def test_truncate(run, spec, overrides, expected):
    assert run(spec, **overrides) == {"p": expected}


# --- null passes through; lists are handled element by element ---

# One spec per transform (first_non_null is the one that replaces null, tested above).
NULL_SAFE = {
    "strip": "strip",
    "lower": "lower",
    "upper": "upper",
    "title": "title",
    "null_if": "{null_if: x}",
    "e164": "e164",
    "date": "{date: iso}",
    "int": "int",
    "float": "float",
    "bool": "bool",
    "str": "str",
    "join": "join",
    "split": "split",
    "map": "{map: {values: {a: b}, default: z}}",
    "sha256": "sha256",
    "truncate": "{truncate: 2}",
}


def test_every_transform_is_covered():
    assert set(TRANSFORMS) == {*NULL_SAFE, "first_non_null"}


@pytest.mark.parametrize("transform", NULL_SAFE.values(), ids=list(NULL_SAFE))
def test_null_passes_through(run, transform):
    assert run(f"{{from: email, transform: [{transform}]}}") == {}
    assert run(f"{{from: email, transform: [{transform}], on_null: send}}") == {"p": None}
    # a placeholder is null before the transforms see it
    assert run(f"{{from: notes, transform: [{transform}], on_null: send}}") == {"p": None}


@pytest.mark.parametrize(
    ("transform", "items", "expected"),
    [
        ("strip", [" a ", "b "], ["a", "b"]),
        ("lower", ["A", "B"], ["a", "b"]),
        ("upper", ["a", "b"], ["A", "B"]),
        ("title", ["jo ann", "al"], ["Jo Ann", "Al"]),
        ("e164", ["3105551234", "12", "(202) 555-0143"], ["+13105551234", "+12025550143"]),
        ("date", ["1948-02-12", "2000-01-01 00:00:00.000"], ["1948-02-12", "2000-01-01"]),
        ("int", ["1", 2, "3.0"], [1, 2, 3]),
        ("float", ["1.5", 2], [1.5, 2.0]),
        ("bool", ["yes", "no", 1], [True, False, True]),
        ("{map: {values: {a: x}}}", ["a", "b"], ["x", "b"]),
        ("{null_if: b}", ["a", "b", "c"], ["a", "c"]),
        ("sha256", ["a"], [sha("a")]),
        ("{truncate: 1}", ["a", "b"], ["a"]),
        ("strip", ["a", "  ", "N/A", None], ["a"]),  # nulls and placeholders dropped
    ],
)
def test_lists_are_mapped_element_by_element(run, transform, items, expected):
    assert run(f"{{from: tags, transform: [{transform}]}}", tags=items) == {"p": expected}


# --- run-time failures: FieldMappingError naming field and transform, never the value ---


@pytest.mark.parametrize(
    ("transform", "overrides", "secret"),
    [
        ("strip", {"tags": 987654321}, "987654321"),
        ("lower", {"tags": ["ok", 13579]}, "13579"),
        ("upper", {"tags": {"k": "SECRET-UPPER"}}, "SECRET-UPPER"),
        ("title", {"tags": 24680.5}, "24680.5"),
        ("e164", {"tags": {"n": "SECRET-PHONE-3105551234"}}, "SECRET-PHONE"),
        ("date", {"tags": "SECRET-DATE-1948"}, "SECRET-DATE"),
        ("date", {"tags": "1948-13-45"}, "1948-13-45"),
        ("date", {"tags": 19480212}, "19480212"),
        ("{date: {parse: '%m/%d/%Y'}}", {"tags": "1948-02-12"}, "1948-02-12"),
        ("int", {"tags": "SECRET-INT"}, "SECRET-INT"),
        ("int", {"tags": "3.75"}, "3.75"),
        ("int", {"tags": 1234.5}, "1234.5"),
        ("float", {"tags": "SECRET-FLOAT"}, "SECRET-FLOAT"),
        ("float", {"tags": "infinity"}, "infinity"),
        ("float", {"tags": True}, "True"),
        ("bool", {"tags": "SECRET-MAYBE"}, "SECRET-MAYBE"),
        ("bool", {"tags": 2468}, "2468"),
        ("str", {"tags": ["SECRET-LIST"]}, "SECRET-LIST"),
        ("str", {"tags": {"k": "SECRET-OBJ"}}, "SECRET-OBJ"),
        ("join", {"tags": [{"k": "SECRET-JOIN"}]}, "SECRET-JOIN"),
        ("split", {"tags": 112233}, "112233"),
        ("sha256", {"tags": {"k": "SECRET-SHA"}}, "SECRET-SHA"),
        ("{truncate: 2}", {"tags": 445566}, "445566"),
    ],
)
def test_runtime_failure_names_field_and_transform_but_not_the_value(
    make_customer, transform, overrides, secret
):
    mapping = compile_mapping_text(f"contact.note: {{from: tags, transform: [{transform}]}}")
    name = transform.strip("{").split(":")[0]
    customer = make_customer(**overrides)
    with pytest.raises(FieldMappingError) as info:
        mapping.apply(customer, DISPENSARY)
    exc = info.value
    assert exc.field == "contact.note"
    assert exc.transform == name
    message = str(exc)
    assert message.startswith(f"field 'contact.note': transform '{name}' failed: ")
    assert secret not in message
    assert secret not in repr(exc.args)
    assert exc.__cause__ is None


def test_runtime_failure_of_a_later_transform_is_named(run):
    with pytest.raises(FieldMappingError) as info:
        run("{from: notes, transform: [strip, lower, int]}", notes=" NOT-A-NUMBER ")
    assert info.value.transform == "int"
    assert str(info.value) == "field 'p': transform 'int' failed: text is not a number"
    assert "NOT-A-NUMBER" not in str(info.value)
    assert "not-a-number" not in str(info.value)


def test_unparseable_date_reason_says_what_was_expected(run):
    with pytest.raises(FieldMappingError) as info:
        run("{from: notes, transform: [date]}", notes="12th of Feb")
    assert "YYYY-MM-DD or ISO 8601" in str(info.value)
    with pytest.raises(FieldMappingError) as info:
        run("{from: notes, transform: [{date: {parse: '%m/%d/%Y'}}]}", notes="1948/02/12")
    assert "%m/%d/%Y" in str(info.value)


def test_float_of_a_huge_integer_is_a_field_mapping_error(run):
    # JSON allows a 401-digit integer; float() of it overflows.
    with pytest.raises(FieldMappingError) as info:
        run("{from: rewards_balance, transform: [float]}", rewards_balance=10**400)
    assert info.value.transform == "float"
    assert "1" * 5 not in str(info.value)


# `on_error: null` as the docs write it is YAML's null; quoted, it is the text "null".
ON_ERROR_NULL = pytest.mark.parametrize("spelling", ["null", "'null'"], ids=["bare", "quoted"])


@ON_ERROR_NULL
@pytest.mark.parametrize(
    ("extra", "expected"),
    [("", {"other": "Jules"}), (", default: -1", {"p": -1, "other": "Jules"})],
)
def test_on_error_null_gives_null_or_the_default(make_customer, spelling, extra, expected):
    mapping = compile_mapping_text(
        f"p: {{from: notes, transform: [int], on_error: {spelling}{extra}}}\nother: first_name\n"
    )
    assert mapping.apply(make_customer(notes="SECRET"), DISPENSARY) == expected
    # a good value still maps
    assert mapping.apply(make_customer(notes="12"), DISPENSARY) == {"p": 12, "other": "Jules"}


@ON_ERROR_NULL
def test_on_error_null_with_on_null_send(run, spelling):
    spec = f"{{from: notes, transform: [date], on_error: {spelling}, on_null: send}}"
    assert run(spec, notes="SECRET") == {"p": None}


def test_on_error_fail_is_the_default(run):
    with pytest.raises(FieldMappingError):
        run("{from: notes, transform: [int], on_error: fail}", notes="x")
    with pytest.raises(FieldMappingError):
        run("{from: notes, transform: [int]}", notes="x")


# --- load-time errors: MappingError naming the field and the problem ---


@pytest.mark.parametrize(
    ("transform", "problem"),
    [
        ("nope", "unknown transform 'nope' (known: bool, date, e164, first_non_null, float"),
        ("Strip", "unknown transform 'Strip'"),
        ("{strip: x}", "transform 'strip' takes no argument"),
        ("{int: 3}", "transform 'int' takes no argument"),
        ("{strip: 1, lower: 2}", "each transform is a name (strip) or a one-key table"),
        ("null_if", "transform 'null_if' needs a value or a list of values"),
        ("{null_if: {a: 1}}", "transform 'null_if' takes plain values"),
        ("{e164: XX}", "transform 'e164': region must be a two-letter country code such as US"),
        (
            "{e164: {region: ZZ}}",
            "transform 'e164': region must be a two-letter country code such as US, got 'ZZ'",
        ),
        ("{e164: {country: US}}", "transform 'e164' has unknown option(s) ['country']"),
        ("{date: {tz: Mars/Olympus}}", "transform 'date': unknown time zone 'Mars/Olympus'"),
        ("{date: {fmt: '%Y'}}", "transform 'date' has unknown option(s) ['fmt']"),
        ("{date: {parse: 5}}", "transform 'date': parse must be a strptime format"),
        ("{date: ''}", "transform 'date': format must be a strftime format or 'iso'"),
        ("{date: 7}", "transform 'date': format must be a strftime format or 'iso'"),
        ("{join: 5}", "transform 'join': the separator must be text"),
        ("{split: ''}", "transform 'split': the separator must not be empty"),
        ("{split: {sep: ';'}}", "transform 'split' has unknown option(s) ['sep']"),
        ("map", "transform 'map' needs {values: {from: to, ...}}"),
        ("{map: {M: male}}", "transform 'map' needs {values: {from: to, ...}}"),
        ("{map: {values: {}}}", "transform 'map': values must be a non-empty table"),
        ("{map: {values: {a: b}, otherwise: c}}", "transform 'map' has unknown option(s)"),
        ("first_non_null", "transform 'first_non_null' needs a list of paths"),
        ("{first_non_null: [email, 5]}", "transform 'first_non_null' needs a list of paths"),
        ("{first_non_null: ['a..b']}", "transform 'first_non_null': path 'a..b' needs a field"),
        ("{truncate: 0}", "transform 'truncate' needs a maximum length of 1 or more"),
        ("{truncate: -3}", "transform 'truncate' needs a maximum length of 1 or more"),
        ("{truncate: ten}", "transform 'truncate' needs a maximum length of 1 or more"),
        ("{truncate: true}", "transform 'truncate' needs a maximum length of 1 or more"),
        ("truncate", "transform 'truncate' needs a maximum length of 1 or more"),
    ],
)
def test_bad_transform_is_a_load_time_error(transform, problem):
    exc = load_error(f"{{from: notes, transform: [{transform}]}}")
    assert len(exc.problems) == 1
    assert exc.problems[0].where == "field 'p'"
    assert exc.problems[0].line == 1
    assert problem in exc.problems[0].what
    assert f"<mapping>:1: field 'p': {problem}" in str(exc)


def test_load_time_error_names_file_and_line():
    text = "first: first_name\nphone:\n  from: phone\n  transform:\n    - {e164: XX}\n"
    with pytest.raises(MappingError) as info:
        compile_mapping_text(text, name="mappings/shop.yaml")
    message = str(info.value)
    assert message.startswith("mappings/shop.yaml: 1 problem in the mapping")
    assert "mappings/shop.yaml:2: field 'phone': transform 'e164': region" in message
