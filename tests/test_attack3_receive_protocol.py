"""Adversarial pass on the listener's answer path (connector/http_protocol.py's ``_Cycle``,
``_Heads`` and ``_CycleTransport.hold``): pipelined requests, a slow reader pausing the
transport, a Date header changing between requests of one connection, the 64-entry head
cache filled by varied answers, and ASGI messages uvicorn accepts. Each case runs the
listener's protocol and uvicorn's own on fake transports in one event loop, and compares
the bytes the client gets. ``xfail(strict=True)`` tests are breaks (their reason says what
breaks and where); plain tests are attacks that held."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from test_perf3_receive_answers import FakeTransport, _request
from uvicorn.server import ServerState

from connector.http_protocol import ClientLimits, protocol_class

DATE_1 = (b"date", b"Sun, 06 Dec 2026 23:00:00 GMT")
DATE_2 = (b"date", b"Sun, 06 Dec 2026 23:00:01 GMT")
SERVER = (b"server", b"uvicorn")


class PausingTransport(FakeTransport):
    """A transport whose client reads slowly: past ``high`` bytes unread, the protocol's
    writing is paused; ``drain`` empties the buffer and resumes it."""

    def __init__(self, high: int) -> None:
        super().__init__()
        self.high = high
        self.buffered = 0
        self.paused = False
        self.protocol: Any = None
        self.late: list[bytes] = []  # written after the close

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            self.late.append(bytes(data))
            return
        super().write(data)
        self.buffered += len(data)
        if not self.paused and self.buffered > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self) -> None:
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered


Step = Callable[[Any, Any, ServerState], Awaitable[None] | None]


async def _turns(n: int = 60) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _drive(app: Any, http: Any, steps: list[Step], transport: FakeTransport) -> None:
    config = uvicorn.Config(
        app,
        http=http,
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )
    config.load()
    state = ServerState()
    state.default_headers = [DATE_1, SERVER]
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
    )
    if isinstance(transport, PausingTransport):
        transport.protocol = protocol
    protocol.connection_made(transport)
    for step in steps:
        result = step(protocol, transport, state)
        if result is not None:
            await result
        await _turns()
    await _turns()
    for task in list(state.tasks):
        task.cancel()
    await _turns(5)
    for name in ("timeout_keep_alive_task", "_timer", "_write_deadline"):
        timer = getattr(protocol, name, None)
        if timer is not None:
            timer.cancel()


def both(
    app: Any, steps: list[Step], make: Callable[[], FakeTransport] = FakeTransport
) -> tuple[FakeTransport, FakeTransport]:
    """The listener's protocol and uvicorn's own, through the same steps."""
    ours, theirs = make(), make()
    asyncio.run(_drive(app, protocol_class(ClientLimits()), steps, ours))
    asyncio.run(_drive(app, "httptools", steps, theirs))
    return ours, theirs


def feed(data: bytes) -> Step:
    def step(protocol: Any, transport: Any, state: ServerState) -> None:
        protocol.data_received(data)

    return step


def new_date(protocol: Any, transport: Any, state: ServerState) -> None:
    state.default_headers = [DATE_2, SERVER]  # uvicorn's tick: a new list each second


def drain(protocol: Any, transport: Any, state: ServerState) -> None:
    transport.drain()


def post(body: bytes = b"{}", *headers: str, path: str = "/") -> bytes:
    return _request("POST", path, *headers, body=body)


def _echo_app(hold: asyncio.Event | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/")
    async def answer(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({"n": len(body), "pad": "x" * len(body)}, status_code=202)

    return app


def _responses(data: bytes) -> list[bytes]:
    """The answers in ``data``, each head and body (Content-Length framed)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        out.append(head + sep + rest[:length])
        data = rest[length:]
    return out


# --- pipelining -------------------------------------------------------------------------------


def test_pipelined_requests_in_one_packet_are_answered_as_uvicorn_does() -> None:
    packet = b"".join(post(b"x" * n) for n in (1, 20, 3, 400))
    ours, theirs = both(_echo_app(), [feed(packet)])
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert len(_responses(b"".join(ours.writes))) == 4


