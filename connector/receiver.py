"""The webhook receiver (contract 1): answers within milliseconds, and only after the event is
durably stored.

Requests hand their event to a :class:`GroupCommitter`, which commits whatever has arrived
meanwhile in one transaction and then answers all of them: ``synchronous=FULL`` durability at
the cost of one fsync per batch rather than per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from connector.errors import EventValidationError, StoreUnavailable
from connector.logs import get_logger
from connector.planner import instant_us
from connector.store import NewEvent, Rejected
from connector.store.abc import Inbox, InboxWriterPort
from connector.treez import (
    NotJsonError,
    OtherEvent,
    check_event_json,
    webhook_body_schema,
)

if TYPE_CHECKING:
    from connector.service import Service

log = get_logger("connector.receiver")
# the level check on the standard logger behind ``log``: it caches its answer, where asking
# structlog's lazy proxy builds a bound logger each time (5 % of a webhook's CPU)
_levels = logging.getLogger("connector.receiver")
RETRY_AFTER_SECONDS = 5


class GroupCommitter:
    """Commits received events in batches; each caller waits for its own batch's commit.

    A writer thread of its own takes whatever has arrived, commits it in one transaction,
    hands the outcome to the event loop and at once takes what arrived meanwhile: the next
    batch never waits for the event loop to come round (with the loop busy answering the
    previous batch, that wait cost two thirds of each commit cycle: bench/ingest.py).
    """

    def __init__(self, store: Inbox, *, max_batch: int = 512, timeout: float | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        # how long a commit may take before its callers, and every caller after them until
        # it ends, are answered 503: a database that stopped answering (a hung connection,
        # no error) must not hold requests for minutes (_watch)
        self.timeout = timeout
        self._stuck = False
        self._batch_started: float | None = None  # monotonic, while the writer commits
        self.on_commit: list[Callable[[], None]] = []  # run after each commit of events
        self._queue: deque[tuple[NewEvent | Rejected, asyncio.Future[None]]] = deque()
        self._signal = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._idle = False  # the writer waits for the signal (read by submit)
        self._inflight: list[tuple[NewEvent | Rejected, asyncio.Future[None]]] = []

    async def submit(self, item: NewEvent | Rejected) -> None:
        """Return once ``item`` is committed; :class:`StoreUnavailable` if it was not."""
        loop = self._loop
        if loop is None or self._closing:
            raise StoreUnavailable("the receiver is not running")
        if self._stuck:
            raise StoreUnavailable(f"the store has not answered for {self.timeout} s")
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((item, future))
        if self._idle:  # else the writer takes it with what it finds after its commit
            self._signal.set()
        await future

    async def run(self, stopping: asyncio.Event) -> None:
        """Commit until ``stopping`` is set, then commit what is queued and return. Ends
        early, raising, if the writer thread dies (readiness then reports it)."""
        previous = self._thread
        if previous is not None:  # a run that was cancelled while its writer drained
            await asyncio.to_thread(previous.join)
        self._loop = asyncio.get_running_loop()
        self._closing = False
        ended = asyncio.Event()
        thread = threading.Thread(
            target=self._write, args=(ended,), name="receiver-commit", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(ended.wait())]
            watch = (
                None if self.timeout is None else asyncio.ensure_future(self._watch(self.timeout))
            )
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                if watch is not None:
                    watch.cancel()
            if not stopping.is_set():
                raise RuntimeError("the receiver's commit thread stopped")
        finally:
            self._closing = True
            self._signal.set()
            await asyncio.to_thread(thread.join)
            if self._thread is thread:
                self._thread = None
            # a submission that passed its check just as the writer made its last one: it
            # is on the queue with nobody to take it (later ones see _closing and refuse)
            left = [self._queue.popleft() for _ in range(len(self._queue))]
            if left:
                self._settle(left, StoreUnavailable("the receiver is not running"), False)

    async def _watch(self, timeout: float) -> None:
        """While a commit takes longer than ``timeout``, answer its callers and everyone
        queued behind it 503, and new callers at once; the writer skips what was answered
        (a 503 for an event the commit stores after all is harmless: Treez sends it again)."""
        error = StoreUnavailable(f"the store has not answered for {timeout} s")
        while True:
            await asyncio.sleep(min(0.25, timeout / 4))
            started = self._batch_started
            self._stuck = started is not None and time.monotonic() - started > timeout
            if self._stuck:
                waiting = [*self._inflight, *list(self._queue)]
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(error)

    def _write(self, ended: asyncio.Event) -> None:
        loop = self._loop
        assert loop is not None
        try:
            writer = self.store.inbox_writer()
            try:
                self._write_batches(writer)
            finally:
                writer.close()
        except Exception:  # a bug: run() reports it, and readiness with it
            log.exception("commit_thread_failed")
        finally:
            # whatever ended the thread: nobody is left waiting, and nobody else is let in
            self._closing = True
            left, self._inflight = self._inflight, []
            while self._queue:
                left.append(self._queue.popleft())
            error = StoreUnavailable("the receiver's commit thread stopped")
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                if left:
                    loop.call_soon_threadsafe(self._settle, left, error, False)
                loop.call_soon_threadsafe(ended.set)

    def _write_batches(self, writer: InboxWriterPort) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            # idle, then look once more: an item queued before this flag was set is seen
            # below, one queued after it sets the signal (the interpreter lock orders both)
            self._idle = True
            if not self._queue:
                self._signal.wait()
            self._idle = False
            self._signal.clear()
            while self._queue:
                size = min(len(self._queue), self.max_batch)
                # not what _watch answered 503 meanwhile
                batch = [e for e in (self._queue.popleft() for _ in range(size)) if not e[1].done()]
                if not batch:
                    continue
                events = [item for item, _ in batch if isinstance(item, NewEvent)]
                rejected = [item for item, _ in batch if isinstance(item, Rejected)]
                error: StoreUnavailable | None = None
                self._inflight = batch  # failed by _write if the thread dies with it
                self._batch_started = time.monotonic()
                try:
                    writer.add(events, rejected)
                except StoreUnavailable as exc:
                    error = exc
                except Exception as exc:  # every waiter learns of it; none is told "stored"
                    error = StoreUnavailable(f"the store failed ({exc.__class__.__name__})")
                finally:
                    self._batch_started = None
                try:
                    loop.call_soon_threadsafe(self._settle, batch, error, bool(events))
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return
                self._inflight = []
            if self._closing and not self._queue:
                return

    def _settle(
        self,
        batch: list[tuple[NewEvent | Rejected, asyncio.Future[None]]],
        error: StoreUnavailable | None,
        committed_events: bool,
    ) -> None:
        for _, future in batch:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if error is None and committed_events:
            for callback in self.on_commit:
                callback()


class _Answer(Response):
    """The 202 answer, ``{"status": outcome}``, its body and headers rendered once (what
    JSONResponse renders per request). Each answer gets its own copy of the header list,
    which middleware may change."""

    _rendered: ClassVar[dict[str, tuple[bytes, list[tuple[bytes, bytes]]]]] = {}

    def __init__(self, outcome: str) -> None:
        rendered = self._rendered.get(outcome)
        if rendered is None:
            template = JSONResponse({"status": outcome}, status_code=202)
            rendered = self._rendered[outcome] = (bytes(template.body), template.raw_headers)
        self.status_code = 202
        self.background = None
        self.body = rendered[0]
        self.raw_headers = list(rendered[1])


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _auth_and_type(request: Request) -> tuple[str | None, str | None]:
    """The bearer token and the content type, in one pass over the raw headers (ASGI
    servers give their names in lower case); the first of each counts, as in Starlette."""
    authorization = content_type = None
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"content-type" and content_type is None:
            content_type = value.decode("latin-1")
    return _bearer(authorization), content_type


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _read_limited(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body and False; or, once it grows past ``limit`` bytes, its first ``limit`` bytes
    and True (kept in quarantine; the rest is never read)."""
    chunks = []
    size = 0
    while True:  # the ASGI messages themselves: Request.stream() costs a generator a chunk
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            chunks.append(chunk)
            if size > limit:
                return b"".join(chunks)[:limit], True
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks), False


