"""The OpenAPI document tells the truth (issue #16): schemathesis generates requests from
``/openapi.json`` and holds each answer to it (no server error; a declared status, media type,
headers and body schema).

First against the ASGI app over a real SQLite store (test_receiver's harness: the real
service, its committer and pipeline), on a loop of this test's own so the service's lifespan
spans every request; then once against a running ``connector serve`` (real uvicorn, real
sockets), where the raw-socket cases of the HTTP layer this module's receiver answers are
checked too (codings, a trailing slash). The answers schemathesis rarely or never reaches
(the ping, not JSON, too large, a wrong content type, the store unavailable, ``/readyz`` 503)
are made on purpose and held to the same document.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_e2e import Procs, start_server
from test_receiver import (
    DISPENSARY,
    MAX_BODY,
    OTHER_TOKEN,
    SEED,
    SEED_BYTES,
    TOKEN_A,
    TOKEN_B,
    eventually,
    write_config,
)

from connector.config import load_config
from connector.receiver import create_app
from connector.service import Service
from connector.store.schema import inbox, quarantine

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# a 503 said on purpose (the store unavailable) is declared; not_a_server_error counts any 5xx
CONFORMANCE = CHECKS[1:]
WEBHOOK = "/webhooks/treez/{dispensary}"
BASE = "http://testserver"

# Who sends: mostly a valid token, so that the deep paths (the body's checks, the store) are
# reached; also none, a wrong one, another dispensary's, another scheme, and whatever
# schemathesis itself generated (its negative cases send odd Authorization headers).
KEEP = "keep the generated header"
AUTHORIZATIONS = [f"Bearer {TOKEN_A}"] * 5 + [
    f"Bearer {TOKEN_B}",
    None,
    "Bearer not-the-token",
    f"Bearer {OTHER_TOKEN}",
    f"Basic {TOKEN_A}",
    KEEP,
]


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same examples on every run: CI stays stable
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


class App:
    """The ASGI app over a started service, driven from a loop of its own."""

    def __init__(self, folder: Path, **config: Any) -> None:
        self.folder = folder
        self.service = Service(load_config(write_config(folder, **config)), idle_poll=0.05)
        self.app = create_app(self.service)
        self.loop = asyncio.new_event_loop()
        self.stack = contextlib.AsyncExitStack()

    def __enter__(self) -> App:
        async def start() -> httpx.AsyncClient:
            await self.stack.enter_async_context(self.service.lifespan(self.app))
            transport = httpx.ASGITransport(app=self.app)
            return await self.stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url=BASE)
            )

        self.client = self.loop.run_until_complete(start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(self.stack.aclose())
        self.loop.close()

    def schema(self) -> schemathesis.BaseSchema:
        document = self.loop.run_until_complete(self.client.get("/openapi.json")).json()
        return schemathesis.openapi.from_dict(document)

    def send(self, case: schemathesis.Case, authorization: str | None = KEEP) -> httpx.Response:
        """``case`` as schemathesis would send it, its Authorization as given; the answer is
        held to the document."""
        prepared = requests.Request(**case.as_transport_kwargs(base_url=BASE)).prepare()
        headers = {k: v for k, v in prepared.headers.items() if k.lower() != "content-length"}
        if authorization != KEEP:
            headers.pop("Authorization", None)
            if authorization is not None:
                headers["Authorization"] = authorization
        body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
        assert prepared.method is not None
        assert prepared.url is not None
        response = self.loop.run_until_complete(
            self.client.request(prepared.method, prepared.url, headers=headers, content=body)
        )
        case.validate_response(response, checks=CHECKS, headers=headers)
        return response

    def rows(self, table: Any) -> list[Any]:
        from sqlalchemy import select

        store = self.service.astore.store
        query = select(table).order_by(table.c.id)
        return self.loop.run_until_complete(self.service.astore.call(store.query, query))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with App(tmp_path) as running:
        yield running


def _webhook_cases(
    schema: schemathesis.BaseSchema,
) -> Callable[[st.DataObject], schemathesis.Case]:
    """Draws a case: positive or negative for the configured dispensary (nine in ten), or a
    positive one for whatever dispensary name schemathesis makes up."""
    operation = schema[WEBHOOK]["POST"]
    ours = {"dispensary": DISPENSARY}
    kinds = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.POSITIVE, path_parameters=ours),
        operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=ours),
    ]

    def draw(data: st.DataObject) -> schemathesis.Case:
        which = data.draw(st.integers(0, 9), label="kind")
        case: schemathesis.Case = data.draw(kinds[0 if which == 0 else 1 + which % 2])
        return case

    return draw


def test_the_webhook_answers_as_its_document_says(app: App) -> None:
    """600 generated requests on the webhook POST, with and without a valid token: each
    answer is declared, with its media type, headers and body schema; no 5xx."""
    schema = app.schema()
    seen: Counter[int] = Counter()

    cases = _webhook_cases(schema)

    @given(data=st.data(), authorization=st.sampled_from(AUTHORIZATIONS))
    @_settings(600)
    def check(data: st.DataObject, authorization: str | None) -> None:
        seen[app.send(cases(data), authorization).status_code] += 1

    check()
    print("answers by status", dict(seen))  # shown when the test fails
    assert sum(seen.values()) >= 500, seen
    # the generated requests reached the refusals and the store, not only the first check
    assert {200, 202, 400, 401, 403, 404, 422} <= set(seen), seen
    accepted = [r for r in app.rows(inbox) if r.source == "webhook"]
    assert len(accepted) == seen[202]


def _case(app: App, body: Any = None, *, path: str = WEBHOOK, method: str = "POST") -> Any:
    operation = app.schema()[path][method]
    if method == "GET":
        return operation.Case()
    return operation.Case(
        path_parameters={"dispensary": DISPENSARY}, body=body, media_type="application/json"
    )


def _raw(
    app: App, case: Any, content: bytes, checks: list[Any] = CHECKS, **headers: str
) -> httpx.Response:
    """``content`` posted as sent (schemathesis would serialise a body), held to the document."""
    sent = {"authorization": f"Bearer {TOKEN_A}", "content-type": "application/json", **headers}
    url = BASE + case.formatted_path
    response = app.loop.run_until_complete(app.client.post(url, content=content, headers=sent))
    case.validate_response(response, checks=checks, headers=sent)
    return response


def test_the_answers_generated_requests_rarely_reach_are_declared_too(app: App) -> None:
    """The ping (200), not JSON (400), too large (413), another content type or a coding
    (415), a body naming another dispensary (403), a shape the rules refuse (422): each
    answer is held to the document's status, media type, headers and schema."""
    case = _case(app)
    ping = {"test": True, "dispensary_short_name": DISPENSARY}
    wrong = copy.deepcopy(SEED)
    wrong["dispensary_short_name"] = "elsewhere"
    answers = {
        200: _raw(app, case, json.dumps(ping).encode()),
        202: _raw(app, case, SEED_BYTES),
        400: _raw(app, case, b"{not json"),
        403: _raw(app, case, json.dumps(wrong).encode()),
        413: _raw(app, case, b" " * (MAX_BODY + 1)),
        415: _raw(app, case, SEED_BYTES, **{"content-type": "text/plain"}),
        422: _raw(app, case, b'{"event_type": "CUSTOMER", "data": {}}'),
    }
    coded = _raw(app, case, SEED_BYTES, **{"content-encoding": "gzip"})
    for status, response in {**answers, 415.1: coded}.items():
        assert response.status_code == int(status), (status, response.text)
    assert answers[200].json() == {"status": "ok", "test": True}
    assert answers[422].json()["problems"]


