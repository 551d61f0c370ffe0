"""The mapping language: paths, sources, options, targets, load-time errors and warnings,
and the shipped mappings/http.yaml applied to the real seed delivery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connector.errors import MappingError
from connector.mapping import DEFAULT_PLACEHOLDERS, compile_mapping_text, load_mapping

ROOT = Path(__file__).parent.parent
DISPENSARY = "dispensary1"

TWO_ADDRESSES = [
    {"type": "billing", "city": "BURBANK", "zipcode": "91501", "primary": False},
    {"type": "address_of_record", "city": "INGLEWOOD", "zipcode": "90301", "primary": True},
    {"type": "mailing", "city": "COMPTON", "zipcode": "90220"},
]


@pytest.fixture
def run(make_customer):
    """run("p: first_name\\n", first_name="Ann") → the mapped dict."""

    def apply(text: str, **overrides: Any) -> dict[str, Any]:
        return compile_mapping_text(text).apply(make_customer(**overrides), DISPENSARY)

    return apply


def mapping_error(text: str, name: str = "<mapping>") -> MappingError:
    with pytest.raises(MappingError) as info:
        compile_mapping_text(text, name=name)
    return info.value


# --- paths ---


@pytest.mark.parametrize(
    ("path", "overrides", "expected"),
    [
        ("first_name", {}, "Jules"),
        ("customer_id", {}, "3904"),
        ("birthday", {}, "1948-02-12"),
        ("rewards_balance", {}, 0),
        ("customer_groups", {}, ["SENIOR"]),
        # nested objects
        ("external_ids.aiq_contact_id", {"external_ids": {"aiq_contact_id": 12345}}, "12345"),
        (
            "external_ids.sticky_cards_contact_id",
            {"external_ids": {"sticky_cards_contact_id": "s-9"}},
            "s-9",
        ),
        # list elements by position, negative from the end
        ("addresses[0].city", {"addresses": TWO_ADDRESSES}, "BURBANK"),
        ("addresses[1].city", {"addresses": TWO_ADDRESSES}, "INGLEWOOD"),
        ("addresses[-1].city", {"addresses": TWO_ADDRESSES}, "COMPTON"),
        ("addresses[-3].zipcode", {"addresses": TWO_ADDRESSES}, "91501"),
        ("customer_groups[1]", {"customer_groups": ["A", "B", "C"]}, "B"),
        ("customer_groups[-1]", {"customer_groups": ["A", "B", "C"]}, "C"),
        # [key=value] selectors: bare and quoted literals, booleans
        ("addresses[primary=true].city", {"addresses": TWO_ADDRESSES}, "INGLEWOOD"),
        ("addresses[primary=True].city", {"addresses": TWO_ADDRESSES}, "INGLEWOOD"),
        ("addresses[primary=false].city", {"addresses": TWO_ADDRESSES}, "BURBANK"),
        ("addresses[primary=null].city", {"addresses": TWO_ADDRESSES}, "COMPTON"),
        ("addresses[type=mailing].city", {"addresses": TWO_ADDRESSES}, "COMPTON"),
        ('addresses[type="billing"].city', {"addresses": TWO_ADDRESSES}, "BURBANK"),
        ("addresses[type='address_of_record'].zipcode", {"addresses": TWO_ADDRESSES}, "90301"),
        ("addresses[ type = mailing ].zipcode", {"addresses": TWO_ADDRESSES}, "90220"),
        ("addresses[zipcode=90220].city", {"addresses": TWO_ADDRESSES}, "COMPTON"),
        ('addresses[zipcode="90220"].city', {"addresses": TWO_ADDRESSES}, "COMPTON"),
        # selectors on plain JSON objects inside a list
        (
            "verification_reasons[verification_reason=NEW].verification_reason_description",
            {},
            "NEW_INTAKE_CUSTOMER",
        ),
        # the event's dispensary
        ("dispensary", {}, DISPENSARY),
        # primary_address: the first flagged primary, else the first
        ("primary_address.city", {}, "INGLEWOOD"),
        ("primary_address.city", {"addresses": TWO_ADDRESSES}, "INGLEWOOD"),
        ("primary_address.city", {"addresses": TWO_ADDRESSES[::2]}, "BURBANK"),
        ("primary_address.zipcode", {}, "90301"),
        # a field Treez adds later is read when sent
        ("loyalty_tier", {"loyalty_tier": "gold"}, "gold"),
    ],
)
def test_path_reads_the_value(run, path, overrides, expected):
    assert run(f"p: {{from: {json.dumps(path)}}}\n", **overrides) == {"p": expected}


@pytest.mark.parametrize(
    ("path", "overrides"),
    [
        ("email", {}),  # null in the seed
        ("external_ids.aiq_contact_id", {}),
        ("addresses[5].city", {}),
        ("addresses[-2].city", {}),
        ("addresses[0].city", {"addresses": []}),
        ("addresses[0].city", {"addresses": None}),
        ("addresses[type=billing].city", {}),
        ('addresses[primary="true"].city', {}),  # quoted text never matches a boolean
        ("addresses[primary=false].city", {}),
        ("addresses[0].street2", {}),  # "" in the seed: a placeholder
        ("customer_groups[3]", {}),
        ("primary_address.city", {"addresses": []}),
        ("loyalty_tier", {}),  # unknown and not sent
        ("loyalty.tier", {"loyalty": "gold"}),  # a field inside a plain value
    ],
)
def test_missing_elements_are_omitted(run, path, overrides):
    assert run(f"p: {{from: {json.dumps(path)}}}\nq: customer_id\n", **overrides) == {"q": "3904"}


def test_primary_address_still_works_when_treez_sends_unknown_fields(run):
    # An unknown field lands in the model's extras; properties must still be found.
    text = "city: primary_address.city\nzip: primary_address.zipcode\n"
    assert run(text, loyalty_tier="gold") == {"city": "INGLEWOOD", "zip": "90301"}


@pytest.mark.parametrize("name", ["json", "copy", "model_config", "model_fields", "schema"])
def test_unknown_names_read_null_not_python_attributes(run, name):
    # check_path's warning says such a name "reads null unless Treez sends it".
    assert run(f"p: {name}\nq: customer_id\n") == {"q": "3904"}
    assert run(f"p: {name}\n", **{name: "sent"}) == {"p": "sent"}


# --- sources: shorthand, from, template, value ---


def test_shorthand_is_the_same_as_from(run):
    text = "a: 'addresses[0].city'\nb: {from: 'addresses[0].city'}\nc:\n  from: addresses[0].city\n"
    assert run(text) == {"a": "INGLEWOOD", "b": "INGLEWOOD", "c": "INGLEWOOD"}


@pytest.mark.parametrize(
    ("template", "overrides", "expected"),
    [
        ("treez-{dispensary}-{customer_id}", {}, "treez-dispensary1-3904"),
        ("{first_name} {last_name}", {}, "Jules Winnfield"),
        ("{ first_name }!", {}, "Jules!"),
        ("{addresses[primary=true].city}, {addresses[0].state}", {}, "INGLEWOOD, CA"),
        ("born {birthday}", {}, "born 1948-02-12"),
        ("balance={rewards_balance}", {"rewards_balance": 12.5}, "balance=12.5"),
        ("opt_out={opt_out}", {}, "opt_out=true"),  # booleans as JSON writes them
        ("plain text", {}, "plain text"),
        # {{ and }} are literal braces
        ("{{{customer_id}}}", {}, "{3904}"),
        ("{{not a path}}", {}, "{not a path}"),
        ("a}}b{{c", {}, "a}b{c"),
    ],
)
def test_template(run, template, overrides, expected):
    assert run(f"p: {{template: {json.dumps(template)}}}\n", **overrides) == {"p": expected}


@pytest.mark.parametrize(
    ("template", "overrides"),
    [
        ("mail-{email}", {}),  # null
        ("note-{notes}", {}),  # "N/A" placeholder
        ("x-{addresses[0].street2}", {}),  # "" placeholder
        ("x-{addresses[4].city}", {}),  # missing element
        ("x-{customer_groups}", {}),  # a list is not text
        ("x-{addresses[0]}", {}),  # nor is an object
        ("{first_name} {email}", {}),  # one null part is enough
    ],
)
def test_template_with_a_null_part_is_null(run, template, overrides):
    assert run(f"p: {{template: {json.dumps(template)}}}\n", **overrides) == {}
    text = f"p: {{template: {json.dumps(template)}, on_null: send}}\n"
    assert run(text, **overrides) == {"p": None}


def test_template_keeps_placeholders_when_told(run):
    text = "p: {template: 'note-{notes}', placeholders: []}\n"
    assert run(text) == {"p": "note-N/A"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("treez", "treez"),
        ("42", 42),
        ("2.5", 2.5),
        ("true", True),
        ("[a, 1]", ["a", 1]),
        ("{k: v}", {"k": "v"}),
        ("2024-01-31", "2024-01-31"),  # a YAML date is sent as ISO text
        ("'{customer_id}'", "{customer_id}"),  # not a template
    ],
)
def test_value_is_a_constant(run, value, expected):
    assert run(f"p: {{value: {value}}}\n") == {"p": expected}
    assert run(f"p: {{value: {value}}}\n", first_name="Other", customer_id="1") == {"p": expected}


# --- default, on_null ---


@pytest.mark.parametrize(
    ("source", "overrides", "expected"),
    [
        ("email", {}, "none@example.com"),  # null
        ("notes", {}, "none@example.com"),  # placeholder
        ("addresses[3].city", {}, "none@example.com"),  # missing
        ("email", {"email": "j@x.co"}, "j@x.co"),  # not used when there is a value
    ],
)
def test_default(run, source, overrides, expected):
    text = f"p: {{from: {json.dumps(source)}, default: none@example.com}}\n"
    assert run(text, **overrides) == {"p": expected}


def test_default_applies_after_transforms(run):
    text = "p: {from: phone, transform: [e164], default: unknown}\n"
    assert run(text, phone="12") == {"p": "unknown"}
    assert run(text, phone="3105551234") == {"p": "+13105551234"}
    text = "p: {from: opt_out, transform: [bool], default: false}\n"
    assert run(text, opt_out=None) == {"p": False}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("", {"q": "3904"}),
        (", on_null: omit", {"q": "3904"}),
        (", on_null: send", {"p": None, "q": "3904"}),
        (", on_null: send, default: x", {"p": "x", "q": "3904"}),
    ],
)
def test_on_null(run, options, expected):
    assert run(f"p: {{from: email{options}}}\nq: customer_id\n") == expected


# --- placeholders ---


def test_default_placeholders():
    assert DEFAULT_PLACEHOLDERS == ("N/A", "")


@pytest.mark.parametrize(
    ("source", "overrides"),
    [
        ("notes", {}),  # "N/A"
        ("caregiver_license_number", {}),  # ""
        ("addresses[0].street2", {}),  # ""
        ("first_name", {"first_name": "  N/A "}),
        ("first_name", {"first_name": "   "}),
    ],
)
def test_placeholders_read_as_null_by_default(run, source, overrides):
    assert run(f"p: {{from: {json.dumps(source)}, on_null: send}}\n", **overrides) == {"p": None}


def test_placeholders_are_dropped_from_lists(run):
    text = "p: customer_groups\n"
    assert run(text, customer_groups=["A", "N/A", "", "B"]) == {"p": ["A", "B"]}


def test_placeholder_produced_by_a_transform_is_null(run):
    assert run("p: {from: first_name, transform: [upper]}\n", first_name="n/a") == {}


def test_custom_placeholders_replace_the_defaults(run):
    text = (
        "gender: {from: gender, placeholders: [U, UNKNOWN]}\n"
        "notes: {from: notes, placeholders: [U, UNKNOWN]}\n"
        "street2: {from: 'addresses[0].street2', placeholders: [U]}\n"
    )
    assert run(text) == {"notes": "N/A", "street2": ""}
    assert run(text, gender="F") == {"gender": "F", "notes": "N/A", "street2": ""}


def test_empty_placeholders_keep_the_text(run):
    text = (
        "notes: {from: notes, placeholders: []}\n"
        "license: {from: caregiver_license_number, placeholders: []}\n"
        "groups: {from: customer_groups, placeholders: []}\n"
    )
    result = run(text, customer_groups=["N/A", "A"])
    assert result == {"notes": "N/A", "license": "", "groups": ["N/A", "A"]}


# --- targets ---


def test_dotted_targets_build_nested_objects(run):
    text = (
        "id: customer_id\n"
        "location.city: 'addresses[0].city'\n"
        "name.first: first_name\n"
        "location.zip: 'addresses[0].zipcode'\n"
        "location.geo.state: 'addresses[0].state'\n"
        "name.last: last_name\n"
    )
    assert run(text) == {
        "id": "3904",
        "location": {"city": "INGLEWOOD", "zip": "90301", "geo": {"state": "CA"}},
        "name": {"first": "Jules", "last": "Winnfield"},
    }


def test_nested_object_with_only_nulls_is_left_out(run):
    text = "id: customer_id\ncontact.email: email\ncontact.phone: phone\n"
    assert run(text) == {"id": "3904"}
    text = "id: customer_id\ncontact.email: {from: email, on_null: send}\ncontact.phone: phone\n"
    assert run(text) == {"id": "3904", "contact": {"email": None}}


@pytest.mark.parametrize(
    ("text", "where", "parent", "line"),
    [
        (
            "location: 'addresses[0].city'\nlocation.city: first_name\n",
            "location.city",
            "location",
            2,
        ),
        ("a.b.c: first_name\nid: customer_id\na.b: last_name\n", "a.b.c", "a.b", 1),
    ],
)
def test_dotted_target_clashing_with_a_value_is_an_error(text, where, parent, line):
    exc = mapping_error(text, name="m.yaml")
    assert len(exc.problems) == 1
    problem = exc.problems[0]
    assert problem.where == f"field {where!r}"
    assert problem.what == f"clashes with field {parent!r}, which is not an object"
    assert problem.line == line
    assert f"m.yaml:{line}: field {where!r}: clashes with field {parent!r}" in str(exc)


@pytest.mark.parametrize(
    "names",
    [
        ["zeta", "alpha", "mid", "beta"],
        ["b", "a", "c", "x.y", "d"],
        ["last_name", "first_name", "customer_id", "dispensary"],
    ],
)
def test_output_keys_follow_the_file_order(run, names):
    text = "".join(f"{name}: customer_id\n" for name in names)
    mapping = compile_mapping_text(text)
    assert list(mapping.targets) == names
    result = run(text)
    top = list(dict.fromkeys(name.split(".")[0] for name in names))
    assert list(result) == top


def test_output_is_deterministic(make_customer):
    mapping = load_mapping(ROOT / "mappings" / "http.yaml")
    customer = make_customer()
    first = json.dumps(mapping.apply(customer, DISPENSARY))
    assert json.dumps(mapping.apply(customer, DISPENSARY)) == first
    assert json.dumps(mapping.apply(make_customer(), DISPENSARY)) == first


# --- load-time errors: file, field, problem and line ---


@pytest.mark.parametrize(
    ("text", "where", "what", "line"),
    [
        (
            "id: customer_id\np:\n  from: first_name\n  colour: red\n",
            "field 'p', colour",
            "is not an option (options: from, template, value, transform, default, on_null, "
            "on_error, placeholders)",
            4,
        ),
        (
            "id: customer_id\np:\n  transform: [strip]\n",
            "field 'p'",
            "needs exactly one of from, template or value (found none of them)",
            2,
        ),
        (
            "p: {from: first_name, value: x}\n",
            "field 'p'",
            "needs exactly one of from, template or value (found from, value)",
            1,
        ),
        (
            "id: customer_id\n\np: {template: 'x{customer_id}', value: 1, from: a}\n",
            "field 'p'",
            "needs exactly one of from, template or value (found from, template, value)",
            3,
        ),
        (
            "id: customer_id\np: first_name.x\n",
            "field 'p'",
            "path 'first_name.x': first_name is a plain value with no fields inside",
            2,
        ),
        (
            "p: addresses.city\n",
            "field 'p'",
            "path 'addresses.city': addresses is a list; pick an element with [0] or "
            "[field=value] before .city",
            1,
        ),
        (
            "id: customer_id\np: 'birthday[0]'\n",
            "field 'p'",
            "path 'birthday[0]': birthday is not a list, so it has no elements",
            2,
        ),
        (
            "p: 'external_ids[0]'\n",
            "field 'p'",
            "path 'external_ids[0]': external_ids is not a list, so it has no elements",
            1,
        ),
        (
            "p: 'customer_groups[kind=x]'\n",
            "field 'p'",
            "path 'customer_groups[kind=x]': the elements of customer_groups are plain values, "
            "so [kind=...] cannot match",
            1,
        ),
        (
            "p: dispensary.name\n",
            "field 'p'",
            "path 'dispensary.name': 'dispensary' is a plain value with no fields inside",
            1,
        ),
        (
            "id: customer_id\np: a..b\n",
            "field 'p'",
            "path 'a..b' needs a field name at character 3",
            2,
        ),
        ("p: a.\n", "field 'p'", "path 'a.' ends with '.'", 1),
        ("p: .a\n", "field 'p'", "path '.a' needs a field name at character 1", 1),
        ("p: 'a b'\n", "field 'p'", "cannot read path 'a b' at character 2", 1),
        ("p: 'addresses[0'\n", "field 'p'", "cannot read path 'addresses[0' at character 10", 1),
        ("p: 'addresses[0]city'\n", "field 'p'", "path 'addresses[0]city' needs '.' or '['", 1),
        (
            "p: 'addresses[primary=]'\n",
            "field 'p'",
            "path 'addresses[primary=]': selector [primary=] needs a value",
            1,
        ),
        ("p: {from: ''}\n", "field 'p'", "a path must be non-empty text", 1),
        (
            "p: {template: 'x-{customer_id'}\n",
            "field 'p'",
            "template 'x-{customer_id' has an unmatched '{' (write {{)",
            1,
        ),
        (
            "p: {template: 'x-}'}\n",
            "field 'p'",
            "template 'x-}' has an unmatched '}' (write }})",
            1,
        ),
        (
            "p: {template: 'x-{first_name.x}'}\n",
            "field 'p'",
            "template 'x-{first_name.x}': path 'first_name.x': first_name is a plain value",
            1,
        ),
        ("p: 5\n", "field 'p'", "must be a source path or a table such as {from: path}", 1),
        ("p:\n", "field 'p'", "must be a source path or a table such as {from: path}", 1),
        ("id: customer_id\n'a..b': first_name\n", "field 'a..b'", "target names are non-empty", 2),
        (
            "p: {from: email, on_null: maybe}\n",
            "field 'p', on_null",
            "Input should be 'omit' or 'send'",
            1,
        ),
        (
            "p: {from: email, on_error: skip}\n",
            "field 'p', on_error",
            "Input should be 'fail' or 'null'",
            1,
        ),
    ],
)
def test_mapping_error_names_file_field_problem_and_line(text, where, what, line):
    exc = mapping_error(text, name="mappings/shop.yaml")
    assert len(exc.problems) == 1
    problem = exc.problems[0]
    assert problem.where == where
    assert what in problem.what
    assert problem.line == line
    message = str(exc)
    assert message.startswith("mappings/shop.yaml: 1 problem in the mapping\n")
    assert f"mappings/shop.yaml:{line}: {where}: {what}" in message


def test_several_errors_are_reported_together():
    text = (
        "ok: first_name\n"  # 1
        "q:\n"  # 2
        "  transform: [strip]\n"  # 3
        "r: {from: a, value: b}\n"  # 4
        "s: first_name.x\n"  # 5
        "fine: {from: email, transform: [lower]}\n"  # 6
        "t: addresses.city\n"  # 7
        "u: 'birthday[0]'\n"  # 8
        "v: a..b\n"  # 9
        "w:\n"  # 10
        "  from: email\n"  # 11
        "  transform: [{truncate: 0}]\n"  # 12
        "x: {from: email, colour: red}\n"  # 13
    )
    exc = mapping_error(text, name="bad.yaml")
    assert [(p.where, p.line) for p in exc.problems] == [
        ("field 'q'", 2),
        ("field 'r'", 4),
        ("field 's'", 5),
        ("field 't'", 7),
        ("field 'u'", 8),
        ("field 'v'", 9),
        ("field 'w'", 10),
        ("field 'x', colour", 13),
    ]
    message = str(exc)
    assert message.startswith("bad.yaml: 8 problems in the mapping\n")
    for line in (2, 4, 5, 7, 8, 9, 10, 13):
        assert f"bad.yaml:{line}: field " in message
    assert "'ok'" not in message
    assert "'fine'" not in message


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n", "{}\n"])
def test_a_mapping_must_be_a_non_empty_table(text):
    exc = mapping_error(text)
    assert [p.where for p in exc.problems] == ["mapping"]
    assert "must be a table of target field → source, with at least one field" in str(exc)


# --- warnings ---


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        (
            "p: emial\n",
            "field 'p': path 'emial': 'emial' is not a field Treez is known to send "
            "(did you mean 'email'?); it reads null unless Treez sends it",
        ),
        (
            "p: 'addresses[0].cty'\n",
            "field 'p': path 'addresses[0].cty': 'cty' is not a field Treez is known to send "
            "(did you mean 'city'?)",
        ),
        (
            "p: external_ids.aiq_contact\n",
            "'aiq_contact' is not a field Treez is known to send (did you mean 'aiq_contact_id'?)",
        ),
        ("p: {template: 'hi {frist_name}'}\n", "(did you mean 'first_name'?)"),
        ("p: {from: email, transform: [{first_non_null: [phnoe]}]}\n", "(did you mean 'phone'?)"),
        (
            "p: 'addresses[colour=red].city'\n",
            "field 'p': path 'addresses[colour=red].city': the elements of addresses have no "
            "known field 'colour'",
        ),
    ],
)
def test_unknown_names_are_warnings_with_a_suggestion(text, warning):
    mapping = compile_mapping_text(text)  # compiled, not refused
    assert len(mapping.warnings) == 1
    assert warning in mapping.warnings[0]


def test_unknown_name_without_a_close_match_has_no_suggestion():
    mapping = compile_mapping_text("p: zzqqxx\n")
    assert mapping.warnings == (
        "field 'p': path 'zzqqxx': 'zzqqxx' is not a field Treez is known to send; "
        "it reads null unless Treez sends it",
    )


def test_warnings_do_not_stop_the_mapping(make_customer):
    mapping = compile_mapping_text("id: customer_id\np: emial\nq: 'addresses[0].cty'\n")
    assert len(mapping.warnings) == 2
    assert mapping.apply(make_customer(), DISPENSARY) == {"id": "3904"}
    assert mapping.apply(make_customer(emial="sent"), DISPENSARY) == {"id": "3904", "p": "sent"}


def test_known_paths_give_no_warnings():
    text = (
        "a: primary_address.city\n"
        "b: 'addresses[primary=true].zipcode'\n"
        "c: external_ids.aiq_contact_id\n"
        "d: {template: '{dispensary}-{customer_id}'}\n"
        "e: 'verification_reasons[0].anything'\n"
    )
    assert compile_mapping_text(text).warnings == ()


# --- load_mapping ---


def test_load_mapping_of_a_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert info.value.source == str(path)
    assert str(info.value) == f"{path}: 1 problem in the mapping\n  - file: does not exist"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("id: customer_id\np: [unclosed\nq: x\n", 3, "expected ',' or ']'"),
        ("id: customer_id\np: first_name\n  q: x: y\n", 3, "mapping values are not allowed here"),
        ("p: {from: addresses[0].city}\n", 1, "expected ',' or '}'"),
    ],
)
def test_load_mapping_of_a_yaml_syntax_error(tmp_path, text, line, what):
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    (problem,) = info.value.problems
    assert problem.where == "YAML syntax"
    assert problem.line == line
    assert what in problem.what
    assert f"{path}:{line}: YAML syntax: " in str(info.value)


def test_load_mapping_names_the_file_in_errors(tmp_path):
    path = tmp_path / "shop.yaml"
    path.write_text("id: customer_id\nphone: {from: phone, transform: [e165]}\n", encoding="utf-8")
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert f"{path}:2: field 'phone': unknown transform 'e165'" in str(info.value)


def test_load_mapping_reads_a_file(tmp_path, make_customer):
    path = tmp_path / "ok.yaml"
    path.write_text("# comment\nname: {template: '{first_name} {last_name}'}\n", encoding="utf-8")
    mapping = load_mapping(path)
    assert mapping.name == str(path)
    assert mapping.apply(make_customer(), DISPENSARY) == {"name": "Jules Winnfield"}


# --- the shipped mapping ---


@pytest.fixture
def http_mapping():
    return load_mapping(ROOT / "mappings" / "http.yaml")


def test_shipped_http_mapping_has_no_warnings(http_mapping):
    assert http_mapping.warnings == ()


def test_shipped_http_mapping_on_the_seed(http_mapping, make_customer, seed_body):
    contact = http_mapping.apply(make_customer(), seed_body["dispensary_short_name"])
    assert contact["external_id"] == "treez-partnersandbox3-3904"
    assert contact["treez_customer_id"] == "3904"
    assert contact["dispensary"] == "partnersandbox3"
    assert contact["first_name"] == "Jules"
    assert contact["last_name"] == "Winnfield"
    assert contact["birthday"] == "1948-02-12"
    assert contact["address"] == "2515 Shepherd Way"
    assert contact["city"] == "Inglewood"
    assert contact["state"] == "CA"
    assert contact["zip"] == "90301"
    assert contact["groups"] == ["SENIOR"]
    assert contact["rewards_balance"] == 0
    assert contact["opted_out"] is True
    assert contact["gender"] == "unknown"
    assert contact["signup_date"] == "2026-04-24T11:38:21-07:00"
    # null in the seed, or "never visited": left out
    for absent in (
        "email",
        "phone",
        "aiq_contact_id",
        "sticky_cards_contact_id",
        "last_visit_date",
    ):
        assert absent not in contact
    text = json.dumps(contact)
    assert "N/A" not in text
    assert '""' not in text


def test_shipped_http_mapping_on_a_fuller_customer(http_mapping, make_customer):
    customer = make_customer(
        email=" Jules@Example.COM ",
        phone="(310) 555-1234",
        gender="M",
        opt_out="false",
        external_ids={"aiq_contact_id": 777},
        last_visit_date="2026-04-20 15:00:00.000",
    )
    contact = http_mapping.apply(customer, "store9")
    assert contact["email"] == "jules@example.com"
    assert contact["phone"] == "+13105551234"
    assert contact["gender"] == "male"
    assert contact["opted_out"] is False
    assert contact["aiq_contact_id"] == "777"
    assert contact["external_id"] == "treez-store9-3904"
    assert contact["last_visit_date"] == "2026-04-20T15:00:00"
