"""Issue 12's consent and identity defects owned by the planner, the store and replay: one test
each, named after the defect, each failing on the code before its fix. The Klaviyo defects
(1, 12) are in ``test_klaviyo_identity.py``, the gone ids and ``Retry-After`` (8, 10) in
``test_alpineiq.py`` and ``test_delivery.py``, the receiver's (11) in ``test_receiver.py``."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fakes.alpineiq import AlpineIQFake
from test_alpineiq import API_KEY, BASE_URL, config_text
from vendor_flow import DISPENSARY, Flow, event_body

from connector.config import load_config
from connector.config_base import PolicyConfig
from connector.destinations.alpineiq import AlpineIQSink
from connector.mapping import compile_mapping_text, load_mapping
from connector.pipeline import Deployment, process_batch
from connector.planner import CustomerState, DestinationSpec, Operation, merge_key, plan
from connector.store import NewEvent, open_store
from connector.store.schema import outbox
from connector.treez import Customer, parse_customer

ROOT = Path(__file__).resolve().parent.parent
SEED = json.loads((Path(__file__).parent / "data" / "seed_body.json").read_text())["data"]
HTTP_MAPPING = load_mapping(ROOT / "mappings" / "http.yaml")


def customer(**overrides: Any) -> Customer:
    data = copy.deepcopy(SEED)
    data.update(overrides)
    return parse_customer(data)


def at(minute: int) -> str:
    return f"2026-05-01T10:{minute:02d}:00.000-07:00"


def apply(
    events: list[Customer],
    dests: list[DestinationSpec],
    states: dict[str, CustomerState] | None = None,
) -> tuple[dict[str, CustomerState], list[Operation]]:
    states = dict(states or {})
    ops: list[Operation] = []
    for event in events:
        result = plan(event, "store1", states, dests)
        states.update(result.states)
        ops += result.operations
    return states, ops


def http_spec(mapping: Any = HTTP_MAPPING, **options: Any) -> DestinationSpec:
    return DestinationSpec(name="crm", mapping=mapping, **options)


def upserts(ops: list[Operation]) -> list[dict[str, Any]]:
    return [op.body["fields"] for op in ops if op.op == "upsert"]


# --- 2: a field carrying consent in an upsert never says opted in after an opt-out ----------


def test_defect_2_shipped_http_mapping_never_says_opted_in_after_an_opt_out() -> None:
    out = customer(customer_id="1", last_update=at(0), opt_out="true")
    back_in = customer(customer_id="1", last_update=at(5), opt_out="false", first_name="Mia")
    pulled = customer(customer_id="1", last_update=at(9), opt_out=None, first_name="Ann")
    _, ops = apply([out, back_in, pulled], [http_spec()])
    sent = upserts(ops)
    assert len(sent) == 3  # the names changed each time: each is sent
    assert [fields.get("opted_out") for fields in sent] == [True, True, True]
    assert [op.op for op in ops].count("unsubscribe") == 1


def test_defect_2_a_null_opt_out_is_never_read_as_false() -> None:
    # first sight with no opt_out: the shipped mapping leaves the field out (it said false)
    _, ops = apply([customer(customer_id="1", last_update=at(0), opt_out=None)], [http_spec()])
    assert "opted_out" not in upserts(ops)[0]
    # a pull that says nothing about consent after an opt-out changes nothing at all
    out = customer(customer_id="2", last_update=at(0), opt_out="true")
    silent = customer(customer_id="2", last_update=at(3), opt_out=None)
    _, ops = apply([out, silent], [http_spec()])
    assert [op.op for op in ops] == ["upsert", "unsubscribe"]


def test_defect_2_a_user_mapping_reading_opt_out_through_any_transform() -> None:
    mapping = compile_mapping_text(
        "first_name: first_name\n"
        "sms_ok: {from: opt_out, transform: [{map: {values: {true: 'no', false: 'yes'}}}]}\n"
        "consent_text: {from: opt_out, transform: [str, upper]}\n",
        name="user.yaml",
    )
    out = customer(customer_id="1", last_update=at(0), opt_out="true")
    back_in = customer(customer_id="1", last_update=at(5), opt_out="false", first_name="Mia")
    _, ops = apply([out, back_in], [http_spec(mapping)])
    assert [(f["sms_ok"], f["consent_text"]) for f in upserts(ops)] == [("no", "TRUE")] * 2
    # under on_source_opt_in the flip true → false is the customer's to make
    resub = http_spec(mapping, policy=PolicyConfig(resubscribe="on_source_opt_in"))
    _, ops = apply([out, back_in], [resub])
    assert [f["sms_ok"] for f in upserts(ops)] == ["no", "yes"]
    assert [op.op for op in ops] == ["upsert", "unsubscribe", "upsert", "subscribe"]


# --- 3: the opt-out does not depend on arrival order -----------------------------------------


def test_defect_3_a_stale_opt_out_is_still_owed() -> None:
    v1 = customer(customer_id="1", last_update=at(0), opt_out="true")
    v2 = customer(customer_id="1", last_update=at(5), opt_out="false")
    keys = set()
    for order in ([v1, v2], [v2, v1]):
        _, ops = apply(order, [http_spec()])
        [unsubscribe] = [op for op in ops if op.op == "unsubscribe"]
        keys.add(unsubscribe.idempotency_key)
        # no upsert planned once the opt-out is known says the customer is opted in
        after = ops[ops.index(unsubscribe) :]
        assert all(f.get("opted_out") is True for f in upserts(after))
    assert len(keys) == 1  # one key, whichever version owed it


def pipeline_outbox(work: Path, bodies: list[bytes]) -> list[dict[str, Any]]:
    """Each body stored and planned in turn (as webhooks arriving one after the other)
    through the real pipeline and store, with the shipped http mapping; the outbox after."""
    for mapping in (ROOT / "mappings").glob("*.yaml"):
        (work / mapping.name).write_text(mapping.read_text())
    (work / "config.yaml").write_text(
        f"store: sqlite:///{work}/c.db\n"
        f"dispensaries:\n  {DISPENSARY}:\n    webhook_token: tok\n    destinations:\n"
        "      - {name: crm, type: http, url: 'http://127.0.0.1:9/ops', mapping: http.yaml}\n"
    )
    config = load_config(work / "config.yaml")
    store = open_store(config.store)
    deployment = Deployment.from_config(config)
    try:
        for raw in bodies:
            data = json.loads(raw)["data"]
            event = NewEvent(
                DISPENSARY, "webhook", "CUSTOMER", data["customer_id"], None, raw.decode()
            )
            store.add_events([event])
            while process_batch(store, deployment).events:
                pass
        return [
            {**row._asdict(), "body": json.loads(row.payload)}
            for row in store.query(sa.select(outbox).order_by(outbox.c.id))
        ]
    finally:
        store.close()


def test_defect_3_through_the_pipeline_the_contact_ends_opted_out_in_either_order(
    tmp_path: Path,
) -> None:
    """v2 (false) first, then v1 (true, older): v1 is stale, yet owes the unsubscribe, and
    the current version is planned again so the contact's consent field says opted out."""
    v1 = event_body("7", 60, opt_out="true")
    v2 = event_body("7", 300, opt_out="false")
    finals = []
    for n, order in enumerate(([v1, v2], [v2, v1])):
        work = tmp_path / str(n)
        work.mkdir()
        rows = pipeline_outbox(work, order)
        assert [r["op"] for r in rows].count("unsubscribe") == 1
        last = [r["body"]["fields"] for r in rows if r["op"] == "upsert"][-1]
        assert last["opted_out"] is True
        finals.append(last)
    assert finals[0] == finals[1]


