"""The plumbing every page shares: the signed-in session, forms and their CSRF check,
rendering, and the audit record of an action."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response

from connector.config import Config
from connector.console.auth import (
    CSRF_FIELD,
    SESSION_COOKIE,
    Session,
    Sessions,
    SignInBrake,
    same_origin,
    token_matches,
)
from connector.store.abc import Store

P = ParamSpec("P")
T = TypeVar("T")
FORM_LIMIT = 256 * 1024  # a form of a few thousand ticked ids, not an upload
Form = dict[str, list[str]]


def iso(moment: float | None) -> str:
    if moment is None:
        return ""
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def span(seconds: float) -> str:
    """``42 s``, ``3 min``, ``5 h 10 min``, ``2 d 4 h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86_400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(seconds // 3600, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def when(moment: float | str | None) -> Markup:
    """A time (epoch seconds, or ISO as ``connector explain`` gives it) as UTC ISO and how
    long ago (or ahead) it is."""
    if moment is None or moment == "":
        return Markup("")
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()
    delta = time.time() - moment
    relative = f"{span(delta)} ago" if delta >= 0 else f"in {span(-delta)}"
    return Markup('<time datetime="{0}">{0}</time> <span class="ago">{1}</span>').format(
        iso(moment), relative
    )


class Web:
    """What the handlers share: the store, the configuration, the sessions and the pages."""

    def __init__(self, store: Store, config: Config, sessions: Sessions) -> None:
        self.store = store
        self.config = config
        self.sessions = sessions
        self.brake = SignInBrake()
        self.pages = Environment(
            loader=FileSystemLoader(Path(__file__).parent / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.pages.filters["when"] = when
        self.pages.filters["span"] = span
        self.pages.filters["iso"] = iso

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A store call, off the event loop (the receiver's webhooks share this process)."""
        return await run_in_threadpool(fn, *args, **kwargs)

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status_code: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        flash = list(session.flash) if session is not None else []
        if session is not None:
            session.flash.clear()
        html = self.pages.get_template(template).render(
            request=request,
            session=session,
            csrf=session.csrf if session is not None else "",
            flash=flash,
            path=request.url.path,
            dispensaries=list(self.config.dispensaries),
            destinations=sorted(
                {d.name for disp in self.config.dispensaries.values() for d in disp.destinations}
            ),
            **values,
        )
        response = HTMLResponse(html, status_code=status_code)
        response.headers["cache-control"] = "no-store"  # pages may hold revealed values
        return response

    async def form(self, request: Request) -> Form:
        """A posted form (``application/x-www-form-urlencoded``, what a plain HTML form
        sends); anything else, or a body too large for a form, reads as empty."""
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return {}
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > FORM_LIMIT:
                return {}
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)

    def refused(self, request: Request, session: Session | None, form: Form) -> Response | None:
        """Why a POST is refused (403), or None when it came from a signed-in console page:
        its Origin (or Referer) is the console, and its form carries the session's token."""
        if session is None:
            return RedirectResponse("/login", status_code=303)
        host = request.headers.get("host", "")
        origin, referer = request.headers.get("origin"), request.headers.get("referer")
        if not same_origin(origin, referer, request.url.scheme, host):
            return PlainTextResponse(
                "403: refused: this form was not sent from one of the console's own pages "
                "(its Origin or Referer names another site)",
                status_code=403,
            )
        given = (form.get(CSRF_FIELD) or [""])[0]
        if not given or not token_matches(given, session.csrf):
            return PlainTextResponse(
                "403: refused: the form's CSRF token is missing or out of date; reload the "
                "page and try again",
                status_code=403,
            )
        return None

    async def audit(self, who: str, action: str, target: str, detail: str = "") -> None:
        await self.call(self.store.audit, who, action, target, detail)


def page(
    web: Web,
) -> Callable[
    [Callable[[Request, Session], Awaitable[Response]]], Callable[[Request], Awaitable[Response]]
]:
    """A handler that needs a signed-in session; without one, the sign-in page."""

    def wrap(
        handler: Callable[[Request, Session], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            session = web.session(request)
            if session is None:
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session)

        return handle

    return wrap


def action(
    web: Web,
) -> Callable[
    [Callable[[Request, Session, Form], Awaitable[Response]]],
    Callable[[Request], Awaitable[Response]],
]:
    """A POST handler: signed in, sent from a console page with the session's CSRF token
    (:meth:`Web.refused`); it gets the posted form."""

    def wrap(
        handler: Callable[[Request, Session, Form], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            session = web.session(request)
            form = await web.form(request)
            refused = web.refused(request, session, form)
            if refused is not None:
                return refused
            assert session is not None  # refused() answers a request without one
            return await handler(request, session, form)

        return handle

    return wrap


def first(form: Form, name: str) -> str:
    return (form.get(name) or [""])[0].strip()


MAX_ID = 2**63 - 1  # what a database integer column holds


def as_id(value: str) -> int | None:
    """A row id or HTTP status from a form or a URL: plain ASCII digits within a database
    integer, else None (``'²'`` passes ``isdigit`` and fails ``int``; ``10**30`` overflows)."""
    value = value.strip()
    if not value or not value.isascii() or not value.isdecimal():
        return None
    number = int(value)
    return number if 0 < number <= MAX_ID else None


def ids(form: Form, name: str = "id") -> list[int]:
    """The ticked ids of a form (a value that is not an id is ignored)."""
    return [i for i in (as_id(v) for v in form.get(name, [])) if i is not None]
