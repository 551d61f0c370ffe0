"""The webhook receiver (contract 1): answers within milliseconds, and only after the event is
durably stored.

The receiver runs on a few narrow ports (:class:`ReceiverPorts`), not on the whole running
connector: an :class:`~connector.intake.Intake` that stores a body (the group committer of
:mod:`connector.intake`), the load count that lets planning step aside, readiness, and the
metrics text. :class:`connector.service.Service` provides them; this module never imports it.
"""

from __future__ import annotations

import copy
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from connector.errors import EventValidationError, StoreUnavailable
from connector.logs import get_logger
from connector.planner import instant_us
from connector.store import NewEvent, Rejected
from connector.treez import (
    NotJsonError,
    OtherEvent,
    check_event_json,
    webhook_body_schema,
)

if TYPE_CHECKING:
    from connector.config import Config
    from connector.intake import Intake
    from connector.metrics import Metrics

log = get_logger("connector.receiver")
# the level check on the standard logger behind ``log``: it caches its answer, where asking
# structlog's lazy proxy builds a bound logger each time (5 % of a webhook's CPU)
_levels = logging.getLogger("connector.receiver")
RETRY_AFTER_SECONDS = 5


class ReceiverPorts(Protocol):
    """What the receiver needs of the process it runs in."""

    @property
    def config(self) -> Config:
        """The dispensaries' webhook tokens and the body limit."""
        ...

    @property
    def metrics(self) -> Metrics:
        """Where webhooks are counted."""
        ...

    @property
    def committer(self) -> Intake:
        """Stores a received body (or a refused one, in quarantine) durably."""
        ...

    def lifespan(self, app: Any) -> AbstractAsyncContextManager[None]:
        """Starts and stops whatever runs beside the receiver (the ASGI lifespan)."""
        ...

    def webhook_started(self) -> None:
        """A webhook is being answered (planning and delivery step aside when saturated)."""
        ...

    def webhook_finished(self) -> None: ...

    async def readiness(self) -> list[str]:
        """What keeps this replica from taking webhooks; empty when it can."""
        ...

    async def metrics_text(self) -> bytes:
        """The Prometheus text exposition of this replica (queue gauges: the cluster's)."""
        ...


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


def _unavailable() -> Response:
    retry = {"retry-after": str(RETRY_AFTER_SECONDS)}
    return _error(503, "store_unavailable", "the event could not be stored; retry", retry)


def _webhook_headers(
    request: Request,
) -> tuple[str | None, str | None, list[str], int | None]:
    """The bearer token, the content type and the codings the receiver does not decode, in
    one pass over the raw headers (ASGI servers give their names in lower case); the first
    token and content type count, as in Starlette. A coding is a ``Content-Encoding`` other
    than identity, or a ``Transfer-Encoding`` other than chunked (the server has undone
    chunked; nothing here undoes gzip or any other). Last, the declared Content-Length of a
    request that waits for ``100 Continue`` before it sends its body (else None)."""
    authorization = content_type = None
    codings: list[str] = []
    expects_continue = False
    length = b""
    for name, value in request.scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"content-type":
            if content_type is None:
                content_type = value.decode("latin-1")
        elif name == b"content-encoding":
            codings += _codings(value, b"identity")
        elif name == b"transfer-encoding":
            codings += _codings(value, b"chunked")
        elif name == b"expect":
            # any Expect header asking for it counts, as the server answers any of them
            expects_continue = expects_continue or value.strip().lower() == b"100-continue"
        elif name == b"content-length":
            length = value
    declared = int(length) if expects_continue and length.strip().isdigit() else None
    return _bearer(authorization), content_type, codings, declared


def _codings(value: bytes, understood: bytes) -> list[str]:
    """The codings listed in a header ``value`` other than ``understood``, each cut short and
    in ASCII (they are repeated in the answer and the quarantine)."""
    return [
        coding[:40].decode("ascii", "replace")
        for part in value.split(b",")
        if (coding := part.strip().lower()) and coding != understood
    ]


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


class WebhookTokens:
    """Each dispensary's accepted webhook tokens, encoded once. ``replace`` swaps the whole
    table in one assignment (a configuration reload): a request sees the old table or the
    new one, never a mix. Its repr names dispensaries and counts, never a token."""

    def __init__(self, config: Config) -> None:
        self._table = self._of(config)

    @staticmethod
    def _of(config: Config) -> dict[str, list[bytes]]:
        return {
            name: [t.get_secret_value().encode() for t in disp.webhook_token]
            for name, disp in config.dispensaries.items()
        }

    def replace(self, config: Config) -> None:
        self._table = self._of(config)

    def get(self, dispensary: str) -> list[bytes] | None:
        return self._table.get(dispensary)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}: {len(ts)}" for name, ts in sorted(self._table.items()))
        return f"WebhookTokens({counts})"


