"""The operator's view from the command line and the store: ``connector explain`` tells a
customer's whole story (the demo's opt-out customer, its merge pair, a delivery that failed
and died), ``quarantine replay`` moves a refused body once, ``conflicts ack`` acknowledges,
every action and every reveal is audited, and no command prints a customer value unless
asked to. Through the real service, store (both backends) and HTTP sink."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fakes.http_sink import HttpSink

from connector.cli import main
from connector.config import load_config
from connector.demo import load_samples
from connector.explain import build_story, story_json, story_lines
from connector.quarantine import judge
from connector.receiver import create_app
from connector.service import Service
from connector.store import Store, open_store
from connector.store.abc import NewEvent, Rejected

ROOT = Path(__file__).resolve().parent.parent
DISPENSARY = "partnersandbox3"  # the samples' own
TOKEN = "operator-test-token-0123456789"
DEADLINE = 30.0


def write_config(folder: Path, store_url: str, sink_url: str) -> Path:
    (folder / "mappings").mkdir(exist_ok=True)
    (folder / "mappings" / "http.yaml").write_text(
        (ROOT / "mappings" / "http.yaml").read_text(encoding="utf-8"), encoding="utf-8"
    )
    text = f"""\
        store: "{store_url}"
        dispensaries:
          {DISPENSARY}:
            webhook_token: {TOKEN}
            destinations:
              - name: crm
                type: http
                url: {sink_url}
                mapping: mappings/http.yaml
                retry: {{initial_seconds: 0.05, max_seconds: 0.1, min_attempts: 2,
                         min_elapsed_seconds: 0}}
        """
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@contextmanager
def opened(url: str) -> Iterator[Store]:
    store = open_store(url, listen=False)
    try:
        yield store
    finally:
        store.close()


def sample_values() -> set[str]:
    """Every customer value of the bundled samples that must never be printed unasked:
    names, e-mail addresses, phones, birthdays, licence and medical numbers, streets."""
    keys = {
        "first_name",
        "last_name",
        "middle_name",
        "nickname",
        "email",
        "phone",
        "birthday",
        "drivers_license",
        "state_medical_id",
        "physician_license",
        "physician_first_name",
        "physician_last_name",
        "caregiver_license_number",
        "street1",
        "notes",
    }
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key in keys and isinstance(inner, str) and len(inner) >= 4:
                    found.add(inner)
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    for _, _, body in load_samples(DISPENSARY):
        walk(json.loads(body))
    return found


VALUES = sample_values()


def leaked(text: str) -> list[str]:
    return sorted(v for v in VALUES if v in text)


def test_the_scan_has_values_to_look_for() -> None:
    assert len(VALUES) >= 8, VALUES
    assert any("@" in v for v in VALUES)


@dataclass
class Deployment:
    config_path: Path
    sink: HttpSink
    store: Store

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, [*args, "--config", str(self.config_path)])
        return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


async def _post_all(config_path: Path, bodies: list[bytes], until: Any) -> None:
    service = Service(load_config(config_path), idle_poll=0.05)
    app = create_app(service)
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    async with (
        service.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        for body in bodies:
            await client.post(f"/webhooks/treez/{DISPENSARY}", content=body, headers=headers)
        deadline = time.monotonic() + DEADLINE
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("the pipeline did not settle")
            await asyncio.sleep(0.05)


@pytest.fixture
def demo(tmp_path: Path, store_url: str) -> Iterator[Deployment]:
    """The demo's samples delivered to an HTTP sink whose first answer to 5001's
    unsubscribe is a 503 (retried) and whose answer to 3904's upsert is a 400 (a dead
    letter)."""
    with HttpSink() as sink:
        path = write_config(tmp_path, store_url, sink.url)
        store = open_store(store_url, listen=False)
        sink.script_for("5001", "unsubscribe", ["503"])
        sink.script_for("3904", "upsert", ["400"])
        try:
            bodies = [body for _, _, body in load_samples(DISPENSARY)]
            asyncio.run(_post_all(path, bodies, lambda: store.pending_work() == 0))
            yield Deployment(path, sink, store)
        finally:
            store.close()


def story(store: Store, customer_id: str, show_values: bool = False) -> dict[str, Any]:
    record = store.customer_record(DISPENSARY, customer_id, ["crm"])
    return story_json(build_story(record, ["crm"]), show_values)


def test_explain_tells_the_opt_out_customers_story(demo: Deployment) -> None:
    told = story(demo.store, "5001")
    assert told["state"]["opt_out"] is True
    assert [e["outcome"] for e in told["events"]] == [
        "applied",
        "applied",
        "applied",
        "duplicate",
        "stale",
    ]
    rules = [e["decisions"][0]["rule"] for e in told["events"]]
    assert rules[2].startswith("upsert:")
    assert "unsubscribe: opt-out owed" in rules[2]
    assert rules[3].startswith("duplicate")
    assert rules[4].startswith("stale")
    ops = {o["id"]: o for o in told["operations"]}
    # every operation is told under the event that planned it, and each exactly once
    planned = [i for e in told["events"] for d in e["decisions"] for i in d["operations"]]
    assert sorted(planned) == sorted(ops)
    assert [ops[i]["op"] for i in planned] == ["upsert", "upsert", "upsert", "unsubscribe"]
    assert all(o["status"] == "done" for o in ops.values())
    retried = [o for o in ops.values() if o["answers"]]
    assert len(retried) == 1
    answer = retried[0]["answers"][0]
    assert (answer["result"], answer["status_code"], answer["code"]) == ("retry", 503, "injected")
    assert retried[0]["attempts"] == 2
    assert "after 2 attempts" in retried[0]["standing"]
    # the refused sample names this customer: it is part of its story
    assert [q["status_code"] for q in told["quarantined"]] == [422]


def test_explain_tells_the_merge_pair(demo: Deployment) -> None:
    survivor, absorbed = story(demo.store, "5002"), story(demo.store, "5003")
    assert survivor["state"]["absorbed"] == ["5003"]
    assert absorbed["state"]["merged_into"] == "5002"
    merge = [o for o in survivor["operations"] if o["op"] == "merge"]
    assert len(merge) == 1
    assert merge[0]["event"] == survivor["events"][0]["id"]
    assert merge[0]["customer_id"] == "5003"
    assert absorbed["events"][0]["outcome"] == "absorbed"
    assert absorbed["events"][0]["decisions"][0]["rule"].startswith("merged away")


def test_explain_tells_a_dead_letter(demo: Deployment) -> None:
    told = story(demo.store, "3904")
    dead = [o for o in told["operations"] if o["status"] == "dead"]
    assert len(dead) == 1
    assert dead[0]["dead_letter"] is not None
    assert f"dead letter #{dead[0]['dead_letter']}" in dead[0]["standing"]
    assert [a["status_code"] for a in dead[0]["answers"]] == [400]
    assert dead[0]["answers"][0]["result"] == "dead"
    text = "\n".join(
        story_lines(build_story(demo.store.customer_record(DISPENSARY, "3904", ["crm"]), ["crm"]))
    )
    assert "dead" in text
    assert "HTTP 400 injected" in text


def test_explain_command_prints_names_never_values_unless_asked(demo: Deployment) -> None:
    for customer in ("5001", "5002", "5003", "3904"):
        code, out = demo.cli("explain", customer)
        assert code == 0, out
        assert out.startswith(f"customer {customer} of {DISPENSARY} (field names only")
        assert leaked(out) == [], customer
        code, out = demo.cli("explain", customer, "--json")
        assert code == 0
        assert json.loads(out)["values_shown"] is False
        assert leaked(out) == []
    assert demo.store.audit_log() == []
    code, out = demo.cli("explain", "5001", "--show-values")
    assert code == 0
    assert "CUSTOMER VALUES SHOWN" in out.splitlines()[0]
    assert leaked(out)  # the scan finds values when they are there
    entry = demo.store.audit_log()[0]
    assert (entry.action, entry.target) == ("reveal", f"customer {DISPENSARY}/5001")
    assert entry.who.startswith("cli ")


def test_explain_an_unknown_customer(demo: Deployment) -> None:
    code, out = demo.cli("explain", "no-such-customer")
    assert code == 0
    assert "nothing is kept about this customer" in out


def test_commands_never_print_values(demo: Deployment) -> None:
    outputs = []
    for args in (
        ("quarantine", "list", "--all"),
        ("quarantine", "show", "1"),
        ("conflicts", "list", "--all"),
        ("dlq", "list", "--all"),
        ("status",),
    ):
        code, out = demo.cli(*args)
        assert code == 0, (args, out)
        outputs.append(out)
        assert leaked(out) == [], args
    assert "body:" in outputs[1]
    assert "data keys:" in outputs[1]
    code, out = demo.cli("quarantine", "show", "1", "--show-values")
    assert code == 0
    assert leaked(out)
    assert demo.store.audit_log()[0].target == "quarantine #1"


# --- quarantine replay ---


def _valid_body(customer_id: str = "7001") -> bytes:
    _, _, body = load_samples(DISPENSARY)[0]
    data = json.loads(body)
    data["data"]["customer_id"] = customer_id
    return json.dumps(data).encode()


def test_quarantine_replay_moves_a_body_that_now_passes_once(
    tmp_path: Path, store_url: str
) -> None:
    """A body refused by an older rule (kept with its reason) passes today's checks: the
    replay moves it into the inbox once, however many replays run, at once or after."""
    path = write_config(tmp_path, store_url, "http://127.0.0.1:9/ops")
    config = load_config(path)
    with opened(store_url) as store:
        refused = Rejected(DISPENSARY, 422, "an older rule", "application/json", _valid_body())
        still = Rejected(DISPENSARY, 422, "bad", "application/json", b'{"event_type": 1}')
        store.add_events([], [refused, still])
        open_rows = store.quarantined()
        assert len(open_rows) == 2
        results = []

        def replay() -> None:
            results.append(store.replay_quarantined(judge(config)))

        threads = [threading.Thread(target=replay) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        moved = [m for r in results for m in r.moved]
        assert len(moved) == 1
        assert all(len(r.refused) == 1 for r in results)  # the bad body, every time
        assert store.replay_quarantined(judge(config)).moved == []
        left = store.quarantined()
        assert [q.reason for q in left] == ["bad"]
        replayed = store.quarantined(include_replayed=True, ids=[moved[0][0]])[0]
        assert replayed.replayed_event_id == moved[0][1]
        record = store.customer_record(DISPENSARY, "7001", ["crm"])
        assert [(e.id, e.source, e.status) for e in record.events] == [
            (moved[0][1], "webhook", "pending")
        ]


@pytest.mark.parametrize(
    ("reason", "content_type", "body", "why"),
    [
        ("x", "application/json", b"[1]", "body: must be a JSON object"),
        ("x", "text/plain", None, "content type must be application/json, not text/plain"),
        ("x", "application/json", b"\xff\xfe", "not UTF-8"),
        ("cut", "application/json", None, "cut at the size limit"),
    ],
)
def test_quarantine_replay_says_why_a_body_is_still_refused(
    tmp_path: Path, reason: str, content_type: str, body: bytes | None, why: str
) -> None:
    path = write_config(tmp_path, "sqlite:///connector.db", "http://127.0.0.1:9/ops")
    config = load_config(path)
    status = 413 if reason == "cut" else 422
    with opened(config.store) as store:
        store.add_events(
            [], [Rejected(DISPENSARY, status, reason, content_type, body or _valid_body())]
        )
        done = store.replay_quarantined(judge(config))
    assert done.moved == []
    assert why in done.refused[0][1]


def test_quarantine_replay_keeps_the_source_of_a_body_refused_when_planned(tmp_path: Path) -> None:
    path = write_config(tmp_path, "sqlite:///connector.db", "http://127.0.0.1:9/ops")
    config = load_config(path)
    with opened(config.store) as store:
        reason = "refused when planned (reconcile): data: an older rule"
        store.add_events([], [Rejected(DISPENSARY, 422, reason, "application/json", _valid_body())])
        done = store.replay_quarantined(judge(config))
        event = store.customer_record(DISPENSARY, "7001").events[0]
    assert len(done.moved) == 1
    assert event.source == "reconcile"


def test_quarantine_replay_command_is_audited(tmp_path: Path) -> None:
    path = write_config(tmp_path, "sqlite:///connector.db", "http://127.0.0.1:9/ops")
    config = load_config(path)
    with opened(config.store) as store:
        store.add_events([], [Rejected(DISPENSARY, 422, "old", "application/json", _valid_body())])
    runner = CliRunner()
    result = runner.invoke(main, ["quarantine", "replay", "--config", str(path)])
    assert result.exit_code == 1
    assert "say which bodies" in result.output
    result = runner.invoke(main, ["quarantine", "replay", "1", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "#1: moved to the inbox as event #1" in result.output
    assert "moved 1, still refused 0, skipped 0" in result.output
    result = runner.invoke(main, ["quarantine", "replay", "--all", "--config", str(path)])
    assert "moved 0" in result.output
    with opened(config.store) as store:
        actions = [(a.action, a.target) for a in store.audit_log()]
    assert actions == [
        ("quarantine_replay_asked", "all"),
        ("quarantine_replay", "quarantine #1"),
        ("quarantine_replay_asked", "#1"),
    ]


# --- conflicts ---


def test_conflicts_list_and_ack(tmp_path: Path, store_url: str) -> None:
    path = write_config(tmp_path, store_url, "http://127.0.0.1:9/ops")
    with opened(store_url) as store:
        store.add_conflict(DISPENSARY, "c1", "crm", "external_id_mismatch", "map kept")
        store.add_conflict(DISPENSARY, "c2", "crm", "sms_consent_unsupported", "no group")
        store.add_conflict(DISPENSARY, "c3", "other", "external_id_mismatch", "map kept")
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(main, [*args, "--config", str(path)])
        assert result.exit_code == 0, result.output
        return result.output

    listed = cli("conflicts", "list")
    assert [line.split()[0] for line in listed.splitlines()] == ["#1", "#2", "#3"]
    assert "acknowledged 1" in cli("conflicts", "ack", "2")
    assert "acknowledged 0" in cli("conflicts", "ack", "2")  # once
    out = cli("conflicts", "ack", "--all", "--kind", "external_id_mismatch", "-t", "crm")
    assert "acknowledged 1" in out
    assert [line.split()[0] for line in cli("conflicts", "list").splitlines()] == ["#3"]
    assert "acknowledged" in cli("conflicts", "list", "--all").splitlines()[0]
    with opened(store_url) as store:
        assert [c.id for c in store.conflict_records()] == [3]
        log = store.audit_log()
        assert [(a.action, a.target, a.detail) for a in log] == [
            ("conflicts_ack", "#1", "acknowledged 1 of 1"),
            ("conflicts_ack", "#2", "acknowledged 0 of 1"),
            ("conflicts_ack", "#2", "acknowledged 1 of 1"),
        ]
        counts = {
            (o.dispensary, o.destination): o.open_conflicts
            for o in store.overview([(DISPENSARY, "crm")])
        }
    assert counts[(DISPENSARY, "other")] == 1
    assert counts[(DISPENSARY, "crm")] == 0


# --- what the store keeps for the story ---


def test_decisions_and_attempts_are_recorded(demo: Deployment) -> None:
    record = demo.store.customer_record(DISPENSARY, "5001", ["crm"])
    kinds = [[k for _, k, _ in e.decisions or []] for e in record.events]
    assert kinds == [["upsert"], ["upsert"], ["upsert", "unsubscribe"], [], []]
    failed = [a for o in record.operations for a in o.failures]
    assert [(a.result, a.status_code) for a in failed] == [("retry", 503)]
    assert "HTTP 503" in failed[0].error


def test_overview_and_throughput(demo: Deployment) -> None:
    overview = {(o.dispensary, o.destination): o for o in demo.store.overview()}
    crm = overview[(DISPENSARY, "crm")]
    assert crm.pending == crm.inflight == 0
    assert crm.dead == 1
    assert crm.delivered_last_hour == 7  # 8 operations, one dead
    buckets = demo.store.throughput(time.time() - 86_400, 3600)
    assert sum(n for _, n in buckets) == crm.delivered_last_hour
    assert all(start % 3600 == 0 for start, _ in buckets)


def test_purge_forgets_attempts_of_purged_operations(demo: Deployment) -> None:
    before = demo.store.customer_record(DISPENSARY, "5001", ["crm"])
    assert any(o.failures for o in before.operations)
    demo.store.purge(raw_before=0, delivered_before=time.time() + 10)
    after = demo.store.customer_record(DISPENSARY, "5001", ["crm"])
    assert after.operations == []
    dead = demo.store.customer_record(DISPENSARY, "3904", ["crm"])
    assert [a.result for o in dead.operations for a in o.failures] == ["dead"]  # kept


def test_a_new_event_is_stored_with_no_decisions_until_planned(tmp_path: Path) -> None:
    with opened("sqlite:///" + str(tmp_path / "s.db")) as store:
        store.add_events([NewEvent(DISPENSARY, "webhook", "CUSTOMER", "9", 1, "{}")])
        event = store.customer_record(DISPENSARY, "9").events[0]
    assert event.decisions is None
    assert event.status == "pending"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            '{"errors": [{"id": "x", "status": 409, "code": "duplicate_profile"}]}',
            "duplicate_profile",
        ),
        (
            '{"status": "error", "category": "VALIDATION_ERROR", "message": "Property x"}',
            "VALIDATION_ERROR",
        ),
        ('{"message": "x", "errors": [{"type": "invalid_phone", "index": 0}]}', "invalid_phone"),
        ('{"error": "injected"}', "injected"),
        ('{"error": "Bad request: jules@example.com is taken"}', None),
        ('{"code": 4012}', "4012"),
        ("not json", None),
        ("", None),
        ("[]", None),
    ],
)
def test_vendor_code_reads_an_identifier_never_text(body: str, code: str | None) -> None:
    from connector.delivery._http import vendor_code

    assert vendor_code(body) == code


def test_vendor_code_is_never_an_echo_of_what_was_sent() -> None:
    """A service answering {"error": "<the customer's last name>"} names no code: a value
    of the customer must not reach explain or the console as one."""
    from connector.delivery._http import vendor_code

    sent = [{"op": "upsert", "fields": {"last_name": "Winnfield", "tags": ["VIP"]}}]
    assert vendor_code('{"error": "Winnfield"}', sent) is None
    assert vendor_code('{"error": "winnfield"}', sent) is None
    assert vendor_code('{"code": "vip"}', sent) is None
    assert vendor_code('{"error": "duplicate"}', sent) == "duplicate"
