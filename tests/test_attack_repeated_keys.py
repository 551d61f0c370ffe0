"""Adversary: a webhook body that repeats a JSON name (issue #16's contract change).

Since issue #16 a repeated name is read as Python's ``json`` reads it, the last copy winning,
and is no longer refused. These properties hold every reader of a body to that one reading,
with a model of their own (the last member whose decoded name is exactly the field's, its
value normalised as the contract says) rather than any reader of the connector:

- the receiver's check (its msgspec quick check and the pydantic model behind it), the
  planner's parse, the quarantine's replay judge, the mapping engine, the content hash, and
  the operator's readers (``explain``, the console's customer story) over bodies whose rule
  fields (``opt_out`` in every accepted spelling, ``customer_id``, ``last_update``, merge
  targets, ``status``, ``external_ids`` with its own repeats, ``event_type``) are repeated
  under escaped spellings (``"opt\\u005fout"``) and beside decoys that are other names to
  every reader (``OPT_OUT``, its fullwidth letters, a trailing space);
- histories of such bodies in random orders, through the real planner, the real SQLite store
  and the real delivery worker into the Alpine IQ fake, end exactly where the same histories
  written without repeats (``json.dumps(json.loads(body))``) end: the same operations, the same
  consent, one contact per customer, an opt-out owed exactly when a last copy says true, and
  nothing ever sent about a customer id that only a discarded copy names.

``ATTACK_KEYS_EXAMPLES`` (default 60; the readers' property draws five times as many) and
``ATTACK_KEYS_HISTORIES`` (default 12 per vendor, a quarter of it on PostgreSQL) set how many
examples the properties draw, for a longer hunt.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import fresh_schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_order_independence import VENDORS, consent_by_customer, survivor_of
from vendor_flow import DISPENSARY, Flow

from connector.errors import EventValidationError
from connector.explain import _customer_of
from connector.mapping import load_mapping
from connector.pipeline import process_batch
from connector.planner import content_hash, instant_us
from connector.quarantine import judge
from connector.store import NewEvent
from connector.store.operator import _names_customer
from connector.treez import (
    CustomerEvent,
    OtherEvent,
    ReceivedCustomer,
    TestPing,
    _check_with_model,
    _quick_check,
    check_event_json,
    parse_event,
    parse_event_json,
    parse_stored_event,
)

ROOT = Path(__file__).resolve().parent.parent
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())
HTTP_MAPPING = load_mapping(ROOT / "mappings" / "http.yaml")
EXAMPLES = int(os.environ.get("ATTACK_KEYS_EXAMPLES", "60"))
HISTORIES = int(os.environ.get("ATTACK_KEYS_HISTORIES", "12"))

# --- the model: what a last-wins reading means, without any reader of the connector ---------

# opt_out as JSON text and what the contract reads it as (None: says nothing)
OPT_OUT_SPELLINGS: dict[str, bool | None] = {
    '"true"': True,
    '"TRUE"': True,
    '" True "': True,
    "true": True,
    '"false"': False,
    '"False"': False,
    '" FALSE"': False,
    "false": False,
    "null": None,
    '""': None,
    '"  "': None,
}
OPT_OUT_REFUSED = ('"yes"', "1", '"N/A"', '"0"')  # consent is never guessed: a 422


def escaped(name: str, at: int) -> str:
    """``name`` as JSON text with its character at ``at`` written as a \\u escape."""
    return name[:at] + f"\\u{ord(name[at]):04x}" + name[at + 1 :]


def fullwidth(name: str) -> str:
    """The fullwidth form of ``name``'s letters: NFKC folds it back, no JSON reader does."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isalpha() else c for c in name)


def spellings(name: str) -> st.SearchStrategy[str]:
    """JSON texts of a member name that every reader must decode to exactly ``name``."""
    return st.sampled_from([name, escaped(name, 0), escaped(name, len(name) - 1)]) | st.integers(
        0, len(name) - 1
    ).map(lambda at: escaped(name, at))


def decoys(name: str) -> list[str]:
    """Names that are not ``name`` to any JSON reader (differing by case, by Unicode
    normalisation, by a space): data to map, never a rule field."""
    return [name.upper(), name.title(), fullwidth(name), name + " ", " " + name]


@dataclass(frozen=True)
class Member:
    text: str  # the name as JSON text (escapes included), without quotes
    field: str | None  # the field it decodes to, None for a decoy
    value: str  # JSON text


