"""Attacks on intake (reviewer "intake"): everything the receiver answers 202 must be planned,
and consent must never be guessed. Bodies go through the real ASGI app (test_receiver's
harness: real store, planner and a jsonl delivery worker), the reconciliation's own check
(``Reconciler._events``) and ``connector map``.

A test here FAILS while the defect it names is present; the ``held`` tests record attacks
that were tried and held.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes.klaviyo import ChannelConsent, KlaviyoFake
from test_klaviyo import existing_profile, klaviyo_flow
from test_receiver import (
    DISPENSARY,
    SEED,
    Running,
    eventually,
    run,
    settled_inbox,
)
from vendor_flow import event_body

from connector import planner
from connector.cli import main
from connector.mapping import load_mapping
from connector.planner import DestinationSpec, plan
from connector.reconcile import Reconciler
from connector.store.schema import inbox, outbox, quarantine
from connector.treez import parse_stored_event

ROOT = Path(__file__).resolve().parent.parent
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"


def _raw_body(
    data_changes: dict[str, Any], raw_members: str = "", *, drop: tuple[str, ...] = ()
) -> bytes:
    """The seed body with ``data_changes`` applied, ``drop`` removed from data, and the raw
    JSON text ``raw_members`` (e.g. duplicate keys) appended inside ``data``."""
    body = copy.deepcopy(SEED)
    body["data"].update(data_changes)
    for name in drop:
        body["data"].pop(name, None)
    text = json.dumps(body)
    if raw_members:
        assert text.endswith("}}")
        text = text[:-2] + ", " + raw_members + "}}"
    return text.encode()


async def _outcome(rx: Running, raw: bytes) -> tuple[int, list[str], list[str], list[str]]:
    """Post ``raw``; the status code, and once settled: the inbox statuses, the quarantine
    reasons and the ops in the sink."""
    response = await rx.post(raw)
    if response.status_code != 202:
        return response.status_code, [], [r.reason for r in await rx.rows(quarantine)], []
    rows = await settled_inbox(rx, 1)
    reasons = [r.reason for r in await rx.rows(quarantine)]
    ops = [r.op for r in await rx.rows(outbox)]
    if ops:
        await eventually(rx.sink, lambda lines: len(lines) >= len(ops), "sink")
    return 202, [r.status for r in rows], reasons, [line["op"] for line in await rx.sink()]


# --- BREAK 1 (contract changed, issue #16): a repeated name is read by its last copy -----


@pytest.mark.parametrize(
    ("members", "statuses", "ops"),
    [
        # the last copy says opted in: no unsubscribe (Python's json reads it so)
        ('"opt_out": "true", "opt_out": "false"', ["applied"], ["upsert"]),
        ('"opt_out": "yes", "opt_out": "false"', ["applied"], ["upsert"]),  # the first not judged
        ('"opt_out": "false", "opt_out": "true"', ["applied"], ["upsert", "unsubscribe"]),
        ('"event_type": "CUSTOMER", "event_type": "PRODUCT"', ["ignored"], []),
    ],
    ids=["true-then-false", "yes-then-false", "false-then-true", "customer-then-product"],
)
def test_a_repeated_name_is_accepted_and_read_by_its_last_copy(
    tmp_path: Path, members: str, statuses: list[str], ops: list[str]
) -> None:
    """A body repeating a name is not refused for it: the receiver stores it (202) and the
    planner reads it as Python's json does, the last copy winning (the receiver's check
    agrees with it: a refusal would be 422 here)."""
    raw = _raw_body({}, members, drop=("opt_out",))
    if members.startswith('"event_type"'):
        raw = _raw_body({}).replace(b'"event_type": "CUSTOMER"', members.encode())

    async def scenario(rx: Running) -> None:
        status, stored, reasons, sent = await _outcome(rx, raw)
        assert (status, stored, reasons) == (202, statuses, [])
        assert sorted(sent) == sorted(ops)

    run(tmp_path, scenario)


def test_a_repeated_customer_id_is_the_last_in_the_inbox_and_the_plan(tmp_path: Path) -> None:
    """``{"customer_id": 1, ..., "customer_id": 2}`` is customer 2 in the inbox row, in the
    outbox and in what is delivered."""
    raw = _raw_body({}, '"customer_id": 1, "customer_id": 2', drop=("customer_id",))

    async def scenario(rx: Running) -> None:
        status, stored, _reasons, sent = await _outcome(rx, raw)
        assert (status, stored) == (202, ["applied"])
        assert [r.customer_id for r in await rx.rows(inbox)] == ["2"]
        assert {r.customer_id for r in await rx.rows(outbox)} == {"2"}
        assert {line["customer_id"] for line in await rx.sink()} == {"2"}
        assert sent

    run(tmp_path, scenario)


# --- BREAK 2: the reconciliation check accepts what the planner refuses ----------------------


def test_a_pulled_record_nested_past_512_levels_outside_the_rules_is_planned(
    tmp_path: Path,
) -> None:
    """``check_customer`` (reconciliation) only screens the rule fields; ``_events`` then
    re-serialises the record and stores it. A record holding an unknown field nested 600
    levels deep (json.loads in the Treez client reads it) is accepted, and then the planner's
    ``_json_body`` refuses the whole stored event as "not JSON we read (nested past 512
    levels)": the event fails and the customer's opt-out is lost. The receiver refuses such
    a body with 400 and leaves out a field nested 129..512 deep; the pull must do one or the
    other too (pipeline.py says a "refused when planned" event cannot come from it)."""
    record = copy.deepcopy(SEED["data"])
    record["opt_out"] = "true"
    deep: Any = 1
    for _ in range(600):
        deep = [deep]
    record["loyalty_history"] = deep
    record = json.loads(json.dumps(record))  # as the Treez client decodes it

    async def scenario(rx: Running) -> None:
        events, rejected, _ = Reconciler._events(DISPENSARY, [record], "pull", None)
        if rejected:  # refused by the check: no 202-equivalent; acceptable
            assert not events
            return
        store = rx.service.astore.store
        await rx.service.astore.call(store.add_events, events)
        rows = await settled_inbox(rx, 1)
        reasons = [r.reason for r in await rx.rows(quarantine)]
        assert [r.status for r in rows] == ["applied"], reasons
        lines = await eventually(rx.sink, lambda lines: len(lines) >= 2, "sink")
        assert "unsubscribe" in [line["op"] for line in lines]

    run(tmp_path, scenario)


# --- BREAK 3: `connector map` refuses bodies the receiver accepts and the pipeline applies ---


_MAP_BODIES = {
    "first_name-an-object": _raw_body({"first_name": {"given": "Jules"}}),
    "lone-surrogate-in-first_name": _raw_body({"first_name": "@@X@@"}).replace(
        b'"@@X@@"', b'"\\ud800"'
    ),
    "deep-unknown-field": _raw_body({}, '"extra": ' + "[" * 200 + "1" + "]" * 200),
    "byte-order-mark": codecs.BOM_UTF8 + _raw_body({}),
}


@pytest.mark.parametrize("name", list(_MAP_BODIES))
def test_connector_map_reads_every_body_the_receiver_applies(tmp_path: Path, name: str) -> None:
    """``connector map`` parses with ``parse_event(json.loads(text))``: no screening, no
    leaving-out, no BOM handling. The receiver answers 202 to these bodies and the pipeline
    applies them (the opt-out is sent); ``map`` must show what the pipeline sends, not fail."""
    raw = _MAP_BODIES[name]

    async def scenario(rx: Running) -> None:
        status, statuses, reasons, ops = await _outcome(rx, raw)
        assert status == 202, (status, reasons)
        assert statuses == ["applied"], (statuses, reasons)
        assert "unsubscribe" in ops, ops

    run(tmp_path, scenario)
    event_file = tmp_path / "event.json"
    event_file.write_bytes(raw)
    result = CliRunner().invoke(
        main, ["map", "--mapping", str(HTTP_MAPPING), "--dispensary", DISPENSARY, str(event_file)]
    )
    assert result.exit_code == 0, result.stderr if hasattr(result, "stderr") else result.output


# --- BREAK 4: last_update as a bare number in text is read as Unix seconds or milliseconds ---


@pytest.mark.parametrize("sent", ["1700000000", "20000000000", "0"], ids=repr)
def test_last_update_without_date_and_offset_is_refused(tmp_path: Path, sent: str) -> None:
    """treez.py: last_update "must be a valid timestamp with an offset" (ISO 8601); the
    validator's message says "an ISO 8601 timestamp with an offset, as text". Text holding a
    bare number passes ``_timestamp`` (only the type is checked) and pydantic reads it as a
    Unix time, seconds or (past 2e10) milliseconds: the order of events is guessed."""
    raw = _raw_body({"last_update": sent})

    async def scenario(rx: Running) -> None:
        response = await rx.post(raw)
        assert response.status_code == 422, (response.status_code, response.text)

    run(tmp_path, scenario)


# --- BREAK 5: planning merged_customer_ids is quadratic --------------------------------------


def test_planning_a_long_merged_customer_ids_list_is_linear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A survivor payload within max_body_bytes (1 MiB) can list ~100,000 absorbed ids; the
    receiver answers 202. ``plan`` copied the whole state view for each absorbed id, so
    planning was O(n^2) (100,000 ids took 63 s, during which no other customer's opt-out was
    planned). Each merge must now see one view, built once (no timing asserted here; the
    figures are in the issue's note)."""
    specs = [
        DestinationSpec(p.stem, load_mapping(p)) for p in sorted((ROOT / "mappings").glob("*.yaml"))
    ]
    body = copy.deepcopy(SEED)
    body["data"]["merged_customer_ids"] = list(range(10**6, 10**6 + 500))
    event, _ = parse_stored_event(json.dumps(body))
    views: set[int] = set()
    real = planner._merge

    def spy(dispensary: str, absorbed: Any, survivor: str, states: Any, *rest: Any) -> Any:
        views.add(id(states))
        return real(dispensary, absorbed, survivor, states, *rest)

    monkeypatch.setattr(planner, "_merge", spy)
    result = plan(event.customer, DISPENSARY, {}, specs)  # type: ignore[union-attr]
    assert len(views) == 1
    assert sum(op.op == "merge" for op in result.operations) == 500 * sum(
        s.native_merge for s in specs
    )