def test_a_request_arriving_while_the_first_is_answered_keeps_the_order() -> None:
    gate: dict[str, asyncio.Event] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/slow":
            event = gate.setdefault("slow", asyncio.Event())
            await event.wait()
        body = scope["path"].encode()
        await send(
            {
                "type": "http.response.start",
                "status": 202,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def release(protocol: Any, transport: Any, state: ServerState) -> None:
        gate.pop("slow").set()

    steps = [feed(post(path="/slow")), feed(post(path="/second")), release]
    ours, theirs = both(app, steps)
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    answers = _responses(b"".join(ours.writes))
    assert [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers] == [b"/slow", b"/second"]


def test_a_date_change_between_pipelined_answers_follows_each_cycles_defaults() -> None:
    gate: dict[str, asyncio.Event] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        if scope["path"] == "/slow":
            await gate.setdefault("slow", asyncio.Event()).wait()
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def release(protocol: Any, transport: Any, state: ServerState) -> None:
        gate.pop("slow").set()

    steps = [
        feed(post(path="/slow") + post(path="/b")),
        new_date,
        feed(b""),
        release,
        feed(post(path="/c")),
    ]
    ours, theirs = both(app, steps)
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    answers = _responses(b"".join(ours.writes))
    assert len(answers) == 3
    assert DATE_2[1] in answers[2]


def test_a_new_date_list_on_one_connection_is_never_answered_with_a_stale_head() -> None:
    app = _echo_app()
    steps = [feed(post(b"ab")), new_date, feed(post(b"ab")), feed(post(b"ab"))]
    ours, theirs = both(app, steps)
    answers = _responses(b"".join(ours.writes))
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert DATE_1[1] in answers[0]
    assert DATE_2[1] in answers[1]
    assert DATE_2[1] in answers[2]


# --- slow readers -----------------------------------------------------------------------------


@pytest.mark.parametrize("high", [1, 150, 600, 5000])
def test_a_slow_reader_gets_every_pipelined_answer_once_and_in_order(high: int) -> None:
    packet = b"".join(post(b"y" * n) for n in (5, 300, 7, 900, 2, 50))
    steps: list[Step] = [feed(packet)] + [drain] * 12
    ours, theirs = both(_echo_app(), steps, lambda: PausingTransport(high))
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    answers = _responses(b"".join(ours.writes))
    assert [a.count(b"HTTP/1.1 202") for a in answers] == [1] * 6


def test_a_client_lost_while_paused_gets_no_write_after_the_loss() -> None:
    def lose(protocol: Any, transport: Any, state: ServerState) -> None:
        transport.closed = True
        protocol.connection_lost(None)

    packet = b"".join(post(b"z" * n) for n in (400, 400, 400))
    ours, theirs = both(_echo_app(), [feed(packet), lose, drain], lambda: PausingTransport(100))
    # uvicorn's head goes out alone, then the pause holds its body; here head and body are
    # one write: the client has a whole first answer, and nothing after the loss
    assert b"".join(ours.writes).startswith(b"".join(theirs.writes))
    assert len(_responses(b"".join(ours.writes))) == 1
    assert isinstance(ours, PausingTransport)
    assert ours.late == []


# --- the head cache ---------------------------------------------------------------------------


def test_a_hundred_varied_answers_each_get_their_own_head() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        n = int(scope["path"].strip("/"))
        body = b"x" * (n % 7)
        headers = [(b"x-n", str(n % 70).encode()), (b"content-length", str(len(body)).encode())]
        await send(
            {
                "type": "http.response.start",
                "status": (200, 201, 202, 409)[n % 4],
                "headers": headers,
            }
        )
        await send({"type": "http.response.body", "body": body})

    steps = [feed(_request("GET", f"/{n}")) for n in range(140)]
    steps.insert(70, new_date)
    ours, theirs = both(app, steps)
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert len(_responses(b"".join(ours.writes))) == 140


def test_two_listeners_sharing_the_cache_keep_their_own_defaults() -> None:
    """The console and the webhook listener run in one process: the module-wide cache must
    never give one listener's head (its Date, Server) to the other."""

    async def run() -> tuple[bytes, bytes]:
        app = _echo_app()
        config = uvicorn.Config(
            app,
            http=protocol_class(ClientLimits()),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
        )
        config.load()
        loop = asyncio.get_running_loop()
        one, two = ServerState(), ServerState()
        one.default_headers = [DATE_1, SERVER]
        two.default_headers = [DATE_2, (b"server", b"console")]
        out = []
        for state in (one, two, one, two):
            protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state={}, _loop=loop
            )
            transport = FakeTransport()
            protocol.connection_made(transport)
            protocol.data_received(post(b"q"))
            await _turns()
            out.append(b"".join(transport.writes))
            protocol.timeout_keep_alive_task.cancel()
            protocol._timer.cancel()
        assert out[0] == out[2]
        assert out[1] == out[3]
        return out[0], out[1]

    first, second = asyncio.run(run())
    assert DATE_1[1] in first
    assert b"server: uvicorn" in first
    assert DATE_2[1] in second
    assert b"server: console" in second


# --- ASGI messages uvicorn accepts ------------------------------------------------------------


def _headers_app(make_headers: Callable[[], Any], status: Any = 200) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": status, "headers": make_headers()})
        await send({"type": "http.response.body", "body": b"hello"})

    return app


def _gen() -> Iterator[tuple[bytes, bytes]]:
    yield (b"content-type", b"text/plain")
    yield (b"content-length", b"5")


def test_headers_given_as_a_generator_are_written_as_uvicorn_writes_them() -> None:
    ours, theirs = both(_headers_app(_gen), [feed(_request("GET", "/"))])
    assert b"content-length: 5" in b"".join(theirs.writes)
    assert b"".join(ours.writes) == b"".join(theirs.writes)


@pytest.mark.parametrize(
    "make_headers",
    [
        lambda: [[b"content-length", b"5"]],
        lambda: ((b"Content-Length", b"5"), (b"X-A", b"1")),
        lambda: [(b"content-length", b"5"), (b"content-length", b"5")],
        lambda: [(b"content-length", b" 5 ")],
        lambda: [(b"content-length", b"5"), (b"x", bytearray(b"y"))],
        lambda: [(b"content-length", b"5"), (b"connection", b"keep-alive")],
        lambda: [(b"content-length", b"5"), (b"transfer-encoding", b"identity")],
    ],
    ids=["lists", "tuple-mixed-case", "two-lengths", "spaced", "bytearray", "keep-alive", "te"],
)
def test_unusual_heads_match_uvicorn(make_headers: Callable[[], Any]) -> None:
    ours, theirs = both(_headers_app(make_headers), [feed(_request("GET", "/"))])
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert ours.closed == theirs.closed


def test_http_1_0_and_connection_close_match_uvicorn() -> None:
    app = _echo_app()
    for request in (
        b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",
        b"POST / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
        post(b"{}", "Connection: close"),
        post(b"{}", "CONNECTION: Close"),
    ):
        ours, theirs = both(app, [feed(request), feed(post(b"{}"))])
        assert b"".join(ours.writes) == b"".join(theirs.writes)
        assert ours.closed
        assert theirs.closed


def test_a_head_sent_before_the_app_reads_the_body_reaches_the_client_at_once() -> None:
    seen: dict[str, list[bytes]] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        start = {"type": "http.response.start", "status": 200}
        await send({**start, "headers": [(b"content-length", b"2")]})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.body", "body": b"ok"})

    def snapshot(protocol: Any, transport: Any, state: ServerState) -> None:
        seen.setdefault("ours" if "ours" not in seen else "theirs", list(transport.writes))

    head = b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    ours, theirs = both(app, [feed(head), snapshot, feed(b"abc")])
    assert b"".join(ours.writes) == b"".join(theirs.writes)  # in the end, the same bytes
    assert seen["theirs"]
    assert seen["theirs"][0].startswith(b"HTTP/1.1 200 OK")
    assert seen["ours"] == seen["theirs"]