def render(members: list[Member]) -> str:
    return "{" + ", ".join(f'"{m.text}": {m.value}' for m in members) + "}"


def last(members: list[Member], field: str) -> str | None:
    found = [m.value for m in members if m.field == field]
    return found[-1] if found else None


@st.composite
def repeated(
    draw: st.DrawFn, field: str, final: str, earlier: st.SearchStrategy[str]
) -> list[Member]:
    """``field`` with the value ``final``, after 0-3 earlier copies and decoys (any value)."""
    members = [
        Member(draw(spellings(field)), field, draw(earlier)) for _ in range(draw(st.integers(0, 3)))
    ]
    members += [
        Member(d, None, draw(earlier))
        for d in draw(st.lists(st.sampled_from(decoys(field)), max_size=2, unique=True))
    ]
    members = draw(st.permutations(members))
    return [*members, Member(draw(spellings(field)), field, final)]


@st.composite
def interleaved(draw: st.DrawFn, groups: list[list[Member]]) -> list[Member]:
    """The members of ``groups`` in a random interleaving that keeps each group's order
    (a field's last copy stays its last)."""
    tags = draw(st.permutations([i for i, group in enumerate(groups) for _ in group]))
    heads = [iter(group) for group in groups]
    return [next(heads[i]) for i in tags]


def dumped(value: Any) -> str:
    return json.dumps(value)


ids = st.sampled_from(["7", "8", "3904"])
id_texts = ids.flatmap(lambda i: st.sampled_from([dumped(i), i, dumped(f" {i} ")]))
TIMES = ["2026-05-01T10:00:00.000-07:00", "2026-05-01T11:00:00.000-07:00", "2026-05-02T09:30:00Z"]
any_value = st.sampled_from(
    [*OPT_OUT_SPELLINGS, *OPT_OUT_REFUSED, '"7"', "8", '{"x": 1}', "[]", '"yesterday"']
)


