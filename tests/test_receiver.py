"""The webhook receiver (design.md, contract 1) against the real ASGI app and a real SQLite file.

Each test writes a config into ``tmp_path``, starts a :class:`Service` through its lifespan
(store, group committer, planner and a jsonl delivery worker per destination) and drives
``create_app(service)`` with ``httpx.ASGITransport``. Results are read back from the store
(through the store's own thread) and from the jsonl sink files. Waiting is done by polling
with a deadline, never by sleeping for a fixed time; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import copy
import hmac
import io
import json
import logging
import re
import shutil
import sqlite3
import textwrap
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Table, insert, select, update

from connector import receiver
from connector.config import load_config
from connector.config_base import PolicyConfig
from connector.errors import StoreUnavailable
from connector.logs import configure_logging
from connector.mapping import load_mapping
from connector.planner import ContactState, CustomerState, DestinationSpec, content_hash, plan
from connector.receiver import create_app
from connector.runner import status_lines
from connector.service import Service
from connector.store import NewEvent
from connector.store.schema import inbox, outbox, quarantine
from connector.treez import CustomerEvent, parse_stored_event

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
HTTP_MAPPING = ROOT / "mappings" / "http.yaml"
SEED_BYTES = (Path(__file__).resolve().parent / "data" / "seed_body.json").read_bytes()
SEED: dict[str, Any] = json.loads(SEED_BYTES)

DISPENSARY = "partnersandbox3"
OTHER = "otherstore"
TOKEN_A = "tok-a-7Qx9rL2mVwJ5"
TOKEN_B = "tok-b-K4pZ8sN1cYe3"
OTHER_TOKEN = "tok-other-H3jT6dF0bQ"
MAX_BODY = 2048
URL = f"/webhooks/treez/{DISPENSARY}"
OTHER_URL = f"/webhooks/treez/{OTHER}"
DEADLINE = 5.0
SEED_LAST_UPDATE_US = (
    datetime.fromisoformat("2026-04-24T11:38:21.000-07:00") - datetime(1970, 1, 1, tzinfo=UTC)
) // timedelta(microseconds=1)

# What the seed customer owns; none of it may reach a log line (design.md, "PII").
PII_WORDS = ("jules", "winnfield", "shepherd", "inglewood")  # searched case-insensitively
PII_VALUES = ("1948-02-12", "90301", TOKEN_A, TOKEN_B, OTHER_TOKEN)
_TOUCHED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", "sqlalchemy")


# --- set-up ---


def write_config(
    folder: Path,
    *,
    store: str = "sqlite:///connector.db",
    store_timeout: float = 5.0,
    max_body: int = MAX_BODY,
) -> Path:
    """A deployment in ``folder``: two dispensaries, each with a jsonl sink in ``out/``; the
    store at ``store`` (tests/conftest.py's ``store_url``: SQLite or PostgreSQL)."""
    (folder / "mappings").mkdir(exist_ok=True)
    shutil.copy(HTTP_MAPPING, folder / "mappings" / "http.yaml")
    path = folder / "config.yaml"
    text = f"""\
        store: "{store}"
        store_timeout_seconds: {store_timeout}
        server:
          max_body_bytes: {max_body}
          shutdown_grace_seconds: 5
        dispensaries:
          {DISPENSARY}:
            webhook_token: [{TOKEN_A}, {TOKEN_B}]
            destinations:
              - name: sink
                type: jsonl
                path: out/{DISPENSARY}.jsonl
                mapping: mappings/http.yaml
          {OTHER}:
            webhook_token: {OTHER_TOKEN}
            destinations:
              - name: sink
                type: jsonl
                path: out/{OTHER}.jsonl
                mapping: mappings/http.yaml
        """
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def logs() -> Iterator[io.StringIO]:
    """The connector's log lines of this test, captured; logging is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name, lg in ((n, logging.getLogger(n)) for n in _TOUCHED_LOGGERS)
    }
    stream = io.StringIO()
    configure_logging(stream=stream, level="debug")  # accepted webhooks log at debug
    yield stream
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name, (lg_handlers, lg_level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = lg_handlers
        lg.setLevel(lg_level)
        lg.propagate = propagate
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


@dataclass
class Running:
    """A started service and a client of its ASGI app."""

    service: Service
    client: httpx.AsyncClient
    folder: Path

    async def post(
        self,
        body: Any = SEED_BYTES,
        *,
        path: str = URL,
        token: str | None = TOKEN_A,
        authorization: str | None = None,
        content_type: str | None = "application/json",
    ) -> httpx.Response:
        headers = {}
        if authorization is not None:
            headers["authorization"] = authorization
        elif token is not None:
            headers["authorization"] = f"Bearer {token}"
        if content_type is not None:
            headers["content-type"] = content_type
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        return await self.client.post(path, content=body, headers=headers)

    async def rows(self, table: Table) -> list[Any]:
        """Every row of ``table`` in id order, read in the store's own thread."""
        store = self.service.astore.store
        return await self.service.astore.call(store.query, select(table).order_by(table.c.id))

    async def sink(self, dispensary: str = DISPENSARY) -> list[dict[str, Any]]:
        path = self.folder / "out" / f"{dispensary}.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    async def readiness(self) -> tuple[int, Any]:
        response = await self.client.get("/readyz")
        return response.status_code, response.json()

    async def nothing_stored(self) -> None:
        assert await self.rows(inbox) == []
        assert await self.rows(quarantine) == []


Scenario = Callable[[Running], Awaitable[None]]


async def _drive(config_path: Path, scenario: Scenario) -> None:
    service = Service(load_config(config_path), idle_poll=0.05)
    app = create_app(service)
    transport = httpx.ASGITransport(app=app)
    async with (
        service.lifespan(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        await scenario(Running(service, client, config_path.parent))


def run(
    tmp_path: Path,
    scenario: Scenario,
    *,
    store: str = "sqlite:///connector.db",
    store_timeout: float = 5.0,
    max_body: int = MAX_BODY,
) -> None:
    """Run ``scenario`` against a freshly started service in ``tmp_path``, on ``store``."""
    config = write_config(tmp_path, store=store, store_timeout=store_timeout, max_body=max_body)
    asyncio.run(_drive(config, scenario))


async def eventually(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str) -> T:
    """Poll ``probe`` until ``done`` holds for its value, or fail after :data:`DEADLINE`."""
    deadline = time.monotonic() + DEADLINE
    while True:
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {DEADLINE} s")
        await asyncio.sleep(0.02)


async def settled_inbox(rx: Running, count: int) -> list[Any]:
    """The inbox once it holds ``count`` rows and none is still pending."""
    return await eventually(
        lambda: rx.rows(inbox),
        lambda rows: len(rows) == count and all(r.status != "pending" for r in rows),
        "inbox",
    )


def seed_with(**changes: Any) -> dict[str, Any]:
    """The seed body with customer fields replaced; a value of ... removes the field."""
    body = copy.deepcopy(SEED)
    for key, value in changes.items():
        if value is ...:
            del body["data"][key]
        else:
            body["data"][key] = value
    return body


def envelope_without(key: str) -> dict[str, Any]:
    body = copy.deepcopy(SEED)
    del body[key]
    return body


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


# --- 202: stored, then planned and delivered ---


def test_seed_event_is_stored_then_delivered_as_upsert_and_unsubscribe(
    tmp_path: Path, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        response = await rx.post()
        assert response.status_code == 202, response.text
        assert response.json() == {"status": "accepted"}

        # committed before the answer: the row is there now, whatever the planner has done
        (row,) = await rx.rows(inbox)
        assert row.status in ("pending", "applied")
        assert (row.dispensary, row.source, row.event_type) == (DISPENSARY, "webhook", "CUSTOMER")
        assert row.customer_id == "3904"
        assert row.last_update_us == SEED_LAST_UPDATE_US
        assert row.body == SEED_BYTES.decode()
        assert await rx.rows(quarantine) == []

        lines = await eventually(rx.sink, lambda lines: len(lines) >= 2, "sink")
        assert sorted(line["op"] for line in lines) == ["unsubscribe", "upsert"]  # opt_out "true"
        for line in lines:
            assert line["dispensary"] == DISPENSARY
            assert line["customer_id"] == "3904"
            assert line["idempotency_key"]
        (upsert,) = [line for line in lines if line["op"] == "upsert"]
        assert upsert["fields"]["external_id"] == f"treez-{DISPENSARY}-3904"
        assert upsert["fields"]["first_name"] == "Jules"
        assert upsert["fields"]["opted_out"] is True
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "applied"
        assert await rx.sink(OTHER) == []

    run(tmp_path, scenario, store=store_url)


def test_either_token_of_the_list_is_accepted(tmp_path: Path, store_url: str) -> None:
    async def scenario(rx: Running) -> None:
        first = await rx.post(token=TOKEN_A)
        later = seed_with(last_update="2026-04-25T09:00:00.000-07:00")
        second = await rx.post(later, token=TOKEN_B)

        assert (first.status_code, second.status_code) == (202, 202), second.text
        rows = await rx.rows(inbox)
        assert [r.customer_id for r in rows] == ["3904", "3904"]
        assert rows[1].body == json.dumps(later)

    run(tmp_path, scenario, store=store_url)


def test_the_token_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_url: str
) -> None:
    calls: list[tuple[bytes, bytes]] = []

    def compare_digest(given: bytes, known: bytes) -> bool:
        calls.append((given, known))
        return hmac.compare_digest(given, known)

    monkeypatch.setattr(receiver, "hmac", types.SimpleNamespace(compare_digest=compare_digest))

    async def scenario(rx: Running) -> None:
        assert (await rx.post(token="not-the-token")).status_code == 403
        assert (b"not-the-token", TOKEN_A.encode()) in calls
        assert (b"not-the-token", TOKEN_B.encode()) in calls
        assert (await rx.post(token=TOKEN_B)).status_code == 202
        assert (TOKEN_B.encode(), TOKEN_B.encode()) in calls

    run(tmp_path, scenario, store=store_url)


def test_a_body_without_dispensary_short_name_is_accepted(tmp_path: Path, store_url: str) -> None:
    async def scenario(rx: Running) -> None:
        body = envelope_without("dispensary_short_name")
        response = await rx.post(body)

        assert response.status_code == 202, response.text
        (row,) = await rx.rows(inbox)
        assert (row.dispensary, row.customer_id) == (DISPENSARY, "3904")
        assert await rx.rows(quarantine) == []

    run(tmp_path, scenario, store=store_url)


def test_json_content_type_with_parameters_is_accepted(tmp_path: Path, store_url: str) -> None:
    accepted = [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/json;charset=UTF-8",
    ]

    async def scenario(rx: Running) -> None:
        for count, content_type in enumerate(accepted, start=1):
            response = await rx.post(content_type=content_type)

            assert response.status_code == 202, (content_type, response.text)
            rows = await rx.rows(inbox)
            assert len(rows) == count
            assert rows[-1].customer_id == "3904"

    run(tmp_path, scenario, store=store_url)


# --- 200: the test ping; 202 ignored: other event types ---


def test_the_test_ping_is_answered_200_and_not_stored(tmp_path: Path, store_url: str) -> None:
    async def scenario(rx: Running) -> None:
        for body in ({"test": True}, {"test": True, "dispensary_short_name": DISPENSARY}):
            response = await rx.post(body)

            assert response.status_code == 200, (body, response.text)
            assert response.json() == {"status": "ok", "test": True}
        await rx.nothing_stored()

    run(tmp_path, scenario, store=store_url)


def test_other_event_types_are_stored_as_ignored(tmp_path: Path, store_url: str) -> None:
    bodies = [
        {"event_type": "TICKET", "dispensary_short_name": DISPENSARY, "data": {"ticket_id": "T"}},
        {"event_type": "PRODUCT", "data": {"product_id": "P-1"}},
    ]

    async def scenario(rx: Running) -> None:
        for body in bodies:
            response = await rx.post(body)

            assert response.status_code == 202, (body, response.text)
            assert response.json() == {"status": "ignored"}
        rows = await rx.rows(inbox)
        assert [(r.event_type, r.status, r.customer_id) for r in rows] == [
            ("TICKET", "ignored", None),
            ("PRODUCT", "ignored", None),
        ]
        assert [json.loads(r.body) for r in rows] == bodies
        assert await rx.rows(quarantine) == []

    run(tmp_path, scenario, store=store_url)


# --- 401 / 403 / 404: authentication, nothing stored ---


def test_no_bearer_token_is_401(tmp_path: Path, store_url: str) -> None:
    headers = [None, "Basic dG9rOnRvaw==", "Bearer", "Bearer   ", f"Token {TOKEN_A}", TOKEN_A]

    async def scenario(rx: Running) -> None:
        for authorization in headers:
            response = await rx.post(token=None, authorization=authorization)

            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].lower().startswith("bearer")
        await rx.nothing_stored()

    run(tmp_path, scenario, store=store_url)


def test_a_wrong_token_is_403(tmp_path: Path, store_url: str) -> None:
    attempts = [
        (URL, "wrong-token"),
        (URL, OTHER_TOKEN),  # another dispensary's token
        (URL, TOKEN_A + "x"),
        (URL, TOKEN_A[:-1]),
        (URL, TOKEN_A.upper()),
        (OTHER_URL, TOKEN_A),
        (OTHER_URL, TOKEN_B),
    ]

    async def scenario(rx: Running) -> None:
        for path, token in attempts:
            response = await rx.post(path=path, token=token)

            assert_error(response, 403, "forbidden")
        await rx.nothing_stored()

    run(tmp_path, scenario, store=store_url)


def test_an_unknown_dispensary_is_404(tmp_path: Path, store_url: str) -> None:
    async def scenario(rx: Running) -> None:
        for token in (TOKEN_A, None):
            response = await rx.post(path="/webhooks/treez/nosuchstore", token=token)

            assert_error(response, 404, "unknown_dispensary")
        await rx.nothing_stored()

    run(tmp_path, scenario, store=store_url)


def test_a_body_naming_another_dispensary_is_403_and_quarantined(
    tmp_path: Path, store_url: str
) -> None:
    ticket = {"event_type": "TICKET", "dispensary_short_name": OTHER, "data": {}}
    cases = [
        (OTHER_URL, OTHER_TOKEN, DISPENSARY, SEED),
        (URL, TOKEN_A, OTHER, {**SEED, "dispensary_short_name": OTHER}),
        (URL, TOKEN_B, OTHER, ticket),
    ]

    async def scenario(rx: Running) -> None:
        for count, (path, token, named, body) in enumerate(cases, start=1):
            raw = json.dumps(body).encode()
            response = await rx.post(raw, path=path, token=token)

            assert_error(response, 403, "wrong_dispensary")
            assert named in response.json()["detail"]
            rows = await rx.rows(quarantine)
            assert len(rows) == count
            assert rows[-1].dispensary == path.rsplit("/", 1)[1]
            assert rows[-1].status_code == 403
            assert named in rows[-1].reason
            assert rows[-1].body == raw
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url)


# --- 400 / 413 / 415: the body itself ---


def test_a_body_that_is_not_json_is_400_and_quarantined(tmp_path: Path, store_url: str) -> None:
    bodies = [b"{not json", b"", b'{"event_type": "CUSTOMER",', b"\xff\xfe\xfd", b"{'a': 1}"]

    async def scenario(rx: Running) -> None:
        for count, raw in enumerate(bodies, start=1):
            response = await rx.post(raw)

            assert_error(response, 400, "not_json")
            rows = await rx.rows(quarantine)
            assert len(rows) == count, raw
            assert (rows[-1].dispensary, rows[-1].status_code) == (DISPENSARY, 400)
            assert "not JSON" in rows[-1].reason
            assert rows[-1].content_type == "application/json"
            assert rows[-1].body == raw
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url)