WEBHOOK_PREFIX = "/webhooks/treez/"


class WebhookFastPath:
    """``POST /webhooks/treez/{dispensary}`` straight to its handler, past FastAPI's router,
    exception middleware and dependency solving: a sixth of the receiver's CPU per request
    (py-spy, bench/pipeline.py). The route stays declared in FastAPI for the OpenAPI
    document, and every other request goes through FastAPI; Starlette's outermost error
    middleware still turns an exception into a 500."""

    def __init__(
        self,
        app: ASGIApp,
        handler: Callable[[str, Request], Awaitable[Response]],
        prefix: str = WEBHOOK_PREFIX,
    ) -> None:
        self.app = app
        self.handler = handler
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(self.prefix):
                dispensary = path[len(self.prefix) :]
                if dispensary and "/" not in dispensary:
                    response = await self.handler(dispensary, Request(scope, receive))
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def create_app(service: Service) -> FastAPI:
    """The ASGI app of one running connector."""
    app = FastAPI(
        title="Treez connector",
        version="0.1.0",
        lifespan=service.lifespan,
        docs_url=None,
        redoc_url=None,
        # FastAPI's own OpenTelemetry hooks: off. /metrics is the connector's account, and
        # their exception logs could carry what a customer sent. Off, each request skips
        # three provider look-ups in os.environ (6% of the receiver's CPU, py-spy).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    config = service.config
    metrics = service.metrics
    tokens = {
        name: [t.get_secret_value().encode() for t in disp.webhook_token]
        for name, disp in config.dispensaries.items()
    }
    limit = config.server.max_body_bytes
    counters: dict[tuple[str, str], Any] = {}

    def count(dispensary: str, outcome: str) -> None:
        # the labelled child, found once: labels() costs more than the rest of the count
        child = counters.get((dispensary, outcome))
        if child is None:
            child = counters[(dispensary, outcome)] = metrics.events.labels(dispensary, outcome)
        child.inc()

    body_schema = webhook_body_schema()
    schemas = body_schema.pop("$defs", {})

    async def quarantine(
        dispensary: str, status: int, reason: str, content_type: str | None, body: bytes
    ) -> None:
        count(dispensary, f"rejected_{status}")
        try:
            await service.committer.submit(Rejected(dispensary, status, reason, content_type, body))
        except StoreUnavailable:
            log.error("quarantine_failed", dispensary=dispensary, status_code=status)

    @app.post(
        "/webhooks/treez/{dispensary}",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            },
        },
        responses={
            200: {"description": "Treez's test ping"},
            202: {"description": "Stored; it will be applied"},
            400: {"description": "Not JSON"},
            401: {"description": "No bearer token"},
            403: {"description": "Wrong token, or a body naming another dispensary"},
            404: {"description": "Unknown dispensary"},
            413: {"description": "Body too large"},
            415: {"description": "Not application/json"},
            422: {"description": "Not a CUSTOMER event of the expected shape (quarantined)"},
            503: {"description": "The store cannot take the event now; retry"},
        },
    )
    async def receive_webhook(dispensary: str, request: Request) -> Response:
        """Receive a Treez webhook for one dispensary."""
        started = time.perf_counter()
        service.webhook_started()
        try:
            response, customer_id, outcome = await _receive(dispensary, request)
        finally:
            service.webhook_finished()
        # An accepted event is recorded in the inbox (with its arrival time) and counted in
        # /metrics; its log line is debug, for at hundreds a second the line cost a quarter
        # of the receiver's CPU. Every other answer (refused, unavailable, ping) stays info.
        level = logging.DEBUG if response.status_code == 202 else logging.INFO
        if _levels.isEnabledFor(level):
            log.log(
                level, "webhook", dispensary=dispensary, status_code=response.status_code,
                outcome=outcome, customer_id=customer_id,
                duration_ms=round((time.perf_counter() - started) * 1e3, 2),
            )  # fmt: skip
        return response

    async def _receive(dispensary: str, request: Request) -> tuple[Response, str | None, str]:
        known = tokens.get(dispensary)
        if known is None:
            count("unknown", "rejected_404")
            return (
                _error(404, "unknown_dispensary", "no such dispensary is configured"),
                None,
                "unknown",
            )
        token, content_type = _auth_and_type(request)
        if token is None:
            count(dispensary, "rejected_401")
            return (
                _error(401, "unauthorized", "send the webhook token as Authorization: Bearer",
                       {"www-authenticate": "Bearer"}),
                None, "unauthorized",
            )  # fmt: skip
        given = token.encode()
        for candidate in known:  # each compared in constant time
            if hmac.compare_digest(given, candidate):
                break
        else:
            count(dispensary, "rejected_403")
            return _error(403, "forbidden", "the token is not this dispensary's"), None, "forbidden"
        body, too_large = await _read_limited(request, limit)
        if too_large:
            reason = f"body larger than {limit} bytes (the first {limit} are kept)"
            await quarantine(dispensary, 413, reason, content_type, body)
            return _error(413, "too_large", reason), None, "rejected"
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            reason = f"content type must be application/json, not {media or 'missing'}"
            await quarantine(dispensary, 415, reason, content_type, body)
            return _error(415, "unsupported_media_type", reason), None, "rejected"
        try:
            # what is stored is exactly what was parsed: UTF-8 text (RFC 8259), a leading
            # byte-order mark dropped
            text = body.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            reason = "body: is not JSON (not UTF-8 text)"
            await quarantine(dispensary, 400, reason, content_type, body)
            return _error(400, "not_json", reason), None, "rejected"
        try:
            event = check_event_json(text, source="body")
        except NotJsonError as exc:
            reason = "; ".join(str(p) for p in exc.problems)
            await quarantine(dispensary, 400, reason, content_type, body)
            return _error(400, "not_json", reason), None, "rejected"
        except EventValidationError as exc:
            reason = "; ".join(str(p) for p in exc.problems)
            await quarantine(dispensary, 422, reason, content_type, body)
            return (
                JSONResponse(
                    {"error": "invalid_event", "detail": reason,
                     "problems": [{"field": p.where, "problem": p.what} for p in exc.problems]},
                    status_code=422,
                ),
                None, "rejected",
            )  # fmt: skip
        named = event.dispensary_short_name
        if named is not None and named != dispensary:
            reason = f"the body names dispensary {named!r}, not {dispensary!r}"
            await quarantine(dispensary, 403, reason, content_type, body)
            return _error(403, "wrong_dispensary", reason), None, "rejected"
        if event.kind == "test":
            count(dispensary, "ping")
            return JSONResponse({"status": "ok", "test": True}, status_code=200), None, "ping"
        if isinstance(event, OtherEvent):
            item = NewEvent(dispensary, "webhook", event.event_type, None, None, text, "ignored")
            outcome = "ignored"
            customer_id = None
        else:
            customer_id = event.customer_id
            item = NewEvent(
                dispensary, "webhook", "CUSTOMER", customer_id, instant_us(event.last_update), text
            )
            outcome = "accepted"
        try:
            await service.committer.submit(item)
        except StoreUnavailable:
            count(dispensary, "unavailable")
            return (
                _error(503, "store_unavailable", "the event could not be stored; retry",
                       {"retry-after": str(RETRY_AFTER_SECONDS)}),
                customer_id, "unavailable",
            )  # fmt: skip
        count(dispensary, outcome)
        return _Answer(outcome), customer_id, outcome

    app.add_middleware(WebhookFastPath, handler=receive_webhook)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = await service.readiness()
        if problems:
            return JSONResponse({"status": "not_ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        try:
            stats = await service.astore.call(service.astore.store.queue_stats)
        except StoreUnavailable:
            stats = []
        return Response(
            metrics.render(
                stats,
                service.destination_keys,
                service.child.status.families if service.child is not None else (),
            ),
            media_type="text/plain; version=0.0.4",
        )

    return app