class WebhookFastPath:
    """``POST /webhooks/treez/{dispensary}`` (or ``.../{dispensary}/``: the app makes no
    redirects) straight to its handler, in front of the app's whole middleware stack
    (:func:`add_fast_path`): past Starlette's error, telemetry and body-limit middleware,
    FastAPI's router, exception middleware and dependency solving. Each layer costs its call
    and, while the handler waits for its commit, the suspension and resumption of its frame.
    The route stays declared in FastAPI for the OpenAPI document, and every other request
    goes through FastAPI. An exception from the handler reaches the server, which answers
    500 (or closes, once an answer began) and logs it: what Starlette's error middleware
    would do before raising it again to the server."""

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
                # one trailing slash is the same path: answered alike, never redirected
                dispensary = path[len(self.prefix) :].removesuffix("/")
                if dispensary and "/" not in dispensary:
                    response = await self.handler(dispensary, Request(scope, receive))
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def add_fast_path(
    app: FastAPI,
    handler: Callable[[str, Request], Awaitable[Response]],
    prefix: str = WEBHOOK_PREFIX,
) -> None:
    """Put a :class:`WebhookFastPath` for ``prefix`` in front of ``app``'s middleware stack,
    outside every middleware (``add_middleware`` would put it inside Starlette's own); and
    note it for :func:`serving_app`, which puts it in front of the app itself."""
    build = app.build_middleware_stack

    def build_with_fast_path() -> ASGIApp:
        return WebhookFastPath(build(), handler=handler, prefix=prefix)

    app.build_middleware_stack = build_with_fast_path  # type: ignore[method-assign]
    app.middleware_stack = None  # built again at the next request
    app.state.fast_paths = [*getattr(app.state, "fast_paths", ()), (prefix, handler)]


def serving_app(app: Any) -> Any:
    """What the server runs for ``app``: its fast paths (:func:`add_fast_path`) in front of
    the app itself, so that a webhook also skips FastAPI's and Starlette's own calls (each a
    frame, resumed again at each await: what they do, the app's root path and
    ``scope["app"]``, no fast path reads). Every other request, and the lifespan, goes to
    ``app`` as before; an app without fast paths is returned as it is."""
    state = getattr(app, "state", None)
    served = app
    for prefix, handler in getattr(state, "fast_paths", ()):
        served = WebhookFastPath(served, handler=handler, prefix=prefix)
    return served


# --- the OpenAPI document: every answer, its media type and body (contract 1) ---


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
        **extra,
    }


def _text(*names: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, **({"enum": list(names)} if names else {})}