def test_a_content_type_other_than_json_is_415_and_quarantined(
    tmp_path: Path, store_url: str
) -> None:
    refused = ["text/plain", None, "application/x-www-form-urlencoded", "application/jsonp"]

    async def scenario(rx: Running) -> None:
        for count, content_type in enumerate(refused, start=1):
            response = await rx.post(content_type=content_type)

            assert_error(response, 415, "unsupported_media_type")
            rows = await rx.rows(quarantine)
            assert len(rows) == count, content_type
            assert (rows[-1].dispensary, rows[-1].status_code) == (DISPENSARY, 415)
            assert "application/json" in rows[-1].reason
            assert rows[-1].content_type == content_type
            assert rows[-1].body == SEED_BYTES
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url)


def _too_large() -> bytes:
    raw = json.dumps(seed_with(notes="x" * 1490)).encode()
    assert MAX_BODY < len(raw) <= 3100
    return raw


def test_a_body_over_the_limit_is_413(tmp_path: Path, store_url: str) -> None:
    raw = _too_large()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 256):
            yield raw[start : start + 256]

    async def scenario(rx: Running) -> None:
        declared = await rx.post(raw)
        chunked = await rx.post(chunks())

        assert "content-length" in declared.request.headers
        assert "content-length" not in chunked.request.headers
        for response in (declared, chunked):
            body = assert_error(response, 413, "too_large")
            assert str(MAX_BODY) in body["detail"]
        assert await rx.rows(inbox) == []
        rows = await rx.rows(quarantine)
        assert [(r.dispensary, r.status_code) for r in rows] == [(DISPENSARY, 413)] * 2
        assert all(str(MAX_BODY) in r.reason for r in rows)
        assert [r.body for r in rows] == [raw[:MAX_BODY]] * 2  # the first bytes are kept

    run(tmp_path, scenario, store=store_url)


