"""Adversarial tests of issue 16's HTTP hardening (connector/http_protocol.py, the receiver's
paths and codings, ``connector check --online``): request smuggling and framing, pipelining,
idle and trickling clients, odd paths, and secrets in the preflight's output.

Each ``xfail(strict=True)`` test demonstrates a break that is not fixed yet (its reason says
what breaks); the plain tests are attacks that held and stay as regression tests. The
listener runs as a real ``connector serve`` process with short limits; waits are bounded,
nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import select
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fakes._serve import serve_in_thread
from test_e2e import (
    DISPENSARY,
    HEADERS,
    TOKEN,
    Event,
    Procs,
    Server,
    procs_in,
    start_server,
    start_sink,
    write_config,
)

from connector.config import TreezApiConfig
from connector.preflight import probe_treez

LIMITS = {
    "max_header_bytes": 16 * 1024,
    "max_headers": 100,
    "header_timeout_seconds": 1.0,
    "body_timeout_seconds": 2.0,
    "keep_alive_seconds": 1,
}
WAIT = 20.0  # the bound on any answer or close (the limits above are a second or two)
PATH = f"/webhooks/treez/{DISPENSARY}"
_customers = itertools.count(1)


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    with procs_in(tmp_path_factory.mktemp("attack-http")) as registry:
        yield registry


@pytest.fixture(scope="module")
def sink_url(procs: Procs) -> str:
    return start_sink(procs, "sink").url


def _serve(procs: Procs, sink_url: str, name: str, **server: Any) -> tuple[Server, Path]:
    folder = procs.folder / name
    folder.mkdir()
    store = folder / "store.db"
    config = write_config(folder, sink_url, f"sqlite:///{store}")
    document = yaml.safe_load(config.read_text())
    document["server"].update(server)
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return start_server(procs, config, name), store


@pytest.fixture(scope="module")
def served(procs: Procs, sink_url: str) -> tuple[Server, Path]:
    return _serve(procs, sink_url, "serve", **LIMITS)


@pytest.fixture(scope="module")
def server(served: tuple[Server, Path]) -> Server:
    return served[0]


# --- helpers ----------------------------------------------------------------------------------


def connect(server: Server) -> socket.socket:
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def customer() -> str:
    return str(4_200_000 + next(_customers))


def webhook(cid: str, *extra: str, pad: int = 0) -> bytes:
    """A whole webhook request for customer ``cid`` (``pad`` spaces after its JSON)."""
    body = Event(cid, 1).body + b" " * pad
    lines = [
        f"POST {PATH} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {TOKEN}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_until_closed(sock: socket.socket, bound: float = WAIT) -> bytes | None:
    """All the server sends until it closes; None if it is still open after ``bound``."""
    data = b""
    deadline = time.monotonic() + bound
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return None


def answers(data: bytes) -> list[tuple[int, bytes]]:
    """The (status, body) of each answer in ``data`` (answers with a Content-Length)."""
    found = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        if lines[0] == "HTTP/1.1 100 Continue":
            found.append((100, b""))
            data = rest
            continue
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        found.append((int(lines[0].split()[1]), rest[:length]))
        data = rest[length:]
    return found


def json_error(body: bytes, error: str) -> None:
    document = json.loads(body)
    assert document["error"] == error, document
    assert isinstance(document["detail"], str), document
    assert document["detail"], document


def in_inbox(store: Path, cid: str) -> bool:
    with contextlib.closing(sqlite3.connect(store)) as db:
        return bool(db.execute("SELECT 1 FROM inbox WHERE customer_id = ?", (cid,)).fetchall())


def normal_webhook(server: Server) -> int:
    with httpx.Client(timeout=WAIT) as client:
        response = client.post(server.webhook, content=Event(customer(), 1).body, headers=HEADERS)
    return response.status_code


# --- framing and smuggling: refused with the JSON 400, nothing behind it served ---------------

_HEAD = (
    f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
    "Content-Type: application/json\r\n"
)
_BODY = b'{"event_type":"CUSTOMER"}'
_CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY)
SMUGGLING = {
    "content-length and transfer-encoding": (
        f"{_HEAD}Content-Length: {len(_BODY)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + _CHUNKED
    ),
    "two content-lengths": (
        f"{_HEAD}Content-Length: {len(_BODY)}\r\nContent-Length: 4\r\n\r\n".encode() + _BODY
    ),
    "a signed content-length": f"{_HEAD}Content-Length: +{len(_BODY)}\r\n\r\n".encode() + _BODY,
    "a content-length list": (
        f"{_HEAD}Content-Length: {len(_BODY)}, {len(_BODY)}\r\n\r\n".encode() + _BODY
    ),
    "a content-length with a space inside": (
        f"{_HEAD}Content-Length: {len(_BODY)} 0\r\n\r\n".encode() + _BODY
    ),
    "chunked twice": f"{_HEAD}Transfer-Encoding: chunked, chunked\r\n\r\n".encode() + _CHUNKED,
    "xchunked": f"{_HEAD}Transfer-Encoding: xchunked\r\n\r\n".encode() + _CHUNKED,
    "an obs-fold continuation line": (
        f"{_HEAD}X-A: a\r\n  folded\r\nContent-Length: {len(_BODY)}\r\n\r\n".encode() + _BODY
    ),
    "bare LF line ends": (
        _HEAD.replace("\r\n", "\n") + f"Content-Length: {len(_BODY)}\n\n"
    ).encode()
    + _BODY,
    "a NUL in a header name": (
        f"{_HEAD}X-\x00A: 1\r\nContent-Length: {len(_BODY)}\r\n\r\n".encode() + _BODY
    ),
    "a non-ASCII header name": (
        _HEAD.encode() + "Hóst: x\r\n".encode() + f"Content-Length: {len(_BODY)}\r\n\r\n".encode()
    )
    + _BODY,
    "a space before the colon": (f"{_HEAD}Content-Length : {len(_BODY)}\r\n\r\n".encode() + _BODY),
}


@pytest.mark.parametrize("case", SMUGGLING)
def test_ambiguous_framing_is_a_json_400_and_nothing_behind_it_is_served(
    server: Server, case: str
) -> None:
    """Held: each ambiguous or malformed framing is refused by llhttp; the answer is the JSON
    400, the connection closes, and the request smuggled behind it is never answered."""
    with connect(server) as sock:
        sock.sendall(SMUGGLING[case] + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_until_closed(sock)
    assert data is not None, "the connection stayed open"
    got = answers(data)
    assert [status for status, _ in got] == [400], data
    json_error(got[0][1], "bad_request")


# --- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/webhooks/treez/partner%2Fsandbox3", "not_found"),
        (f"/webhooks/treez/../treez/{DISPENSARY}", "not_found"),
        ("/webhooks/treez/..", "unknown_dispensary"),
        ("/webhooks/treez/no-such-one/", "unknown_dispensary"),
        (f"/webhooks/treez/{DISPENSARY}//", "not_found"),
        ("/webhooks/treez/", "not_found"),
        (f"/webhooks/treez/{DISPENSARY}%00", "unknown_dispensary"),
    ],
)
def test_odd_webhook_paths_are_json_404s_never_redirects(
    server: Server, path: str, error: str
) -> None:
    """Held: an encoded slash, ``..``, an unknown dispensary with a trailing slash, a double
    slash, a NUL: a JSON 404 (no redirect, no 5xx, nothing stored)."""
    request = webhook(customer(), "Connection: close").replace(PATH.encode(), path.encode(), 1)
    with connect(server) as sock:  # raw: an HTTP client would normalise the path
        sock.sendall(request)
        data = read_until_closed(sock)
    assert data is not None
    got = answers(data)
    assert [status for status, _ in got] == [404], data
    assert b"content-type: application/json" in data.lower()
    json_error(got[0][1], error)


def test_a_16_kib_url_is_a_json_413(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(
            webhook(customer()).replace(PATH.encode(), PATH.encode() + b"?" + b"a" * 16400)
        )
        data = read_until_closed(sock)
    assert data is not None
    got = answers(data)
    assert [status for status, _ in got] == [413], data
    json_error(got[0][1], "headers_too_large")


# --- refusals and lingering -------------------------------------------------------------------


def test_a_client_trickling_after_a_refusal_is_closed(server: Server) -> None:
    """Held: the lingering read after a refusal is bounded; a client that keeps sending a byte
    every 50 ms cannot hold the refused connection open (its sends end in a reset)."""
    with connect(server) as sock:
        sock.sendall(SMUGGLING["two content-lengths"])
        deadline = time.monotonic() + WAIT
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable:
                    sock.recv(65536)  # the answer, then the FIN of the half close
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    assert closed, "a trickling client held a refused connection open"


# --- idle connections: a CRLF disarms every timer ---------------------------------------------


def test_a_connection_sending_only_crlf_is_closed(server: Server) -> None:
    with connect(server) as fresh, connect(server) as reused:
        fresh.sendall(b"\r\n")
        reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        select.select([reused], [], [], WAIT)
        reused.recv(65536)  # the 200
        reused.sendall(b"\r\n")
        bound = 4 * (LIMITS["keep_alive_seconds"] + LIMITS["header_timeout_seconds"])
        assert read_until_closed(fresh, bound) is not None, "a fresh connection stayed open"
        assert read_until_closed(reused, bound) is not None, "a kept-alive one stayed open"


def test_crlf_only_connections_cannot_shut_out_webhooks(procs: Procs, sink_url: str) -> None:
    crowded, _ = _serve(procs, sink_url, "crowded", **{**LIMITS, "max_connections": 10})
    with contextlib.ExitStack() as stack:
        for _ in range(10):
            stack.enter_context(connect(crowded)).sendall(b"\r\n")
        deadline = time.monotonic() + 4 * (
            LIMITS["keep_alive_seconds"] + LIMITS["header_timeout_seconds"]
        )
        status = normal_webhook(crowded)
        while status != 202 and time.monotonic() < deadline:
            time.sleep(0.2)
            status = normal_webhook(crowded)
    assert status == 202


# --- pipelining -------------------------------------------------------------------------------


def test_a_good_request_pipelined_before_a_malformed_one_is_answered(
    served: tuple[Server, Path],
) -> None:
    server, store = served
    cid = customer()
    with connect(server) as sock:
        sock.sendall(webhook(cid) + SMUGGLING["two content-lengths"])
        data = read_until_closed(sock)
    assert data is not None
    got = answers(data)
    assert [status for status, _ in got] == [202, 400], data
    json_error(got[1][1], "bad_request")
    assert in_inbox(store, cid)


def test_a_request_pipelined_after_a_large_body_is_served(served: tuple[Server, Path]) -> None:
    server, store = served
    first, second = customer(), customer()
    big, small = webhook(first, pad=200_000), webhook(second)
    with connect(server) as sock:
        sock.sendall(big + small[:40])  # the next head starts in the big body's last chunk
        time.sleep(0.3)
        sock.sendall(small[40:] + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_until_closed(sock)
    assert data is not None
    assert [status for status, _ in answers(data)] == [202, 202, 200], data
    assert in_inbox(store, first)
    assert in_inbox(store, second)


def test_header_limits_are_counted_per_request_on_a_kept_alive_connection(
    server: Server,
) -> None:
    """Held: three pipelined requests of 80 headers each (under the 100 limit each, 240 on the
    connection) are all served."""
    extra = [f"X-N{i}: v" for i in range(80)]
    requests = b"".join(webhook(customer(), *extra) for _ in range(3))
    with connect(server) as sock:
        sock.sendall(requests + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = read_until_closed(sock)
    assert data is not None
    assert [status for status, _ in answers(data)] == [202, 202, 202, 200], data


def test_an_oversized_expect_100_continue_is_refused_before_the_body(server: Server) -> None:
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 50000000\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with connect(server) as sock:
        sock.sendall(head)
        select.select([sock], [], [], WAIT)
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 413 "), first


# --- check --online: what a vendor's error body can put in the output -------------------------

_ECHOED_KEY = "TreezKey0123456789abcdefSECRET"


def _treez_answering(status: int, document: dict[str, Any]) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = json.dumps(document).encode()
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def _probe_text(status: int, document: dict[str, Any]) -> str:
    with serve_in_thread(
        _treez_answering(status, document), host="127.0.0.1", port=0, name="treez-echo"
    ) as port:
        config = TreezApiConfig.model_validate(
            {
                "api_url": f"http://127.0.0.1:{port}/v2.0/dispensary/{DISPENSARY}",
                "client_id": "client-1",
                "api_key": _ECHOED_KEY,
            }
        )
        probe = asyncio.run(probe_treez(config, timeout=5.0))
    return f"{probe} {probe!r}"


def test_a_treez_401_echoing_the_key_does_not_show_it() -> None:
    text = _probe_text(401, {"error": _ECHOED_KEY})
    assert _ECHOED_KEY not in text, text


def test_a_treez_result_code_echoing_the_key_does_not_show_it() -> None:
    text = _probe_text(200, {"resultCode": f"bad key {_ECHOED_KEY} for client-1"})
    assert _ECHOED_KEY not in text, text


def test_check_without_online_makes_no_dns_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held: with vendor host names (not addresses) configured, ``check`` alone resolves none
    (the existing test patches connect only; a lookup leaves the machine too)."""
    from click.testing import CliRunner
    from test_preflight import SECRETS
    from test_preflight import write_config as preflight_config

    from connector import cli

    urls = {
        "treez": f"https://api.treez.invalid/v2.0/dispensary/{DISPENSARY}",
        "klaviyo": "https://a.klaviyo.invalid",
        "hubspot": "https://api.hubapi.invalid",
        "alpineiq": "https://lab.alpineiq.invalid",
        "braze": "https://rest.braze.invalid",
    }
    config = preflight_config(tmp_path, urls)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CONNECTOR_CONFIG", raising=False)
    looked_up: list[Any] = []

    def lookup(*args: Any, **kwargs: Any) -> Any:
        looked_up.append(args[0])
        raise OSError("no lookups in this test")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket, "gethostbyname", lookup)
    result = CliRunner().invoke(cli.main, ["check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert looked_up == []
    result = CliRunner().invoke(cli.main, ["check", "--config", str(config), "--online"])
    assert looked_up, result.output  # the patch sees the lookups --online makes
