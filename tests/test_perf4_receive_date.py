"""The receiver's Date header made on demand (issue 17, cost at a trickle): an idle server no
longer wakes each second to refresh it. The header is made when a request reads the defaults
in a new second, as uvicorn's on_tick would have made it; the loop still ends when told to,
and still ticks each second where uvicorn has something to check then (a request limit)."""

from __future__ import annotations

import asyncio
import socket
from email.utils import formatdate
from typing import Any

import pytest
import uvicorn

from connector import server as server_module
from connector.http_protocol import ClientLimits, protocol_class
from connector.server import ConnectorServer, DatedState, QuietServer


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock(1_796_500_000.25)
    monkeypatch.setattr(server_module, "time", fake)
    return fake


def _config(**kw: Any) -> uvicorn.Config:
    config = uvicorn.Config(_app, lifespan="off", log_config=None, **kw)
    config.load()
    return config


def _uvicorns(config: uvicorn.Config, now: float) -> list[tuple[bytes, bytes]]:
    """What uvicorn's Server.on_tick sets at ``now``."""
    date = [(b"date", formatdate(now, usegmt=True).encode())] if config.date_header else []
    return date + config.encoded_headers


@pytest.mark.parametrize(
    "kw", [{}, {"date_header": False}, {"headers": [("x-served-by", "c")], "server_header": False}]
)
def test_defaults_are_uvicorns_made_once_a_second(clock: _Clock, kw: dict[str, Any]) -> None:
    config = _config(**kw)
    state = DatedState(config)
    first = state.default_headers
    assert first == _uvicorns(config, clock.now)
    clock.now += 0.7  # the same second: the same list (answer heads are kept per list)
    assert state.default_headers is first
    clock.now += 0.1
    later = state.default_headers
    assert later is not first
    assert later == _uvicorns(config, clock.now)


def test_on_ticks_own_defaults_are_kept_for_their_second(clock: _Clock) -> None:
    state = DatedState(_config())
    given = [(b"date", b"x")]
    state.default_headers = given
    assert state.default_headers is given
    clock.now += 1
    assert state.default_headers != given


def _timers() -> list[asyncio.TimerHandle]:
    loop: Any = asyncio.get_running_loop()
    return [t for t in loop._scheduled if not t.cancelled()]


@pytest.mark.parametrize("kind", [ConnectorServer, QuietServer])
def test_an_idle_server_has_no_timer_and_ends_when_told(kind: type[QuietServer]) -> None:
    async def scenario() -> None:
        server = kind(_config())
        loop = asyncio.create_task(server.main_loop())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not loop.done()
        assert _timers() == []  # nothing wakes it: no Date timer
        server.should_exit = True
        await asyncio.wait_for(loop, 30)  # a guard against a hang, not a timing

    asyncio.run(scenario())


def test_a_server_with_a_request_limit_still_ticks_and_stops_at_it() -> None:
    async def scenario() -> None:
        server = QuietServer(_config(limit_max_requests=3))
        loop = asyncio.create_task(server.main_loop())
        for _ in range(5):
            await asyncio.sleep(0)
        assert _timers() != []  # the tick that checks the limit
        server.server_state.total_requests = 3
        await asyncio.wait_for(loop, 30)

    asyncio.run(scenario())


def test_a_stop_then_a_change_of_mind_does_not_spin() -> None:
    async def scenario() -> None:
        server = QuietServer(_config())
        ticks = 0
        on_tick = server.on_tick

        async def counted(counter: int) -> bool:
            nonlocal ticks
            ticks += 1
            return await on_tick(counter)

        server.on_tick = counted  # type: ignore[method-assign]
        loop = asyncio.create_task(server.main_loop())
        await asyncio.sleep(0)
        server.should_exit = True
        server.should_exit = False  # before the loop looked
        for _ in range(20):
            await asyncio.sleep(0)
        assert ticks <= 2  # woken once, then asleep again
        server.should_exit = True
        await asyncio.wait_for(loop, 30)

    asyncio.run(scenario())


def test_served_answers_carry_the_date_of_their_second(clock: _Clock) -> None:
    async def scenario() -> list[bytes]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            _app, lifespan="off", log_config=None, http=protocol_class(ClientLimits())
        )
        server = QuietServer(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        heads = []
        for _ in range(3):
            clock.now += 1  # past the second of the start's own defaults (on_tick's)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(2)
        writer.close()
        server.should_exit = True
        await asyncio.wait_for(serving, 30)
        sock.close()
        return heads

    start = clock.now
    heads = asyncio.run(scenario())
    for i, head in enumerate(heads):
        date = formatdate(start + i + 1, usegmt=True).encode()
        assert b"\r\ndate: " + date + b"\r\n" in head