# --- 422: JSON, but not a CUSTOMER event of the expected shape ---

INVALID_EVENTS: list[tuple[str, Any, str]] = [
    ("event_type missing", envelope_without("event_type"), "event_type"),
    ("event_type empty", {**SEED, "event_type": ""}, "event_type"),
    ("event_type null", {**SEED, "event_type": None}, "event_type"),
    ("data missing", envelope_without("data"), "data"),
    ("data text", {**SEED, "data": "3904"}, "data"),
    ("data list", {**SEED, "data": [SEED["data"]]}, "data"),
    ("data null", {**SEED, "data": None}, "data"),
    ("customer_id missing", seed_with(customer_id=...), "data.customer_id"),
    ("customer_id null", seed_with(customer_id=None), "data.customer_id"),
    ("customer_id empty", seed_with(customer_id=""), "data.customer_id"),
    ("last_update missing", seed_with(last_update=...), "data.last_update"),
    ("last_update text", seed_with(last_update="yesterday"), "data.last_update"),
    ("no offset", seed_with(last_update="2026-04-24T11:38:21.000"), "data.last_update"),
    ("epoch number", seed_with(last_update=1777055901), "data.last_update"),
    ("impossible date", seed_with(last_update="2026-02-30T11:38:21.000-07:00"), "data.last_update"),
    ("opt_out maybe", seed_with(opt_out="maybe"), "data.opt_out"),
    # the other fields the planner's rules stand on: merges, deactivation, identity
    ("status an object", seed_with(status={"a": 1}), "data.status"),
    ("merged ids text", seed_with(merged_customer_ids="1, 2"), "data.merged_customer_ids"),
    (
        "merged into a list",
        seed_with(merged_into_customer_id=["1"]),
        "data.merged_into_customer_id",
    ),
    ("external ids text", seed_with(external_ids="aiq:1"), "data.external_ids"),
    ("an array", [SEED], "body"),
    ("a number", 3904, "body"),
]


def test_an_invalid_event_is_422_with_its_problems_and_quarantined(
    tmp_path: Path, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        for count, (case, body, field) in enumerate(INVALID_EVENTS, start=1):
            raw = json.dumps(body).encode()
            response = await rx.post(raw)

            assert response.status_code == 422, (case, response.text)
            answer = assert_error(response, 422, "invalid_event")
            problems = answer["problems"]
            assert field in [p["field"] for p in problems], (case, answer)
            assert all(isinstance(p["problem"], str) and p["problem"] for p in problems), case
            rows = await rx.rows(quarantine)
            assert len(rows) == count, case
            row = rows[-1]
            assert (row.dispensary, row.status_code) == (DISPENSARY, 422), case
            assert field in row.reason, (case, row.reason)
            assert row.content_type == "application/json"
            assert row.body == raw, case
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url)


OPT_OUT_GUESSES = ["yes", "no", "y", "n", "1", "0", 1, 0, "N/A", " Yes ", "on", 2, 1.5]


@pytest.mark.parametrize("sent", OPT_OUT_GUESSES, ids=repr)
def test_opt_out_other_than_true_false_or_null_is_422_and_quarantined(
    tmp_path: Path, sent: Any, store_url: str
) -> None:
    raw = json.dumps(seed_with(opt_out=sent)).encode()

    async def scenario(rx: Running) -> None:
        response = await rx.post(raw)

        answer = assert_error(response, 422, "invalid_event")
        assert [p["field"] for p in answer["problems"]] == ["data.opt_out"]
        (row,) = await rx.rows(quarantine)
        assert (row.status_code, row.body) == (422, raw)
        assert row.reason.startswith("data.opt_out: ")
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url)