# --- 4: a far-future last_update does not swallow later events -------------------------------


def test_defect_4_a_future_dated_event_orders_at_its_receipt(tmp_path: Path) -> None:
    fake = AlpineIQFake(api_key=API_KEY, uid="1234", rate_limit_per_second=None)

    async def go() -> None:
        flow = Flow(
            tmp_path, config_text(), app=fake.app, sink_factory=AlpineIQSink, base_url=BASE_URL
        )
        try:
            future = json.loads(event_body("42", 1, first_name="Vincent"))
            future["data"]["last_update"] = "2099-01-01T00:00:00.000-08:00"
            await flow.deliver(json.dumps(future).encode())
            # ten minutes later (past the allowed skew) the customer changes and opts out
            later = json.loads(event_body("42", 1, first_name="Mia", opt_out="true"))
            moment = datetime.now(UTC) + timedelta(minutes=10)
            later["data"]["last_update"] = moment.isoformat(timespec="milliseconds")
            await flow.deliver(json.dumps(later).encode())
            assert flow.ops("42") == ["upsert", "upsert", "unsubscribe"]
            [persona] = fake.personas.values()
            assert persona["firstName"] == "Mia"
            assert fake.consent(persona["contactID"]) == {"email": False, "sms": False}
        finally:
            await flow.close()

    asyncio.run(go())


