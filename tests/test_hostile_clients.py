"""Hostile and slow clients against a real ``connector serve`` process, over raw sockets
(issue 16, items 2 and 4; connector/http_protocol.py; README, "Limits on clients").

Each case checks the answer the client gets (a contract-1 status with the JSON error body, or a
close), that a normal webhook is answered 202 while the hostile client is connected, and that
the server's resident memory stays within a generous bound. The server runs with short
timeouts (:data:`LIMITS`) so that a case that would take a minute at the defaults takes
seconds; waits are bounded generously and nothing asserts a duration.

The store is SQLite only: what is under test is the listener, not the store.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
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

from connector.config import load_config
from connector.http_protocol import ClientLimits, LimitedHttpProtocol
from connector.server import console_config, uvicorn_config

LIMITS = {
    "max_header_bytes": 16 * 1024,
    "max_headers": 100,
    "header_timeout_seconds": 2.0,
    "body_timeout_seconds": 3.0,
    "keep_alive_seconds": 2,
}
WAIT = 30.0  # the bound on any answer (the limits above are seconds)
RSS_BOUND = 64 * 1024 * 1024  # growth of the server's resident memory over one case
PATH = f"/webhooks/treez/{DISPENSARY}"
_customers = itertools.count(1)


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    with procs_in(tmp_path_factory.mktemp("hostile")) as registry:
        yield registry


@pytest.fixture(scope="module")
def sink_url(procs: Procs) -> str:
    return start_sink(procs, "sink").url


def _serve(procs: Procs, sink_url: str, name: str, **server: Any) -> Server:
    folder = procs.folder / name
    folder.mkdir()
    config = write_config(folder, sink_url, f"sqlite:///{folder / 'store.db'}")
    document = yaml.safe_load(config.read_text())
    document["server"].update(server)
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return start_server(procs, config, name)


@pytest.fixture(scope="module")
def server(procs: Procs, sink_url: str) -> Server:
    return _serve(procs, sink_url, "serve", **LIMITS)


# --- helpers ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    status: int | None  # None: closed without an answer
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def address(server: Server) -> tuple[str, int]:
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(address(server), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(*extra: str, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [
        f"POST {PATH} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {TOKEN}",
        "Content-Type: application/json",
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> Answer:
    """Everything the server sends until it closes, parsed as one answer."""
    sock.settimeout(WAIT)
    data = b""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    else:
        pytest.fail("the server neither answered nor closed the connection")
    if not data:
        return Answer(None, {}, b"")
    head_part, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_part.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def trickle(sock: socket.socket, data: bytes, step: int, every: float, server: Server) -> int:
    """Send ``data`` ``step`` bytes at a time, one step every ``every`` seconds, until the
    server answers (or the bound passes); a normal webhook is posted after the second step.
    Returns that webhook's status."""
    status = 0
    deadline = time.monotonic() + WAIT
    for index, start in enumerate(range(0, len(data), step)):
        if time.monotonic() > deadline:
            break
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            break
        try:
            sock.sendall(data[start : start + step])
        except (BrokenPipeError, ConnectionResetError):
            break
        if index == 1:
            status = normal_webhook(server)
    else:
        # all of it sent: wait for the answer
        select.select([sock], [], [], WAIT)
    return status


def normal_webhook(server: Server) -> int:
    body = Event(str(900_000 + next(_customers)), 1).body
    with httpx.Client(timeout=WAIT) as client:
        return client.post(server.webhook, content=body, headers=HEADERS).status_code