@pytest.mark.parametrize("sent", ["", "  "], ids=repr)
def test_opt_out_empty_text_is_accepted_as_saying_nothing(
    tmp_path: Path, sent: str, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        assert (await rx.post(seed_with(opt_out=sent))).status_code == 202
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "applied"
        lines = await eventually(rx.sink, lambda lines: len(lines) >= 1, "sink")
        assert [line["op"] for line in lines] == ["upsert"]  # no unsubscribe, no subscribe

    run(tmp_path, scenario, store=store_url)


def test_a_wrong_field_outside_the_rules_is_dropped_and_the_consent_change_applied(
    tmp_path: Path, logs: io.StringIO, store_url: str
) -> None:
    """Contract 1 decides the envelope, customer_id and last_update before answering; the
    receiver also checks the fields the rules stand on (consent, merges, status, external
    ids). A wrong value in any other field (a first name that is an object) does not hold up
    the event: the field is left out, as if not sent, and the opt-out goes through."""

    async def scenario(rx: Running) -> None:
        body = seed_with(first_name={"given": "Jules"}, addresses="Inglewood")
        response = await rx.post(body)
        assert response.status_code == 202, response.text
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "applied"
        lines = await eventually(rx.sink, lambda lines: len(lines) == 2, "sink")
        assert [line["op"] for line in lines] == ["upsert", "unsubscribe"]
        assert "first_name" not in lines[0]["fields"]
        assert "city" not in lines[0]["fields"]
        assert lines[0]["fields"]["last_name"] == SEED["data"]["last_name"]
        assert await rx.rows(quarantine) == []
        text = (await rx.client.get("/metrics")).text
        assert samples(text, "connector_fields_dropped_total") == {
            (("dispensary", DISPENSARY), ("field", "addresses")): 1.0,
            (("dispensary", DISPENSARY), ("field", "first_name")): 1.0,
        }

    run(tmp_path, scenario, store=store_url)
    dropped = [
        json.loads(line) for line in logs.getvalue().splitlines() if "fields_dropped" in line
    ]
    assert len(dropped) == 1
    assert dropped[0]["customer_id"] == "3904"
    assert "data.first_name" in dropped[0]["reason"]
    assert "data.addresses" in dropped[0]["reason"]
    assert "jules" not in logs.getvalue().lower()
    assert "inglewood" not in logs.getvalue().lower()


def _with_raw(body: dict[str, Any], marker: str, raw_json: str) -> bytes:
    """``body`` as JSON, with the string ``marker`` replaced by ``raw_json`` (JSON text that
    json.dumps would not write, such as a lone surrogate escape)."""
    text = json.dumps(body)
    assert text.count(json.dumps(marker)) == 1
    return text.replace(json.dumps(marker), raw_json).encode()


def test_defect_11_a_lone_surrogate_outside_the_rules_is_left_out_and_the_opt_out_sent(
    tmp_path: Path, logs: io.StringIO, store_url: str
) -> None:
    """A lone surrogate escape is valid JSON, but no serializer takes the text it makes: in a
    field the rules do not stand on (a value, or a field's name), that field is left out when
    planned, as a wrong field is, and the opt-out in the same body goes through."""
    bodies = [
        _with_raw(seed_with(customer_id="66", first_name="@"), "@", '"Ann\\ud800"'),
        _with_raw(seed_with(customer_id="67", **{"@": 1}), "@", '"first_\\udc00name"').replace(
            b'"first_\\udc00name": 1', b'"first_\\udc00name": "Ann"'
        ),
        _with_raw(
            seed_with(customer_id="68", addresses=[SEED["data"]["addresses"][0], "@"]),
            "@",
            '{"city": "\\udfff"}',
        ),
    ]

    async def scenario(rx: Running) -> None:
        for raw in bodies:
            assert (await rx.post(raw)).status_code == 202
        rows = await settled_inbox(rx, 3)
        assert [(r.customer_id, r.status) for r in rows] == [
            ("66", "applied"),
            ("67", "applied"),
            ("68", "applied"),
        ]
        assert await rx.rows(quarantine) == []
        sent = await eventually(rx.sink, lambda lines: len(lines) == 6, "sink")
        by_customer: dict[str, list[str]] = {}
        for line in sent:
            by_customer.setdefault(line["customer_id"], []).append(line["op"])
        assert by_customer == {c: ["upsert", "unsubscribe"] for c in ("66", "67", "68")}
        upserts = {line["customer_id"]: line["fields"] for line in sent if line["op"] == "upsert"}
        assert "first_name" not in upserts["66"]
        assert upserts["67"]["first_name"] == SEED["data"]["first_name"]
        assert upserts["68"]["city"] == SEED["data"]["addresses"][0]["city"].title()

    run(tmp_path, scenario, store=store_url)
    reasons = [
        json.loads(line)["reason"]
        for line in logs.getvalue().splitlines()
        if "fields_dropped" in line
    ]
    assert len(reasons) == 3
    assert reasons[0].startswith("data.first_name: is not Unicode text")
    assert reasons[1].startswith("data.first_\\udc00name: has a name that is not Unicode text")
    assert reasons[2].startswith("data.addresses[1].city: is not Unicode text")


@pytest.mark.parametrize(
    ("field", "raw_json", "where"),
    [
        ("customer_id", '"39\\ud80004"', "data.customer_id"),
        ("customer_id", '"39\\u00004"', "data.customer_id"),  # PostgreSQL's text takes no NUL
        ("merged_into_customer_id", '"a\\u001fb"', "data.merged_into_customer_id"),
        ("status", '"ACTIVE\\udc00"', "data.status"),
        ("opt_out", '"true\\ud800"', "data.opt_out"),
        ("merged_customer_ids", '["1", "\\ud800"]', "data.merged_customer_ids[1]"),
        ("merged_into_customer_id", '"\\udbff"', "data.merged_into_customer_id"),
        ("external_ids", '{"aiq_contact_id": "a\\ud800"}', "data.external_ids.aiq_contact_id"),
        ("external_ids", '{"other\\ud800": "1"}', "data.external_ids.other\\ud800"),
        # a name of the body's own, as a place: escaped (a NUL in the quarantine's reason
        # failed PostgreSQL's insert, answered 503 for ever, and the body was never kept)
        ("external_ids", '{"a\\u0000b": "\\ud800"}', "data.external_ids.a\\u0000b"),
        ("external_ids", '{"a\\nb": "\\ud800"}', "data.external_ids.a\\u000ab"),
        ("external_ids", '{"other": ' + "[" * 200 + "]" * 200 + "}", "data.external_ids"),
    ],
)
def test_defect_11_a_lone_surrogate_or_deep_nesting_in_a_rule_field_is_422(
    tmp_path: Path, field: str, raw_json: str, where: str, store_url: str
) -> None:
    """In a field the rules stand on, nothing is left out: the body is refused before the
    answer, naming the path (a customer id that is not text once answered 503 and failed
    the commit of every event in its batch)."""
    raw = _with_raw(seed_with(**{field: "@"}), "@", raw_json)

    async def scenario(rx: Running) -> None:
        answer = assert_error(await rx.post(raw), 422, "invalid_event")
        assert [p["field"] for p in answer["problems"]] == [where]
        (row,) = await rx.rows(quarantine)
        assert (row.status_code, row.body) == (422, raw)
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url, max_body=16_384)