@st.composite
def customer_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A CUSTOMER body (JSON text) repeating its rule fields, and what the model expects."""
    data = copy.deepcopy(SEED["data"])
    blocks: list[list[Member]] = []
    expect: dict[str, Any] = {"refused": False}
    order = draw(
        st.permutations(
            [
                "opt_out",
                "customer_id",
                "last_update",
                "status",
                "merge",
                "external_ids",
                "addresses",
            ]
        )
    )
    for field in order:
        if field == "opt_out":
            final = draw(st.sampled_from([*OPT_OUT_SPELLINGS, *OPT_OUT_REFUSED[:1]]))
            blocks.append(draw(repeated("opt_out", final, any_value)))
            expect["opt_out"] = OPT_OUT_SPELLINGS.get(final)
            expect["refused"] |= final not in OPT_OUT_SPELLINGS
        elif field == "customer_id":
            final = draw(id_texts)
            blocks.append(draw(repeated("customer_id", final, any_value | id_texts)))
            expect["customer_id"] = str(json.loads(final)).strip()
        elif field == "last_update":
            final = dumped(draw(st.sampled_from(TIMES)))
            blocks.append(draw(repeated("last_update", final, any_value)))
            expect["last_update"] = instant_us(datetime.fromisoformat(json.loads(final)))
        elif field == "status":
            final = dumped(draw(st.sampled_from(["ACTIVE", "MERGED", "DEACTIVATED"])))
            blocks.append(draw(repeated("status", final, st.sampled_from(['"ACTIVE"', "null"]))))
            expect["status"] = json.loads(final)
        elif field == "merge":
            into = draw(st.sampled_from(["null", '"8"', "9"]))
            blocks.append(
                draw(repeated("merged_into_customer_id", into, id_texts | st.just("null")))
            )
            expect["merged_into"] = None if into == "null" else str(json.loads(into))
            merged = draw(st.sampled_from(["[]", '["7"]', '[8, "9"]', "null"]))
            blocks.append(
                draw(repeated("merged_customer_ids", merged, st.sampled_from(['["3"]', "[]"])))
            )
            expect["merged_ids"] = [str(i) for i in json.loads(merged) or []]
        elif field == "addresses":
            elements, primary_zip, first_zip = [], None, None
            for zipcode in draw(
                st.lists(st.sampled_from(["90301", "90210", "10001"]), min_size=1, max_size=2)
            ):
                primary = draw(st.sampled_from(["true", "false", "null"]))
                element = [
                    draw(repeated("primary", primary, st.sampled_from(["true", "false"]))),
                    draw(repeated("zipcode", dumped(zipcode), st.just('"00000"'))),
                    [Member("city", "city", '"INGLEWOOD"')],
                ]
                elements.append(render(draw(interleaved(element))))
                first_zip = first_zip or zipcode
                if primary == "true" and primary_zip is None:
                    primary_zip = zipcode
            final = "[" + ", ".join(elements) + "]"
            blocks.append(
                draw(
                    repeated("addresses", final, st.just('[{"zipcode": "00000", "primary": true}]'))
                )
            )
            expect["zipcode"] = primary_zip or first_zip
        else:
            aiq = draw(st.sampled_from(['"p-1"', '"p-2"', "null", "5"]))
            inner = [
                draw(repeated("aiq_contact_id", aiq, st.sampled_from(['"p-9"', "null"]))),
                draw(repeated("sticky_cards_contact_id", '"s-1"', st.just('"s-0"'))),
            ]
            outer = render(draw(interleaved(inner)))
            # the whole external_ids object repeated too: the last one wins, not a merge
            blocks.append(
                draw(repeated("external_ids", outer, st.just('{"aiq_contact_id": "p-0"}')))
            )
            found = json.loads(outer).get("aiq_contact_id")
            expect["aiq"] = None if found is None else str(found)
    members = draw(interleaved(blocks))
    for member in members:
        data.pop(member.field or "", None)
    rest = json.dumps(data)[1:-1]
    data_text = render(members)[:-1] + ", " + rest + "}"
    # the envelope: event_type and the dispensary repeated as well, "data" possibly twice
    event_type = draw(st.sampled_from(['"CUSTOMER"', '" customer "', '"PRODUCT"']))
    types = draw(repeated("event_type", event_type, st.sampled_from(['"PRODUCT"', '"CUSTOMER"'])))
    names = draw(repeated("dispensary_short_name", dumped(DISPENSARY), st.just('"other"')))
    expect["event_type"] = json.loads(event_type).strip().upper()
    shadow = (
        [Member("data", "data", '{"customer_id": "999", "opt_out": "true"}')]
        if draw(st.booleans())
        else []
    )
    # the ping's "test" is read by presence: an escaped spelling is it, a decoy is not
    ping = draw(st.sampled_from([[], [], [], ["t\\u0065st"], ["TEST"], ["Test"]]))
    expect["ping"] = ping == ["t\\u0065st"]
    tests = [Member(name, "test" if expect["ping"] else None, "true") for name in ping]
    envelope = draw(interleaved([types, names, shadow, tests]))
    text = render(envelope)[:-1] + ', "data": ' + data_text + "}"
    return text, expect


# --- every reader, one reading -----------------------------------------------------------


def reading(read: Any) -> tuple[Any, ...]:
    """One reader's answer, as comparable facts (no values beyond the rule fields)."""
    try:
        event = read()
    except EventValidationError:
        return ("refused",)
    if isinstance(event, tuple):  # parse_stored_event: (event, fields left out)
        event = event[0]
    if isinstance(event, OtherEvent):
        return ("other", event.event_type)
    if isinstance(event, TestPing):
        return ("ping",)
    if isinstance(event, CustomerEvent):
        c = event.customer
        return ("customer", c.customer_id, instant_us(c.last_update))
    return ("customer", event.customer_id, instant_us(event.last_update))


def replay_verdict(text: str) -> tuple[Any, ...]:
    """The quarantine's replay judge on ``text`` refused once as a 422."""
    config = SimpleNamespace(dispensaries={DISPENSARY: None})
    row = SimpleNamespace(
        dispensary=DISPENSARY, status_code=422, content_type="application/json", reason="x"
    )
    verdict = judge(config)(row, text.encode())  # type: ignore[arg-type]
    if isinstance(verdict, str):
        return ("refused",)
    if verdict.event_type != "CUSTOMER":
        return ("other", verdict.event_type)
    return ("customer", verdict.customer_id, verdict.last_update_us)


