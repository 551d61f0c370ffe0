"""Attacks on the operator's command-line view (issue #15, items 1-2): ``explain``,
``quarantine list/show/replay``, ``conflicts list/ack`` and what the store keeps for them.

Eleven of these found a defect when they were written (a value told as a vendor code, an
error text or a contact id; actions without an audit row; a replayed dead letter, a cut
history and a refresh event told wrong; a non-JSON body told in another customer's story):
each is fixed and its test stays as a guard, with the attacks that held."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes.echo_sink import EchoSink
from test_operator import DISPENSARY, VALUES, _post_all, leaked, opened, write_config

from connector.cli import main
from connector.demo import load_samples
from connector.store import Store


def cli(config_path: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*args, "--config", str(config_path)])
    return result.exit_code, result.output


def deliver_samples(tmp_path: Path, store_url: str, sink: EchoSink) -> Path:
    """The demo's samples through the real service to ``sink``; the config's path."""
    path = write_config(tmp_path, store_url, sink.url)
    with opened(store_url) as store:
        bodies = [body for _, _, body in load_samples(DISPENSARY)]
        asyncio.run(_post_all(path, bodies, lambda: store.pending_work() == 0))
    return path


# --- privacy: a vendor's answer quoting the customer ---


def _last_name_refused(status: int, key: str) -> Any:
    """A sink that refuses 5001's first upsert with ``{key: <its last name>}``."""
    answered: set[str] = set()

    def answer(op: dict[str, Any]) -> tuple[int, Any] | None:
        if op.get("customer_id") != "5001" or op.get("op") != "upsert" or answered:
            return None
        answered.add("once")
        return status, {key: op["fields"]["last_name"]}

    return answer


@pytest.mark.parametrize(("status", "key"), [(400, "error"), (503, "code")])
def test_explain_never_prints_a_last_name_a_sink_answered(
    tmp_path: Path, store_url: str, status: int, key: str
) -> None:
    with EchoSink(_last_name_refused(status, key)) as sink:
        path = deliver_samples(tmp_path, store_url, sink)
    assert "Vega" in VALUES
    for args in (("explain", "5001"), ("explain", "5001", "--json"), ("dlq", "list", "--all")):
        code, out = cli(path, *args)
        assert code == 0, out
        assert leaked(out) == [], args


def test_a_braze_error_quoting_a_first_name_stays_out_of_the_message(tmp_path: Path) -> None:
    import shutil

    import httpx
    from test_braze import MAPPING, braze_config, delivery, fields_of

    from connector.destinations.braze import BrazeSink
    from connector.errors import DeliveryError

    shutil.copy(MAPPING, tmp_path / "braze.yaml")

    def answer(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)["attributes"][0]
        refused = {
            "type": f"'{sent['first_name']}' is not a valid first_name",
            "input_array": "attributes",
            "index": 0,
        }
        return httpx.Response(201, json={"message": "success", "errors": [refused]})

    async def go() -> list[Any]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        sink = BrazeSink(braze_config(tmp_path), client)
        try:
            fields = fields_of("5001", first_name="Vincent")
            return list(await sink.send([delivery("upsert", "5001", fields=fields)]))
        finally:
            await sink.aclose()

    [result] = asyncio.run(go())
    assert isinstance(result, DeliveryError)
    assert "Vincent" not in str(result)


# --- audit ---


def _refuse(customer: str, op: str = "upsert", status: int = 400) -> Any:
    def answer(sent: dict[str, Any]) -> tuple[int, Any] | None:
        if sent.get("customer_id") == customer and sent.get("op") == op:
            return status, {"error": "refused"}
        return None

    return answer


def test_dlq_replay_from_the_command_line_is_audited(tmp_path: Path, store_url: str) -> None:
    with EchoSink(_refuse("3904")) as sink:
        path = deliver_samples(tmp_path, store_url, sink)
    code, out = cli(path, "dlq", "replay", "--all")
    assert code == 0, out
    assert "replayed 1" in out
    with opened(store_url) as store:
        assert [a.action for a in store.audit_log()] != []


# --- explain's correctness ---