def test_defect_11_an_unknown_field_nested_too_deep_is_left_out_and_the_opt_out_sent(
    tmp_path: Path,
    store_url: str,
) -> None:
    """256 levels of nesting are valid JSON that pydantic keeps in an unknown field and cannot
    serialize: the field is left out when planned; the customer and its opt-out are sent."""
    bodies = [
        _with_raw(seed_with(customer_id="70", unknown="@"), "@", "[" * 256 + "]" * 256),
        _with_raw(seed_with(customer_id="71", unknown="@"), "@", '{"a": ' * 256 + "1" + "}" * 256),
        _with_raw(seed_with(customer_id="72", caregiver_details="@"), "@", "[" * 129 + "]" * 129),
    ]

    async def scenario(rx: Running) -> None:
        for raw in bodies:
            assert (await rx.post(raw)).status_code == 202
        rows = await settled_inbox(rx, 3)
        assert [r.status for r in rows] == ["applied"] * 3
        assert await rx.rows(quarantine) == []
        sent = await eventually(rx.sink, lambda lines: len(lines) == 6, "sink")
        assert sorted((line["customer_id"], line["op"]) for line in sent) == sorted(
            (c, op) for c in ("70", "71", "72") for op in ("upsert", "unsubscribe")
        )

    run(tmp_path, scenario, store=store_url, max_body=16_384)


def test_a_stored_event_the_customer_model_refuses_is_quarantined_when_planned(
    tmp_path: Path,
    store_url: str,
) -> None:
    """The receiver refuses a body whose merge fields are wrong with 422; one already in the
    inbox (stored by an older version, or by hand) is marked failed when planned and kept in
    quarantine with its problems, never applied."""

    async def scenario(rx: Running) -> None:
        raw = json.dumps(seed_with(merged_into_customer_id=["1"], customer_id="77"))
        assert (await rx.post(raw.encode())).status_code == 422
        store = rx.service.astore.store
        await rx.service.astore.call(
            store.add_events,
            [NewEvent(DISPENSARY, "webhook", "CUSTOMER", "77", SEED_LAST_UPDATE_US, raw)],
        )
        rx.service.wake_processor()
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "failed"
        refused = await eventually(lambda: rx.rows(quarantine), lambda r: len(r) == 2, "quarantine")
        kept = refused[1]
        assert (kept.dispensary, kept.status_code) == (DISPENSARY, 422)
        assert kept.reason.startswith("refused when planned (webhook): ")
        assert "data.merged_into_customer_id" in kept.reason
        assert kept.body == raw.encode()
        assert await rx.rows(outbox) == []
        # the next good event of the same customer is applied as usual
        assert (await rx.post(seed_with(customer_id="77"))).status_code == 202
        rows = await settled_inbox(rx, 2)
        assert rows[1].status == "applied"

    run(tmp_path, scenario, store=store_url)


# --- 503: the store cannot take the write ---


@contextlib.contextmanager
def write_lock(database: Path, *, pending_event: bytes | None = None) -> Iterator[None]:
    """Hold SQLite's write lock on ``database`` from another connection.

    ``pending_event``: first commit it to the inbox as a pending event, and take the lock
    again at once, so that the planner has something to write while the lock is held (with
    nothing pending it reads and takes no lock)."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as conn:
        if pending_event is not None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO inbox (dispensary, source, event_type, customer_id,"
                " last_update_us, received_at, body, status)"
                " VALUES (?, 'webhook', 'CUSTOMER', ?, ?, ?, ?, 'pending')",
                (DISPENSARY, "3904", SEED_LAST_UPDATE_US, time.time(), pending_event.decode()),
            )
            conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")


def test_a_locked_store_is_503_with_retry_after_and_a_retry_is_202(tmp_path: Path) -> None:
    """SQLite only: its write lock held by another connection."""
    ticket = {"event_type": "TICKET", "dispensary_short_name": DISPENSARY, "data": {}}

    async def scenario(rx: Running) -> None:
        with write_lock(rx.folder / "connector.db"):
            answers = await asyncio.gather(rx.post(), rx.post(ticket))
        for response in answers:
            assert_error(response, 503, "store_unavailable")
            assert response.headers["retry-after"].isdigit()
            assert int(response.headers["retry-after"]) > 0
        await rx.nothing_stored()  # neither was committed

        retry = await rx.post()
        assert retry.status_code == 202, retry.text
        (row,) = await rx.rows(inbox)
        assert (row.customer_id, row.body) == ("3904", SEED_BYTES.decode())

    run(tmp_path, scenario, store_timeout=0.2)


@contextlib.contextmanager
def pg_table_lock(url: str, table: str) -> Iterator[None]:
    """PostgreSQL: ``table`` locked by another connection (no reader or writer gets in)."""
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


@pytest.mark.postgresql_only
def test_a_locked_postgresql_store_is_503_with_retry_after_and_a_retry_is_202(
    tmp_path: Path, store_url: str
) -> None:
    """The receiver waits for a locked inbox no longer than ``store_timeout_seconds``: the
    sender is told to come back (503), not left hanging."""

    async def scenario(rx: Running) -> None:
        with pg_table_lock(store_url, "inbox"):
            response = await asyncio.wait_for(rx.post(), 10.0)
            assert_error(response, 503, "store_unavailable")
            assert int(response.headers["retry-after"]) > 0
        retry = await rx.post()
        assert retry.status_code == 202, retry.text
        (row,) = await rx.rows(inbox)
        assert (row.customer_id, row.body) == ("3904", SEED_BYTES.decode())

    run(tmp_path, scenario, store=store_url, store_timeout=0.5)


@contextlib.contextmanager
def store_locked(store_url: str, pending_event: bytes) -> Iterator[None]:
    """The store locked by another connection, once it holds ``pending_event`` (so that the
    planner has something to write): SQLite's write lock (:func:`write_lock`); on PostgreSQL
    the tables the receiver, the planner and a delivery worker write."""
    if store_url.startswith("sqlite"):
        database = Path(store_url.removeprefix("sqlite:///"))
        with write_lock(database, pending_event=pending_event):
            yield
        return
    import psycopg

    with psycopg.connect(store_url) as conn:
        conn.execute(
            "INSERT INTO inbox (dispensary, source, event_type, customer_id, last_update_us,"
            " received_at, body, status) VALUES (%s, 'webhook', 'CUSTOMER', %s, %s, %s, %s,"
            " 'pending')",
            (DISPENSARY, "3904", SEED_LAST_UPDATE_US, time.time(), pending_event.decode()),
        )
        conn.commit()
        conn.execute("LOCK TABLE inbox, outbox, locks IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


def test_the_pipeline_recovers_once_a_locked_store_is_released(
    tmp_path: Path, store_url: str
) -> None:
    """The planner and the delivery worker meet the lock too: they must carry on, not die."""

    async def scenario(rx: Running) -> None:
        failed: set[str] = set()

        def recording(store_call: Callable[..., Any]) -> Callable[..., Any]:
            async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
                try:
                    return await store_call(fn, *args, **kwargs)
                except StoreUnavailable:
                    failed.add(getattr(fn, "__name__", repr(fn)))
                    raise

            return call

        async def failures() -> set[str]:
            return set(failed)

        # the workers' lane and the planner's lane (a thread each)
        for lane in (rx.service.astore, rx.service.planner_lane):
            lane.call = recording(lane.call)  # type: ignore[method-assign]
        with store_locked(store_url, SEED_BYTES):
            assert (await rx.post()).status_code == 503
            # hold the lock until the planner and the worker have each been refused a write
            await eventually(
                failures,
                # the worker's first write is its lease on the destination (acquire)
                lambda f: (
                    "process_batch" in f and bool(f & {"acquire", "claim", "next_due", "finish"})
                ),
                "store calls refused",
            )

        assert (await rx.post()).status_code == 202
        ready = await eventually(rx.readiness, lambda r: r[0] == 200, "readyz")
        assert ready == (200, {"status": "ready"})
        first, second = await settled_inbox(rx, 2)  # the same event twice
        assert (first.status, second.status) == ("applied", "duplicate")
        await eventually(rx.sink, lambda lines: len(lines) == 2, "sink")

    run(tmp_path, scenario, store=store_url, store_timeout=0.2)


# --- encodings: never a 500, never a 202 that cannot be applied ---


def test_a_utf16_body_is_refused_not_a_server_error(tmp_path: Path, store_url: str) -> None:
    raw = json.dumps({"event_type": "TICKET", "data": {}}).encode("utf-16")

    async def scenario(rx: Running) -> None:
        response = await rx.post(raw)

        assert_error(response, 400, "not_json")
        (row,) = await rx.rows(quarantine)
        assert (row.status_code, row.body) == (400, raw)

    run(tmp_path, scenario, store=store_url)


def test_json_the_parsers_refuse_in_an_ignored_field_is_400_not_202(
    tmp_path: Path, store_url: str
) -> None:
    # msgspec (the quick check) would skip both; Python's parsers refuse a number past 4,300
    # digits and nesting past the recursion limit, so planning could never read the event
    seed = SEED_BYTES.rstrip()[:-1]
    bodies = [
        seed + b', "extra": ' + b"7" * 4301 + b"}",
        seed + b', "extra": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    ]

    async def scenario(rx: Running) -> None:
        for raw in bodies:
            response = await rx.post(raw)

            assert_error(response, 400, "not_json")
        assert [row.body for row in await rx.rows(quarantine)] == bodies
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario, store=store_url, max_body=16_384)


def test_a_body_with_a_byte_order_mark_is_refused_or_applied(
    tmp_path: Path, store_url: str
) -> None:
    raw = codecs.BOM_UTF8 + SEED_BYTES

    async def scenario(rx: Running) -> None:
        response = await rx.post(raw)

        if response.status_code == 400:
            assert_error(response, 400, "not_json")
            (row,) = await rx.rows(quarantine)
            assert row.body == raw
            return
        assert response.status_code == 202, response.text
        (row,) = await settled_inbox(rx, 1)
        assert row.status == "applied"  # accepted must mean it will be applied

    run(tmp_path, scenario, store=store_url)


# --- health, readiness, metrics, OpenAPI ---


def test_a_dead_commit_thread_makes_the_receiver_unready_and_answer_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite only: the commit thread's InboxWriter fails to open."""

    def no_writer(self: Any) -> Any:
        raise OSError("no file handles left")

    monkeypatch.setattr("connector.store.sqlite.SqliteStore.inbox_writer", no_writer)

    async def scenario(rx: Running) -> None:
        _, body = await eventually(rx.readiness, lambda r: r[0] == 503, "readiness")
        assert "committer stopped" in body["problems"]
        response = await rx.post()
        assert_error(response, 503, "store_unavailable")
        assert response.headers["retry-after"] == "5"
        assert await rx.rows(inbox) == []

    run(tmp_path, scenario)


