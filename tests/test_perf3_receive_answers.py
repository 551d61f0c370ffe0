"""The listener's answers after the receiver's CPU work (issue 17): answer heads rendered once
per Date header and written with their body in one send (connector/http_protocol.py's _Cycle),
uvicorn's header callback inlined, and the webhook's fast path in front of the FastAPI app
itself (receiver.serving_app). Each answer must be byte for byte what uvicorn's own protocol
writes; only the number of writes may differ. The protocol runs here on a fake transport, in
one event loop, without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from uvicorn.server import ServerState

from connector.http_protocol import ClientLimits, protocol_class
from connector.receiver import WebhookFastPath, add_fast_path, serving_app

DEFAULTS = [(b"date", b"Sun, 06 Dec 2026 22:40:00 GMT"), (b"server", b"uvicorn")]


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


async def _exchange(app: Any, request: bytes, http: Any) -> FakeTransport:
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
    state.default_headers = list(DEFAULTS)
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(100):  # the app's task and whatever it schedules
        await asyncio.sleep(0)
    for task in list(state.tasks):
        task.cancel()
    timer = getattr(protocol, "timeout_keep_alive_task", None)
    if timer is not None:
        timer.cancel()
    own = getattr(protocol, "_timer", None)
    if own is not None:
        own.cancel()
    return transport


def exchange(app: Any, request: bytes) -> tuple[FakeTransport, FakeTransport]:
    """The same request answered by the listener's protocol and by uvicorn's own."""
    ours = asyncio.run(_exchange(app, request, protocol_class(ClientLimits())))
    theirs = asyncio.run(_exchange(app, request, "httptools"))
    return ours, theirs


def _request(method: str = "POST", path: str = "/", *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _chunks() -> AsyncIterator[bytes]:
    for chunk in (b"a", b"bc"):
        yield chunk


def _app(make: Callable[[Request], Response]) -> FastAPI:
    app = FastAPI()

    @app.api_route("/", methods=["GET", "POST", "HEAD"])
    async def answer(request: Request) -> Response:
        await request.body()
        return make(request)

    return app


@pytest.mark.parametrize(
    "make",
    [
        lambda r: JSONResponse({"status": "accepted"}, status_code=202),
        lambda r: JSONResponse({"error": "x"}, status_code=503, headers={"retry-after": "5"}),
        lambda r: JSONResponse({"error": "x"}, status_code=413, headers={"connection": "close"}),
        lambda r: Response(b"", status_code=204),
        lambda r: Response(b"", status_code=200),
        lambda r: StreamingResponse(_chunks(), media_type="text/plain"),
    ],
    ids=["202", "503-retry", "close", "204", "empty", "chunked"],
)
@pytest.mark.parametrize("method", ["POST", "GET", "HEAD"])
def test_answers_are_uvicorns_byte_for_byte(
    make: Callable[[Request], Response], method: str
) -> None:
    app = _app(make)
    body = b'{"a": 1}' if method == "POST" else b""
    ours, theirs = exchange(app, _request(method, "/", body=body))
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert ours.closed == theirs.closed


def test_a_plain_answer_is_one_write() -> None:
    app = _app(lambda r: JSONResponse({"status": "accepted"}, status_code=202))
    ours, theirs = exchange(app, _request("POST", "/", body=b"{}"))
    assert len(ours.writes) == 1
    assert ours.writes[0].startswith(b"HTTP/1.1 202 ")
    assert ours.writes[0].endswith(b"}")
    assert b"".join(theirs.writes) == ours.writes[0]


def test_a_second_answer_reuses_the_rendered_head_and_follows_new_defaults() -> None:
    app = _app(lambda r: JSONResponse({"status": "accepted"}, status_code=202))
    first, _ = exchange(app, _request("POST", "/", body=b"{}"))
    again, _ = exchange(app, _request("POST", "/", body=b"{}"))
    assert first.writes == again.writes
    DEFAULTS[0] = (b"date", b"Sun, 06 Dec 2026 22:40:01 GMT")
    try:
        later, theirs = exchange(app, _request("POST", "/", body=b"{}"))
    finally:
        DEFAULTS[0] = (b"date", b"Sun, 06 Dec 2026 22:40:00 GMT")
    assert b"22:40:01" in later.writes[0]
    assert later.writes == [b"".join(theirs.writes)]


def test_a_head_without_its_body_goes_out_when_the_app_ends() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )

    ours, theirs = exchange(app, _request("GET", "/"))
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert b"".join(ours.writes).startswith(b"HTTP/1.1 200 OK\r\n")
    assert ours.closed
    assert theirs.closed


def test_a_head_the_app_waits_after_is_held_for_its_body() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"ok"})

    ours, theirs = exchange(app, _request("GET", "/"))
    assert b"".join(ours.writes) == b"".join(theirs.writes)
    assert ours.writes[-1].endswith(b"\r\n\r\nok")


def test_invalid_answers_fail_as_in_uvicorn() -> None:
    for headers in (
        [(b"bad name", b"x"), (b"content-length", b"0")],
        [(b"x", b"a\nb"), (b"content-length", b"0")],
        [(b"content-length", b"nope")],
    ):

        async def app(scope: Any, receive: Any, send: Any, headers: Any = headers) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b""})

        ours, theirs = exchange(app, _request("GET", "/"))
        # uvicorn refuses the head and, the answer begun, closes without a word
        assert ours.writes == theirs.writes == []
        assert ours.closed
        assert theirs.closed


def test_headers_reach_the_app_as_uvicorn_gives_them() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["headers"])
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    request = _request("POST", "/", "X-Mixed-Case: Value  ", "Expect: 100-Continue", body=b"hi")
    ours, theirs = exchange(app, request)
    assert seen[0] == seen[2]
    assert (b"x-mixed-case", b"Value") in seen[0]
    assert seen[1] == seen[3] == b"hi"
    assert ours.writes[0] == theirs.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"".join(ours.writes) == b"".join(theirs.writes)


def test_serving_app_puts_the_fast_paths_in_front_of_the_app() -> None:
    app = FastAPI()
    calls: list[str] = []

    async def handler(dispensary: str, request: Request) -> Response:
        calls.append(dispensary)
        return JSONResponse({"status": "accepted"}, status_code=202)

    @app.get("/other")
    async def other() -> dict[str, str]:
        return {"status": "ok"}

    add_fast_path(app, handler, prefix="/in/")
    served = serving_app(app)
    assert isinstance(served, WebhookFastPath)
    assert served.app is app
    ours, _ = exchange(served, _request("POST", "/in/d1", body=b"{}"))
    assert calls == ["d1", "d1"]
    assert ours.writes[0].startswith(b"HTTP/1.1 202 ")
    other_answer, _ = exchange(served, _request("GET", "/other"))
    assert b'{"status":"ok"}' in b"".join(other_answer.writes)
    # the app alone (a test client's way) still takes the fast path, inside Starlette
    direct, _ = exchange(app, _request("POST", "/in/d2", body=b"{}"))
    assert calls == ["d1", "d1", "d2", "d2"]
    assert direct.writes[0].startswith(b"HTTP/1.1 202 ")
    plain = object()
    assert serving_app(plain) is plain
