"""The webhook listener's HTTP/1.1 protocol: uvicorn's httptools protocol with a bound on what
one client may hold of the listener, and contract-1 answers for whatever it refuses.

uvicorn (0.55) on httptools bounds neither the size nor the number of a request's headers,
nor how long a client may take to send them or its body (``h11_max_incomplete_event_size``
is h11's alone); a connection that never sends a byte is never closed either (its keep-alive
timer is armed only after a response). And what it refuses itself is a plain-text page. Here
(README, "Limits on clients"; the figures are ``server:`` settings, :class:`ClientLimits`):

==============================================  ==============================================
a request head (request line and headers)       413 ``headers_too_large``
  past ``max_header_bytes``
more than ``max_headers`` headers               413 ``too_many_headers``
a head not complete ``header_timeout_seconds``  400 ``header_timeout``
  after its first byte
a body not complete ``body_timeout_seconds``    400 ``body_timeout``
  after its head
a request httptools cannot parse (a broken      400 ``bad_request``, llhttp's reason as detail
  chunk size, a bad header line)
no request ``keep_alive_seconds`` after the     closed without an answer
  connection opens or the last answer
``max_connections`` connections or requests     503 ``overloaded`` with ``Retry-After``
  in hand
==============================================  ==============================================

Each refusal is the JSON error body of the receiver (``{"error": ..., "detail": ...}``), then
the connection closes (after at most :data:`LINGER_SECONDS` of reading what the client still
sends); it is logged as one warning line (``http_refused``), no traceback. A
client that hangs up in the middle of its body is one warning line too (``http_client_gone``),
not the ``ClientDisconnect`` traceback the app's read would otherwise end in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import httptools
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from connector.logs import get_logger

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope
    from uvicorn.config import Config as UvicornConfig
    from uvicorn.server import ServerState

    from connector.config import ServerConfig

log = get_logger("connector.http")
RETRY_AFTER_SECONDS = 5
LINGER_SECONDS = 2.0
"""How long a refused connection's late bytes are read and dropped before it is closed."""
DUE_SLACK = 0.001
"""A deadline's timer that fires this close before it (the loop's clock resolution) counts."""
MAX_PIPELINED = 16
"""Requests one connection may send ahead of their answers (parsed and queued); the next is
refused (400 ``too_many_pipelined``) after the answers before it. Without a bound, one read
of the transport queues thousands."""


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """What one client may hold (the ``server:`` settings of the same names)."""

    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0

    @classmethod
    def of(cls, server: ServerConfig) -> ClientLimits:
        return cls(
            max_header_bytes=server.max_header_bytes,
            max_headers=server.max_headers,
            header_timeout_seconds=server.header_timeout_seconds,
            body_timeout_seconds=server.body_timeout_seconds,
        )


@dataclass(frozen=True, slots=True)
class _Refusal:
    status: int
    error: str
    detail: str


class _Refused(Exception):
    """Raised from a parser callback to stop parsing (httptools re-raises it wrapped in an
    ``HttpParserCallbackError``); the refusal itself is kept on the protocol."""