def test_healthz_and_readyz(tmp_path: Path) -> None:
    async def scenario() -> None:
        service = Service(load_config(write_config(tmp_path)), idle_poll=0.05)
        app = create_app(service)
        transport = httpx.ASGITransport(app=app)
        running = False
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            try:
                before = await client.get("/readyz")
                assert before.status_code == 503, "not ready before the workers run"
                assert before.json()["status"] == "not_ready"
                running = True
                async with service.lifespan(app):
                    health = await client.get("/healthz")
                    ready = await client.get("/readyz")
            finally:
                if not running:
                    service.astore.close()
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

    asyncio.run(scenario())


_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.MULTILINE)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for match in _SAMPLE.finditer(text):
        if match["name"] == name:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match["labels"])))
            out[labels] = float(match["value"])
    return out


def test_metrics_count_events_by_outcome(tmp_path: Path, store_url: str) -> None:
    async def scenario(rx: Running) -> None:
        assert (await rx.post()).status_code == 202
        assert (await rx.post({"test": True})).status_code == 200
        assert (await rx.post({"event_type": "TICKET", "data": {}})).status_code == 202
        assert (await rx.post(token=None)).status_code == 401
        assert (await rx.post(token="wrong")).status_code == 403
        assert (await rx.post(seed_with(opt_out="maybe"))).status_code == 422
        assert (await rx.post(b"nope")).status_code == 400
        assert (await rx.post(content_type="text/plain")).status_code == 415

        response = await rx.client.get("/metrics")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        received = samples(text, "connector_events_received_total")
        for outcome in (
            "accepted",
            "ping",
            "ignored",
            "rejected_401",
            "rejected_403",
            "rejected_422",
            "rejected_400",
            "rejected_415",
        ):
            key = (("dispensary", DISPENSARY), ("outcome", outcome))
            assert received.get(key) == 1.0, (outcome, received)
        assert "# TYPE connector_queue_depth gauge" in text

    run(tmp_path, scenario, store=store_url)


def test_metrics_queue_depth_follows_the_store(tmp_path: Path, store_url: str) -> None:
    """The gauge is read from the store at each scrape, so it drops back once work is done."""

    def add_waiting_operation(store: Any) -> None:
        now = time.time()
        with store.transaction() as conn:
            conn.execute(
                insert(outbox).values(
                    dispensary=OTHER,
                    destination="sink",
                    order_key="c-1",
                    customer_id="c-1",
                    op="upsert",
                    payload="{}",
                    idempotency_key="k-1",
                    status="pending",
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now + 3600,
                )
            )

    def finish_it(store: Any) -> None:
        with store.transaction() as conn:
            conn.execute(update(outbox).values(status="done", done_at=time.time()))

    async def scenario(rx: Running) -> None:
        astore = rx.service.astore
        key = (("destination", "sink"), ("dispensary", OTHER))
        await astore.call(add_waiting_operation, astore.store)
        waiting = samples((await rx.client.get("/metrics")).text, "connector_queue_depth")
        assert waiting.get(key) == 1.0, waiting

        await astore.call(finish_it, astore.store)
        after = samples((await rx.client.get("/metrics")).text, "connector_queue_depth")
        assert after.get(key, 0.0) == 0.0, after

    run(tmp_path, scenario, store=store_url)