# --- BREAK 6: a 202 opt-out whose upsert cannot be mapped never reaches Klaviyo -------------


@pytest.mark.parametrize("balance", [12.5, float("nan")], ids=["12.5", "NaN"])
def test_an_opt_out_reaches_an_existing_klaviyo_profile_when_the_upsert_cannot_be_mapped(
    tmp_path: Path, balance: float
) -> None:
    """The receiver answers 202 (rewards_balance is any number to the model; NaN is read from
    the token). The shipped klaviyo.yaml maps it with ``int``, which fails on 12.5 or NaN, so
    the whole upsert is dead-lettered ("mapping failed") and ``_consent_fields`` (planner.py)
    gives None for the whole contact: the unsubscribe carries no e-mail or phone, finds no
    profile and dies ("nothing to find it by"). The person's profile in Klaviyo (same e-mail,
    made by a sign-up form) stays SUBSCRIBED: an opted-out customer keeps being e-mailed."""
    fake = KlaviyoFake(seed=11)

    async def go() -> None:
        mia = await existing_profile(fake, email="mia@example.com", first_name="Mia")
        profile = fake.profile(mia)
        assert profile is not None
        profile.consent["email"] = ChannelConsent("SUBSCRIBED")
        async with klaviyo_flow(tmp_path, fake) as flow:
            body = event_body(
                "1001", 1, rewards_balance=balance, opt_out="true", email="mia@example.com"
            )
            await flow.deliver(body)
            statuses = [(r["op"], r["status"]) for r in flow.outbox()]
            assert fake.consent(mia)["email"] != "SUBSCRIBED", (statuses, flow.dead_letters())

    asyncio.run(go())


