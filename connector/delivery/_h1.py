"""A lean HTTP/1.1 client for POSTs to one URL: what the ``http`` destination sends through.

A POST alone costs aiohttp markedly more CPU than a request written and read on asyncio's
streams (bench/pipeline.py prints this client's floor; the issue 17 notes have the figures),
and at a trickle every request is alone. This client keeps what a POST to a user's service
needs and no more:

- keep-alive connections to the URL's host, at most ``limit`` at once; an idle one the peer
  has closed is dropped before it is used, and a request whose reused connection ends before
  any byte of an answer is sent once more on a new one (the operation's idempotency key makes
  a second copy harmless; a dropped keep-alive is the peer's normal timeout, not a failure);
- TLS with the system's trust store (as aiohttp's default), checking the host name;
- answers framed by ``Content-Length``, ``chunked``, or the end of the connection;
  ``1xx`` interim answers skipped; ``gzip`` and ``deflate`` bodies decoded;
- a total timeout per request, connection included; a connection that timed out, was
  cancelled or broke the protocol is closed, never reused;
- redirects are not followed: a ``3xx`` is the answer (a client that follows one turns a POST
  into a GET, and the operation would count as delivered with nothing sent).

Errors: :class:`TimeoutError`, :class:`OSError` (refused, reset, DNS, TLS) and
:class:`H1Error` (an answer that is not HTTP/1.x, or too large); :class:`Unsendable` (a
:class:`ValueError`) for a request that cannot be written, raised before anything is sent.
Never a header value or a body in an error's text.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_HEAD = 64 * 1024  # status line and headers of one answer
MAX_BODY = 8 * 1024 * 1024  # a destination's answer is a few bytes of JSON: ample

_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class H1Error(Exception):
    """The peer's answer is not one this client reads (not HTTP/1.x, malformed, too large)."""


class Unsendable(ValueError):
    """The request cannot be written (a header or the URL): nothing was sent."""


@dataclass(frozen=True, slots=True)
class H1Response:
    status: int
    headers: dict[str, str]  # names in lower case; repeated ones joined with ", "
    body: bytes  # decoded when the answer's content coding was gzip or deflate


