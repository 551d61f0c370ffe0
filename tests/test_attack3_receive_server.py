"""Adversarial pass on the receiver as served (connector/server.py's ``uvicorn_config``:
``serving_app``'s fast path in front of the FastAPI app, the listener's ``_Cycle`` answers,
no proxy headers), over raw sockets against a real uvicorn server. The server runs in a
thread of this process on fake receiver ports: a committer that can hang, fail or raise, so
that what is under test is the listener and the fast path, not the store. Plain tests are
attacks that held; nothing asserts a duration (waits are bounded)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvicorn
from test_e2e import free_port
from test_receiver import (
    DISPENSARY,
    MAX_BODY,
    PII_VALUES,
    PII_WORDS,
    SEED_BYTES,
    TOKEN_A,
    write_config,
)

from connector.config import Config, load_config
from connector.errors import StoreUnavailable
from connector.http_protocol import LimitedHttpProtocol
from connector.logs import configure_logging
from connector.metrics import Metrics
from connector.receiver import WebhookFastPath, create_app
from connector.server import console_config, uvicorn_config
from connector.store import NewEvent, Rejected

WAIT = 10.0
PATH = f"/webhooks/treez/{DISPENSARY}"
_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "connector")


class Ports:
    """The receiver's ports, faked: ``mode`` says what the committer does next."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.committer = self
        self.items: list[NewEvent | Rejected] = []
        self.mode = "ok"  # ok | unavailable | hang | boom
        self.waiting = threading.Event()  # a submit is hanging
        self.release: asyncio.Event | None = None
        self.lifespan_seen: list[str] = []

    async def submit(self, item: NewEvent | Rejected) -> None:
        if self.mode == "unavailable":
            raise StoreUnavailable("store locked", reason="store locked")
        if self.mode == "boom":
            raise RuntimeError("the committer failed")
        if self.mode == "hang":
            self.release = self.release or asyncio.Event()
            self.waiting.set()
            await self.release.wait()
        self.items.append(item)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        self.lifespan_seen.append("start")
        yield
        self.lifespan_seen.append("stop")

    def webhook_started(self) -> None:
        pass

    def webhook_finished(self) -> None:
        pass

    async def readiness(self) -> list[str]:
        return []

    async def metrics_text(self) -> bytes:
        return b"# nothing\n"


