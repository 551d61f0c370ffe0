"""An answer's head and body leave in one write to the socket (connector/http_protocol.py,
_CycleTransport): uvicorn writes them apart, a send and a segment each."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from connector.http_protocol import _CycleTransport


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _cycle(method: str = "POST", length: int = 10, chunked: bool | None = False) -> Any:
    return SimpleNamespace(
        scope={"method": method},
        response_started=False,
        response_complete=False,
        more_body=False,
        expected_content_length=length,
        chunked_encoding=chunked,
    )


def _transport(cycle: Any, loop: asyncio.AbstractEventLoop) -> tuple[_CycleTransport, _Recorder]:
    raw = _Recorder()
    protocol: Any = SimpleNamespace(loop=loop)
    return _CycleTransport(protocol, raw, cycle), raw  # type: ignore[arg-type]


def test_head_and_body_in_one_write() -> None:
    async def main() -> list[bytes]:
        cycle = _cycle()
        transport, raw = _transport(cycle, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the answer: at once
        cycle.response_started = True
        transport.write(b"HEAD\r\n\r\n")
        assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        transport.write(b"0123456789")
        await asyncio.sleep(0)  # the fallback flush finds nothing held
        return raw.writes

    assert asyncio.run(main()) == [b"HTTP/1.1 100 Continue\r\n\r\n", b"HEAD\r\n\r\n0123456789"]


def test_a_head_whose_body_is_late_goes_out_at_the_next_turn() -> None:
    async def main() -> list[bytes]:
        cycle = _cycle()
        transport, raw = _transport(cycle, asyncio.get_running_loop())
        cycle.response_started = True
        transport.write(b"HEAD\r\n\r\n")
        await asyncio.sleep(0)
        assert raw.writes == [b"HEAD\r\n\r\n"]
        transport.write(b"0123456789")
        return raw.writes

    assert asyncio.run(main()) == [b"HEAD\r\n\r\n", b"0123456789"]


def test_heads_without_a_body_to_follow_are_not_held() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for cycle in (_cycle(method="HEAD"), _cycle(length=0), _cycle(chunked=True)):
            transport, raw = _transport(cycle, loop)
            cycle.response_started = True
            transport.write(b"HEAD\r\n\r\n")
            assert raw.writes == [b"HEAD\r\n\r\n"]

    asyncio.run(main())


def test_a_close_writes_a_held_head_first() -> None:
    async def main() -> list[bytes]:
        cycle = _cycle()
        transport, raw = _transport(cycle, asyncio.get_running_loop())
        cycle.response_started = True
        transport.write(b"HEAD\r\n\r\n")
        transport.close()
        assert raw.closed
        await asyncio.sleep(0)
        return raw.writes

    assert asyncio.run(main()) == [b"HEAD\r\n\r\n"]