def _waiting_operation(store: Any) -> None:
    """One operation for OTHER's sink, due in an hour: it stays pending."""
    now = time.time()
    with store.transaction() as conn:
        conn.execute(
            insert(outbox).values(
                dispensary=OTHER,
                destination="sink",
                order_key="c-1",
                customer_id="c-1",
                op="upsert",
                payload="{}",
                idempotency_key="k-1",
                status="pending",
                attempts=0,
                created_at=now,
                next_attempt_at=now + 3600,
            )
        )


def test_two_replicas_on_one_store_are_ready_and_show_the_clusters_queues(tmp_path: Path) -> None:
    """Two ``serve`` replicas on one store: the first delivers (holds every lease), the second
    holds none and is ready all the same; each /metrics shows the cluster's queues and its
    own replica id; ``connector status`` names the replica that delivers and both processes."""
    config = load_config(write_config(tmp_path))
    keys = [(("destination", "sink"), ("dispensary", d)) for d in (DISPENSARY, OTHER)]

    async def scrape(client: httpx.AsyncClient, name: str) -> dict[Any, float]:
        return samples((await client.get("/metrics")).text, name)

    first, second = Service(config, idle_poll=0.05), Service(config, idle_poll=0.05)

    async def lease_requests() -> list[float]:  # when each worker last asked (monotonic)
        return [worker._lease_checked for worker in second.workers.values()]

    async def scenario() -> None:
        apps = create_app(first), create_app(second)
        async with (
            first.lifespan(apps[0]),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[0]), base_url="http://a") as a,
        ):
            await eventually(
                lambda: scrape(a, "connector_delivery_lease"),
                lambda found: all(found.get(k) == 1.0 for k in keys),
                "the first replica's leases",
            )
            async with (
                second.lifespan(apps[1]),
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=apps[1]), base_url="http://b"
                ) as b,
            ):
                # once each of its workers has asked for its lease (and been refused)
                await eventually(
                    lease_requests, lambda checked: all(c >= 0 for c in checked), "requests"
                )
                ready = await b.get("/readyz")
                assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
                assert await scrape(b, "connector_delivery_lease") == dict.fromkeys(keys, 0.0)

                await first.astore.call(_waiting_operation, first.astore.store)
                for client in (a, b):
                    depth = await scrape(client, "connector_queue_depth")
                    assert depth.get(keys[1]) == 1.0, depth
                replicas = [
                    dict(labels)["replica"]
                    for client in (a, b)
                    for labels in await scrape(client, "connector_replica_info")
                ]
                assert replicas == [first.replica, second.replica]

                status = await asyncio.to_thread(status_lines, config)
                delivered = [line for line in status if "delivered by:" in line]
                assert len(delivered) == 2
                assert all(f"delivered by: {first.replica} (" in line for line in delivered)
                assert "processes: 2" in status
                listed = status[status.index("processes: 2") + 1 :]
                assert sorted(line.split()[0] for line in listed) == sorted(replicas)

    asyncio.run(scenario())


def test_the_receiver_role_builds_no_planner_reconciler_or_workers(tmp_path: Path) -> None:
    """Planning, delivery and reconciliation run in the pipeline process, and only there."""
    service = Service(load_config(write_config(tmp_path)), role="receiver")
    try:
        assert service.processor is None
        assert service.planner_lane is None
        assert service.reconciler is None
        assert service.workers == {}
        assert service.child is not None
    finally:
        service.astore.close()


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            assert isinstance(node, dict), f"{ref} does not resolve"
            assert part in node, f"{ref} does not resolve"
            node = node[part]
        schema = node
    return schema


def test_the_openapi_document_describes_the_webhook_body(tmp_path: Path, store_url: str) -> None:
    async def scenario(rx: Running) -> None:
        response = await rx.client.get("/openapi.json")

        assert response.status_code == 200
        document = response.json()
        operation = document["paths"]["/webhooks/treez/{dispensary}"]["post"]
        assert "components" not in operation, "components belong at the document's top level"
        body = operation["requestBody"]
        assert body["required"] is True
        kinds = body["content"]["application/json"]["schema"]["anyOf"]
        schema = _resolve(document, kinds[0])
        assert schema["title"] == "CustomerEvent"
        assert [_resolve(document, kind)["title"] for kind in kinds[1:]] == [
            "OtherEvent",
            "TestPing",
        ]
        assert {"event_type", "data"} <= set(schema["properties"])
        assert {"event_type", "data"} <= set(schema["required"])
        data = _resolve(document, schema["properties"]["data"])
        assert {"customer_id", "last_update", "opt_out"} <= set(data["properties"])
        assert {"customer_id", "last_update"} <= set(data["required"])
        assert {"202", "401", "403", "413", "415", "422", "503"} <= set(operation["responses"])
        assert operation["responses"]["202"]["content"]["application/json"]["schema"]

    run(tmp_path, scenario, store=store_url)


# --- privacy: one request line each, and no customer value in any log line ---


def test_logs_hold_one_line_per_request_and_no_customer_value(
    tmp_path: Path, logs: io.StringIO, store_url: str
) -> None:
    async def scenario(rx: Running) -> None:
        assert (await rx.post()).status_code == 202
        assert (await rx.post(seed_with(opt_out="maybe"), token=TOKEN_B)).status_code == 422
        await eventually(rx.sink, lambda lines: len(lines) == 2, "sink")
        await eventually(
            lambda: rx.rows(outbox),
            lambda ops: len(ops) == 2 and all(o.status == "done" for o in ops),
            "outbox",
        )

    run(tmp_path, scenario, store=store_url)

    text = logs.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines, "nothing was logged"
    lowered = text.lower()
    for word in PII_WORDS:
        assert word not in lowered, word
    for line in lines:
        # timestamps and durations are digits of our own that may contain "90301" by chance
        rendered = json.dumps({k: v for k, v in line.items() if k not in ("timestamp",)})
        rendered = re.sub(r'"duration_ms": [0-9.e+-]+', "", rendered)
        for value in PII_VALUES:
            assert value not in rendered, (value, line)

    requests = [line for line in lines if line.get("event") == "webhook"]
    assert len(requests) == 2, requests
    accepted, refused = requests
    assert accepted["dispensary"] == refused["dispensary"] == DISPENSARY
    assert (accepted["status_code"], accepted["customer_id"]) == (202, "3904")
    assert refused["status_code"] == 422
    assert "customer_id" in refused
    for line in requests:
        assert isinstance(line["duration_ms"], int | float)
        assert line["duration_ms"] >= 0
    assert (accepted["level"], refused["level"]) == ("debug", "info")
    assert any(line.get("event") == "delivered" for line in lines)


# --- defect 11: whatever is answered 202 is planned ---

_LONE_SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
_hostile_text = st.one_of(
    st.text(max_size=6),
    st.builds("{}{}{}".format, st.text(max_size=3), _LONE_SURROGATES, st.text(max_size=3)),
    st.sampled_from(
        [
            "N/A",
            "",
            " ",
            "true",
            "false",
            "\ud83d\ude00",  # a pair: escaped, a valid character; raw, no UTF-8
            "2000-01-01 00:00:00.000",
            "2026-04-24T11:38:21.000-07:00",
            "1948-02-12",
            "\x00",
            "+1 (310) 555-0100",
        ]
    ),
)
# JSON number tokens json.dumps never writes, put in place of their marker after dumping
_RAW_TOKENS = [
    "1e999",
    "-1e999",
    "1E+2",
    "-0",
    "NaN",
    "-Infinity",
    "7" * 4300,
    "7" * 4301,
    "0.1e-999",
    "123456789012345678901234567890",
]
_raw_numbers = st.sampled_from(range(len(_RAW_TOKENS))).map("\x01raw{}\x01".format)