def test_defect_4_the_ceiling_is_receipt_plus_skew_and_an_opt_out_in_it_counts() -> None:
    future = customer(customer_id="1", last_update="2099-01-01T00:00:00Z", opt_out="false")
    received_us = int(time.time() * 1_000_000)
    ceiling = received_us + 300_000_000
    result = plan(future, "store1", {}, [http_spec()], not_after_us=ceiling)
    assert result.states["1"].last_update_us == ceiling
    out = customer(customer_id="1", last_update="2099-01-02T00:00:00Z", opt_out="true")
    again = plan(out, "store1", result.states, [http_spec()], not_after_us=ceiling + 1)
    assert [op.op for op in again.operations] == ["upsert", "unsubscribe"]


# --- 5: an opt-out carried only by the absorbed customer's merge payload ---------------------


def test_defect_5_the_absorbed_payloads_opt_out_reaches_both_personas(tmp_path: Path) -> None:
    """Alpine IQ has no merge: A's persona lives on. A's own opt-out webhook was lost; its
    merge payload carries it: owed to the survivor's persona and to A's own."""
    fake = AlpineIQFake(api_key=API_KEY, uid="1234", rate_limit_per_second=None)

    async def go() -> None:
        flow = Flow(
            tmp_path, config_text(), app=fake.app, sink_factory=AlpineIQSink, base_url=BASE_URL
        )
        try:
            await flow.deliver(
                event_body("200", 60, email="a@example.com", phone="3105550200"),
                event_body("100", 60, email="b@example.com", phone="3105550100"),
            )
            await flow.deliver(
                event_body(
                    "200",
                    120,
                    status="DEACTIVATED",
                    merged_into_customer_id="100",
                    opt_out="true",
                    email="a@example.com",
                    phone="3105550200",
                ),
                event_body(
                    "100",
                    120,
                    status="MERGED",
                    merged_customer_ids=["200"],
                    email="b@example.com",
                    phone="3105550100",
                ),
            )
            contacts = flow.contact_ids()
            for customer_id in ("200", "100"):
                persona = contacts[(DISPENSARY, "aiq", customer_id)]
                assert persona is not None
                assert fake.consent(persona) == {"email": False, "sms": False}, customer_id
        finally:
            await flow.close()

    asyncio.run(go())


# --- 6: a dead-lettered unsubscribe is replayed after a merge --------------------------------