def _json_answer(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


async def _overloaded(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """uvicorn's answer past ``limit_concurrency`` (a plain-text 503), as the receiver's."""
    body = _json_answer("overloaded", "too many connections or requests in hand; retry")
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _CycleTransport:
    """The transport as one request's cycle sees it.

    An answer's head and body go out in one write: uvicorn writes the head when the app
    sends ``http.response.start`` and the body at ``http.response.body``, two sends to the
    socket (and two segments to the client) where one does. A head that announces a body
    (a ``Content-Length`` above 0, not a HEAD request) is held until the body's first write;
    it goes out alone at the loop's next turn if the body has not come by then (an app that
    waits between the two), or at a close. A head :class:`_Cycle` rendered itself is held
    without that turn of the loop (:meth:`hold`): it goes out with the body, when the app
    ends without one, or at a close.

    A close after an answer given before the request's body was read (a 413 to an oversized
    ``Expect: 100-continue``, an early refusal that closes) lingers like the protocol's own
    refusals, so the client still sending its body gets the answer rather than a reset
    (RFC 9112, 9.6)."""

    __slots__ = ("_cycle", "_head", "_held", "_protocol", "_transport")

    def __init__(
        self, protocol: LimitedHttpProtocol, transport: asyncio.Transport, cycle: Any
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None  # the head, waiting for the body's first write
        self._head = True  # the answer's head is still to be written

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
            return
        if self._head:
            cycle = self._cycle
            if cycle.response_started:  # this is the head (a 100 Continue comes before it)
                self._head = False
                if (
                    cycle.expected_content_length > 0
                    and cycle.chunked_encoding is False
                    and cycle.scope["method"] != "HEAD"
                ):
                    self._held = data
                    self._protocol.loop.call_soon(self.flush)
                    return
        self._transport.write(data)

    def hold(self, head: bytes) -> None:
        """Hold ``head`` for the body's first write, without a turn of the loop to flush
        it: :class:`_Cycle` gives it, when its body follows at once or the app ends (where
        :meth:`LimitedHttpProtocol._guarded` flushes it), or at a close."""
        if self._head and self._held is None:
            self._head = False
            self._held = head
        else:
            self.write(head)

    def flush(self) -> None:
        """Write a held head now (the body did not follow it at once)."""
        held = self._held
        if held is not None:
            self._held = None
            # not on a connection being refused meanwhile (closed, or its end written)
            with contextlib.suppress(RuntimeError):
                if not self._transport.is_closing():
                    self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        if self._cycle.response_complete and self._cycle.more_body:
            self._protocol.linger_after_answer()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_Head = tuple[bytes, int]
_HEADS_MAX = 64
"""Rendered answer heads kept (:class:`_Heads`): the handful of answers the receiver gives."""


class _Heads:
    """Answer heads rendered once per set of default headers (the Date header: a new list
    each second) rather than once per answer: uvicorn renders each header of each answer
    anew (two regular expressions, a lower-casing and three comparisons a header). Only
    heads uvicorn renders plainly are kept: a ``Content-Length``, no ``Transfer-Encoding`` or
    ``Connection``, every name and value valid; any other start goes to uvicorn."""

    def __init__(self) -> None:
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._heads: dict[tuple[Any, ...], _Head | None] = {}

    def get(self, defaults: list[tuple[bytes, bytes]], status: Any, headers: Any) -> _Head | None:
        """The head and its ``Content-Length`` for an answer, or None: uvicorn's to render."""
        if type(headers) is not list and type(headers) is not tuple:
            return None  # any other iterable (a generator) is uvicorn's: a key would use it up
        if defaults is not self._defaults or len(self._heads) >= _HEADS_MAX:
            self._defaults = defaults  # held, so no later list can take its id
            self._heads = {}
        try:
            key = (status, *headers)
            return self._heads[key]
        except KeyError:
            head = self._heads[key] = _render_head(defaults, status, headers)
            return head
        except TypeError:  # unhashable: a header given as a list, a status that is not a number
            return None


def _render_head(defaults: list[tuple[bytes, bytes]], status: Any, headers: Any) -> _Head | None:
    """What uvicorn's ``send`` writes for this start, and its ``Content-Length``; None for a
    head it renders otherwise (or refuses)."""
    line = STATUS_LINE.get(status) if isinstance(status, int) else None
    if line is None:
        return None
    content = [line]
    length: int | None = None
    for name, value in [*defaults, *headers]:
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            return None
        if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
            return None
        name = name.lower()
        if name == b"content-length":
            if length is None:
                if not value.strip().isdigit():
                    return None
                length = int(value)
        elif name in (b"transfer-encoding", b"connection"):
            return None
        content.extend([name, b": ", value, b"\r\n"])
    if length is None:
        return None
    content.append(b"\r\n")
    return b"".join(content), length


_heads = _Heads()


class _Cycle(RequestResponseCycle):
    """uvicorn's request-response cycle, its plain answers written without uvicorn's
    rendering of each header (:class:`_Heads`) and their bodies in one step: a start with a
    ``Content-Length`` on a kept-alive connection, then a body of that length in one message.
    Anything else (a HEAD, chunked bodies, a connection that closes, a paused or lost client,
    an access log) is uvicorn's ``send``, unchanged."""

    async def send(self, message: Any) -> None:
        if self.disconnected or self.flow.write_paused or self.access_log:
            await super().send(message)
            return
        kind = message["type"]
        if not self.response_started:
            if kind == "http.response.start" and self.keep_alive and self.scope["method"] != "HEAD":
                head = _heads.get(
                    self.default_headers, message["status"], message.get("headers", ())
                )
                if head is not None:
                    self.response_started = True
                    self.waiting_for_100_continue = False
                    self.expected_content_length = head[1]
                    self.chunked_encoding = False
                    transport: Any = self.transport
                    if type(transport) is _CycleTransport and head[1] > 0 and not self.more_body:
                        # the request's body all read: the answer's body follows, written
                        # with it in one send
                        transport.hold(head[0])
                    else:  # an answer before the body was read: out by the next turn at latest
                        transport.write(head[0])
                    return
        elif (
            kind == "http.response.body"
            and not self.response_complete
            and self.chunked_encoding is False
            and self.scope["method"] != "HEAD"
            and not message.get("more_body", False)
        ):
            body = message.get("body", b"")
            if len(body) == self.expected_content_length:
                self.expected_content_length = 0
                self.transport.write(body)
                self.response_complete = True
                self.message_event.set()
                if not self.keep_alive:
                    self.transport.close()
                self.on_response()
                return
        await super().send(message)


class LimitedHttpProtocol(HttpToolsProtocol):
    """One connection of the webhook listener. ``limits`` is set per listener by
    :func:`protocol_class` (uvicorn builds the protocol itself, from a class)."""

    limits: ClassVar[ClientLimits] = ClientLimits()

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # the deadline of the phase the connection is in (a head, a body, a lingering close):
        # when, and what runs then. One timer serves them all, and is moved only when a
        # deadline comes before it (_set_due): a request arms and clears two deadlines, each
        # once a timer of the loop made and cancelled
        self._due: float | None = None
        self._due_call: tuple[Callable[..., None], tuple[Any, ...]] = (_nothing, ())
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._reading_head = False
        self._head_bytes = 0  # as the callbacks saw it: the URL and the complete headers
        self._raw_head_bytes = 0  # as it came in, while the head is incomplete
        self._header_count = 0
        self._refusal: _Refusal | None = None
        self._refused = False
        self._running: RequestResponseCycle | None = None  # the cycle whose app runs now
        self._deferred: _Refusal | None = None  # written once the answers before it are out
        self._heads = 0  # heads begun on this connection (which head a read's bytes are of)
        self._ended_in_read = False  # a request ended in the read being parsed
        self._clean_start = False  # the head being read began a read, no request before it
        self._write_deadline: asyncio.TimerHandle | None = None

    # --- connection ---

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # a connection that never sends a request is closed like an idle keep-alive one
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._cancel_write_deadline()
        # every request in hand reads a disconnect and sends nothing more: the running one and
        # those queued behind it, not only the last parsed (uvicorn's), which would leave the
        # running app writing to a closed transport (an error traceback)
        for cycle in [self._running, *(item[0] for item in self.pipeline)]:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # the client reads its answers slower than they are written: past the body timeout
        # without draining, the connection is cut (its app stops waiting on the drain)
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(
                self.limits.body_timeout_seconds, self._write_expired
            )

    def resume_writing(self) -> None:
        self._cancel_write_deadline()
        super().resume_writing()

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_expired(self) -> None:
        self._write_deadline = None
        seconds = self.limits.body_timeout_seconds
        reason = f"the client read no answer for {seconds:g} s"
        log.warning("http_refused", status_code=None, error="write_timeout", reason=reason)
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # The idle timer is not stopped by bytes as such (uvicorn's way), only by a request
        # that begins (on_message_begin): a lone CRLF, which llhttp skips before a request
        # line, would otherwise hold the connection with no timer at all.
        head_before = self._heads if self._reading_head else None
        self._ended_in_read = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # no upgrade is offered (ws="none"): the request was served as plain HTTP
            self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            refusal = self._refusal
            if refusal is None:
                refusal = _Refusal(400, "bad_request", _reason(exc))
            self._refuse(refusal)
            return
        if self._reading_head:
            # A head still incomplete: count its bytes as they come, for httptools keeps a
            # header it has not finished without a callback. A read that began with this
            # head counts whole; one where the head began behind other requests counts what
            # the callbacks saw of it (the rest of the read is theirs): there, a partial
            # header may be held uncounted, at most one read of the transport, and only
            # behind requests already in the queue (MAX_PIPELINED bounds them).
            if head_before == self._heads:  # the same head, incomplete before and after
                self._raw_head_bytes += len(data)
            elif self._clean_start:  # the read is this head's (and at most a few CRLFs)
                self._raw_head_bytes = len(data)
            else:  # behind other requests of the read, which it must not be charged with
                self._raw_head_bytes = self._head_bytes
            if self._raw_head_bytes > self.limits.max_header_bytes:
                self._refuse(self._head_too_large())

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._unset_keepalive_if_required()  # a request began: the header deadline governs
        self._heads += 1
        self._clean_start = not self._ended_in_read
        self._reading_head = True
        self._head_bytes = self._raw_head_bytes = self._header_count = 0
        self._arm(self.limits.header_timeout_seconds, "header_timeout")

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_header_bytes:
            self._stop(self._head_too_large())
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        count = self._header_count = self._header_count + 1
        if count > limits.max_headers:
            self._stop(_Refusal(413, "too_many_headers", f"more than {limits.max_headers} headers"))
        size = self._head_bytes = self._head_bytes + len(name) + len(value) + 4  # ": ", CRLF
        if size > limits.max_header_bytes:
            self._stop(self._head_too_large())
        # uvicorn's on_header (0.55), here rather than called: a call less for each header
        name = name.lower()
        # llhttp keeps trailing whitespace, which RFC 9110 (5.5) leaves out of the value
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:
            detail = f"more than {MAX_PIPELINED} requests sent ahead of their answers"
            self._stop(_Refusal(400, "too_many_pipelined", detail))
        if self.parser.get_http_version() != "1.1":
            # no interim answer to an HTTP/1.0 client (RFC 9110, 10.1.1)
            self.expect_100_continue = False
        self._cancel_deadline()
        super().on_headers_complete()
        cycle: Any = self.cycle
        if type(cycle) is RequestResponseCycle:  # not yet started: its send is looked up then
            cycle.__class__ = _Cycle
        cycle.transport = _CycleTransport(self, self.transport, cycle)
        self._reading_head = False  # after: a head uvicorn fails on is answered as a head
        if not self._queued(self.cycle):
            self._arm(self.limits.body_timeout_seconds, "body_timeout")
        # else: queued behind another request, with reading paused by the server: its body
        # deadline starts when it does (_start_asgi_task)

    def _queued(self, cycle: RequestResponseCycle | None) -> bool:
        pipeline = self.pipeline
        return bool(pipeline) and any(item[0] is cycle for item in pipeline)

    def on_message_complete(self) -> None:
        self._ended_in_read = True
        self._cancel_deadline()
        super().on_message_complete()

    # --- the app ---

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        if app is service_unavailable:
            app = _overloaded
        self._running = cycle
        if cycle is self.cycle and cycle.more_body and not self._reading_head:
            # a queued request whose body is still to come: its deadline from now on
            self._arm(self.limits.body_timeout_seconds, "body_timeout")
        super()._start_asgi_task(cycle, self._guarded(cycle, app))

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, or the idle timer
        if self.transport.is_closing():
            return
        if self._reading_head:
            # the next request's head is arriving: its deadline governs, not the idle timer,
            # and counts again from now (reading was paused while requests were queued)
            self._unset_keepalive_if_required()
            if self._deferred is None:
                self._arm(self.limits.header_timeout_seconds, "header_timeout")
        if self._deferred is not None and not self._answers_pending():
            refusal, self._deferred = self._deferred, None
            self._unset_keepalive_if_required()
            self._write_answer(refusal)
            self._close_lingering()

    def _answers_pending(self) -> bool:
        """Whether a request before the refused one still owes its answer."""
        running = self._running
        busy = running is not None and not running.response_complete and not running.disconnected
        return busy or bool(self.pipeline)

    def _guarded(self, cycle: RequestResponseCycle, app: ASGI3Application) -> ASGI3Application:
        """``app``, except that a read cut short by the client (or by a refusal here) ends
        in one warning line, not uvicorn's error traceback."""

        async def guarded(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            try:
                await app(scope, receive, send)
            except ClientDisconnect:
                if not cycle.disconnected:
                    raise
                if not self._refused:
                    log.warning("http_client_gone", reason="disconnected before the body ended")
            finally:
                # a head held for a body that never came (an app that ended, or failed,
                # after its start): out now, before uvicorn closes or answers 500
                transport: Any = cycle.transport
                if type(transport) is _CycleTransport:
                    transport.flush()

        return guarded

    # --- refusals ---

    def _head_too_large(self) -> _Refusal:
        limit = self.limits.max_header_bytes
        return _Refusal(413, "headers_too_large", f"request line and headers past {limit} bytes")

    def _stop(self, refusal: _Refusal) -> None:
        self._refusal = refusal
        raise _Refused

    def _arm(self, seconds: float, error: str) -> None:
        self._set_due(seconds, self._expired, (seconds, error))

    def _set_due(self, seconds: float, call: Callable[..., None], args: tuple[Any, ...]) -> None:
        """``call(*args)`` in ``seconds``, in place of the deadline armed before (if any)."""
        loop = self.loop
        due = loop.time() + seconds
        self._due = due
        self._due_call = (call, args)
        timer = self._timer
        if timer is None or self._timer_at > due:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(due, self._tick)
            self._timer_at = due

    def _cancel_deadline(self) -> None:
        self._due = None

    def _tick(self) -> None:
        self._timer = None
        due = self._due
        if due is None:
            return
        if self.loop.time() < due - DUE_SLACK:  # armed again since: wait for that deadline
            self._timer = self.loop.call_at(due, self._tick)
            self._timer_at = due
            return
        self._due = None
        call, args = self._due_call
        call(*args)

    def _expired(self, seconds: float, error: str) -> None:
        part = "headers" if error == "header_timeout" else "body"
        self._refuse(_Refusal(400, error, f"the {part} did not arrive within {seconds:g} s"))

    def _refuse(self, refusal: _Refusal) -> None:
        """Answer ``refusal`` where no answer is on the wire yet, and close."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_deadline()
        log.warning(
            "http_refused", status_code=refusal.status, error=refusal.error, reason=refusal.detail
        )
        # The refused request's own cycle, when its head was complete (a body refused): its
        # app's next read is a disconnect and anything it answers is dropped; if it waits in
        # the pipeline, it leaves it. A request whose head was refused has no cycle.
        refused = None if self._reading_head else self.cycle
        if refused is not None and refused.response_started:
            # answered already (before its body ended): no second answer, only the close
            if not refused.response_complete:
                refused.disconnected = True
                refused.message_event.set()
            self._close_lingering()
            return
        if refused is not None:
            refused.disconnected = True
            refused.message_event.set()
            for item in list(self.pipeline):
                if item[0] is refused:
                    self.pipeline.remove(item)
            if self._running is refused:
                self._running = None
        if self._answers_pending():
            # requests before it (pipelined in the same write) are answered first, in order;
            # the refusal follows the last of them (on_response_complete)
            self._deferred = refusal
            return
        self._write_answer(refusal)
        self._close_lingering()

    def linger_after_answer(self) -> None:
        """The app answered and closes before the request's body was read: what the client
        still sends is read and dropped for a while, then the connection closes."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_deadline()
        self._close_lingering()

    def _close_lingering(self) -> None:
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        # a lingering close: the answer and a FIN, then what the client still sends is read
        # and dropped for a while. Closed at once, a socket with unread bytes is reset, and a
        # reset may destroy the answer before the client reads it (RFC 9112, 9.6).
        self.transport.write_eof()
        self.flow.resume_reading()
        self._set_due(LINGER_SECONDS, self._end_linger, ())

    def _end_linger(self) -> None:
        # an answer the client has not taken by now (it reads nothing) is not waited for
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _write_answer(self, refusal: _Refusal) -> None:
        body = _json_answer(refusal.error, refusal.detail)
        content = [STATUS_LINE[refusal.status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.append(b"content-type: application/json\r\n")
        content.append(b"content-length: %d\r\n" % len(body))
        content.append(b"connection: close\r\n\r\n")
        content.append(body)
        self.transport.write(b"".join(content))


def _nothing() -> None:
    pass


def _reason(exc: httptools.HttpParserError) -> str:
    """llhttp's reason ("Invalid character in chunk size"): a fixed text of the parser, never
    what the client sent. A callback's failure (a path that is not ASCII) has none."""
    if isinstance(exc, httptools.HttpParserCallbackError) or not str(exc):
        return "malformed HTTP request"
    return f"malformed HTTP request: {str(exc)[:200]}"


def protocol_class(limits: ClientLimits) -> type[LimitedHttpProtocol]:
    """The protocol class of one listener, bound to its limits (uvicorn's ``http=``)."""
    bound = limits

    class Limited(LimitedHttpProtocol):
        limits = bound

    return Limited
