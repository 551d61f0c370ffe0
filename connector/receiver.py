"""The webhook receiver (contract 1): answers within milliseconds, and only after the event is
durably stored.

Requests hand their event to a :class:`GroupCommitter`, which commits whatever has arrived
meanwhile in one transaction and then answers all of them: ``synchronous=FULL`` durability at
the cost of one fsync per batch rather than per request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from connector.errors import EventValidationError, StoreUnavailable
from connector.logs import get_logger
from connector.planner import instant_us
from connector.store import AsyncStore, NewEvent, Rejected
from connector.treez import (
    CustomerEvent,
    NotJsonError,
    OtherEvent,
    parse_event_json,
    webhook_body_schema,
)

if TYPE_CHECKING:
    from connector.service import Service

log = get_logger("connector.receiver")
RETRY_AFTER_SECONDS = 5


class GroupCommitter:
    """Commits received events in batches; each caller waits for its own batch's commit."""

    def __init__(self, astore: AsyncStore, *, max_batch: int = 512) -> None:
        self.astore = astore
        self.max_batch = max_batch
        self._queue: list[tuple[NewEvent | Rejected, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self.on_commit: list[Callable[[], None]] = []  # run after each commit of events

    async def submit(self, item: NewEvent | Rejected) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._wake.set()
        await future

    async def run(self, stopping: asyncio.Event) -> None:
        while True:
            if not self._queue:
                if stopping.is_set():
                    return
                self._wake.clear()
                waits = [asyncio.ensure_future(self._wake.wait()),
                         asyncio.ensure_future(stopping.wait())]  # fmt: skip
                _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                continue
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            events = [item for item, _ in batch if isinstance(item, NewEvent)]
            rejected = [item for item, _ in batch if isinstance(item, Rejected)]
            try:
                await self.astore.call(self.astore.store.add_events, events, rejected)
            except Exception as exc:  # every waiter learns of it; none is told "stored"
                error = (
                    exc
                    if isinstance(exc, StoreUnavailable)
                    else StoreUnavailable(f"the store failed ({exc.__class__.__name__})")
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            if events:
                for callback in self.on_commit:
                    callback()


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def _read_limited(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body and False; or, once it grows past ``limit`` bytes, its first ``limit`` bytes
    and True (kept in quarantine; the rest is never read)."""
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


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
    body_schema = webhook_body_schema()
    schemas = body_schema.pop("$defs", {})

    async def quarantine(
        dispensary: str, status: int, reason: str, content_type: str | None, body: bytes
    ) -> None:
        metrics.events.labels(dispensary, f"rejected_{status}").inc()
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
        service.pressure.enter()
        try:
            response, customer_id, outcome = await _receive(dispensary, request)
        finally:
            service.pressure.leave()
        # An accepted event is recorded in the inbox (with its arrival time) and counted in
        # /metrics; its log line is debug, for at hundreds a second the line cost a quarter
        # of the receiver's CPU. Every other answer (refused, unavailable, ping) stays info.
        level = logging.DEBUG if response.status_code == 202 else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level, "webhook", dispensary=dispensary, status_code=response.status_code,
                outcome=outcome, customer_id=customer_id,
                duration_ms=round((time.perf_counter() - started) * 1e3, 2),
            )  # fmt: skip
        return response

    async def _receive(dispensary: str, request: Request) -> tuple[Response, str | None, str]:
        known = tokens.get(dispensary)
        if known is None:
            metrics.events.labels("unknown", "rejected_404").inc()
            return (
                _error(404, "unknown_dispensary", "no such dispensary is configured"),
                None,
                "unknown",
            )
        token = _bearer(request)
        if token is None:
            metrics.events.labels(dispensary, "rejected_401").inc()
            return (
                _error(401, "unauthorized", "send the webhook token as Authorization: Bearer",
                       {"www-authenticate": "Bearer"}),
                None, "unauthorized",
            )  # fmt: skip
        given = token.encode()
        if not any(hmac.compare_digest(given, t) for t in known):
            metrics.events.labels(dispensary, "rejected_403").inc()
            return _error(403, "forbidden", "the token is not this dispensary's"), None, "forbidden"
        content_type = request.headers.get("content-type")
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
            event = parse_event_json(text, source="body")
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
            metrics.events.labels(dispensary, "ping").inc()
            return JSONResponse({"status": "ok", "test": True}, status_code=200), None, "ping"
        if isinstance(event, OtherEvent):
            item = NewEvent(dispensary, "webhook", event.event_type, None, None, text, "ignored")
            outcome = "ignored"
            customer_id = None
        else:
            assert isinstance(event, CustomerEvent)
            customer = event.customer
            customer_id = customer.customer_id
            item = NewEvent(
                dispensary, "webhook", "CUSTOMER", customer_id,
                instant_us(customer.last_update), text,
            )  # fmt: skip
            outcome = "accepted"
        try:
            await service.committer.submit(item)
        except StoreUnavailable:
            metrics.events.labels(dispensary, "unavailable").inc()
            return (
                _error(503, "store_unavailable", "the event could not be stored; retry",
                       {"retry-after": str(RETRY_AFTER_SECONDS)}),
                customer_id, "unavailable",
            )  # fmt: skip
        metrics.events.labels(dispensary, outcome).inc()
        return JSONResponse({"status": outcome}, status_code=202), customer_id, outcome

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