@settings(max_examples=EXAMPLES * 5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(customer_bodies())
def test_every_reader_reads_a_repeated_name_by_its_last_copy(
    case: tuple[str, dict[str, Any]],
) -> None:
    text, expect = case
    predicted: tuple[Any, ...]
    if expect["ping"]:
        predicted = ("ping",)
    elif expect["event_type"] != "CUSTOMER":
        predicted = ("other", expect["event_type"])
    elif expect["refused"]:
        predicted = ("refused",)
    else:
        predicted = ("customer", expect["customer_id"], expect["last_update"])
    # the receiver's check, both halves; the planner; the replay judge
    assert reading(lambda: check_event_json(text)) == predicted
    assert reading(lambda: _check_with_model(text, "body")) == predicted
    quick = _quick_check(text)
    if quick is not None:
        assert reading(lambda: quick) == predicted
    assert reading(lambda: parse_stored_event(text)) == predicted
    assert reading(lambda: parse_event_json(text)) == predicted
    # a ping is never replayed (nothing to replay)
    assert replay_verdict(text) == (("refused",) if expect["ping"] else predicted)
    if predicted[0] != "customer":
        return
    planned = parse_stored_event(text)[0]
    direct = parse_event_json(text)
    assert isinstance(planned, CustomerEvent)
    assert isinstance(direct, CustomerEvent)
    customer = planned.customer
    assert customer.opt_out is expect["opt_out"]
    assert customer.status == expect["status"]
    assert customer.merged_into_customer_id == expect["merged_into"]
    assert customer.merged_customer_ids == expect["merged_ids"]
    assert customer.external_ids.aiq_contact_id == expect["aiq"]
    address = customer.primary_address
    assert address is not None
    assert address.zipcode == expect["zipcode"]
    # a decoy is data (an extra), never read as the field, and is kept as sent
    extra = customer.model_extra or {}
    assert not {"opt_out", "customer_id", "last_update"} & set(extra)
    # the canonical body (what json.loads reads, written without repeats) is the same event
    canonical = json.dumps(json.loads(text))
    again = parse_stored_event(canonical)[0]
    assert isinstance(again, CustomerEvent)
    assert content_hash(again.customer) == content_hash(customer) == content_hash(direct.customer)
    # the mapping engine and the destinations' payload: the same contact from either text
    assert json.dumps(HTTP_MAPPING.apply(customer, DISPENSARY)) == json.dumps(
        HTTP_MAPPING.apply(again.customer, DISPENSARY)
    )
    # the operator's readers (explain, the console's story) name the same customer
    found = _customer_of(text)
    assert found is not None
    assert str(found["customer_id"]).strip() == expect["customer_id"]


# --- findings: readers that do not read as the planner does --------------------------------


def _body_naming(customer_id_text: str) -> bytes:
    data = copy.deepcopy(SEED["data"])
    data.pop("customer_id")
    data["opt_out"] = "yes"  # refused: the body is quarantined
    rest = json.dumps(data)[1:-1]
    body = (
        '{"event_type": "CUSTOMER", "dispensary_short_name": "' + DISPENSARY + '", '
        '"data": {"customer_id": ' + customer_id_text + ", " + rest + "}}"
    )
    return body.encode()


@pytest.mark.parametrize(
    "spelled",
    [
        pytest.param('"\\u0033\\u0039\\u0030\\u0034"', id="escaped-digits"),
        pytest.param('" 3904 "', id="spaces"),
    ],
)
def test_a_refused_body_is_in_the_story_of_the_customer_it_names_however_spelled(
    spelled: str,
) -> None:
    body = _body_naming(spelled)
    # the planner's reading of the same body, the opt-out made valid: customer 3904
    fixed = json.loads(body)
    fixed["data"]["opt_out"] = "true"
    event = parse_event(fixed)
    assert isinstance(event, CustomerEvent)
    assert event.customer.customer_id == "3904"
    assert _names_customer(body, "3904")


def test_a_refused_body_is_in_the_story_of_the_customer_its_last_copy_names() -> None:
    """What holds: the story reads a repeated customer_id by its last copy, as the planner."""
    named_last = _body_naming('"999", "customer_id": "3904"')
    named_first = _body_naming('"3904", "customer_id": "999"')
    assert _names_customer(named_last, "3904")
    assert not _names_customer(named_last, "999")
    assert _names_customer(named_first, "999")
    assert not _names_customer(named_first, "3904")


# --- histories of repeating bodies through the real planner, store and worker ----------------

A, B, GHOST = "200", "100", "999"

Version = tuple[str, int, dict[str, str]]  # customer, minute, rule fields as JSON text


@st.composite
def versions(draw: st.DrawFn) -> tuple[list[Version], bool]:
    """Versions of A and B (opt_out in any spelling), maybe A merged into B; repeats."""
    found: list[Version] = []
    for customer in (A, B):
        for _ in range(draw(st.integers(1, 3))):
            fields = {"opt_out": draw(st.sampled_from(list(OPT_OUT_SPELLINGS)))}
            found.append((customer, draw(st.integers(1, 4)), fields))
    merged = draw(st.booleans())
    if merged:
        if draw(st.booleans()):
            fields = {"status": '"DEACTIVATED"', "merged_into_customer_id": dumped(B)}
            found.append(
                (A, 5, {"opt_out": draw(st.sampled_from(list(OPT_OUT_SPELLINGS))), **fields})
            )
        fields = {"status": '"MERGED"', "merged_customer_ids": dumped([A])}
        found.append((B, 5, {"opt_out": draw(st.sampled_from(list(OPT_OUT_SPELLINGS))), **fields}))
    repeats = draw(st.lists(st.sampled_from(range(len(found))), max_size=2))
    return [*found, *(found[i] for i in repeats)], merged


@st.composite
def disguised(draw: st.DrawFn, version: Version) -> str:
    """``version`` as a body whose rule fields come after discarded copies saying otherwise:
    an opt-out of "true", the id of a customer never sent (GHOST), another survivor, another
    time; in random orders and spellings, beside decoy names."""
    customer, minute, fields = version
    wanted = {
        "customer_id": dumped(customer),
        "last_update": dumped(f"2026-05-01T10:{minute:02d}:00.000-07:00"),
        "email": dumped(f"c{customer}@example.com"),
        "phone": dumped(f"310555{int(customer):04d}"),
        "status": '"ACTIVE"',
        "merged_into_customer_id": "null",
        "merged_customer_ids": "[]",
        **fields,
    }
    lies = {
        "opt_out": st.sampled_from(['"true"', "true", '" TRUE "', '"false"']),
        "customer_id": st.sampled_from([dumped(GHOST), GHOST]),
        "last_update": st.just(dumped("2026-05-01T10:59:00.000-07:00")),
        "merged_into_customer_id": st.sampled_from([dumped(GHOST), "null"]),
        "merged_customer_ids": st.just(dumped([GHOST])),
        "status": st.sampled_from(['"DEACTIVATED"', '"MERGED"']),
    }
    blocks = [draw(repeated(name, wanted[name], lies.get(name, st.just('"x"')))) for name in wanted]
    members = draw(interleaved(blocks))
    data = copy.deepcopy(SEED["data"])
    for name in wanted:
        data.pop(name, None)
    data_text = render(members)[:-1] + ", " + json.dumps(data)[1:-1] + "}"
    head = draw(
        st.sampled_from(
            [
                '"event_type": "CUSTOMER"',
                '"event_type": "PRODUCT", "event_type": "CUSTOMER"',
                '"data": {"customer_id": "999", "opt_out": "true"}, "event_type": "CUSTOMER"',
            ]
        )
    )
    return "{" + head + f', "dispensary_short_name": "{DISPENSARY}", "data": ' + data_text + "}"


async def run_history(
    work: Path, vendor_name: str, batches: list[list[str]], store_url: str | None = None
) -> dict[str, Any]:
    """Each batch received as the receiver receives it (its check decides the inbox row),
    planned, and delivered into a fresh vendor fake; what the store and the fake hold."""
    vendor = VENDORS[vendor_name]()
    flow = Flow(
        work,
        vendor.config,
        app=vendor.app,
        sink_factory=vendor.sink,
        base_url=vendor.base_url,
        store_url=store_url,
    )
    try:
        for batch in batches:
            events = []
            for text in batch:
                checked = check_event_json(text)
                assert isinstance(checked, ReceivedCustomer)
                events.append(
                    NewEvent(
                        DISPENSARY,
                        "webhook",
                        "CUSTOMER",
                        checked.customer_id,
                        instant_us(checked.last_update),
                        text,
                    )
                )
            flow.store.add_events(events)
            while (await flow.astore.call(process_batch, flow.store, flow.deployment, 256)).events:
                pass
            await flow.drain()
        calls = getattr(vendor.fake, "calls", [])
        return {
            "ops": [
                (
                    r["op"],
                    r["customer_id"],
                    r["status"],
                    r["idempotency_key"],
                    json.dumps(r["payload"], sort_keys=True),
                )
                for r in flow.outbox()
            ],
            # (customer, whether a contact id is known): the vendors' ids differ run to run
            "contacts": sorted((c, k is not None) for (_, _, c), k in flow.contact_ids().items()),
            "consent": consent_by_customer(vendor, flow),
            "opted_in": len(vendor.opted_in()),
            "calls": [json.dumps(c.body, sort_keys=True) for c in calls],
        }
    finally:
        await flow.close()


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Version], bool, list[list[str]]]:
    """A history, one order of it written with repeating names, cut into batches."""
    history, merged = draw(versions())
    order = draw(st.permutations(history))
    texts = [draw(disguised(v)) for v in order]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(texts) - 1)), max_size=3)))
    bounds = list(zip([0, *cuts], [*cuts, len(texts)], strict=True))
    return history, merged, [texts[i:j] for i, j in bounds]


