"""Adversarial tests of the lean HTTP/1.1 client (connector/delivery/_h1.py) and of the http
destination over it: raw asyncio servers answer hand-written bytes, so framing is exact."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import shutil
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from connector.delivery._h1 import MAX_BODY, H1Error, H1Pool
from connector.delivery.base import Delivery
from connector.destinations.http import HttpDestination, HttpSink
from connector.errors import FatalDelivery, RetriableDelivery

SECRET = "s3cr3t-Value-42"

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A raw TCP server on 127.0.0.1: ``handler`` runs once per connection."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.requests: list[tuple[bytes, bytes]] = []  # head, body of every request read
        self.connections = 0
        self.live = 0
        self.max_live = 0
        self.closed_conns = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pools: list[H1Pool] = []

    def pool(self, url: str | None = None, **options: Any) -> H1Pool:
        pool = H1Pool(url or self.url, **options)
        self._pools.append(pool)
        return pool

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/hook"

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._on_conn, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        for pool in self._pools:
            await pool.aclose()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0.01)  # let closed transports finish

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self.live -= 1
            self.closed_conns += 1
            writer.close()
            self._tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body


def serve(*answers: bytes, close_after: bool = False) -> Handler:
    """Answers the n-th request of the whole server with ``answers[n]`` (the last repeats)."""

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await srv.read_request(reader) is not None:
            n = len(srv.requests) - 1
            writer.write(answers[min(n, len(answers) - 1)])
            await writer.drain()
            if close_after:
                return

    return handler


def ok(body: bytes = b"ok", extra: str = "") -> bytes:
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra.encode(),
        len(body),
        body,
    )


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def refused_by(handler: Handler, timeout: float = 2.0) -> None:
    """A POST to a server running ``handler`` raises H1Error."""

    async def main() -> None:
        async with Server(handler) as srv:
            pool = srv.pool(limit=1, timeout=timeout)
            with pytest.raises(H1Error):
                await pool.post(b"x", {})

    run(main())


async def post_twice(handler: Handler, timeout: float = 1.0, pause: float = 0.0):
    async with Server(handler) as srv:
        pool = srv.pool(limit=1, timeout=timeout)
        try:
            first = await pool.post(b"one", {})
            if pause:
                await asyncio.sleep(pause)
            second = await pool.post(b"two", {})
        finally:
            await pool.aclose()
        return SimpleNamespace(srv=srv, pool=pool, first=first, second=second)


def rst_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---- 1. connection reuse ---------------------------------------------------------------------


def test_reuse_content_length_answers_are_each_their_own() -> None:
    r = run(post_twice(serve(ok(b"first"), ok(b"second"))))
    assert (r.first.body, r.second.body) == (b"first", b"second")
    assert r.pool.connections_opened == 1 == r.srv.connections


def test_reuse_chunked_answers_are_each_their_own() -> None:
    a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nfir\r\n2\r\nst\r\n0\r\n\r\n"
    r = run(post_twice(serve(a, ok(b"second"))))
    assert (r.first.body, r.second.body) == (b"first", b"second")
    assert r.pool.connections_opened == 1


def test_extra_bytes_after_body_are_not_read_as_next_answer() -> None:
    smuggled = ok(b"EVIL")
    r = run(post_twice(serve(ok(b"first") + smuggled, ok(b"second")), pause=0.05))
    assert (r.first.body, r.second.body) == (b"first", b"second")
    assert r.pool.connections_opened == 2


def test_extra_bytes_sent_with_large_body_are_not_read_as_next_answer() -> None:
    # the extra bytes sit in the kernel (the stream paused reading at 2x its limit) when the
    # next post checks the idle connection out at once: the check sees an empty buffer
    size = 2 * 1024 * 1024 - len(ok(b"x" * (1024 * 1024)))
    big = ok(b"x" * size)
    assert len(big) == 1024 * 1024
    r = run(post_twice(serve(big + ok(b"EVIL"), ok(b"second"))))
    assert len(r.first.body) == size
    assert r.second.body == b"second"
    assert r.pool.connections_opened == 2


def test_unsolicited_408_and_close_while_idle() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if await srv.read_request(reader) is None:
            return
        writer.write(ok(b"first"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(
            b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()

    async def handler2(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if srv.connections == 1:
            await handler(srv, reader, writer)
        else:
            await serve(ok(b"first"), ok(b"second"))(srv, reader, writer)

    r = run(post_twice(handler2, pause=0.2))
    assert (r.first.status, r.second.status, r.second.body) == (200, 200, b"second")
    assert r.pool.connections_opened == 2
    assert len(r.srv.requests) == 2


def test_unsolicited_408_without_close_while_idle() -> None:
    # the 408 stays buffered, the peer keeps the socket open: must not be taken as the answer
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if srv.connections == 1:
            if await srv.read_request(reader) is None:
                return
            writer.write(ok(b"first"))
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
            await reader.read()  # a second request may arrive; no answer is written
        else:
            await serve(ok(b"first"), ok(b"second"))(srv, reader, writer)

    r = run(post_twice(handler, pause=0.2))
    assert (r.second.status, r.second.body) == (200, b"second")


# ---- 2. idle keep-alive closed by the peer ---------------------------------------------------


def test_idle_connection_closed_by_peer_is_replaced() -> None:
    r = run(post_twice(serve(ok(b"first"), ok(b"second"), close_after=True), pause=0.1))
    assert r.second.body == b"second"
    assert r.pool.connections_opened == 2
    assert len(r.srv.requests) == 2


def test_peer_closes_after_reading_second_request_is_resent_once() -> None:
    # the keep-alive race: the peer closes just as the request arrives, no byte of an answer
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if srv.connections == 1:
            await srv.read_request(reader)
            writer.write(ok(b"first"))
            await writer.drain()
            await reader.readuntil(b"\r\n\r\n")  # the second request's head: drop it
            return
        await serve(ok(b"first"), ok(b"second"))(srv, reader, writer)

    r = run(post_twice(handler))
    assert r.second.body == b"second"
    assert r.pool.connections_opened == 2


def test_partial_answer_then_fin_is_not_resent() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if srv.connections == 1:
            await srv.read_request(reader)
            writer.write(ok(b"first"))
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-")
            await writer.drain()
            return
        await serve(ok(b"x"))(srv, reader, writer)

    async def main() -> tuple[Server, BaseException | None]:
        async with Server(handler) as srv:
            pool = srv.pool(limit=1, timeout=1.0)
            await pool.post(b"one", {})
            err: BaseException | None = None
            try:
                await pool.post(b"two", {})
            except H1Error as exc:
                err = exc
            await pool.aclose()
            return srv, err

    srv, err = run(main())
    assert isinstance(err, H1Error)
    assert [b for _, b in srv.requests] == [b"one", b"two"]


def test_partial_answer_then_reset_is_not_resent() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if srv.connections == 1:
            await srv.read_request(reader)
            writer.write(ok(b"first"))
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-")
            await writer.drain()
            await asyncio.sleep(0.1)  # the client has the bytes, then the reset
            rst_close(writer)
            return
        await serve(ok(b"x"))(srv, reader, writer)

    async def main() -> Server:
        async with Server(handler) as srv:
            pool = srv.pool(limit=1, timeout=1.0)
            await pool.post(b"one", {})
            with contextlib.suppress(H1Error, OSError):
                await pool.post(b"two", {})
            await pool.aclose()
            return srv

    srv = run(main())
    assert [b for _, b in srv.requests] == [b"one", b"two"]


# ---- 3. framing ------------------------------------------------------------------------------


def test_chunked_extensions_trailers_and_hex_case() -> None:
    a = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'A;name=val;q="x"\r\n0123456789\r\n'
        b"a\r\nabcdefghij\r\n"
        b"1F\r\n" + b"z" * 31 + b"\r\n"
        b"0;last\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"
    )
    r = run(post_twice(serve(a, ok(b"second"))))
    assert r.first.body == b"0123456789abcdefghij" + b"z" * 31
    assert r.second.body == b"second"
    assert r.pool.connections_opened == 1


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"0_5"])
def test_chunk_size_that_is_not_hex_digits_is_an_error(size: bytes) -> None:
    a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n"

    refused_by(serve(a), timeout=1.0)


def test_content_length_repeated_equal_is_one_length() -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    r = run(post_twice(serve(a, ok(b"second"))))
    assert (r.first.body, r.second.body) == (b"hello", b"second")


@pytest.mark.parametrize(
    "cl",
    [b"Content-Length: 5\r\nContent-Length: 6", b"Content-Length: 5, 6", b"Content-Length: -1"],
)
def test_content_length_conflicting_or_bad_is_h1error(cl: bytes) -> None:
    a = b"HTTP/1.1 200 OK\r\n" + cl + b"\r\n\r\nhello!"

    refused_by(serve(a), timeout=1.0)


@pytest.mark.parametrize("value", ["\xb2", "9" * 5000])
def test_content_length_odd_digits_is_h1error(value: str) -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: " + value.encode("latin-1") + b"\r\n\r\nhello"

    refused_by(serve(a), timeout=1.0)


def test_status_with_odd_digit_is_h1error() -> None:
    a = b"HTTP/1.1 2\xb20 OK\r\nContent-Length: 0\r\n\r\n"

    refused_by(serve(a), timeout=1.0)


def test_sink_malformed_content_length_is_retriable_and_unquoted(tmp_path: Path) -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: 1\xb2\r\n\r\nhello"

    async def main() -> None:
        async with Server(serve(a)) as srv:
            sink = HttpSink(sink_config(tmp_path, srv.url))
            try:
                with pytest.raises(RetriableDelivery) as info:
                    await sink.send([delivery()])
            finally:
                await sink.aclose()
            assert "\xb2" not in str(info.value)

    run(main())


def test_no_length_with_close_reads_to_end_and_is_not_reused() -> None:
    a = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    r = run(post_twice(serve(a, b"HTTP/1.1 200 OK\r\n\r\nagain", close_after=True)))
    assert (r.first.body, r.second.body) == (b"all of it", b"again")
    assert r.pool.connections_opened == 2


def test_http10_answer_is_read_and_not_reused() -> None:
    a = b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    r = run(post_twice(serve(a, ok(b"second"))))
    assert (r.first.body, r.second.body) == (b"abc", b"second")
    assert r.pool.connections_opened == 2


def test_interim_answers_skipped() -> None:
    a = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + ok(b"final", "X-A: 1\r\n")
    )
    r = run(post_twice(serve(a, ok(b"second"))))
    assert (r.first.status, r.first.body, r.second.body) == (200, b"final", b"second")
    assert "link" not in r.first.headers
    assert r.pool.connections_opened == 1


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(status: int) -> None:
    a = b"HTTP/1.1 %d X\r\n\r\n" % status
    r = run(post_twice(serve(a, ok(b"second"))))
    assert (r.first.status, r.first.body, r.second.body) == (status, b"", b"second")
    assert r.pool.connections_opened == 1


def test_transfer_encoding_with_content_length_is_not_desynchronised() -> None:
    # by Content-Length the body would end after "5\r\nhello"; chunked framing goes on, and the
    # rest of the connection holds a smuggled answer
    a = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n" + ok(b"SMUGGLED")
    )
    r = run(post_twice(serve(a, ok(b"second")), pause=0.05))
    assert r.first.body == b"hello"
    assert r.second.body == b"second"


def test_content_length_then_transfer_encoding_short_chunk_body() -> None:
    # the reverse: Content-Length larger than the chunked message; the rest is an answer
    a = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n"
        b"0\r\n\r\n" + ok(b"SMUGGLED")
    )
    r = run(post_twice(serve(a, ok(b"second"))))
    assert r.second.body == b"second"


# ---- 4. bodies -------------------------------------------------------------------------------


def _coded(coding: str, body: bytes) -> bytes:
    return ok(body, f"Content-Encoding: {coding}\r\n")


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("coding", "encoded"),
    [
        ("gzip", gzip.compress(b'{"contact_id": "c1"}')),
        ("x-gzip", gzip.compress(b'{"contact_id": "c1"}')),
        ("deflate", zlib.compress(b'{"contact_id": "c1"}')),
        ("deflate", _raw_deflate(b'{"contact_id": "c1"}')),
        ("GZIP", gzip.compress(b'{"contact_id": "c1"}')),
        ("identity", b'{"contact_id": "c1"}'),
    ],
)
def test_codings_decoded(coding: str, encoded: bytes) -> None:
    r = run(post_twice(serve(_coded(coding, encoded), ok(b"second"))))
    assert r.first.body == b'{"contact_id": "c1"}'
    assert r.second.body == b"second"


def test_unknown_coding_left_as_is() -> None:
    r = run(post_twice(serve(_coded("br", b"\x0b\x02\x80abc"), ok(b"s"))))
    assert r.first.body == b"\x0b\x02\x80abc"


def test_gzip_bomb_is_h1error() -> None:
    bomb = gzip.compress(b"\0" * (MAX_BODY + 1024 * 1024), compresslevel=9)
    assert len(bomb) < 64 * 1024

    refused_by(serve(_coded("gzip", bomb)), timeout=2.0)


def test_deflate_bomb_is_h1error() -> None:
    bomb = zlib.compress(b"\0" * (MAX_BODY + 1024 * 1024), 9)

    refused_by(serve(_coded("deflate", bomb)), timeout=2.0)


def test_truncated_gzip_is_h1error() -> None:
    full = gzip.compress(b'{"contact_id": "c-123456"}' * 20)

    refused_by(serve(_coded("gzip", full[: len(full) // 2])), timeout=1.0)


def test_gzip_garbage_is_h1error() -> None:
    async def main() -> None:
        async with Server(serve(_coded("gzip", b"not gzip at all"))) as srv:
            pool = srv.pool(limit=1, timeout=1.0)
            with pytest.raises(H1Error) as info:
                await pool.post(b"x", {})
            assert "gzip at all" not in str(info.value)

    run(main())


def test_body_over_limit_by_content_length() -> None:
    a = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)

    refused_by(serve(a), timeout=1.0)


def test_body_over_limit_chunked() -> None:
    chunk = b"%x\r\n%s\r\n" % (1024 * 1024, b"a" * (1024 * 1024))

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(9):
            writer.write(chunk)
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    refused_by(handler, timeout=2.0)


def test_body_over_limit_to_end() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(9):
            writer.write(b"a" * (1024 * 1024))
            await writer.drain()

    refused_by(handler, timeout=2.0)


def test_head_over_limit() -> None:
    a = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\nContent-Length: 0\r\n\r\n"

    refused_by(serve(a), timeout=1.0)


# ---- 5. timeouts, cancellation, the limit ----------------------------------------------------


async def _silent(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await srv.read_request(reader)
    await reader.read()  # until the client goes


def test_never_answers_times_out() -> None:
    async def main() -> None:
        async with Server(_silent) as srv:
            pool = srv.pool(limit=1, timeout=0.3)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.post(b"x", {}), 3)
            await asyncio.sleep(0.1)
            assert srv.closed_conns == 1  # the client closed it
            assert pool._idle == []

    run(main())


def test_trickled_body_times_out() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"a")
            await writer.drain()
            await asyncio.sleep(0.05)

    async def main() -> None:
        async with Server(handler) as srv:
            pool = srv.pool(limit=1, timeout=0.4)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.post(b"x", {}), 3)

    run(main())


def test_cancelled_post_closes_its_connection() -> None:
    async def main() -> None:
        async with Server(_silent) as srv:
            pool = srv.pool(limit=1, timeout=5)
            task = asyncio.create_task(pool.post(b"x", {}))
            while not srv.requests:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.1)
            assert srv.closed_conns == 1
            assert pool._idle == []

    run(main())


def test_pool_limit_never_exceeded() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await srv.read_request(reader) is not None:
            await asyncio.sleep(0.01)
            writer.write(ok(b"x"))

    async def main() -> None:
        async with Server(handler) as srv:
            pool = srv.pool(limit=4, timeout=3)
            answers = await asyncio.gather(*(pool.post(b"%d" % i, {}) for i in range(50)))
            assert all(a.body == b"x" for a in answers)
            assert srv.max_live <= 4
            assert pool.connections_opened <= 4
            await pool.aclose()

    run(main())


def test_pool_limit_with_connections_that_close() -> None:
    async def main() -> None:
        async with Server(serve(ok(b"x", "Connection: close\r\n"), close_after=True)) as srv:
            pool = srv.pool(limit=3, timeout=3)
            await asyncio.gather(*(pool.post(b"%d" % i, {}) for i in range(30)))
            assert srv.max_live <= 3
            assert pool._idle == []

    run(main())


# ---- 6. header injection, config -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-A": "a\r\nX-Injected: 1"},
        {"X-A": "a\nb"},
        {"X-A": "a\rb"},
        {"X-A": "a\0b"},
        {"X-A\r\nX-B": "v"},
        {"X A": "v"},
        {"X:A": "v"},
        {"": "v"},
        {"X-A": "\u20ac"},
        {"X-\u20ac": "v"},
        {"Host": "evil"},
        {"content-length": "1"},
        {"Transfer-Encoding": "chunked"},
        {"CONNECTION": "close"},
    ],
)
def test_bad_headers_are_valueerror_and_nothing_sent(headers: dict[str, str]) -> None:
    async def main() -> None:
        async with Server(serve(ok())) as srv:
            pool = srv.pool(limit=1, timeout=1.0)
            with pytest.raises(ValueError, match="header") as info:
                await pool.post(b"BODY", headers)
            for value in headers.values():
                if value not in ("1", "v", "chunked", "close"):
                    assert value not in str(info.value)
            await asyncio.sleep(0.05)
            assert srv.connections == 0
            assert srv.requests == []

    run(main())


def _config_data(tmp_path: Path, url: str, headers: dict[str, str]) -> dict[str, Any]:
    (tmp_path / "http.yaml").write_text(
        (Path(__file__).resolve().parent.parent / "mappings" / "http.yaml").read_text()
    )
    return {"name": "hook", "type": "http", "url": url, "mapping": "http.yaml", "headers": headers}


def sink_config(tmp_path: Path, url: str, headers: dict[str, str] | None = None) -> HttpDestination:
    data = _config_data(tmp_path, url, headers or {})
    return HttpDestination.model_validate(data, context={"base_dir": tmp_path})


def delivery(key: str = "k-1") -> Delivery:
    body = {"op": "upsert", "dispensary": "d", "customer_id": "C1", "fields": {"email": "a@b.c"}}
    return Delivery(1, key, body)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Key", SECRET + "\r\nX-Injected: 1"),
        ("X-Key", SECRET + "\n"),
        ("X-Key", SECRET + "\0"),
        ("X-Key", SECRET + "\u20ac"),
        ("X Key", SECRET),
        ("X-Key\r\n", SECRET),
        ("Host", SECRET),
        ("Content-Length", SECRET),
    ],
)
def test_config_refuses_bad_headers_naming_not_quoting(
    tmp_path: Path, name: str, value: str
) -> None:
    data = _config_data(tmp_path, "http://127.0.0.1:1/x", {name: value})
    with pytest.raises(ValidationError) as info:
        HttpDestination.model_validate(data, context={"base_dir": tmp_path})
    errors = info.value.errors(include_url=False, include_input=False, include_context=True)
    text = " ".join(str(e["msg"]) + str(e.get("ctx", "")) for e in errors)
    assert SECRET not in text
    assert repr(name.strip()) in text or name in text or repr(name) in text


# ---- 7. privacy ------------------------------------------------------------------------------


def test_sink_errors_never_quote_header_values_or_body(tmp_path: Path) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nX-Secret: " + SECRET.encode() + b"\r\nContent-Length: 5, 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Secret: "
        + SECRET.encode()
        + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz" + SECRET.encode() + b"\r\n",
        b"NOTHTTP " + SECRET.encode() + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + SECRET.encode() + b"\r\n\r\n",
        _coded("gzip", SECRET.encode()),
    ]

    async def main() -> None:
        for answer in answers:
            async with Server(serve(answer, close_after=True)) as srv:
                sink = HttpSink(sink_config(tmp_path, srv.url, {"X-Api-Key": SECRET}))
                try:
                    with pytest.raises(RetriableDelivery) as info:
                        await sink.send([delivery()])
                finally:
                    await sink.aclose()
                assert SECRET not in str(info.value)
                assert SECRET.encode() in srv.requests[0][0]  # the header was sent

    run(main())


def test_h1_errors_never_quote() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nContent-Length: " + SECRET.encode() + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + SECRET.encode() + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n" + SECRET.encode() + b"\r\n",
        b"HTTP/1.1 200 OK\r\nbad " + SECRET.encode() + b"\r\n\r\n",
    ]

    async def main() -> None:
        for answer in answers:
            async with Server(serve(answer, close_after=True)) as srv:
                pool = srv.pool(limit=1, timeout=1.0)
                with pytest.raises(H1Error) as info:
                    await pool.post(b"x", {"X-Api-Key": SECRET})
                assert SECRET not in str(info.value)
                assert SECRET not in repr(info.value)

    run(main())


# ---- 8. URLs ---------------------------------------------------------------------------------


def test_query_port_credentials_in_request_head() -> None:
    async def main() -> bytes:
        async with Server(serve(ok())) as srv:
            url = f"http://us%40er:p%3Ass@127.0.0.1:{srv.port}/a/b?x=1&y=%20z"
            pool = srv.pool(url, limit=1, timeout=1.0)
            await pool.post(b"body", {"X-A": "1"})
            await pool.aclose()
            return srv.requests[0][0]

    head = run(main())
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "POST /a/b?x=1&y=%20z HTTP/1.1"
    import base64

    auth = "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert f"Authorization: {auth}" in lines
    assert any(line.startswith("Host: 127.0.0.1:") for line in lines)
    assert "Content-Length: 4" in lines
    assert "X-A: 1" in lines


def test_ipv6_literal_host() -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6")

    async def main() -> tuple[bytes, bytes]:
        async with Server(serve(ok(b"six")), host="::1") as srv:
            pool = srv.pool(limit=1, timeout=1.0)
            answer = await pool.post(b"x", {})
            await pool.aclose()
            return answer.body, srv.requests[0][0]

    body, head = run(main())
    assert body == b"six"
    assert b"\r\nHost: [::1]:" in head


def test_sink_sends_to_url_through_pydantic(tmp_path: Path) -> None:
    async def main() -> tuple[list[Any], bytes]:
        async with Server(serve(ok(b'{"contact_id": "c-9"}'))) as srv:
            sink = HttpSink(sink_config(tmp_path, srv.url + "?q=1", {"X-Api-Key": SECRET}))
            try:
                results = await sink.send([delivery()])
            finally:
                await sink.aclose()
            return results, srv.requests[0][0]

    results, head = run(main())
    assert b"POST /hook?q=1 HTTP/1.1" in head
    assert b"idempotency-key: k-1" in head
    assert b"content-type: application/json" in head
    assert "c-9" in repr(results)


# ---- 9. redirects ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_fatal_with_one_post(tmp_path: Path, status: int) -> None:
    async def main() -> None:
        answer = b"HTTP/1.1 %d Moved\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n" % status
        async with Server(serve(answer)) as srv:
            sink = HttpSink(sink_config(tmp_path, srv.url))
            try:
                with pytest.raises(FatalDelivery) as info:
                    await sink.send([delivery()])
            finally:
                await sink.aclose()
            await asyncio.sleep(0.05)
            assert str(status) in str(info.value)
            assert len(srv.requests) == 1
            assert srv.requests[0][0].startswith(b"POST /hook ")

    run(main())


def test_sink_408_is_retriable(tmp_path: Path) -> None:
    async def main() -> None:
        answer = b"HTTP/1.1 408 Timeout\r\nContent-Length: 0\r\n\r\n"
        async with Server(serve(answer)) as srv:
            sink = HttpSink(sink_config(tmp_path, srv.url))
            try:
                with pytest.raises(RetriableDelivery):
                    await sink.send([delivery()])
            finally:
                await sink.aclose()

    run(main())


# ---- TLS ---------------------------------------------------------------------------------------


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class TlsServer(Server):
    def __init__(self, handler: Handler, cert: Path, key: Path) -> None:
        super().__init__(handler)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._on_conn, self.host, 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


def test_tls_trusted_and_host_checked(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with TlsServer(serve(ok(b"tls")), cert, key) as srv:
            good = srv.pool(
                f"https://localhost:{srv.port}/h", limit=1, timeout=2, ssl_context=trust
            )
            assert (await good.post(b"x", {})).body == b"tls"
            wrong_name = srv.pool(
                f"https://127.0.0.1:{srv.port}/h", limit=1, timeout=2, ssl_context=trust
            )
            with pytest.raises(ssl.SSLCertVerificationError):
                await wrong_name.post(b"x", {})

    run(main())


def test_sink_tls_verification_failure_is_retriable(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)

    async def main() -> None:
        async with TlsServer(serve(ok(b"tls")), cert, key) as srv:
            sink = HttpSink(sink_config(tmp_path, f"https://localhost:{srv.port}/hook"))
            try:
                with pytest.raises(RetriableDelivery):
                    await sink.send([delivery()])
            finally:
                await sink.aclose()

    run(main())


def test_chunked_http10_answer_is_not_reused() -> None:
    a = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    r = run(post_twice(serve(a, ok(b"second"))))
    assert (r.first.body, r.second.body) == (b"abc", b"second")
    assert r.pool.connections_opened == 2


def test_peer_closes_right_after_answer_next_post_at_once() -> None:
    # no Connection: close said, the peer just closes; the next post comes without a pause
    for _ in range(5):
        r = run(post_twice(serve(ok(b"a"), ok(b"b"), close_after=True)))
        assert r.second.body == b"b"
        assert [b for _, b in r.srv.requests] == [b"one", b"two"]


def test_peer_resets_idle_connection_next_post_succeeds() -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await srv.read_request(reader)
        writer.write(ok(b"a" if srv.connections == 1 else b"b"))
        await writer.drain()
        rst_close(writer)

    r = run(post_twice(handler, pause=0.1))
    assert (r.first.body, r.second.body) == (b"a", b"b")
    assert len(r.srv.requests) == 2