_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "description": "Every refusal: a code for programs, a sentence for people",
        "properties": {"error": _text(), "detail": {"type": "string"}},
        "required": ["error", "detail"],
        "additionalProperties": False,
    },
    "InvalidEvent": {
        "type": "object",
        "properties": {
            "error": _text("invalid_event"),
            "detail": {"type": "string"},
            "problems": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
                    "required": ["field", "problem"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["error", "detail", "problems"],
        "additionalProperties": False,
    },
    "Stored": {
        "type": "object",
        "properties": {"status": _text("accepted", "ignored")},
        "required": ["status"],
        "additionalProperties": False,
    },
    "Ping": {
        "type": "object",
        "properties": {"status": _text("ok"), "test": {"type": "boolean", "enum": [True]}},
        "required": ["status", "test"],
        "additionalProperties": False,
    },
    "Healthy": {
        "type": "object",
        "properties": {"status": _text("ok")},
        "required": ["status"],
        "additionalProperties": False,
    },
    "Ready": {
        "type": "object",
        "properties": {"status": _text("ready")},
        "required": ["status"],
        "additionalProperties": False,
    },
    "NotReady": {
        "type": "object",
        "properties": {
            "status": _text("not_ready"),
            "problems": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        },
        "required": ["status", "problems"],
        "additionalProperties": False,
    },
}
# Treez's event types are read case-insensitively, surrounding spaces ignored (treez.parse_event)
_CUSTOMER_TYPE = r"^\s*[Cc][Uu][Ss][Tt][Oo][Mm][Ee][Rr]\s*$"


def _body_schemas() -> dict[str, Any]:
    """What a webhook body may be: a CUSTOMER event (its customer as the model reads it), an
    event of another type (stored as ignored), or the portal's test ping (any object with a
    ``test`` key; answered 200)."""
    customer = webhook_body_schema()
    schemas: dict[str, Any] = customer.pop("$defs", {})
    customer["properties"]["event_type"] = {"type": "string", "pattern": _CUSTOMER_TYPE}
    customer["title"] = "CustomerEvent"
    schemas["CustomerEvent"] = customer
    schemas["OtherEvent"] = {
        "type": "object",
        "title": "OtherEvent",
        "properties": {
            "event_type": {"type": "string", "minLength": 1, "not": {"pattern": _CUSTOMER_TYPE}},
            "dispensary_short_name": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["event_type"],
    }
    schemas["TestPing"] = {
        "type": "object",
        "title": "TestPing",
        "required": ["test"],
    }
    return schemas


_SECURITY = {"webhookToken": {"type": "http", "scheme": "bearer"}}

_WEBHOOK_RESPONSES: dict[str, dict[str, Any]] = {
    "200": _json("Treez's test ping (a body with a `test` key): not stored", "Ping"),
    "202": _json("Stored durably (`accepted`; another event type: `ignored`)", "Stored"),
    "400": _json(
        "Not JSON (not UTF-8 text, not JSON we read, or NaN or Infinity as a number; each"
        " place named): quarantined",
        "Error",
    ),
    "401": _json(
        "No bearer token",
        "Error",
        headers={"WWW-Authenticate": {"schema": {"type": "string", "enum": ["Bearer"]}}},
    ),
    "403": _json(
        "A token that is not this dispensary's, or a body naming another dispensary (quarantined)",
        "Error",
    ),
    "404": _json("No such dispensary is configured", "Error"),
    "413": _json("The body is larger than `server.max_body_bytes`: quarantined", "Error"),
    "415": _json(
        "Not `application/json`, or sent with a coding the receiver does not decode"
        " (a `Content-Encoding` other than identity, a `Transfer-Encoding` other than"
        " chunked): quarantined",
        "Error",
    ),
    "422": _json(
        "JSON, but not an event of the expected shape (each problem named): quarantined",
        "InvalidEvent",
    ),
    "503": _json(
        "The store cannot take the event now: retry after the seconds said",
        "Error",
        headers={
            "Retry-After": {
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            }
        },
    ),
}
_GET_RESPONSES: dict[str, dict[str, dict[str, Any]]] = {
    "/healthz": {"200": _json("The process answers", "Healthy")},
    "/readyz": {
        "200": _json("This replica takes webhooks", "Ready"),
        "503": _json("What keeps this replica from taking webhooks", "NotReady"),
    },
    "/metrics": {
        "200": {
            "description": "The Prometheus text exposition of this replica",
            "content": {"text/plain; version=0.0.4": {"schema": {"type": "string"}}},
        }
    },
}


def _document(app: FastAPI, body_schemas: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document: FastAPI's paths, with each operation's answers as this module
    gives them (FastAPI would declare a validation error no request here can get, and
    JSON for the Prometheus text)."""
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    paths = document["paths"]
    webhook = paths["/webhooks/treez/{dispensary}"]["post"]
    webhook["responses"] = copy.deepcopy(_WEBHOOK_RESPONSES)
    webhook["security"] = [{"webhookToken": []}]
    for path, responses in _GET_RESPONSES.items():
        paths[path]["get"]["responses"] = copy.deepcopy(responses)
    document["components"] = copy.deepcopy(
        {"schemas": {**body_schemas, **_SCHEMAS}, "securitySchemes": _SECURITY}
    )
    return document


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own refusals (an unknown path, a method a path does not take) in the JSON
    error body of every other refusal, their headers (``Allow``) kept."""
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_ERRORS.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


def create_app(service: ReceiverPorts) -> FastAPI:
    """The ASGI app of one running connector, on the ports ``service`` provides."""
    app = FastAPI(
        title="Treez connector",
        version="0.1.0",
        lifespan=service.lifespan,
        docs_url=None,
        redoc_url=None,
        # no redirects: ".../{dispensary}/" is answered as the path without the slash (the
        # fast path), any other path with a slash added or taken away is a 404
        redirect_slashes=False,
        # FastAPI's own OpenTelemetry hooks: off. /metrics is the connector's account, and
        # their exception logs could carry what a customer sent. Off, each request skips
        # three provider look-ups in os.environ (6% of the receiver's CPU, py-spy).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    config = service.config
    metrics = service.metrics
    # the webhook tokens, replaceable while serving (app.state.webhook_tokens.replace)
    tokens = app.state.webhook_tokens = WebhookTokens(config)
    limit = config.server.max_body_bytes
    counters: dict[tuple[str, str], Any] = {}
    webhook_seen = metrics.webhook_seen

    def count(dispensary: str, outcome: str) -> None:
        # the labelled child, found once: labels() costs more than the rest of the count
        child = counters.get((dispensary, outcome))
        if child is None:
            child = counters[(dispensary, outcome)] = metrics.events.labels(dispensary, outcome)
        child.inc()

    schemas = _body_schemas()
    body_schema = {"anyOf": [_ref("CustomerEvent"), _ref("OtherEvent"), _ref("TestPing")]}

    async def quarantine(
        dispensary: str, status: int, reason: str, content_type: str | None, body: bytes
    ) -> None:
        # A refused body that cannot be kept is not refused yet: StoreUnavailable reaches
        # receive_webhook, which answers 503 with Retry-After, so Treez sends it again (a
        # 4xx would end its retries, and the body would be lost). The committer logs the
        # store's fault once, not once per body.
        await service.committer.submit(Rejected(dispensary, status, reason, content_type, body))
        count(dispensary, f"rejected_{status}")

    @app.post(
        "/webhooks/treez/{dispensary}",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            },
        },
    )
    async def receive_webhook(dispensary: str, request: Request) -> Response:
        """Receive a Treez webhook for one dispensary."""
        started = time.perf_counter()
        service.webhook_started()
        try:
            response, customer_id, outcome = await _receive(dispensary, request)
        except StoreUnavailable:  # a refused body could not be kept in quarantine
            count(dispensary, "unavailable")
            response, customer_id, outcome = _unavailable(), None, "unavailable"
        finally:
            service.webhook_finished()
        # An accepted event is recorded in the inbox (with its arrival time) and counted in
        # /metrics; its log line is debug, for at hundreds a second the line cost a quarter
        # of the receiver's CPU. Every other answer (refused, unavailable, ping) stays info.
        level = logging.DEBUG if response.status_code == 202 else logging.INFO
        if _levels.isEnabledFor(level):
            log.log(
                level,
                "webhook",
                dispensary=dispensary,
                status_code=response.status_code,
                outcome=outcome,
                customer_id=customer_id,
                duration_ms=round((time.perf_counter() - started) * 1e3, 2),
            )
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
        token, content_type, codings, declared = _webhook_headers(request)
        if token is None:
            count(dispensary, "rejected_401")
            return (
                _error(
                    401,
                    "unauthorized",
                    "send the webhook token as Authorization: Bearer",
                    {"www-authenticate": "Bearer"},
                ),
                None,
                "unauthorized",
            )
        given = token.encode()
        for candidate in known:  # each compared in constant time
            if hmac.compare_digest(given, candidate):
                break
        else:
            count(dispensary, "rejected_403")
            return _error(403, "forbidden", "the token is not this dispensary's"), None, "forbidden"
        if declared is not None and declared > limit:
            # refused before the body is asked for: the server sends "100 Continue" at the
            # first read, which would invite the whole oversized body. The connection closes:
            # the body the head announced never comes.
            reason = (
                f"body declared as {declared} bytes (Content-Length, Expect: 100-continue), "
                f"larger than {limit}: not read"
            )
            await quarantine(dispensary, 413, reason, content_type, b"")
            return (_error(413, "too_large", reason, {"connection": "close"}), None, "rejected")
        body, too_large = await _read_limited(request, limit)
        if too_large:
            reason = f"body larger than {limit} bytes (the first {limit} are kept)"
            await quarantine(dispensary, 413, reason, content_type, body)
            return _error(413, "too_large", reason), None, "rejected"
        if codings:
            reason = (
                f"the body is sent with coding {', '.join(codings)}, which the receiver does"
                " not decode: send it unencoded (Content-Encoding identity, Transfer-Encoding"
                " chunked or none)"
            )
            await quarantine(dispensary, 415, reason, content_type, body)
            return _error(415, "unsupported_encoding", reason), None, "rejected"
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
                    {
                        "error": "invalid_event",
                        "detail": reason,
                        "problems": [{"field": p.where, "problem": p.what} for p in exc.problems],
                    },
                    status_code=422,
                ),
                None,
                "rejected",
            )
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
            return _unavailable(), customer_id, "unavailable"
        count(dispensary, outcome)
        webhook_seen[dispensary] = time.time()  # connector_last_webhook_timestamp_seconds
        return _Answer(outcome), customer_id, outcome

    add_fast_path(app, receive_webhook)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, schemas)
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

    # HEAD, as some load balancers check health: the same status, no body (the server sends
    # none for HEAD). Left out of the OpenAPI document, which describes the GETs.
    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(await service.metrics_text(), media_type="text/plain; version=0.0.4")

    return app