def holds(
    case: tuple[list[Version], bool, list[list[str]]],
    run: Callable[[list[list[str]]], dict[str, Any]],
) -> None:
    history, merged, batches = case
    canonical = [[json.dumps(json.loads(t)) for t in batch] for batch in batches]
    seen, model = run(batches), run(canonical)
    # the same end as the bodies json.loads reads: operations, payloads, contacts, consent
    assert seen["ops"] == model["ops"]
    assert seen["contacts"] == model["contacts"]
    assert seen["consent"] == model["consent"]
    # and the model's own facts, stated without the connector
    merges = {(A, B)} if merged else set()
    said_out = {c for c, _, f in history if OPT_OUT_SPELLINGS[f["opt_out"]]}
    opted = said_out | {survivor_of(c, merges) for c in said_out}
    assert seen["opted_in"] == 0  # nothing ever opts a contact in
    # A customer merged away into a destination with a native merge owes its opt-out to the
    # survivor's contact; its own contact is folded into the survivor's by the merge. Where
    # the merge went to the dead letters (here: the survivor's contact not delivered yet
    # within the test's three quick attempts), the absorbed contact lives on with the
    # consent it had until the merge is replayed: a known gap (issue #16's note), not what
    # this property is about (the repeated names; both runs above agree).
    dead_merges = {op[1] for op in seen["ops"] if op[0] == "merge" and op[2] == "dead"}
    for customer in opted - dead_merges:
        if customer in seen["consent"]:
            assert seen["consent"][customer] == "out", customer
    for customer, state in seen["consent"].items():
        if state == "out":  # never an opt-out that only a discarded copy says
            assert customer in opted, customer
    unsubscribes = [op[1] for op in seen["ops"] if op[0] == "unsubscribe"]
    assert len(unsubscribes) == len(set(unsubscribes))
    assert set(unsubscribes) <= opted
    # one contact per customer, and nothing about the customer only discarded copies name
    assert len({c for c, _ in seen["contacts"]}) == len(seen["contacts"])
    assert GHOST not in {c for c, _ in seen["contacts"]}
    assert all(op[1] != GHOST and GHOST not in op[4] for op in seen["ops"])
    assert all(GHOST not in call for call in seen["calls"])


@settings(
    max_examples=HISTORIES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cases())
@pytest.mark.parametrize("vendor_name", sorted(VENDORS))
def test_histories_of_repeating_bodies_end_where_json_loads_says(
    tmp_path_factory: pytest.TempPathFactory,
    vendor_name: str,
    case: tuple[list[Version], bool, list[list[str]]],
) -> None:
    def run(batches: list[list[str]]) -> dict[str, Any]:
        work = tmp_path_factory.mktemp("keys")
        return asyncio.run(run_history(work, vendor_name, batches))

    holds(case, run)


@settings(
    max_examples=max(2, HISTORIES // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cases())
def test_histories_of_repeating_bodies_end_where_json_loads_says_on_postgresql(
    tmp_path_factory: pytest.TempPathFactory,
    pg_database: str,
    case: tuple[list[Version], bool, list[list[str]]],
) -> None:
    """The same through the PostgreSQL store (Alpine IQ; fewer examples: a schema each)."""

    def run(batches: list[list[str]]) -> dict[str, Any]:
        work = tmp_path_factory.mktemp("keys")
        with fresh_schema(pg_database) as url:
            return asyncio.run(run_history(work, "alpineiq", batches, store_url=url))

    holds(case, run)