def _nested(depth: int, leaf: Any, as_list: bool) -> Any:
    for _ in range(depth):
        leaf = [leaf] if as_list else {"k": leaf}
    return leaf


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(),
    _hostile_text,
    _raw_numbers,
)
_deep = st.builds(
    _nested, st.integers(100, 1100), st.one_of(st.just(1), _LONE_SURROGATES), st.booleans()
)
_hostile_values = st.one_of(
    st.recursive(
        _scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(_hostile_text, inner, max_size=3)
        ),
        max_leaves=8,
    ),
    _deep,
)
# where a hostile value goes: every field of the seed (and some inside its objects and lists),
# new fields, a field whose name is not text, and the envelope
_DATA_PLACES: list[tuple[str | int, ...]] = [
    *((name,) for name in SEED["data"]),
    ("addresses", 0, "city"),
    ("addresses", 0, "primary"),
    ("addresses", 1),
    ("verification_reasons", 0, "verification_reason"),
    ("external_ids", "aiq_contact_id"),
    ("external_ids", "other_id"),
    ("merged_customer_ids", 0),
    ("customer_groups", 0),
    ("new_field",),
    ("new\udc00field",),
]
_ENVELOPE_PLACES: list[tuple[str | int, ...]] = [
    ("event_type",),
    ("dispensary_short_name",),
    ("extra",),
    ("ex\ud800tra",),
]


def _put(target: Any, place: tuple[str | int, ...], value: Any) -> None:
    for step in place[:-1]:
        if isinstance(target, dict) and isinstance(target.get(step), dict | list):
            target = target[step]  # type: ignore[index]
        elif isinstance(target, list) and isinstance(step, int) and step < len(target):
            target = target[step]
        else:
            return
    last = place[-1]
    if isinstance(target, dict):
        target[last] = value
    elif isinstance(target, list) and isinstance(last, int):
        target[last : last + 1] = [value]


@st.composite
def hostile_bodies(draw: st.DrawFn) -> bytes:
    """The seed with hostile values in some places, as bytes a client could send."""
    body = copy.deepcopy(SEED)
    for place in draw(st.lists(st.sampled_from(_DATA_PLACES), min_size=1, max_size=4)):
        _put(body["data"], place, draw(_hostile_values))
    if draw(st.integers(0, 7)) == 0:
        _put(body, draw(st.sampled_from(_ENVELOPE_PLACES)), draw(_hostile_values))
    ascii_only = draw(st.booleans())
    try:
        text = json.dumps(body, ensure_ascii=ascii_only)
    except RecursionError:
        text = json.dumps({**body, "data": {**body["data"], "new_field": 1}})
    for index, token in enumerate(_RAW_TOKENS):
        for marker in (f'"\\u0001raw{index}\\u0001"', f'"\x01raw{index}\x01"'):
            text = text.replace(marker, token)
    # a lone surrogate as such is no UTF-8: encoded anyway, it is what a sloppy client sends
    return text.encode("utf-8", "surrogatepass")


def _shipped_specs(**options: Any) -> list[DestinationSpec]:
    return [
        DestinationSpec(path.stem, load_mapping(path), **options)
        for path in sorted((ROOT / "mappings").glob("*.yaml"))
    ]


# the shipped mappings, as plain destinations and as ones that resubscribe, match external
# ids and carry the mapped contact in consent calls
SPEC_SETS = [
    _shipped_specs(),
    _shipped_specs(
        policy=PolicyConfig(resubscribe="on_source_opt_in"),
        native_merge=False,
        external_id_key="aiq_contact_id",
        consent_fields=True,
    ),
]


def _plan_as_the_pipeline_does(stored: str) -> int:
    """Plan a stored event as the pipeline does, against no state and against an opted-out,
    unsubscribed one; store each operation body as the store does. The fields left out."""
    event, dropped = parse_stored_event(stored)
    if not isinstance(event, CustomerEvent):
        return len(dropped)
    customer = event.customer
    opted_out = CustomerState(
        customer.customer_id,
        last_update_us=0,
        opt_out=True,
        contacts={
            path.stem: ContactState("c-1", "h", unsubscribed=True)
            for path in (ROOT / "mappings").glob("*.yaml")
        },
    )
    for specs in SPEC_SETS:
        for states in ({}, {customer.customer_id: opted_out}):
            planned = plan(customer, DISPENSARY, states, specs, digest=content_hash(customer))
            for operation in planned.operations:
                # connector/store/inbox.py writes each body so, into a UTF-8 text column
                payload = json.dumps(operation.body, separators=(",", ":"), ensure_ascii=False)
                payload.encode("utf-8")
    return len(dropped)


def test_defect_11_every_hostile_body_answered_202_is_planned(
    tmp_path: Path, store_url: str
) -> None:
    """Lone surrogates (in values and names, at any depth), deep nesting, big numbers and odd
    types in every field of the seed: each body the real receiver answers 202 is planned
    from its stored text, with the shipped mappings, without an exception; the pipeline
    running behind the receiver refuses none of them either."""
    config = write_config(tmp_path, store=store_url, max_body=1 << 20)
    service = Service(load_config(config), idle_poll=0.05)
    app = create_app(service)
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    seen = {"accepted": 0, "accepted_with_fields_left_out": 0, "refused": 0}

    async def start() -> httpx.AsyncClient:
        await stack.enter_async_context(service.lifespan(app))
        transport = httpx.ASGITransport(app=app)
        return await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver")
        )

    async def last_stored() -> Any:
        store = service.astore.store
        query = select(inbox).order_by(inbox.c.id.desc()).limit(1)
        return (await service.astore.call(store.query, query))[0]

    try:
        rx = Running(service, loop.run_until_complete(start()), tmp_path)

        @given(raw=hostile_bodies())
        @settings(
            max_examples=400,
            deadline=None,
            database=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.function_scoped_fixture,
            ],
        )
        def check(raw: bytes) -> None:
            response = loop.run_until_complete(rx.post(raw))
            assert response.status_code != 500, response.text
            if response.status_code != 202:
                assert 400 <= response.status_code < 500, response.text
                seen["refused"] += 1
                return
            row = loop.run_until_complete(last_stored())
            assert row.body == raw.decode("utf-8")
            seen["accepted"] += 1
            if _plan_as_the_pipeline_does(row.body):
                seen["accepted_with_fields_left_out"] += 1

        check()
        assert all(seen.values()), seen  # the bodies reached every outcome
        settled = eventually(
            lambda: rx.rows(inbox), lambda rows: all(r.status != "pending" for r in rows), "inbox"
        )
        rows = loop.run_until_complete(settled)
        refused = [q.reason for q in loop.run_until_complete(rx.rows(quarantine))]
        assert [r for r in refused if r.startswith("refused when planned")] == []
        assert [r.id for r in rows if r.status == "failed"] == []
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