def test_a_store_that_cannot_commit_is_503_and_readyz_says_so_as_declared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit thread cannot open its writer (as test_receiver's dead committer): the
    webhook's 503 with Retry-After and /readyz's 503 match the document."""

    def no_writer(self: Any) -> Any:
        raise OSError("no file handles left")

    monkeypatch.setattr("connector.store.sqlite.SqliteStore.inbox_writer", no_writer)
    with App(tmp_path) as app:
        ready = _case(app, path="/readyz", method="GET")

        async def readiness() -> httpx.Response:
            return await app.client.get("/readyz")

        unready = app.loop.run_until_complete(
            eventually(readiness, lambda r: r.status_code == 503, "readiness")
        )
        ready.validate_response(unready, checks=CONFORMANCE)
        answer = _raw(app, _case(app), SEED_BYTES, CONFORMANCE)
        assert answer.status_code == 503
        assert answer.headers["retry-after"].isdigit()


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
def test_the_get_endpoints_answer_as_their_document_says(app: App, path: str) -> None:
    """/healthz, /readyz (200 here; its 503 above) and /metrics (Prometheus text, declared
    as such), generated requests held to the document."""
    operation = app.schema()[path]["GET"]
    seen: Counter[int] = Counter()

    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    @_settings(15)
    def check(case: schemathesis.Case) -> None:
        seen[app.send(case).status_code] += 1

    check()
    assert set(seen) == {200}, seen
    document = app.schema().raw_schema
    responses = document["paths"][path]["get"]["responses"]
    if path == "/metrics":
        assert list(responses["200"]["content"]) == ["text/plain; version=0.0.4"]
    if path == "/readyz":
        assert set(responses) == {"200", "503"}


def test_the_document_declares_no_answer_that_cannot_come(app: App) -> None:
    """Every status of the webhook with a JSON body schema; no FastAPI validation error (no
    request reaches FastAPI's validation), the path parameter named ``dispensary``."""
    document = app.schema().raw_schema
    operation = document["paths"][WEBHOOK]["post"]
    declared = {"200", "202", "400", "401", "403", "404", "413", "415", "422", "503"}
    assert set(operation["responses"]) == declared
    for status, response in operation["responses"].items():
        assert list(response["content"]) == ["application/json"], status
        assert "$ref" in response["content"]["application/json"]["schema"], status
    assert operation["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    assert [p["name"] for p in operation["parameters"]] == ["dispensary"]
    assert operation["security"] == [{"webhookToken": []}]
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert "ValidationError" not in schemas
    assert "HTTPValidationError" not in json.dumps(document)


def test_fastapis_own_refusals_are_json_errors_and_nothing_redirects(app: App) -> None:
    """A wrong method is 405 with ``Allow``, an unknown path 404, both in the JSON error body
    of every other refusal; a trailing slash is no redirect: on the webhook it is the same
    path (auth first), elsewhere a 404."""
    headers = {"authorization": f"Bearer {TOKEN_A}", "content-type": "application/json"}
    url = f"/webhooks/treez/{DISPENSARY}"

    def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        return app.loop.run_until_complete(app.client.request(method, path, **kwargs))

    wrong_method = call("GET", url)
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.json() == {"error": "method_not_allowed", "detail": "Method Not Allowed"}
    for method, path in [("POST", "/nowhere"), ("GET", "/readyz/"), ("GET", "/healthz/")]:
        unknown = call(method, path)
        assert unknown.status_code == 404, (method, path)
        assert unknown.json() == {"error": "not_found", "detail": "Not Found"}
    assert call("POST", url + "/", content=SEED_BYTES).status_code == 401  # no token
    stored = call("POST", url + "/", content=SEED_BYTES, headers=headers)
    assert (stored.status_code, stored.json()) == (202, {"status": "accepted"})
    assert call("POST", url + "//", content=SEED_BYTES, headers=headers).status_code == 404
    assert [r.customer_id for r in app.rows(inbox)] == ["3904"]


def test_health_and_readiness_answer_head(app: App) -> None:
    """Load balancers that check with HEAD get the GET's status and no body; the document
    describes the GETs only."""

    def call(method: str, path: str) -> httpx.Response:
        return app.loop.run_until_complete(app.client.request(method, path))

    for path in ("/healthz", "/readyz"):
        got, head = call("GET", path), call("HEAD", path)
        assert head.status_code == got.status_code, path
        assert head.content == b"", path
        assert call("POST", path).status_code == 405
        assert list(app.app.openapi()["paths"][path]) == ["get"], path


@pytest.mark.parametrize(
    "headers",
    [
        {"content-encoding": "gzip"},
        {"content-encoding": "identity, br"},
        {"content-encoding": "x-custom"},
        {"transfer-encoding": "gzip"},
    ],
    ids=lambda h: "-".join(f"{k}:{v}" for k, v in h.items()),
)
def test_a_coding_the_receiver_does_not_decode_is_415_and_quarantined(
    app: App, headers: dict[str, str]
) -> None:
    """The body is plain JSON but says it is encoded: refused (not stored as sent), the
    coding named, kept in quarantine."""
    sent = {"authorization": f"Bearer {TOKEN_A}", "content-type": "application/json", **headers}
    response = app.loop.run_until_complete(
        app.client.post(f"/webhooks/treez/{DISPENSARY}", content=SEED_BYTES, headers=sent)
    )
    assert response.status_code == 415, response.text
    assert response.json()["error"] == "unsupported_encoding"
    coding = next(iter(headers.values())).split(",")[-1].strip()
    assert coding in response.json()["detail"]
    assert app.rows(inbox) == []
    (kept,) = app.rows(quarantine)
    assert (kept.status_code, kept.body) == (415, SEED_BYTES)
    identity = {**sent, "content-encoding": "identity"}
    identity.pop("transfer-encoding", None)
    again = app.loop.run_until_complete(
        app.client.post(f"/webhooks/treez/{DISPENSARY}", content=SEED_BYTES, headers=identity)
    )
    assert again.status_code == 202, again.text


# --- once against a running `connector serve` (real uvicorn, real sockets) ---


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """A running ``connector serve`` on the test_receiver deployment (jsonl sinks); its base URL."""
    config = write_config(tmp_path)
    document = yaml.safe_load(config.read_text())
    document["server"]["host"] = "127.0.0.1"
    config.write_text(yaml.safe_dump(document))
    procs = Procs(tmp_path)
    try:
        yield start_server(procs, config, "serve").base
    finally:
        for proc in procs.all:
            proc.close()
        print(procs.tails())  # shown by pytest only when the test failed


def _raw_exchange(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """``request`` written as is to the server; its status, headers and body (the server
    answers and may close: read until the body is whole or the socket closes)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            head, found, rest = data.partition(b"\r\n\r\n")
            if found:
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:])
                }
                if len(rest) >= int(headers.get("content-length", "-1")):
                    return int(lines[0].split()[1]), headers, rest
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    pytest.fail(f"no whole answer: {data[:300]!r}")


def _request(path: str, body: bytes, *headers: str) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {TOKEN_A}",
        "Content-Type: application/json",
        *headers,
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def test_a_running_server_answers_as_its_document_says(served: str) -> None:
    """schemathesis against ``connector serve`` (fewer examples: each is a real request);
    then raw requests over a socket: a transfer or content coding the receiver does not
    decode is a JSON 415 (uvicorn's httptools passes ``gzip, chunked`` on, chunked undone),
    a trailing slash is the same path, never a redirect."""
    schema = schemathesis.openapi.from_dict(httpx.get(f"{served}/openapi.json").json())
    seen: Counter[int] = Counter()
    session = requests.Session()

    def send(case: schemathesis.Case, authorization: str | None) -> None:
        headers = {} if authorization in (None, KEEP) else {"Authorization": authorization}
        if authorization is None:
            case.headers = {k: v for k, v in (case.headers or {}).items() if k != "Authorization"}
        response = case.call_and_validate(
            base_url=served, session=session, headers=headers, checks=CHECKS
        )
        seen[response.status_code] += 1

    cases = _webhook_cases(schema)

    @given(data=st.data(), authorization=st.sampled_from(AUTHORIZATIONS))
    @_settings(120)
    def webhook(data: st.DataObject, authorization: str | None) -> None:
        send(cases(data), authorization)

    webhook()
    print("answers by status", dict(seen))  # shown when the test fails
    assert {202, 401, 403} <= set(seen), seen
    for path in ("/healthz", "/readyz", "/metrics"):
        for case in (schema[path]["GET"].Case(),):
            assert case.call_and_validate(base_url=served, checks=CHECKS).status_code == 200

    path = f"/webhooks/treez/{DISPENSARY}"
    gzip_headers = (f"Content-Length: {len(SEED_BYTES)}", "Content-Encoding: gzip")
    answers: dict[str, Callable[[], tuple[int, dict[str, str], bytes]]] = {
        "gzip, chunked": lambda: _raw_exchange(
            served, _request(path, _chunked(SEED_BYTES), "Transfer-Encoding: gzip, chunked")
        ),
        "gzip": lambda: _raw_exchange(served, _request(path, SEED_BYTES, *gzip_headers)),
    }
    for coding, exchange in answers.items():
        status, headers, body = exchange()
        assert status == 415, (coding, status, body)
        assert headers["content-type"] == "application/json"
        answer = json.loads(body)
        assert answer["error"] == "unsupported_encoding"
        assert "gzip" in answer["detail"]
    status, headers, body = _raw_exchange(
        served, _request(path + "/", _chunked(SEED_BYTES), "Transfer-Encoding: chunked")
    )
    assert (status, json.loads(body)) == (202, {"status": "accepted"})
    status, headers, body = _raw_exchange(
        served, _request(path + "/", SEED_BYTES, f"Content-Length: {len(SEED_BYTES)}")
    )
    assert status == 202, body