# --- HELD: bodies answered 202 are planned, opt-outs sent, refusals are 4xx ------------------


_HELD: dict[str, bytes] = {
    # last_update edges
    "lu-0001+14:00": _raw_body({"last_update": "0001-01-01T00:00:00+14:00"}),
    "lu-9999-12:00": _raw_body({"last_update": "9999-12-31T23:59:59.999-12:00"}),
    "lu-+23:59": _raw_body({"last_update": "2026-04-24T11:38:21+23:59"}),
    "lu--00:00": _raw_body({"last_update": "2026-04-24T11:38:21-00:00"}),
    "lu-leap-second": _raw_body({"last_update": "2016-12-31T23:59:60Z"}),
    "lu-9-digit-fraction": _raw_body({"last_update": "2026-04-24T11:38:21.123456789Z"}),
    "lu-space-separator": _raw_body({"last_update": "2026-04-24 11:38:21Z"}),
    "lu-no-offset": _raw_body({"last_update": "2026-04-24T11:38:21.000"}),
    "lu-2099": _raw_body({"last_update": "2099-01-01T00:00:00Z"}),
    "lu-year-0000": _raw_body({"last_update": "0000-01-01T00:00:00Z"}),
    # opt_out values
    **{
        f"opt-{v!r}": _raw_body({"opt_out": v})
        for v in [
            " TRUE ",
            "\u00a0true\u3000",
            "True",
            "yes",
            1,
            0,
            1.0,
            [],
            {},
            "true\u0000",
            "on",
        ]
    },
    "opt-NaN": _raw_body({}, '"opt_out": NaN', drop=("opt_out",)),
    # lone surrogates and nesting
    "sur-escaped-nickname": _raw_body({"nickname": "@@X@@"}).replace(b'"@@X@@"', b'"\\udc00x"'),
    "sur-escaped-status": _raw_body({"status": "@@X@@"}).replace(b'"@@X@@"', b'"\\ud800"'),
    "sur-escaped-ext-key": _raw_body({"external_ids": {"@@X@@": 1}}).replace(
        b'"@@X@@"', b'"\\ud800"'
    ),
    "sur-escaped-merged-id": _raw_body({"merged_customer_ids": ["@@X@@"]}).replace(
        b'"@@X@@"', b'"\\ud800"'
    ),
    "sur-raw-bytes": _raw_body({"nickname": "@@X@@"}).replace(
        b"@@X@@", "\ud800".encode("utf-8", "surrogatepass")
    ),
    "nest-128-unknown": _raw_body({}, '"extra": ' + "[" * 127 + "1" + "]" * 127),
    "nest-129-unknown": _raw_body({}, '"extra": ' + "[" * 129 + "1" + "]" * 129),
    "nest-510-unknown": _raw_body({}, '"extra": ' + "[" * 509 + "1" + "]" * 509),
    "nest-513": _raw_body({}, '"extra": ' + "[" * 513 + "1" + "]" * 513),
    "nest-129-external_ids": _raw_body(
        {}, '"external_ids": {"x": ' + "[" * 129 + "1" + "]" * 129 + "}", drop=("external_ids",)
    ),
    # numbers
    "rewards-NaN": _raw_body({}, '"rewards_balance": NaN', drop=("rewards_balance",)),
    "rewards-Infinity": _raw_body({}, '"rewards_balance": -Infinity', drop=("rewards_balance",)),
    "rewards-1e999": _raw_body({}, '"rewards_balance": 1e999', drop=("rewards_balance",)),
    "rewards-4301-digit-float": _raw_body(
        {}, '"rewards_balance": ' + "7" * 4301 + ".0", drop=("rewards_balance",)
    ),
    "customer_id-4300-digits": _raw_body({"customer_id": int("9" * 4300)}),
    # ids and merges
    "merged-self-ints-dups": _raw_body({"merged_customer_ids": ["3904", 3904, 77, "77", " 77 "]}),
    "merged_into-self": _raw_body({"merged_into_customer_id": 3904, "status": "DEACTIVATED"}),
    "merged-bool": _raw_body({"merged_customer_ids": [True]}),
    "ext-aiq-float": _raw_body({"external_ids": {"aiq_contact_id": 1.5}}),
    # duplicates that agree everywhere, odd envelope
    "dup-customer_id": _raw_body({}, '"customer_id": "4000"'),
    "dup-event_type-last-product": _raw_body({}).replace(
        b'"event_type": "CUSTOMER"', b'"event_type": "CUSTOMER", "event_type": "PRODUCT"'
    ),
    "event_type-long-s": _raw_body({}).replace(
        b'"event_type": "CUSTOMER"', b'"event_type": " cu\\u017ftomer "'
    ),
    "whitespace-form-feed": _raw_body({}).replace(b'"opt_out": "true"', b'"opt_out":\x0c"true"'),
    "bom-then-body": codecs.BOM_UTF8 + _raw_body({}),
}


@pytest.mark.parametrize("name", list(_HELD))
def test_held_every_202_is_planned_and_its_opt_out_sent(tmp_path: Path, name: str) -> None:
    raw = _HELD[name]

    async def scenario(rx: Running) -> None:
        status, statuses, reasons, ops = await _outcome(rx, raw)
        assert status != 500
        if status != 202:
            assert 400 <= status < 500
            return
        assert "failed" not in statuses, reasons
        assert not [r for r in reasons if r.startswith("refused when planned")]
        store = rx.service.astore.store
        (row,) = await rx.service.astore.call(store.query, inbox.select())
        event, _ = parse_stored_event(row.body)
        if getattr(getattr(event, "customer", None), "opt_out", None) is True:
            assert "unsubscribe" in ops, (statuses, ops)

    run(tmp_path, scenario, max_body=1 << 20)