def test_explain_tells_a_dead_letter_replayed_then_delivered(
    tmp_path: Path, store_url: str
) -> None:
    refusing = {"on": True}

    def answer(op: dict[str, Any]) -> tuple[int, Any] | None:
        if refusing["on"] and op.get("customer_id") == "3904" and op.get("op") == "upsert":
            return 400, {"error": "refused"}
        return None

    with EchoSink(answer) as sink:
        path = deliver_samples(tmp_path, store_url, sink)
        refusing["on"] = False
        assert "replayed 1" in cli(path, "dlq", "replay", "--all")[1]
        with opened(store_url) as store:
            asyncio.run(_post_all(path, [], lambda: store.pending_work() == 0))
    code, out = cli(path, "explain", "3904", "--json")
    assert code == 0, out
    [upsert] = [o for o in json.loads(out)["operations"] if o["op"] == "upsert"]
    assert upsert["status"] == "done"
    assert "after 2 attempts" in upsert["standing"] or "replayed" in upsert["standing"]
    _, text = cli(path, "explain", "3904")
    assert "dead letter #1" in text


@pytest.fixture
def delivered(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The samples delivered to a sink that takes everything (SQLite): config path, store."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with EchoSink(lambda op: None) as sink:
        yield deliver_samples(tmp_path, url, sink), url


def test_a_story_cut_at_the_limit_says_so(
    delivered: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import connector.store.operator as operator_store

    path, _ = delivered
    monkeypatch.setattr(operator_store, "STORY_LIMIT", 2)  # 5001 has 5 events, 4 operations
    code, out = cli(path, "explain", "5001")
    assert code == 0, out
    assert "another customer's event" not in out
    head = out.split("\n\n", 1)[0]
    assert any(word in head for word in ("left out", "older", "newest")), head


# --- a store from revision 0003 ---


def test_explain_works_on_rows_written_at_revision_0003(tmp_path: Path, store_url: str) -> None:
    """The samples delivered (with a dead letter and a retry), the store taken down to 0003
    (no decisions, no attempts, no audit), then opened by this code (upgraded to 0004): every
    command tells the old rows, and says the decisions were not recorded."""
    from alembic import command

    from connector.store._engine import engine_for
    from connector.store.migrate import alembic_config, head

    with EchoSink(_refuse("3904")) as sink:
        path = deliver_samples(tmp_path, store_url, sink)
    engine = engine_for(store_url, timeout=5.0)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "0003")
    finally:
        engine.dispose()
    for customer in ("5001", "5002", "5003", "3904"):
        code, out = cli(path, "explain", customer)
        assert code == 0, out
        assert "(planned before decisions were recorded)" in out, customer
        assert leaked(out) == []
        code, out = cli(path, "explain", customer, "--json")
        assert code == 0, out
        told = json.loads(out)
        assert all(not e["decisions_kept"] for e in told["events"])
        assert told["operations"], customer
    for args in (("quarantine", "list", "--all"), ("conflicts", "list", "--all")):
        code, out = cli(path, *args)
        assert code == 0, out
    with opened(store_url) as store:
        dead = store.customer_record(DISPENSARY, "3904", ["crm"]).operations
        assert [o.status for o in dead if o.op == "upsert"] == ["dead"]
        from sqlalchemy import text

        with store.snapshot() as conn:  # type: ignore[attr-defined]
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head()


# --- quarantine replay ---


def _valid_body(customer_id: str) -> bytes:
    _, _, body = load_samples(DISPENSARY)[0]
    data = json.loads(body)
    data["data"]["customer_id"] = customer_id
    return json.dumps(data).encode()


_REPLAY = """
import sys
from connector.config import load_config
from connector.quarantine import judge
from connector.store import open_store
config = load_config(sys.argv[1])
store = open_store(config.store, listen=False)
done = store.replay_quarantined(judge(config))
print(len(done.moved), done.skipped)
store.close()
"""


def test_replays_in_several_processes_move_each_body_once(tmp_path: Path, store_url: str) -> None:
    import os
    import subprocess
    import sys

    from connector.store.abc import Rejected

    path = write_config(tmp_path, store_url, "http://127.0.0.1:9/ops")
    bodies = 20
    with opened(store_url) as store:
        store.add_events(
            [],
            [
                Rejected(DISPENSARY, 422, "an older rule", "application/json", _valid_body(f"8{i}"))
                for i in range(bodies)
            ],
        )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _REPLAY, str(path)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(4)
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    moved = sum(int(out.split()[0]) for out in outputs)
    assert moved == bodies, outputs
    with opened(store_url) as store:
        replayed = store.quarantined(include_replayed=True, limit=1000)
        assert len({q.replayed_event_id for q in replayed}) == bodies
        for i in range(bodies):
            assert len(store.customer_record(DISPENSARY, f"8{i}").events) == 1


def test_replaying_an_unknown_or_replayed_id_says_so(tmp_path: Path) -> None:
    from connector.store.abc import Rejected

    path = write_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}", "http://127.0.0.1:9/ops")
    with opened(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.add_events(
            [], [Rejected(DISPENSARY, 422, "old", "application/json", _valid_body("7"))]
        )
    assert "moved 1" in cli(path, "quarantine", "replay", "1")[1]
    for wanted in ("1", "999"):
        _, out = cli(path, "quarantine", "replay", wanted)
        assert f"#{wanted}" in out, out


def test_explain_never_prints_an_e_mail_used_as_the_contact_id(
    tmp_path: Path, store_url: str
) -> None:
    def by_email(op: dict[str, Any]) -> Any:
        return (op.get("fields") or {}).get("email") or f"c-{op.get('customer_id')}"

    with EchoSink(lambda op: None, contact=by_email) as sink:
        path = deliver_samples(tmp_path, store_url, sink)
    code, out = cli(path, "explain", "5001")
    assert code == 0, out
    assert leaked(out) == []


def _told_once(story: dict[str, Any]) -> None:
    """Each operation of the story is told under exactly one event, the one it names."""
    named: dict[int, list[int]] = {}
    for event in story["events"]:
        for decision in event["decisions"]:
            for op in decision["operations"]:
                named.setdefault(op, []).append(event["id"])
    for op in story["operations"]:
        assert named.get(op["id"], [op["event"]]) == [op["event"]], (op["id"], named)


def test_explain_after_reconcile_full_and_resend_tells_each_operation_once(
    tmp_path: Path,
) -> None:
    from fakes.treez_api import TreezFake
    from test_reconcile import run
    from test_reconcile import write_config as reconcile_config

    from connector.config import load_config
    from connector.reconcile import RunOptions

    fake = TreezFake.generate(30, seed=11, history_days=0.5, rate_limit=None)
    path = reconcile_config(tmp_path, fake.base_url)
    config = load_config(path)
    run(config, fake)
    run(config, fake, RunOptions(full=True))
    run(config, fake, RunOptions(full=True, resend=True))
    with opened(config.store) as store:
        ids = sorted(_customers(store))
    assert ids
    for customer in ids:
        code, out = cli(path, "explain", customer, "--json")
        assert code == 0, out
        story = json.loads(out)
        assert {e["source"] for e in story["events"]} <= {"reconcile", "resend"}
        assert all(e["run_id"] for e in story["events"])
        _told_once(story)
        _, text = cli(path, "explain", customer)
        person = fake.customer(customer) or {}
        values = [
            str(person.get(k))
            for k in ("first_name", "last_name", "email", "phone", "birthday")
            if person.get(k) and len(str(person.get(k))) >= 4
        ]
        assert [v for v in values if v in text] == [], customer


def _customers(store: Store) -> list[str]:
    from sqlalchemy import select

    from connector.store.schema import customers

    with store.snapshot() as conn:  # type: ignore[attr-defined]
        return [str(c) for c in conn.execute(select(customers.c.customer_id)).scalars()]


def test_a_replay_stopped_half_way_leaves_an_audit_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import connector.quarantine
    from connector.store.abc import Rejected

    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_config(tmp_path, url, "http://127.0.0.1:9/ops")
    with opened(url) as store:
        store.add_events(
            [],
            [
                Rejected(DISPENSARY, 422, "old", "application/json", _valid_body(str(i)))
                for i in (1, 2)
            ],
        )
    real = connector.quarantine.judge

    def interrupted(config: Any) -> Any:
        verdict = real(config)
        seen: list[int] = []

        def judged(row: Any, body: bytes) -> Any:
            seen.append(row.id)
            if len(seen) == 2:
                raise KeyboardInterrupt  # the operator stops a long replay
            return verdict(row, body)

        return judged

    monkeypatch.setattr(connector.quarantine, "judge", interrupted)
    result = CliRunner().invoke(main, ["quarantine", "replay", "--all", "--config", str(path)])
    assert result.exit_code != 0
    with opened(url) as store:
        assert len(store.quarantined(include_replayed=True)) - len(store.quarantined()) == 1
        # what was asked, then the one body moved before the stop
        assert [a.action for a in store.audit_log()] == [
            "quarantine_replay",
            "quarantine_replay_asked",
        ]


def test_an_alpine_iq_error_code_quoting_the_e_mail_stays_out_of_the_message() -> None:
    import httpx
    from test_alpineiq import FIELDS, aiq_config, delivery

    from connector.destinations.alpineiq import AlpineIQSink
    from connector.errors import DeliveryError

    def answer(request: httpx.Request) -> httpx.Response:
        sent = request.content.decode()
        email = str(FIELDS["email"])
        code = f"duplicate member {email}" if email in sent else "INVALID"
        return httpx.Response(409, json={"success": False, "error": {"code": code}})

    async def go() -> list[Any]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        sink = AlpineIQSink(aiq_config(), client)
        try:
            return list(await sink.send([delivery("upsert", fields=dict(FIELDS))]))
        finally:
            await sink.aclose()

    [result] = asyncio.run(go())
    assert isinstance(result, DeliveryError)
    assert str(FIELDS["email"]) not in str(result)


def _version(customer_id: str, last_update: str, opt_out: bool) -> bytes:
    _, _, body = load_samples(DISPENSARY)[0]
    data = json.loads(body)
    data["data"].update(customer_id=customer_id, last_update=last_update, opt_out=opt_out)
    return json.dumps(data).encode()


def test_a_refresh_event_is_not_told_as_different_content(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    with EchoSink(lambda op: None) as sink:
        path = write_config(tmp_path, url, sink.url)
        with opened(url) as store:
            for body in (
                _version("77", "2026-01-02T00:00:00.000Z", False),
                _version("77", "2026-01-01T00:00:00.000Z", True),  # late, stale opt-out
            ):
                asyncio.run(_post_all(path, [body], lambda: store.pending_work() == 0))
    code, out = cli(path, "explain", "77", "--json")
    assert code == 0, out
    events = json.loads(out)["events"]
    assert [e["source"] for e in events] == ["webhook", "webhook", "refresh"]
    ops = [o["op"] for o in json.loads(out)["operations"]]
    assert ops == ["upsert", "unsubscribe", "upsert"]
    _told_once(json.loads(out))
    assert "different content" not in events[2]["outcome_text"]


def test_a_non_json_body_is_not_told_in_an_unrelated_customers_story(tmp_path: Path) -> None:
    from connector.store.abc import Rejected

    url = f"sqlite:///{tmp_path / 's.db'}"
    path = write_config(tmp_path, url, "http://127.0.0.1:9/ops")
    with opened(url) as store:
        store.add_events(
            [_new_event("1")],
            [Rejected(DISPENSARY, 400, "body: is not JSON", "application/json", b"<html>2021")],
        )
    code, out = cli(path, "explain", "1", "--json")
    assert code == 0, out
    assert json.loads(out)["quarantined"] == []


def _new_event(customer_id: str) -> Any:
    from connector.store.abc import NewEvent

    body = _valid_body(customer_id).decode()
    return NewEvent(DISPENSARY, "webhook", "CUSTOMER", customer_id, 1, body)


def test_a_customer_known_at_two_dispensaries(tmp_path: Path, store_url: str) -> None:
    """Without -d, explain names both and asks; with -d, each story holds only its own."""
    from connector.store.abc import NewEvent

    path = write_config(tmp_path, store_url, "http://127.0.0.1:9/ops")
    text = path.read_text(encoding="utf-8")
    other = text[text.index("dispensaries:") + len("dispensaries:\n") :].replace(
        DISPENSARY, "otherstore"
    )
    path.write_text(text + other, encoding="utf-8")
    body = _valid_body("42").decode()
    with opened(store_url) as store:
        store.add_events(
            [
                NewEvent(DISPENSARY, "webhook", "CUSTOMER", "42", 1, body),
                NewEvent("otherstore", "webhook", "CUSTOMER", "42", 2, body),
                NewEvent("otherstore", "webhook", "CUSTOMER", "42", 3, body),
            ]
        )
    code, out = cli(path, "explain", "42")
    assert code != 0
    assert "otherstore" in out
    assert DISPENSARY in out
    for dispensary, count in ((DISPENSARY, 1), ("otherstore", 2)):
        code, out = cli(path, "explain", "42", "-d", dispensary, "--json")
        assert code == 0, out
        assert len(json.loads(out)["events"]) == count