class Served:
    def __init__(self, ports: Ports, server: uvicorn.Server, port: int, logs: io.StringIO):
        self.ports = ports
        self.server = server
        self.port = port
        self.logs = logs
        self.loop: asyncio.AbstractEventLoop | None = None

    def unblock(self) -> None:
        """Let a hanging submit go on (from the test's thread)."""
        assert self.loop is not None
        ports = self.ports
        ports.mode = "ok"

        def go() -> None:
            if ports.release is not None:
                ports.release.set()
                ports.release = None
            ports.waiting.clear()

        self.loop.call_soon_threadsafe(go)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    saved = {
        n: (
            list(logging.getLogger(n).handlers),
            logging.getLogger(n).level,
            logging.getLogger(n).propagate,
        )
        for n in _LOGGERS
    }
    stream = io.StringIO()
    configure_logging(stream=stream, level="debug")
    folder = tmp_path_factory.mktemp("attack3")
    ports = Ports(load_config(write_config(folder)))
    app = create_app(ports)
    port = free_port()
    config = uvicorn_config(app, ports.config, host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    state = Served(ports, server, port, stream)

    def run() -> None:
        async def main() -> None:
            state.loop = asyncio.get_running_loop()
            await server.serve()

        asyncio.run(main())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(WAIT)
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


# --- raw HTTP ---------------------------------------------------------------------------------


def connect(served: Served) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=WAIT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def request(
    body: bytes = SEED_BYTES,
    *extra: str,
    method: str = "POST",
    path: str = PATH,
    token: str | None = TOKEN_A,
    version: str = "HTTP/1.1",
    content_type: str = "application/json",
    length: int | None = None,
) -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body) if length is None else length}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Reader:
    """Answers off one connection, framed by their Content-Length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _more(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            self.eof = True
        self.buffer += chunk

    def answer(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if self.eof:
                raise AssertionError(f"closed mid-answer: {self.buffer!r}")
            self._more()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"header {name} twice: {head!r}"
            headers[name.lower()] = value.strip()
        length = 0 if head_only or status in (100, 204, 304) else int(headers["content-length"])
        while len(rest) < length:
            if self.eof:
                raise AssertionError(f"closed mid-body: {rest!r}")
            self._more()
            rest = self.buffer.partition(b"\r\n\r\n")[2]
        self.buffer = rest[length:]
        return status, headers, rest[:length]

    def closed(self) -> bool:
        while not self.eof:
            self._more()
            if self.buffer:
                return False
        return True


def seed(customer: str) -> bytes:
    body = json.loads(SEED_BYTES)
    body["data"]["customer_id"] = customer
    return json.dumps(body).encode()


_customers = iter(range(10_000, 99_999))


def fresh() -> bytes:
    return seed(f"attack3-{next(_customers)}")


# --- keep-alive and pipelining ----------------------------------------------------------------


def test_lifespan_runs_through_the_fast_path(served: Served) -> None:
    assert isinstance(served.server.config.app, WebhookFastPath)
    assert served.ports.lifespan_seen == ["start"]


def test_one_connection_takes_every_kind_of_answer_in_turn(served: Served) -> None:
    with connect(served) as sock:
        reader = Reader(sock)
        cases: list[tuple[bytes, int, bool]] = [
            (request(fresh()), 202, False),
            (request(b"x" * (MAX_BODY + 10)), 413, False),
            (request(fresh(), token=None), 401, False),
            (request(fresh(), token="wrong"), 403, False),
            (request(fresh(), path="/webhooks/treez/nowhere"), 404, False),
            (request(fresh(), content_type="text/plain"), 415, False),
            (request(b'{"not": "an event"}'), 422, False),
            (request(b"", method="GET"), 405, False),
            (request(b"", method="HEAD"), 405, True),
            (request(b"", method="OPTIONS"), 405, False),
            (request(fresh(), path=PATH + "/"), 202, False),
            (request(fresh()), 202, False),
        ]
        for raw, status, head_only in cases:
            sock.sendall(raw)
            got, headers, body = reader.answer(head_only)
            assert got == status, (raw[:60], headers, body)
            assert "connection" not in headers
            assert "date" in headers
            if not head_only:
                json.loads(body)
        sock.sendall(request(fresh()))
        assert reader.answer()[0] == 202


def test_pipelined_requests_in_one_packet_are_answered_in_order(served: Served) -> None:
    packet = b"".join(
        [
            request(fresh()),
            request(fresh(), token=None),
            request(b"x" * (MAX_BODY + 1)),
            request(b"", method="GET"),
            request(fresh()),
            request(fresh(), "Connection: close"),
        ]
    )
    with connect(served) as sock:
        sock.sendall(packet)
        reader = Reader(sock)
        statuses = [reader.answer()[0] for _ in range(6)]
        assert statuses == [202, 401, 413, 405, 202, 202]
        assert reader.closed()


def test_a_second_request_sent_while_the_commit_hangs_is_answered_after_the_first(
    served: Served,
) -> None:
    ports = served.ports
    first, second = f"attack3-h-{next(_customers)}", f"attack3-h-{next(_customers)}"
    ports.mode = "hang"
    try:
        with connect(served) as sock:
            sock.sendall(request(seed(first)))
            assert ports.waiting.wait(WAIT)
            sock.sendall(request(seed(second), "X-Mixed: Case"))
            time.sleep(0.1)
            served.unblock()
            reader = Reader(sock)
            one, two = reader.answer(), reader.answer()
            assert (one[0], two[0]) == (202, 202)
            assert one[2] == two[2] == b'{"status":"accepted"}'
    finally:
        served.unblock()
    ids = [i.customer_id for i in ports.items if isinstance(i, NewEvent)]
    assert ids.index(first) < ids.index(second)


def test_a_client_gone_while_the_commit_hangs_leaves_the_event_stored(served: Served) -> None:
    ports = served.ports
    customer = f"attack3-g-{next(_customers)}"
    mark = len(served.logs.getvalue())
    ports.mode = "hang"
    try:
        with connect(served) as sock:
            sock.sendall(request(seed(customer)))
            assert ports.waiting.wait(WAIT)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        time.sleep(0.1)
    finally:
        served.unblock()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if any(getattr(i, "customer_id", None) == customer for i in ports.items):
            break
        time.sleep(0.02)
    else:
        pytest.fail("the event whose client left was not stored")
    with connect(served) as sock:
        sock.sendall(request(fresh()))
        assert Reader(sock).answer()[0] == 202
    logs = served.logs.getvalue()[mark:]
    assert "Traceback" not in logs
    assert '"level": "error"' not in logs


def test_a_client_gone_between_head_and_body_is_one_warning(served: Served) -> None:
    mark = len(served.logs.getvalue())
    with connect(served) as sock:
        sock.sendall(request(b"", length=500) + b'{"event_type": "CUSTO')
        time.sleep(0.1)
    deadline = time.monotonic() + WAIT
    while "http_client_gone" not in served.logs.getvalue()[mark:]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    logs = served.logs.getvalue()[mark:]
    assert "Traceback" not in logs
    assert "CUSTO" not in logs


def test_an_unavailable_store_answers_503_then_the_connection_goes_on(served: Served) -> None:
    with connect(served) as sock:
        reader = Reader(sock)
        served.ports.mode = "unavailable"
        try:
            sock.sendall(request(fresh()))
            status, headers, body = reader.answer()
        finally:
            served.ports.mode = "ok"
        assert status == 503
        assert headers["retry-after"] == "5"
        assert json.loads(body)["error"] == "store_unavailable"
        sock.sendall(request(fresh()))
        assert reader.answer()[0] == 202


def test_a_failing_committer_is_a_500_that_closes_and_logs_no_customer_value(
    served: Served,
) -> None:
    mark = len(served.logs.getvalue())
    with connect(served) as sock:
        reader = Reader(sock)
        served.ports.mode = "boom"
        try:
            sock.sendall(request(SEED_BYTES) + request(fresh()))
            status, headers, _ = reader.answer()
        finally:
            served.ports.mode = "ok"
        assert status == 500
        assert headers["connection"] == "close"
        assert reader.closed()
    logs = served.logs.getvalue()[mark:]
    assert "Exception in ASGI application" in logs
    for word in PII_WORDS:
        assert word not in logs.lower()
    for value in PII_VALUES:
        assert value not in logs


def test_bad_input_is_quarantined_with_its_reason(served: Served) -> None:
    before = len(served.ports.items)
    with connect(served) as sock:
        reader = Reader(sock)
        sock.sendall(request(b"x" * (MAX_BODY + 5)))
        assert reader.answer()[0] == 413
        sock.sendall(request(SEED_BYTES, content_type="text/plain"))
        assert reader.answer()[0] == 415
        sock.sendall(request(b"{not json"))
        assert reader.answer()[0] == 400
    rejected = [i for i in served.ports.items[before:] if isinstance(i, Rejected)]
    assert [r.status_code for r in rejected] == [413, 415, 400]
    assert len(rejected[0].body) == MAX_BODY
    assert all(r.reason for r in rejected)


def test_expect_100_continue_then_the_answer(served: Served) -> None:
    body = fresh()
    with connect(served) as sock:
        sock.sendall(request(body, "Expect: 100-continue")[: -len(body)])
        reader = Reader(sock)
        assert reader.answer()[0] == 100
        sock.sendall(body)
        assert reader.answer()[0] == 202
        big = request(b"", "Expect: 100-continue", length=MAX_BODY * 4)
        sock.sendall(big)
        status, headers, _ = reader.answer()
        assert (status, headers["connection"]) == (413, "close")
        assert reader.closed()


@pytest.mark.parametrize("extra", [(), ("Connection: keep-alive",)])
def test_http_1_0_is_answered_and_closed(served: Served, extra: tuple[str, ...]) -> None:
    with connect(served) as sock:
        sock.sendall(request(fresh(), *extra, version="HTTP/1.0"))
        reader = Reader(sock)
        status, headers, _ = reader.answer()
        assert status == 202
        assert headers["connection"] == "close"
        assert reader.closed()


def test_mixed_case_headers_and_scheme_are_taken(served: Served) -> None:
    body = fresh()
    raw = (
        f"POST {PATH} HTTP/1.1\r\nhOsT: x\r\naUtHoRiZaTiOn: bEaReR {TOKEN_A}\r\n"
        f"CONTENT-type: Application/JSON; Charset=UTF-8\r\ncontent-LENGTH: {len(body)}\r\n\r\n"
    ).encode() + body
    with connect(served) as sock:
        sock.sendall(raw)
        assert Reader(sock).answer()[0] == 202


def test_answers_across_a_second_boundary_carry_the_current_date(served: Served) -> None:
    with connect(served) as sock:
        reader = Reader(sock)
        dates = []
        for _ in range(3):
            sock.sendall(request(fresh()))
            dates.append(reader.answer()[1]["date"])
            time.sleep(0.6)
    assert len(set(dates)) >= 2  # 1.2 s apart at least: a new Date header, not a kept head


def test_the_console_listener_gets_the_app_itself(served: Served) -> None:
    config = served.ports.config
    app = object()
    console = console_config(app, config.console, config) if config.console else None
    if console is not None:
        assert console.app is app
    webhook = uvicorn_config(create_app(served.ports), config, host="127.0.0.1", port=1)
    assert isinstance(webhook.app, WebhookFastPath)
    assert webhook.proxy_headers is False


def test_nothing_logged_carries_a_customer_value_or_the_token(served: Served) -> None:
    with connect(served) as sock:
        reader = Reader(sock)
        sock.sendall(request(SEED_BYTES, token=TOKEN_A + "x"))
        assert reader.answer()[0] == 403
        sock.sendall(request(SEED_BYTES, "Content-Encoding: gzip"))
        status, _, body = reader.answer()
        assert status == 415
        for word in PII_WORDS:
            assert word not in body.decode().lower()
    logs = served.logs.getvalue()
    assert logs
    for word in PII_WORDS:
        assert word not in logs.lower()
    for value in PII_VALUES:
        assert value not in logs


def test_zz_lifespan_stops(tmp_path: Path) -> None:
    ports = Ports(load_config(write_config(tmp_path)))
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(create_app(ports), ports.config, host="127.0.0.1", port=port)
    )

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        server.should_exit = True
        await task

    asyncio.run(main())
    assert ports.lifespan_seen == ["start", "stop"]


def test_a_shutdown_while_the_commit_hangs_answers_then_closes(tmp_path: Path) -> None:
    ports = Ports(load_config(write_config(tmp_path)))
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(create_app(ports), ports.config, host="127.0.0.1", port=port)
    )

    async def main() -> bytes:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ports.mode = "hang"
        writer.write(request(fresh()))
        while not ports.waiting.is_set():
            await asyncio.sleep(0.01)
        server.should_exit = True
        await asyncio.sleep(0.3)
        assert ports.release is not None
        ports.release.set()
        data = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        await task
        return data

    data = asyncio.run(main())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202 ")
    assert b"\r\nconnection: close" in head
    assert body == b'{"status":"accepted"}'
    assert len(ports.items) == 1


@pytest.mark.parametrize(
    ("after", "status", "error"),
    [
        (
            b"POST " + PATH.encode() + b" HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
            413,
            "headers_too_large",
        ),
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
            413,
            "too_many_headers",
        ),
    ],
    ids=["431-ish", "400", "too-many"],
)
def test_a_refusal_behind_fast_answers_comes_after_them_whole(
    served: Served, after: bytes, status: int, error: str
) -> None:
    with connect(served) as sock:
        sock.sendall(request(fresh()) + request(fresh(), token=None) + after)
        reader = Reader(sock)
        assert reader.answer()[0] == 202
        assert reader.answer()[0] == 401
        got, headers, body = reader.answer()
        assert (got, json.loads(body)["error"], headers["connection"]) == (status, error, "close")
        assert reader.closed()


def _bad_values() -> list[bytes]:
    """Bodies whose refused values carry a sentinel: wrong types, bad dates, bad JSON."""
    out = []
    for field, value in (
        ("birthday", "SENTINEL-1948"),
        ("last_update", "SENTINEL-2026"),
        ("email", 12345678901),
        ("customer_id", {"SENTINEL": 1}),
        ("first_name", ["SENTINEL"]),
        ("opt_out", "SENTINEL"),
        ("addresses", "SENTINEL"),
    ):
        body = json.loads(SEED_BYTES)
        body["data"][field] = value
        out.append(json.dumps(body).encode())
    out.append(SEED_BYTES.replace(b'"Jules"', b'"SENTINEL" ,,'))
    out.append(SEED_BYTES.replace(b'"Jules"', b'"SENTINEL\xff"'))
    out.append(SEED_BYTES[:-40])
    return out


def test_refused_values_are_neither_answered_nor_logged(served: Served) -> None:
    mark = len(served.logs.getvalue())
    answers = []
    with connect(served) as sock:
        reader = Reader(sock)
        for body in _bad_values():
            sock.sendall(request(body))
            status, _, text = reader.answer()
            answers.append((status, text))
    logs = served.logs.getvalue()[mark:]
    for status, text in answers:
        assert status in (202, 400, 422), text
        for needle in (b"SENTINEL", b"12345678901", b"Jules", b"Winnfield"):
            assert needle not in text, (status, text)
    for needle in ("SENTINEL", "12345678901", "Jules", "Winnfield", TOKEN_A):
        assert needle not in logs


def test_a_slow_reader_of_large_pipelined_answers_gets_each_once_in_order(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    paused: list[int] = []
    pause = LimitedHttpProtocol.pause_writing

    def counted(self: LimitedHttpProtocol) -> None:
        paused.append(1)
        pause(self)

    made = LimitedHttpProtocol.connection_made

    def small_buffers(self: LimitedHttpProtocol, transport: Any) -> None:
        # a slow reader, sooner: a small socket buffer and a low high-water mark
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=2048)
        made(self, transport)

    monkeypatch.setattr(LimitedHttpProtocol, "pause_writing", counted)
    monkeypatch.setattr(LimitedHttpProtocol, "connection_made", small_buffers)
    get = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(WAIT)
    sock.connect(("127.0.0.1", served.port))
    with sock:
        packet = b"".join(get if i % 3 else request(fresh(), f"X-Order: {i}") for i in range(15))
        sock.sendall(packet)
        time.sleep(0.3)  # the server's writes pile up against a full receive window
        reader = Reader(sock)
        answers = [reader.answer() for _ in range(15)]
    documents = [body for status, _, body in answers if status == 200]
    assert [a[0] for a in answers] == [202 if i % 3 == 0 else 200 for i in range(15)]
    assert len(documents) == 10
    assert len(documents[0]) > 8192
    assert all(d == documents[0] for d in documents)
    assert paused  # the transport was paused: the slow path was taken


def _framing(body: bytes) -> dict[str, bytes]:
    start = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n"
        "Content-Type: application/json\r\n"
    ).encode()
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    return {
        "cl+te": start + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        "two-cl": start + b"Content-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(body) + body,
        "te-space": start + b"Transfer-Encoding : chunked\r\n\r\n" + chunked,
        "te-xchunked": start + b"Transfer-Encoding: xchunked\r\n\r\n" + body,
        "lf-only": start.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % len(body) + body,
        "obs-fold": start.replace(b"Bearer ", b"Bearer\r\n ")
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body,
    }


@pytest.mark.parametrize(
    "case", ["cl+te", "two-cl", "te-space", "te-xchunked", "lf-only", "obs-fold"]
)
def test_ambiguous_framing_is_refused_before_the_fast_path(served: Served, case: str) -> None:
    before = len(served.ports.items)
    with connect(served) as sock:
        sock.sendall(_framing(fresh())[case])
        reader = Reader(sock)
        status, headers, body = reader.answer()
        assert (status, json.loads(body)["error"]) == (400, "bad_request")
        assert headers["connection"] == "close"
        assert reader.closed()
    assert len(served.ports.items) == before