def rss(server: Server) -> int:
    text = Path(f"/proc/{server.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match[1]) * 1024


@pytest.fixture
def bounded(server: Server) -> Iterator[None]:
    """The server's resident memory grows by less than :data:`RSS_BOUND` over the test."""
    before = rss(server)
    yield
    grown = rss(server) - before
    assert grown < RSS_BOUND, f"the server's RSS grew by {grown // 1024} KiB"


def warnings_since(server: Server, mark: int) -> list[dict[str, Any]]:
    """The server's log lines of level warning and above, from line ``mark`` on."""
    lines = server.proc.log_lines()[mark:]
    return [x for x in lines if x["level"] not in ("debug", "info")]


def refused(answer: Answer, status: int, error: str) -> None:
    assert answer.status == status, answer
    assert answer.headers.get("content-type") == "application/json", answer
    document = answer.json()
    assert document["error"] == error, document
    assert isinstance(document["detail"], str), document
    assert document["detail"], document


# --- the cases --------------------------------------------------------------------------------


@pytest.mark.usefixtures("bounded")
def test_slowloris_headers_get_a_400_header_timeout(server: Server) -> None:
    """Headers trickled a byte at a time: answered 400 once the header timeout passes since
    the head's first byte, however steadily the bytes come."""
    with connect(server) as sock:
        endless = head(*(f"X-Slow-{i}: {'a' * 20}" for i in range(50)))
        status = trickle(sock, endless, step=1, every=0.05, server=server)
        answer = read_answer(sock)
    assert status == 202
    refused(answer, 400, "header_timeout")


@pytest.mark.usefixtures("bounded")
def test_a_trickled_body_gets_a_400_body_timeout(server: Server) -> None:
    body = Event(str(800_000 + next(_customers)), 1).body
    with connect(server) as sock:
        sock.sendall(head(length=len(body)))
        status = trickle(sock, body, step=1, every=0.05, server=server)
        answer = read_answer(sock)
    assert status == 202
    refused(answer, 400, "body_timeout")


@pytest.mark.usefixtures("bounded")
def test_a_1_mib_body_over_twice_the_body_timeout_gets_a_400(server: Server) -> None:
    """A 1 MiB body (the body limit) sent steadily over twice the body timeout: the minute
    of the issue, at the test's shorter timeout."""
    size = 1024 * 1024
    body = b"[" + b" " * (size - 2) + b"]"
    seconds = 2 * LIMITS["body_timeout_seconds"]
    step = size // 100
    with connect(server) as sock:
        sock.sendall(head(length=size))
        status = trickle(sock, body, step=step, every=seconds / 100, server=server)
        answer = read_answer(sock)
    assert status == 202
    refused(answer, 400, "body_timeout")


@pytest.mark.usefixtures("bounded")
def test_200_idle_connections_are_closed_and_webhooks_go_on(server: Server) -> None:
    """Connections that never send a byte hold nothing for long: each is closed, without an
    answer, once the keep-alive time passes; meanwhile a webhook is answered 202."""
    with contextlib.ExitStack() as stack:
        idle = [stack.enter_context(connect(server)) for _ in range(200)]
        assert normal_webhook(server) == 202
        answers = [read_answer(sock) for sock in idle]
    assert all(a.status is None and not a.body for a in answers)


@pytest.mark.usefixtures("bounded")
def test_3000_headers_get_a_413_too_many_headers(server: Server) -> None:
    many = head(*(f"X-H{i}: v" for i in range(3000)))
    assert len(many) < LIMITS["max_header_bytes"] * 4  # the count is refused, not the size
    with connect(server) as sock:
        sock.sendall(many)
        assert normal_webhook(server) == 202
        answer = read_answer(sock)
    refused(answer, 413, "too_many_headers")


@pytest.mark.usefixtures("bounded")
def test_an_oversized_header_gets_a_413(server: Server) -> None:
    with connect(server) as sock:
        sock.sendall(head(f"X-Big: {'b' * LIMITS['max_header_bytes']}"))
        assert normal_webhook(server) == 202
        answer = read_answer(sock)
    refused(answer, 413, "headers_too_large")


@pytest.mark.usefixtures("bounded")
def test_an_endless_header_line_is_refused_before_it_is_held(server: Server) -> None:
    """A header value that never ends (32 MiB, no line end): refused once the head passes
    the limit, while httptools still holds the unfinished header (no callback yet); the
    server's memory does not grow by what was sent."""
    chunk = b"c" * 65536
    with connect(server) as sock:
        sock.sendall(head().removesuffix(b"\r\n\r\n") + b"\r\nX-Endless: ")
        for index in range(512):
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            if index == 1:
                assert normal_webhook(server) == 202
        answer = read_answer(sock)
    refused(answer, 413, "headers_too_large")


@pytest.mark.usefixtures("bounded")
def test_broken_chunked_framing_gets_a_json_400_and_one_warning(server: Server) -> None:
    mark = len(server.proc.log_lines())
    errors_before = server.proc.err_path.read_text(errors="replace")
    with connect(server) as sock:
        sock.sendall(head(chunked=True) + b"5\r\n[1,2]\r\nzz\r\n")
        assert normal_webhook(server) == 202
        answer = read_answer(sock)
    refused(answer, 400, "bad_request")
    assert "chunk size" in answer.json()["detail"]
    lines = warnings_since(server, mark)
    assert [(x["level"], x["event"], x["error"]) for x in lines] == [
        ("warning", "http_refused", "bad_request")
    ], lines
    assert "exc_info" not in lines[0]
    assert server.proc.err_path.read_text(errors="replace") == errors_before


@pytest.mark.usefixtures("bounded")
def test_a_client_gone_mid_body_is_one_warning_not_a_traceback(server: Server) -> None:
    mark = len(server.proc.log_lines())
    with connect(server) as sock:
        sock.sendall(head(length=1000) + b'{"partial":')
        assert normal_webhook(server) == 202
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not warnings_since(server, mark):
        time.sleep(0.05)
    time.sleep(0.5)  # a second line (the traceback's) would follow the first at once
    lines = warnings_since(server, mark)
    assert [(x["level"], x["event"]) for x in lines] == [("warning", "http_client_gone")], lines


def test_past_max_connections_the_answer_is_a_json_503(procs: Procs, sink_url: str) -> None:
    """``max_connections`` connections held open: the next request is answered 503 with the
    JSON error body and Retry-After (uvicorn's own answer is plain text)."""
    crowded = _serve(procs, sink_url, "crowded", max_connections=10, keep_alive_seconds=600)
    with contextlib.ExitStack() as stack:
        for _ in range(10):
            stack.enter_context(connect(crowded))
        with connect(crowded) as sock:
            body = Event(str(700_000 + next(_customers)), 1).body
            sock.sendall(head(length=len(body)) + body)
            answer = read_answer(sock)
    refused(answer, 503, "overloaded")
    assert answer.headers.get("retry-after") == "5"
    assert normal_webhook(crowded) == 202  # once they are gone


def test_the_listener_takes_its_limits_from_the_config(tmp_path: Path) -> None:
    """The ``server:`` settings reach uvicorn and the protocol; no request-count restarts
    (memory is bounded by the limits, not by recycling the process)."""
    config_path = write_config(tmp_path, "http://127.0.0.1:9/ops", "sqlite:///store.db")
    document = yaml.safe_load(config_path.read_text())
    document["server"].update(LIMITS, max_connections=123)
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load_config(config_path)
    settings = uvicorn_config(object(), config, host=None, port=0)
    assert settings.limit_max_requests is None
    assert settings.timeout_keep_alive == LIMITS["keep_alive_seconds"]
    assert settings.limit_concurrency == 123
    assert isinstance(settings.http, type)
    assert issubclass(settings.http, LimitedHttpProtocol)
    assert settings.http.limits == ClientLimits.of(config.server)
    assert settings.http.limits.header_timeout_seconds == LIMITS["header_timeout_seconds"]


def test_the_console_listener_has_the_same_limits(tmp_path: Path) -> None:
    """The console's own listener meets the same clients when it is not on loopback."""
    config_path = write_config(tmp_path, "http://127.0.0.1:9/ops", "sqlite:///store.db")
    document = yaml.safe_load(config_path.read_text())
    document["server"].update(LIMITS, max_connections=77)
    document["console"] = {"token": "console-token-0123456789"}
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load_config(config_path)
    assert config.console is not None
    settings = console_config(object(), config.console, config)
    assert settings.limit_max_requests is None
    assert settings.limit_concurrency == 77
    assert settings.timeout_keep_alive == LIMITS["keep_alive_seconds"]
    assert settings.ws == "none"
    assert isinstance(settings.http, type)
    assert issubclass(settings.http, LimitedHttpProtocol)
    assert settings.http.limits == ClientLimits.of(config.server)
    assert settings.proxy_headers is False