def test_defect_6_an_owed_unsubscribe_is_replayed_after_a_merge(tmp_path: Path) -> None:
    fake = AlpineIQFake(api_key=API_KEY, uid="1234", rate_limit_per_second=None)

    async def go() -> None:
        flow = Flow(
            tmp_path, config_text(), app=fake.app, sink_factory=AlpineIQSink, base_url=BASE_URL
        )
        try:
            await flow.deliver(event_body("200", 60, email="a@example.com", phone="3105550200"))
            fake.fail_next(400)  # the unsubscribe is refused: dead-lettered
            await flow.deliver(
                event_body("200", 90, opt_out="true", email="a@example.com", phone="3105550200")
            )
            [dead] = flow.dead_letters()
            assert dead["op"] == "unsubscribe"
            await flow.deliver(
                event_body(
                    "100",
                    120,
                    status="MERGED",
                    merged_customer_ids=["200"],
                    email="b@example.com",
                    phone="3105550100",
                ),
            )
            replayed = flow.store.replay()
            assert (replayed.replayed, replayed.superseded) == (1, 0)
            await flow.drain()
            persona = flow.contact_ids()[(DISPENSARY, "aiq", "200")]
            assert persona is not None
            assert fake.consent(persona) == {"email": False, "sms": False}
        finally:
            await flow.close()

    asyncio.run(go())


# --- 9: a merge goes into the final survivor of a chain ---------------------------------------


def test_defect_9_a_late_merge_goes_into_the_final_survivor() -> None:
    dests = [http_spec()]
    b_into_c = customer(
        customer_id="B",
        last_update=at(10),
        status="DEACTIVATED",
        merged_into_customer_id="C",
        opt_out="false",
    )
    a_into_b = customer(
        customer_id="A",
        last_update=at(5),
        status="DEACTIVATED",
        merged_into_customer_id="B",
        opt_out="false",
    )
    states, _ = apply([b_into_c], dests)
    _, ops = apply([a_into_b], dests, states)
    [merge] = [op for op in ops if op.op == "merge"]
    assert (merge.body["from_customer_id"], merge.body["into_customer_id"]) == ("A", "C")
    assert merge.idempotency_key == merge_key("crm", "A", "C")
    # the survivor's payload naming A later plans no second merge
    b_lists_a = customer(
        customer_id="B",
        last_update=at(6),
        status="MERGED",
        merged_customer_ids=["A"],
        opt_out="false",
    )
    states2, _ = apply([b_into_c, a_into_b], dests)
    _, more = apply([b_lists_a], dests, states2)
    assert [op for op in more if op.op == "merge"] == []


def test_defect_9_a_merge_named_only_by_an_overtaken_payload_is_still_planned() -> None:
    """B's payload listing A (A into B) arrives after B's own merge into C (newer): it is
    stale, or a stray of a merged-away customer, yet the merge it names is a fact: A goes
    into C, once, in either order; and A's merge payload arriving after a newer stray of A
    still merges A."""
    dests = [http_spec()]
    b_into_c = customer(
        customer_id="B",
        last_update=at(20),
        status="DEACTIVATED",
        merged_into_customer_id="C",
        opt_out="false",
    )
    b_lists_a = customer(
        customer_id="B",
        last_update=at(10),
        status="MERGED",
        merged_customer_ids=["A"],
        opt_out="false",
    )
    for order in ([b_into_c, b_lists_a], [b_lists_a, b_into_c]):
        states, ops = apply(order, dests)
        merges = sorted(
            (op.body["from_customer_id"], op.body["into_customer_id"])
            for op in ops
            if op.op == "merge"
        )
        assert merges in ([("A", "B"), ("B", "C")], [("A", "C"), ("B", "C")])
        assert states["A"].merged_into in ("B", "C")
    a_later = customer(customer_id="A", last_update=at(30), opt_out="false")
    a_into_b = customer(
        customer_id="A",
        last_update=at(10),
        status="DEACTIVATED",
        merged_into_customer_id="B",
        opt_out="false",
    )
    states, ops = apply([a_later, a_into_b], dests)
    assert [op.op for op in ops if op.op == "merge"] == ["merge"]
    assert states["A"].merged_into == "B"