_ssl_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """One verifying context for the process (building one reads the trust store)."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name (RFC 9110 5.1)
_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # controls but a tab (RFC 9110 5.5)
CLIENT_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def header_problem(name: str, value: str) -> str | None:
    """Why a header cannot be sent, naming it but never its value (it may be a secret);
    None when it can."""
    if not _TOKEN.fullmatch(name):
        return f"header name {name!r} is not a header name"
    if name.lower() in CLIENT_HEADERS:
        return f"header {name!r} is set by the connector"
    if _VALUE_BAD.search(value):
        return f"the value of header {name!r} holds a control character (a line break?)"
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return f"the value of header {name!r} is not Latin-1 text"
    return None


class H1Pool:
    """POSTs to ``url`` over at most ``limit`` kept-alive connections (see the module)."""

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "treez-connector",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Unsendable("the URL is not http:// or https:// with a host")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._ssl = (ssl_context or default_ssl_context()) if self._tls else None
        self._timeout = timeout
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if self._tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [
            f"POST {target} HTTP/1.1",
            f"Host: {host if default_port else f'{host}:{self._port}'}",
            f"User-Agent: {user_agent}",
            "Accept-Encoding: gzip, deflate",
        ]
        if parts.username is not None:  # credentials in the URL: Basic, as a browser would
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            head.append(f"Authorization: Basic {base64.b64encode(pair.encode()).decode()}")
        for line in head:
            if _VALUE_BAD.search(line) or not line.isascii():
                raise Unsendable("the URL cannot be sent (a control or non-ASCII character)")
        self._head = head
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Conn] = []
        self._closed = False
        self.connections_opened = 0  # for tests and benches

    def _request(self, content: bytes, headers: Mapping[str, str]) -> bytes:
        overridden = {name.lower() for name in headers}
        # the caller's User-Agent, Authorization or Accept-Encoding replaces the client's
        lines = [line for line in self._head if line.split(":")[0].lower() not in overridden]
        for name, value in headers.items():
            problem = header_problem(name, value)
            if problem is not None:
                raise Unsendable(problem)
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(content)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content

    async def post(self, content: bytes, headers: Mapping[str, str]) -> H1Response:
        """POST ``content`` with ``headers``; the answer, whatever its status."""
        if self._closed:
            raise OSError("the client is closed")
        request = self._request(content, headers)
        # the wait for a free connection counts too: the timeout is the caller's whole wait
        async with asyncio.timeout(self._timeout), self._slots:
            while True:
                conn, reused = await self._checkout()
                try:
                    response, keep = await self._exchange(conn, request, reused)
                except _Stale:
                    _close(conn)
                    continue  # once per idle connection: the next is new or also idle
                except BaseException:
                    _close(conn)
                    raise
                if keep and not self._closed:
                    self._idle.append(conn)
                else:
                    _close(conn)
                return response

    async def _checkout(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            reader, writer = conn
            # the peer closed it while idle (its keep-alive timeout), or sent what nobody asked
            if reader.at_eof() or writer.is_closing() or getattr(reader, "_buffer", None):
                _close(conn)
                continue
            return conn, True
        reader, writer = await asyncio.open_connection(
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._host if self._tls else None,
            limit=MAX_HEAD,
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections_opened += 1
        return (reader, writer), False

    async def _exchange(self, conn: _Conn, request: bytes, reused: bool) -> tuple[H1Response, bool]:
        reader, writer = conn
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # any byte of an answer (a reset can follow some): the peer took the request
            partial = getattr(reader, "_buffer", None) or (
                isinstance(exc, asyncio.IncompleteReadError) and exc.partial
            )
            if reused and not partial:
                raise _Stale from None
            raise H1Error("the connection ended before the answer was whole") from None
        except asyncio.LimitOverrunError:
            raise H1Error(f"the answer's head is over {MAX_HEAD} bytes") from None
        try:
            return await self._answer(reader, head)
        except asyncio.IncompleteReadError:
            raise H1Error("the connection ended before the answer was whole") from None
        except asyncio.LimitOverrunError:
            raise H1Error(f"a line of the answer is over {MAX_HEAD} bytes") from None

    async def _answer(self, reader: asyncio.StreamReader, head: bytes) -> tuple[H1Response, bool]:
        version, status, headers = _parse_head(head)
        while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints)
            if status == 101:
                raise H1Error("the peer switched protocols")
            head = await reader.readuntil(b"\r\n\r\n")
            version, status, headers = _parse_head(head)
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if status in (204, 304):
            body = b""
        elif "transfer-encoding" in headers:
            codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
            if codings[-1] != "chunked":  # the end of the connection frames it (RFC 9112 6.3)
                body, keep = await _read_to_end(reader), False
            else:
                body = await _read_chunked(reader)
        elif "content-length" in headers:
            length = _content_length(headers["content-length"])
            if length > MAX_BODY:
                raise H1Error(f"the answer's body is over {MAX_BODY} bytes")
            body = await reader.readexactly(length)
        else:
            body, keep = await _read_to_end(reader), False
        return H1Response(status, headers, _decoded(body, headers.get("content-encoding"))), keep

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


class _Stale(Exception):
    """A reused connection ended before any byte of the answer: send on a new one."""


def _close(conn: _Conn) -> None:
    writer = conn[1]
    if not writer.is_closing():
        writer.close()


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    status_line = lines[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not _DIGITS.fullmatch(code):
        raise H1Error("the answer is not HTTP/1.x")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, sep, value = raw.decode("latin-1").partition(":")
        name = name.strip().lower()
        if not sep or not name or name != name.rstrip() or " " in name:
            raise H1Error("a header line of the answer is malformed")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return version, int(code), headers


def _content_length(value: str) -> int:
    # repeated headers were joined: "5, 5" is one length said twice, "5, 6" is no length
    lengths = {v.strip() for v in value.split(",")}
    if len(lengths) != 1:
        raise H1Error("the answer has conflicting Content-Length headers")
    (text,) = lengths
    if not _DIGITS.fullmatch(text) or len(text) > 15:
        raise H1Error("the answer's Content-Length is not a number")
    return int(text)


_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() takes '²', which int() refuses
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")  # a chunk size (RFC 9112 7.1: 1*HEXDIG)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        text = line[:-2].split(b";", 1)[0].strip(b" \t")  # chunk extensions are ignored
        if not _HEX.fullmatch(text):  # int(..., 16) would take 0x, + and _
            raise H1Error("a chunk size of the answer is malformed")
        chunk = int(text, 16)
        if chunk == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, ignored
                pass
            return b"".join(parts)
        size += chunk
        if size > MAX_BODY:
            raise H1Error(f"the answer's body is over {MAX_BODY} bytes")
        parts.append(await reader.readexactly(chunk))
        if await reader.readexactly(2) != b"\r\n":
            raise H1Error("a chunk of the answer is not followed by CRLF")


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size = 0
    while data := await reader.read(65536):
        size += len(data)
        if size > MAX_BODY:
            raise H1Error(f"the answer's body is over {MAX_BODY} bytes")
        parts.append(data)
    return b"".join(parts)


def _decoded(body: bytes, coding: str | None) -> bytes:
    """The body without its content coding, for gzip and deflate (what is asked for); any
    other coding is left as it came (as aiohttp leaves one it does not know)."""
    if not body or coding is None:
        return body
    for name in reversed([c.strip().lower() for c in coding.split(",") if c.strip()]):
        if name in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS)
        elif name == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send
            try:
                body = _inflate(body, zlib.MAX_WBITS)
            except H1Error:
                body = _inflate(body, -zlib.MAX_WBITS)
        elif name != "identity":
            return body
    return body


def _inflate(body: bytes, wbits: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, MAX_BODY + 1)
    except zlib.error:
        raise H1Error("the answer's body does not decode as its Content-Encoding says") from None
    if len(out) > MAX_BODY:
        raise H1Error(f"the answer's body is over {MAX_BODY} bytes decoded")
    if not decoder.eof:  # cut short: what was decoded is not the body
        raise H1Error("the answer's body does not decode as its Content-Encoding says")
    return out
