"""The operator's web console: overview, dead letters, quarantine, conflicts, one customer's
story and the audit log, server-rendered (Jinja2) on a listener of its own.

Security model, in the order a request meets it:

- the listener: ``console.host`` (loopback by default), never the webhook port;
- sign-in with the shared ``console.token`` (compared in constant time; failures audited and
  braked per client address) into a random session id kept in this process's memory, sent
  back as an ``HttpOnly; SameSite=Strict`` cookie (``Secure`` over https), idle-expired;
- every POST checks the session's CSRF token and, when the browser names one, the Origin;
- every action and every reveal of customer values is written to the store's audit log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from connector.config import Config
from connector.console._web import Form, Web, action
from connector.console.auth import (
    SESSION_COOKIE,
    Session,
    Sessions,
    same_origin,
    token_matches,
    who,
)
from connector.console.pages import routes
from connector.logs import get_logger
from connector.store import is_store_failure
from connector.store.abc import Store

log = get_logger("connector.console")

FAILED_SIGN_IN_DELAY = 1.0  # seconds every refused sign-in waits before its answer

__all__ = ["create_console_app"]


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def create_console_app(
    store: Store, config: Config, *, failed_sign_in_delay: float = FAILED_SIGN_IN_DELAY
) -> Starlette:
    """The console's ASGI app over ``store`` (the whole cluster's), for ``config``'s console
    section (which must be on: its token is the sign-in)."""
    console = config.console
    if console is None or not console.enabled:
        raise ValueError("the console is off: console.token is not set")
    token = console.token
    web = Web(store, config, Sessions(console.session_idle_hours * 3600))

    async def login_page(request: Request) -> Response:
        if web.session(request) is not None:
            return RedirectResponse("/", status_code=303)
        return web.render(request, "login.html", None)

    async def login(request: Request) -> Response:
        client = _client(request)
        form = await web.form(request)
        host = request.headers.get("host", "")
        if not same_origin(
            request.headers.get("origin"), request.headers.get("referer"), request.url.scheme, host
        ):
            return web.render(
                request,
                "login.html",
                None,
                403,
                error="Refused: not sent from this console's sign-in page.",
            )
        given = (form.get("token") or [""])[0]
        right = bool(given) and token_matches(given, token)
        wait = web.brake.wait_for(client)
        if wait > 0 and not right:
            # the right token always signs in (a stranger's guesses must not lock the
            # operator out); a wrong one waits, unchecked against the audit log (a flood of
            # refusals must not push the operator's actions off its page): a log line
            log.warning("console_sign_in_braked", client=client, wait_s=round(wait, 1))
            response = web.render(
                request,
                "login.html",
                None,
                429,
                error=f"Too many failed sign-ins from your address: try again in {wait:.0f} s.",
            )
            response.headers["retry-after"] = str(max(1, round(wait)))
            return response
        if not right:
            web.brake.failed(client)
            await web.audit(who(None, client), "sign_in", "console", "refused: wrong token")
            await asyncio.sleep(failed_sign_in_delay)
            return web.render(request, "login.html", None, 403, error="That token is not right.")
        web.brake.succeeded(client)
        session = web.sessions.create(client)
        await web.audit(session.who, "sign_in", "console", "ok")
        signed_in = RedirectResponse("/", status_code=303)
        signed_in.set_cookie(
            SESSION_COOKIE,
            session.id,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return signed_in

    @action(web)
    async def logout(request: Request, session: Session, form: Form) -> Response:
        web.sessions.end(session.id)
        await web.audit(session.who, "sign_out", "console")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def not_found(request: Request, _exc: Exception) -> Response:
        session = web.session(request)
        if session is None:
            return RedirectResponse("/login", status_code=303)
        return web.render(request, "missing.html", session, 404, what=request.url.path)

    async def failed(request: Request, exc: Exception) -> Response:
        """Never a traceback: what failed, by its kind (a store that cannot be read, most
        likely), with no value of any row."""
        log.error("console_error", path=request.url.path, error=exc.__class__.__name__)
        store_down = is_store_failure(exc)
        text = (
            "The store cannot be read right now; the connector's log says why. Try again."
            if store_down
            else "Something went wrong; the connector's log says what."
        )
        return HTMLResponse(
            f"<!doctype html><title>Console</title><p>{text}</p>",
            status_code=503 if store_down else 500,
            headers={"cache-control": "no-store", **dict(_TEXT_HEADERS)},
        )

    static = StaticFiles(directory=Path(__file__).parent / "static")
    return Starlette(
        exception_handlers={404: not_found, Exception: failed},
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(LoopbackHost, loopback=console.loopback),
        ],
        routes=[
            Route("/login", login_page),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Mount("/static", static, name="static"),
            *routes(web),
        ],
    )


# no framing (clickjacking), no script or style from elsewhere, no Referer to other sites
_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    ),
    (b"referrer-policy", b"same-origin"),
    (b"x-content-type-options", b"nosniff"),
]


class SecurityHeaders:
    """Adds :data:`_HEADERS` to every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, sending)


_TEXT_HEADERS = [(k.decode(), v.decode()) for k, v in _HEADERS]
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


class LoopbackHost:
    """On a loopback listener, only loopback names in ``Host``: a web page whose own name
    resolves to 127.0.0.1 (DNS rebinding) sends its name, and is refused before anything,
    sign-in included, sees the request."""

    def __init__(self, app: ASGIApp, *, loopback: bool) -> None:
        self.app = app
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.loopback:
            host = ""
            for name, value in scope.get("headers", []):
                if name == b"host":
                    host = value.decode("latin-1").strip().lower()
                    break
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in _LOOPBACK_NAMES:
                response = HTMLResponse(
                    "<!doctype html><title>Console</title><p>Refused: this console answers "
                    "only to localhost, 127.0.0.1 or [::1] (the Host header).</p>",
                    status_code=421,
                    headers=dict(_TEXT_HEADERS),
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
